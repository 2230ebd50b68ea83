"""The chaos run (tests/chaos.py) at its short size, inside `make test`: writers, two `outbox
run` processes SIGKILLed mid-call and restarted, PostgreSQL stopped and started, a Partnero
outage of every kind, a non-deduplicating fake. `make chaos` runs the full size."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

from tests import chaos
from tests.daemon_helpers import env_for, wait_until


def test_chaos_short_run_loses_duplicates_and_misorders_nothing() -> None:
    figures = chaos.run(chaos.SHORT)
    print(f"\n{figures.line()}")
    histories = [f"{key}: {lines}" for key, lines in figures.histories.items()]
    assert figures.problems() == [], "\n".join([figures.line(), *histories])
    assert figures.kills_in_flight >= 1, "no kill caught a daemon with calls in flight"


def test_outage_request_bound_follows_the_backoff_settings() -> None:
    settings = {
        "max_attempts": "100",
        "retry_base_delay_seconds": "1",
        "retry_max_delay_seconds": "4",
    }
    # Shortest delays (jitter 25 % off): 0.75, 1.5, 3, 3, 3, ...: 1 + 3 retries fit in 5.5 s.
    assert chaos.outage_request_bound(1, 5.5, settings) == 2 * 4
    assert chaos.outage_request_bound(10, 5.5, settings) == 10 * 2 * 4
    assert chaos.outage_request_bound(3, 0.0, settings) == 3 * 2
    # Never more slots than attempts.
    assert chaos.outage_request_bound(1, 1e9, {**settings, "max_attempts": "5"}) == 2 * 5


def test_writers_commit_every_sale_and_refund_exactly_once() -> None:
    keys = [f"k{i}" for i in range(300)]
    refunded = set(keys[::4])
    ops = chaos.writer_ops(keys, refunded, seed=3)
    rows = Counter(row for op in ops for row in op.rows)
    assert rows == Counter([("sale", k) for k in keys] + [("refund", k) for k in refunded])
    # Some refunds commit before their sale (an earlier transaction, or earlier in the same).
    first_seen: dict[tuple[str, str], int] = {}
    for n, op in enumerate(ops):
        for position, row in enumerate(op.rows):
            first_seen.setdefault(row, n * 10 + position)
    early = [k for k in refunded if first_seen[("refund", k)] < first_seen[("sale", k)]]
    assert early


def test_a_daemon_stopped_while_its_database_is_down_exits_cleanly(tmp_path: Path) -> None:
    env = env_for("postgresql://outbox@127.0.0.1:9/shop", "http://127.0.0.1:9", log_level="info")
    log = tmp_path / "daemon.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "outbox.cli", "run"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until(lambda: "outbox.db.retrying" in log.read_text(), what="a connect retry")
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    text = log.read_text()
    assert "outbox.daemon.stopped" in text
    assert (code, "Traceback" in text) == (0, False), text[-1500:]
