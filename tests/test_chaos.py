"""The chaos run (tests/chaos.py) at its short size, inside `make test`: writers of signups,
sales and refunds, two `outbox run` processes SIGKILLed mid-call and restarted, PostgreSQL
stopped and started, a Partnero outage of every kind, a non-deduplicating fake that accepts a
sale only for a customer it knows. `make chaos` runs the full size."""

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
    customers = chaos.assign_customers(keys, seed=3)
    ops = chaos.writer_ops(keys, refunded, seed=3, customers=customers)
    rows = Counter(row for op in ops for row in op.rows)
    signed_up = {c.key for c in customers.values() if c.kind != "no_signup"}
    assert rows == Counter(
        [("sale", k) for k in keys]
        + [("refund", k) for k in refunded]
        + [("signup", c) for c in signed_up]
    )
    # Some refunds commit before their sale (an earlier transaction, or earlier in the same).
    first_seen: dict[tuple[str, str], int] = {}
    for n, op in enumerate(ops):
        for position, row in enumerate(op.rows):
            first_seen.setdefault(row, n * 10 + position)
    early = [k for k in refunded if first_seen[("refund", k)] < first_seen[("sale", k)]]
    assert early


def test_writers_place_each_signup_as_its_customer_says() -> None:
    keys = [f"k{i}" for i in range(300)]
    customers = chaos.assign_customers(keys, seed=5)
    ops = chaos.writer_ops(keys, set(keys[::5]), seed=5, customers=customers)
    first_sale: dict[str, int] = {}
    signup_at: dict[str, int] = {}
    for n, op in enumerate(ops):
        for event_type, key in op.rows:
            if event_type == "sale":
                first_sale.setdefault(customers[key].key, n)
            elif event_type == "signup":
                signup_at[key] = n
    by_name = {c.key: c for c in customers.values()}
    assert set(Counter(c.kind for c in by_name.values())) == {
        "referred",
        "not_referred",
        "invalid_partner",
        "no_signup",
    }
    placed: Counter[str] = Counter()
    for name, customer in by_name.items():
        if customer.kind == "no_signup":
            assert name not in signup_at
            continue
        where = signup_at[name] - first_sale[name]
        expected = {"signup_first": where < 0, "same_transaction": where == 0}
        assert expected.get(customer.placement, where > 0), (customer, where)
        assert customer.late_signup == (customer.placement == "sale_first")
        placed[customer.placement] += 1
    assert min(placed[p] for p in chaos.PLACEMENTS) >= 10, placed
    # A customer buys one to three times, in one writer's keys.
    assert max(Counter(c.key for c in customers.values()).values()) <= 3


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
