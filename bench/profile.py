"""Summaries of a py-spy raw (collapsed-stack) profile: where the sampled CPU time went, by package
(the leaf frame's) and by the outbox and library functions that include it."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^():]+)(?::\d+)?\)$")

# Inclusive time worth naming: the daemon's own steps and the libraries under them.
_WATCH = (
    ("outbox.delivery.claimer", "claim_once"),
    ("outbox.delivery.claimer", "_deliver"),
    ("outbox.delivery.writer", "run_once"),
    ("outbox.delivery.executor", "process"),
    ("outbox.delivery.executor", "_finish"),
    ("outbox.delivery.executor", "_decide"),
    ("outbox.partnero", "create"),
    ("outbox.partnero", "_call"),
    ("outbox.partnero", "build_create_body"),
    ("outbox.delivery.store", "claim"),
    ("outbox.delivery.store", "complete"),
    ("outbox.policy", "decide"),
    ("outbox.service.logs", "__call__"),
    ("structlog", "meth"),
    ("structlog", "PrintLogger.msg"),
)

# Leaf frames that are a thread waiting, not working (py-spy cannot always tell).
_IDLE = {("selectors", "EpollSelector.select"), ("stdlib:concurrent", "_worker")}


def package(path: str) -> str:
    """`httpx` for site-packages/httpx/_client.py, `outbox.delivery.executor`, `asyncio`,
    `stdlib:json`."""
    parts = Path(path).parts
    if "site-packages" in parts:
        rest = parts[parts.index("site-packages") + 1 :]
        return rest[0].removesuffix(".py") if rest else path
    if "outbox" in parts:
        inner = parts[len(parts) - 1 - parts[::-1].index("outbox") :]  # from the last "outbox"
        return ".".join([*inner[:-1], Path(path).stem])
    if "bench" in parts:
        return "bench." + Path(path).stem
    for i, part in enumerate(parts):
        if part.startswith("python3"):
            rest = parts[i + 1 :]
            if not rest:
                break
            name = rest[0].removesuffix(".py")
            return name if name in ("asyncio", "selectors", "ssl", "json") else f"stdlib:{name}"
    return Path(path).name or path


def parse(profile: Path) -> list[tuple[list[tuple[str, str]], int]]:
    stacks = []
    for line in profile.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = []
        for raw in stack.split(";"):
            m = _FRAME.match(raw)
            if m:
                frames.append((m.group("func"), m.group("file")))
        if frames:
            stacks.append((frames, int(count)))
    return stacks


def summarize(profile: Path, top: int = 15) -> dict[str, Any]:
    stacks = parse(profile)
    idle = sum(n for f, n in stacks if (package(f[-1][1]), f[-1][0]) in _IDLE)
    stacks = [(f, n) for f, n in stacks if (package(f[-1][1]), f[-1][0]) not in _IDLE]
    total = sum(n for _, n in stacks)
    if not total:
        return {"samples": 0}
    by_package: Counter[str] = Counter()
    by_function: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for frames, n in stacks:
        func, file = frames[-1]
        by_package[package(file)] += n
        by_function[f"{package(file)}:{func}"] += n
        seen = set()
        for func, file in frames:
            pkg = package(file)
            short = func.rsplit(".", 1)[-1]
            if (pkg, short) in _WATCH or (pkg, func) in _WATCH:
                seen.add(f"{pkg}.{func}")
            if not pkg.startswith(("outbox", "stdlib", "asyncio", "runpy", "click", "bench")):
                seen.add(f"[{pkg}]")
        for name in seen:
            inclusive[name] += n

    def share(counter: Counter[str]) -> list[tuple[str, float]]:
        return [(k, round(100 * v / total, 1)) for k, v in counter.most_common(top)]

    return {
        "samples": total,
        "idle_samples_left_out": idle,
        "self_by_package_pct": share(by_package),
        "self_by_function_pct": share(by_function),
        "inclusive_pct": share(inclusive),
    }
