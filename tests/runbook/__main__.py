"""`make runbook`: follow systemd/README.md in a booted Debian 12 container, check every step.

    python -m tests.runbook [--keep]   (as root; --keep leaves the container running on failure)

Exit status 0 when every block ran and every check passed, 1 otherwise.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.doc_blocks import Block
from tests.runbook import container
from tests.runbook.steps import ROOT, STEPS, Run, runbook_blocks, wait_for

FAKE_KEY = "YOUR-PARTNERO-API-KEY"  # the placeholder the page writes is the key the fake expects


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def fake_partnero() -> Iterator[str]:
    """`outbox fake-partnero` on the host's loopback, which the container shares."""
    port = free_port()
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "outbox"), "fake-partnero", "--port", str(port)],
        env={**os.environ, "PARTNERO_API_KEY": FAKE_KEY},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(f"{url}/_fake/stats", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(up, "the fake Partnero to listen", timeout=30)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def run_block(run: Run, block: Block) -> str:
    """Run one block where it belongs; its output (for the log on failure)."""
    text = block.text
    if "partnero-url" in block.directives:
        text = text.replace(block.directives["partnero-url"], run.fake_url)
    if block.directives.get("where") == "host":
        done = subprocess.run(
            ["/bin/sh", "-ec", text], cwd=ROOT, capture_output=True, text=True, timeout=900
        )
    else:
        done = run.box.exec(text)
    output = (done.stdout + done.stderr).strip()
    if done.returncode != 0:
        raise AssertionError(f"exited {done.returncode}:\n{output}")
    return output


def follow(run: Run, page: list[Block], results: list[tuple[str, float, str]]) -> bool:
    for block in page:
        step = STEPS[str(block.id)]
        started = time.monotonic()
        try:
            if step.before is not None:
                step.before(run)
            run_block(run, block)
            step.after(run)
        except Exception as exc:
            results.append((str(block.id), time.monotonic() - started, f"FAILED at {block.where}"))
            print(f"\n{block.where} ({block.id}) failed: {exc}", file=sys.stderr)
            if not isinstance(exc, AssertionError):
                traceback.print_exc()
            print(run.box.exec("journalctl -n 60 -o short-monotonic --no-pager").stdout)
            return False
        results.append((str(block.id), time.monotonic() - started, "ok"))
    return True


def main() -> int:
    keep = "--keep" in sys.argv[1:]
    if os.geteuid() != 0:
        print("the runbook needs root (debootstrap, systemd-nspawn, mount)", file=sys.stderr)
        return 1
    page = runbook_blocks()
    began = time.monotonic()
    container.host_tools()
    root = container.cached_root()
    prepared = time.monotonic() - began
    box = container.Container(root)
    ok = False
    results: list[tuple[str, float, str]] = []
    notes: list[str] = []
    booted = 0.0
    try:
        box.wait_booted()
        box.trust_the_hosts_network()
        box.setup_shop()
        booted = time.monotonic() - began - prepared
        with fake_partnero() as url:
            run = Run(box=box, fake_url=url, notes=notes)
            ok = follow(run, page, results)
    finally:
        if ok or not keep:
            box.stop()
        else:
            print(f"container kept: nsenter -t {box.pid} -a; root {box.root}", file=sys.stderr)
    total = time.monotonic() - began
    print(f"\nsystemd/README.md followed in a Debian 12 container ({total:.0f} s in all):")
    print(f"  {'cached root':<14} {prepared:6.1f} s  {root}")
    print(f"  {'boot':<14} {booted:6.1f} s")
    for name, seconds, outcome in results:
        print(f"  {name:<14} {seconds:6.1f} s  {outcome}")
    for note in notes:
        print(f"  - {note}")
    print("PASSED" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
