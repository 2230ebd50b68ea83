"""The fenced code blocks of the project's markdown documents, for the tests that run them.

A block is a fence (```` ```lang ````) with its info string's first word as `lang`. The line just
before the fence may hold directives for the tests, invisible in the rendered page:

    <!-- doc-test id=sale-psql skip="needs a Partnero account" -->

parsed as shell words of `key=value`. `skip` says why a block is not run (the page must also say
so in words a reader sees, "not run in CI"); other keys are for the runner that reads the block.
Every runner iterates over all blocks of the languages it runs and fails on one it does not
know, so a block added to a document without a test fails CI instead of going unchecked.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")
_DIRECTIVE = re.compile(r"^\s*<!--\s*doc-test\b(?P<body>.*?)-->\s*$")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    text: str
    directives: dict[str, str] = field(default_factory=dict)

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    @property
    def skip(self) -> str | None:
        return self.directives.get("skip")

    @property
    def id(self) -> str | None:
        return self.directives.get("id")


def _directives(line: str) -> dict[str, str]:
    match = _DIRECTIVE.match(line)
    if match is None:
        return {}
    found: dict[str, str] = {}
    for word in shlex.split(match["body"]):
        key, sep, value = word.partition("=")
        if not sep:
            raise ValueError(f"doc-test directive {word!r} is not key=value")
        found[key] = value
    return found


def blocks(path: Path | str) -> list[Block]:
    """Every fenced block of a markdown file, in order (nested fences are not supported)."""
    path = Path(path)
    if not path.is_absolute():
        path = ROOT / path
    lines = path.read_text(encoding="utf-8").splitlines()
    found: list[Block] = []
    index = 0
    while index < len(lines):
        opening = _FENCE.match(lines[index])
        if opening is None:
            index += 1
            continue
        fence = opening["fence"]
        body: list[str] = []
        end = index + 1
        while end < len(lines) and not lines[end].lstrip().startswith(fence):
            body.append(lines[end])
            end += 1
        if end == len(lines):
            raise ValueError(f"{path}:{index + 1}: unclosed code fence")
        info = opening["info"].strip().split()
        directives = _directives(lines[index - 1]) if index else {}
        found.append(
            Block(
                path=path,
                line=index + 1,
                lang=info[0] if info else "",
                text="\n".join(body) + "\n",
                directives=directives,
            )
        )
        index = end + 1
    return found
