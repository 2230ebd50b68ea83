"""A connection that is not a session of its own (a pooler in transaction or statement mode)
makes `outbox run` and `outbox migrate` refuse at start-up with one line (docs/operations.md,
"PgBouncer and other poolers").

The pooler here is a small proxy in front of the test server (tests/pg_proxy.py) that does what
a pooler does to the daemon: in "transaction mode" a NOTIFY never comes back to the client that
LISTENed (PgBouncer gives the LISTEN's server connection to whoever comes next); in "session
mode" with too few server connections, the daemon's last connection waits in the queue.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import psycopg
import pytest
import sqlalchemy as sa

from outbox import db
from outbox.db.session import PooledConnectionError, check_session
from outbox.dev.fake_partnero import FakeConfig, FakePartneroThread
from tests.daemon_helpers import API_KEY, DaemonThread, insert_sales, make_settings, wait_until
from tests.pg_proxy import PoolerProxy
from tests.test_ops_seed import run_outbox


@pytest.fixture
def pooled_url(database_url: str) -> Iterator[str]:
    with PoolerProxy(database_url) as proxy:
        yield proxy.url()


def test_the_proxy_passes_queries_but_not_notifications(pooled_url: str) -> None:
    with psycopg.connect(db.libpq_url(pooled_url), autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM outbox.events").fetchone() == (0,)


def test_a_direct_connection_is_a_session(database_url: str) -> None:
    check_session(database_url)  # raises if not


def test_a_transaction_pool_is_refused_with_what_to_use_instead(pooled_url: str) -> None:
    with pytest.raises(PooledConnectionError) as refused:
        check_session(pooled_url, notify_timeout=0.5)
    message = str(refused.value)
    assert "a NOTIFY did not come back" in message
    assert "pool_mode = session" in message and "PgBouncer and other poolers" in message


def cli(*args: str, url: str, **extra: str) -> subprocess.CompletedProcess[str]:
    return run_outbox(
        *args, env={"OUTBOX_DATABASE_URL": url, "PARTNERO_API_KEY": "k" * 20, **extra}
    )


@pytest.mark.parametrize("command", [["run"], ["migrate"]])
def test_run_and_migrate_refuse_a_transaction_pool_with_one_line(
    pooled_url: str, command: list[str]
) -> None:
    done = cli(*command, url=pooled_url)
    assert done.returncode == 2, done.stderr
    # The refusal is the last line, and the only one that says "outbox:" (run logs its start).
    lines = done.stderr.strip().splitlines()
    assert [line for line in lines if line.startswith("outbox: ")] == lines[-1:]
    assert lines[-1].startswith("outbox: a NOTIFY did not come back"), lines
    assert "Traceback" not in done.stderr


def test_a_session_pool_too_small_makes_the_daemon_unhealthy_within_seconds_and_says_why(
    engine: sa.Engine, database_url: str
) -> None:
    """A session pool of 3 for a daemon that holds 4 connections (listener, claims, results,
    figures): the last one waits in the pool's queue. Its statements are bounded, so the daemon
    says the database does not answer, and the watchdog and /healthz turn red."""
    config = FakeConfig(api_key=API_KEY, seed=2)
    with (
        PoolerProxy(database_url, drop_notifications=False, pool_size=3) as pool,
        FakePartneroThread(config) as fake,
    ):
        settings = make_settings(pool.url(), fake.url, database_timeout_seconds=1, stall_seconds=2)
        with DaemonThread(settings) as running:
            daemon = running.wait_verified().daemon
            assert daemon is not None
            insert_sales(engine, ["inv_pool1", "inv_pool2"])
            wait_until(lambda: len(fake.ledger()) == 2, what="the sales sent")
            wanted = "results cannot be written: no answer from the database within 1 s"
            wait_until(
                lambda: any(p.startswith(wanted) for p in daemon.health.problems()),
                what="the writer's problem",
            )
            assert "no answer from the database within 1 s" in (daemon.health.last_error or "")
            assert not daemon.healthz()[0]
            assert daemon.watchdog.run_once() is False


@pytest.mark.parametrize(("command", "code"), [(["status"], 3), (["failed"], 1)])
def test_an_operator_command_with_no_answer_ends_with_one_line_instead_of_hanging(
    database_url: str, command: list[str], code: int
) -> None:
    """A statement that gets no answer (a pooler's full queue, or here a lock) is cancelled
    after OUTBOX_DATABASE_TIMEOUT_SECONDS, and the command says so."""
    with psycopg.connect(db.libpq_url(database_url)) as locker:
        locker.execute("LOCK TABLE outbox.events IN ACCESS EXCLUSIVE MODE")
        done = cli(*command, url=database_url, OUTBOX_DATABASE_TIMEOUT_SECONDS="1")
    assert done.returncode == code, done.stderr
    assert done.stderr == (
        "outbox: no answer from the database within 1 s (a pooler's queue full, or a lock "
        "held?); OUTBOX_DATABASE_TIMEOUT_SECONDS sets the bound\n"
    )


def test_an_operator_command_refuses_a_bad_bound(database_url: str) -> None:
    done = cli("status", url=database_url, OUTBOX_DATABASE_TIMEOUT_SECONDS="soon")
    assert (done.returncode, done.stderr) == (
        2,
        "outbox: invalid setting OUTBOX_DATABASE_TIMEOUT_SECONDS: 'soon' is not a number\n",
    )
