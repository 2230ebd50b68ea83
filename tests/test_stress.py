"""Issue 3's end-to-end proof: many writers, a misbehaving non-deduplicating Partnero, and a
daemon killed with SIGKILL and restarted again and again. At the end every row is delivered (or
failed for its stated reason), every sale key has exactly one Partnero transaction, and every
refund's DELETE came after its sale's create.

The suite runs a short version. The full size of the issue (2,000 sales, 500 refunds, 5 kills):

    OUTBOX_STRESS=full make test PYTEST_ARGS="-k stress -s"
"""

from __future__ import annotations

import os
import random
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path

import sqlalchemy as sa

from outbox.fake_partnero import FakeConfig, FakePartneroThread
from tests.daemon_helpers import (
    API_KEY,
    env_for,
    rows,
    scalar,
    sigkill,
    start_cli_daemon,
    stop_cli_daemon,
    wait_until,
)
from tests.helpers import psql_binary

FULL = os.environ.get("OUTBOX_STRESS") == "full"
SALES, REFUNDS, KILLS, WRITERS = (2000, 500, 5, 4) if FULL else (400, 100, 2, 3)


def writer_script(keys: list[str], refunded: set[str], seed: int) -> str:
    """One psql session: each sale in its own transaction; a refund some time after its sale."""
    rng = random.Random(seed)
    lines: list[str] = []
    waiting: list[str] = []
    for n, key in enumerate(keys):
        amount = f"{rng.randint(100, 99999) / 100:.2f}"
        lines.append(f"SELECT outbox.record_sale('{key}', 'cust_{n % 37}', {amount}, 'EUR');")
        if key in refunded:
            waiting.append(key)
        if waiting and rng.random() < 0.3:
            lines.append(f"SELECT outbox.record_refund('{waiting.pop(0)}');")
    lines += [f"SELECT outbox.record_refund('{key}');" for key in waiting]
    return "\n".join(lines) + "\n"


def test_stress_kill_9_restarts_with_faults_lose_and_duplicate_nothing(
    engine: sa.Engine, database_url: str
) -> None:
    keys = [f"ord_{i:05d}" for i in range(SALES)]
    refunded = set(random.Random(1).sample(keys, REFUNDS))
    config = FakeConfig(
        api_key=API_KEY,
        dedupe=False,
        seed=11,
        latency_ms=1,
        fail_5xx_rate=0.03,
        rate_429=0.02,
        retry_after_seconds=0.2,
        drop_before_rate=0.02,
        drop_after_rate=0.02,
    )
    env = env_for(
        database_url,
        "",
        lease_seconds=3,
        request_timeout_seconds=1,
        concurrency=16,
        orphan_refund_grace_seconds=30,
    )
    started = time.monotonic()
    with FakePartneroThread(config) as fake, tempfile.TemporaryDirectory() as scratch:
        env["PARTNERO_API_URL"] = fake.url
        writers = []
        for w in range(WRITERS):
            script = Path(scratch) / f"writer{w}.sql"
            script.write_text(writer_script(keys[w::WRITERS], refunded, seed=w))
            writers.append(
                subprocess.Popen(
                    [
                        psql_binary(),
                        "-X",
                        "-q",
                        "-v",
                        "ON_ERROR_STOP=1",
                        "-d",
                        database_url,
                        "-f",
                        str(script),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
        total = SALES + REFUNDS
        daemon = start_cli_daemon(env)
        try:
            for kill in range(1, KILLS + 1):
                # Let it deliver a slice of the work, then kill it mid-stream and restart.
                target = total * kill // (KILLS + 1)
                wait_until(
                    lambda t=target: (
                        scalar(  # type: ignore[misc]
                            engine, "SELECT count(*) FROM outbox.events WHERE status <> 'pending'"
                        )
                        >= t
                    ),
                    timeout=120,
                    what=f"{target} rows settled before kill {kill}",
                )
                sigkill(daemon)
                daemon = start_cli_daemon(env)
            for proc in writers:
                _, err = proc.communicate(timeout=120)
                assert proc.returncode == 0, err
            wait_until(
                lambda: (
                    scalar(engine, "SELECT count(*) FROM outbox.events WHERE status = 'pending'")
                    == 0
                ),
                timeout=180,
                what="the backlog to settle",
            )
        finally:
            code, stderr = stop_cli_daemon(daemon)
        assert code == 0, stderr[-2000:]
        ledger = fake.ledger()
        log = fake.requests()

    outcomes = dict(
        rows(
            engine,
            "SELECT event_type || ':' || status || ':' || outcome, count(*) "
            "FROM outbox.events GROUP BY 1",
        )
    )
    per_key = Counter(t["key"] for t in ledger)
    duplicated = sum(n - 1 for n in per_key.values() if n > 1)
    lost = SALES - sum(1 for k in keys if per_key[k] >= 1)
    early = [
        t["key"]
        for t in ledger
        if t["deleted_seq"] is not None and t["deleted_seq"] < t["created_seq"]
    ]
    refund_rows = dict(
        rows(
            engine,
            "SELECT outcome, count(*) FROM outbox.events WHERE event_type = 'refund' GROUP BY 1",
        )
    )
    lookups = scalar(engine, "SELECT count(*) FROM outbox.attempts WHERE method = 'GET'")
    faults = Counter(r.get("fault") for r in log if r.get("fault"))
    print(
        f"\nstress: sales={SALES} refunds={REFUNDS} kills={KILLS} writers={WRITERS} "
        f"requests={len(log)} faults={dict(faults)} lookups={lookups} lost={lost} "
        f"duplicated={duplicated} refunds_before_sale={len(early)} outcomes={outcomes} "
        f"seconds={time.monotonic() - started:.1f}"
    )
    assert (lost, duplicated, early) == (0, 0, [])
    assert outcomes == {"sale:delivered:created": SALES, "refund:delivered:deleted": REFUNDS}
    assert refund_rows == {"deleted": REFUNDS}
    assert {t["key"] for t in ledger if t["deleted_seq"] is not None} == refunded
    assert scalar(engine, "SELECT count(*) FROM outbox.events WHERE lease_token IS NOT NULL") == 0
