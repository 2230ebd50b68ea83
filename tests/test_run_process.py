"""`outbox run` as a real process: kill -9 mid-call, SIGTERM, start-up errors, --help."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import sqlalchemy as sa

from outbox.db import migrate
from outbox.dev.fake_partnero import FakePartneroThread
from outbox.service.settings import SPECS
from tests.daemon_helpers import (
    env_for,
    insert_sales,
    rows,
    scalar,
    settled,
    sigkill,
    start_cli_daemon,
    stop_cli_daemon,
    wait_until,
)


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "outbox.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )


def test_kill_9_while_an_applied_create_is_unanswered_then_restart(
    engine: sa.Engine, database_url: str, fake: FakePartneroThread
) -> None:
    fake.configure(hang_after_rate=1.0)  # Partnero applies the create; the answer never comes
    env = env_for(database_url, fake.url, lease_seconds=4, request_timeout_seconds=2.5)
    first = start_cli_daemon(env)
    try:
        insert_sales(engine, ["inv_kill"])
        wait_until(
            lambda: [r for r in fake.requests() if r["status"] == "hung_after"],
            what="the create to be applied and left hanging",
        )
    finally:
        sigkill(first)
    fake.configure(hang_after_rate=0.0)
    lease_expires = scalar(engine, "SELECT lease_expires_at FROM outbox.events")
    assert lease_expires is not None, "the killed daemon's lease should still be on the row"
    second = start_cli_daemon(env)
    try:
        wait_until(lambda: settled(engine, 1), timeout=60)
    finally:
        code, stderr = stop_cli_daemon(second)
    assert code == 0, stderr
    # Exactly one Partnero transaction: the second daemon waited out the lease, looked the key
    # up, found the first daemon's create and did not send another.
    assert [t["key"] for t in fake.ledger()] == ["inv_kill"]
    (attempt,) = rows(engine, "SELECT method, decision, started_at FROM outbox.attempts")
    assert (attempt.method, attempt.decision) == ("GET", "lookup:found")
    assert attempt.started_at >= lease_expires
    assert scalar(engine, "SELECT outcome FROM outbox.events") == "created"


def test_sigterm_lets_calls_finish_and_releases_what_is_left(
    engine: sa.Engine, database_url: str, fake: FakePartneroThread
) -> None:
    fake.configure(latency_ms=200)
    insert_sales(engine, [f"inv_t{i}" for i in range(40)])
    env = env_for(
        database_url, fake.url, concurrency=4, shutdown_grace_seconds=10, log_level="info"
    )
    proc = start_cli_daemon(env)
    wait_until(
        lambda: scalar(engine, "SELECT count(*) FROM outbox.events WHERE status = 'delivered'") >= 4
    )
    code, stderr = stop_cli_daemon(proc)
    assert code == 0, stderr
    events = [json.loads(line)["event"] for line in stderr.splitlines() if line.startswith("{")]
    assert "outbox.daemon.stopping" in events and events[-1] == "outbox.daemon.stopped"
    # Nothing is left leased: finished calls were written, unstarted rows given back.
    assert scalar(engine, "SELECT count(*) FROM outbox.events WHERE lease_token IS NOT NULL") == 0
    assert scalar(engine, "SELECT count(*) FROM outbox.events WHERE lookup_required") == 0
    delivered = scalar(engine, "SELECT count(*) FROM outbox.events WHERE status = 'delivered'")
    assert delivered == len(fake.ledger()) < 40


def test_sigterm_cuts_a_hanging_call_and_marks_the_sale_for_lookup(
    engine: sa.Engine, database_url: str, fake: FakePartneroThread
) -> None:
    fake.configure(hang_after_rate=1.0)
    env = env_for(
        database_url,
        fake.url,
        lease_seconds=30,
        request_timeout_seconds=20,
        shutdown_grace_seconds=0.5,
    )
    proc = start_cli_daemon(env)
    insert_sales(engine, ["inv_cut"])
    wait_until(
        lambda: [r for r in fake.requests() if r["status"] == "hung_after"],
        what="the create to be in flight",
    )
    code, stderr = stop_cli_daemon(proc)
    assert code == 0, stderr
    row = rows(engine, "SELECT status, lease_token, lookup_required FROM outbox.events")[0]
    assert (row.status, row.lease_token, row.lookup_required) == ("pending", None, True)


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        (
            "OUTBOX_LEASE_SECONDS",
            "abc",
            "invalid setting OUTBOX_LEASE_SECONDS (--lease-seconds): 'abc' is not a number",
        ),
        (
            "OUTBOX_CONCURRENCY",
            "0",
            "invalid setting OUTBOX_CONCURRENCY (--concurrency): "
            "'0' is out of range: must be from 1 to 1024",
        ),
        (
            "OUTBOX_DATABASE_URL",
            "mysql://x",
            "invalid setting OUTBOX_DATABASE_URL (--database-url): must start with postgresql:// "
            "(or postgres://, postgresql+psycopg://)",
        ),
        (
            "PARTNERO_API_URL",
            "api.partnero.com",
            "invalid setting PARTNERO_API_URL "
            "(--partnero-api-url): 'api.partnero.com' is "
            "not an http(s) URL",
        ),
        (
            "PARTNERO_API_KEY",
            "",
            "invalid setting PARTNERO_API_KEY: is required (or "
            "--api-key-file, or the systemd credential partnero_api_key)",
        ),
        (
            "OUTBOX_REQUEST_TIMEOUT_SECONDS",
            "60",
            "invalid setting OUTBOX_LEASE_SECONDS "
            "(--lease-seconds): 4 must exceed the request "
            "timeout (60 s) by at least 1 s, so that an "
            "expired lease means no request is still in "
            "flight",
        ),
    ],
)
def test_a_bad_setting_stops_start_up_with_one_line(
    database_url: str, variable: str, value: str, message: str
) -> None:
    env = env_for(database_url, "http://127.0.0.1:9")
    env[variable] = value
    result = run_cli("run", env=env)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"outbox: {message}"]


def test_an_unmigrated_database_is_refused_with_one_line(empty_database_url: str) -> None:
    result = run_cli("run", env=env_for(empty_database_url, "http://127.0.0.1:9"))
    assert result.returncode == 1
    every = ", ".join(f"{m.version}_{m.name}" for m in migrate.available())
    assert result.stderr.splitlines() == [
        f"outbox: the database lacks migration(s) {every}; run `outbox migrate` first"
    ]


def test_run_help_lists_every_setting_with_its_variable() -> None:
    result = run_cli("run", "--help", env=dict(os.environ))
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for spec in SPECS:
        assert spec.flag in text and spec.envvar in text, spec.name
    assert "--api-key " not in text  # never a flag value
