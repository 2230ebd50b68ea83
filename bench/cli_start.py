"""`python -m bench.cli_start [--runs N]`: how long a cold `outbox` command takes to start, and
which imports cost the most. Each run is a fresh process, as an operator's shell starts one."""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

COMMANDS = (("outbox", "--help"), ("outbox", "status", "--help"), ("outbox", "migrate", "--help"))


def outbox_executable() -> str:
    return str(Path(sys.executable).with_name("outbox"))


def time_command(argv: list[str], runs: int) -> list[float]:
    seconds = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True, env={**os.environ, "COLUMNS": "80"})
        seconds.append(time.perf_counter() - started)
    return seconds


def heaviest_imports(module: str, top: int = 8) -> list[tuple[str, float]]:
    """The modules whose import (with what they import) took longest, by `python -X importtime`."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", f"import {module}"],
        check=True,
        capture_output=True,
        text=True,
    )
    found = []
    for line in result.stderr.splitlines():
        parts = line.split("|")
        if len(parts) == 3 and parts[1].strip().isdigit():
            found.append((parts[2].rstrip(), int(parts[1]) / 1_000_000))
    return sorted(found, key=lambda item: -item[1])[:top]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    exe = outbox_executable()
    print(f"{'command':<28} {'min':>8} {'median':>8} {'max':>8}   ({args.runs} cold runs)")
    for command in COMMANDS:
        seconds = time_command([exe, *command[1:]], args.runs)
        print(
            f"{' '.join(command):<28} {min(seconds):8.3f} {statistics.median(seconds):8.3f} "
            f"{max(seconds):8.3f}"
        )
    for module in ("outbox.cli", "outbox.ops.cli"):
        print(f"\nheaviest imports of `import {module}` (cumulative seconds):")
        for name, seconds in heaviest_imports(module):
            print(f"  {seconds:6.3f}  {name.strip()}")


if __name__ == "__main__":
    main()
