"""The doorbell (migration 0003): an INSERT NOTIFYs only while a daemon waits for it, so that
inserting transactions do not commit one at a time behind NOTIFY's lock, and a daemon that arms
it never sleeps past a row that was committed without a NOTIFY."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import psycopg
import pytest
import sqlalchemy as sa

from outbox.db import libpq_url
from outbox.dev.fake_partnero import FakeConfig, FakePartneroThread
from tests.daemon_helpers import (
    API_KEY,
    DaemonThread,
    insert_sales,
    make_settings,
    scalar,
    settled,
    wait_until,
)
from tests.helpers import notifications

SALE = (
    "INSERT INTO outbox.events (event_type, transaction_key, customer_key, amount) "
    "VALUES ('sale', %s, 'c', 1)"
)
DOORBELL_LOCKS = (
    "SELECT count(*) FILTER (WHERE l.granted AND l.mode = 'ExclusiveLock') AS held, "
    "       count(*) FILTER (WHERE NOT l.granted) AS waiting "
    "FROM pg_locks l "
    "WHERE l.locktype = 'advisory' AND l.database = "
    "      (SELECT oid FROM pg_database WHERE datname = current_database()) "
    "  AND ((l.classid::bigint << 32) | l.objid::bigint) = -778825528700430751"
)


def connect(url: str, *, autocommit: bool = True) -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(libpq_url(url), autocommit=autocommit)


def arm(conn: psycopg.Connection[tuple[object, ...]], wait_ms: int = 1000) -> str:
    row = conn.execute("SELECT outbox.arm_doorbell(%s)", (wait_ms,)).fetchone()
    assert row is not None
    return str(row[0])


def doorbell(url: str) -> tuple[int, int]:
    """(sessions holding the doorbell, sessions waiting for it)."""
    with connect(url) as conn:
        row = conn.execute(DOORBELL_LOCKS).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


@pytest.fixture
def listener(database_url: str) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    with connect(database_url) as conn:
        conn.execute("LISTEN outbox_events")
        yield conn


def test_an_insert_does_not_notify_while_no_daemon_waits(
    database_url: str, listener: psycopg.Connection[tuple[object, ...]]
) -> None:
    with connect(database_url) as writer:
        writer.execute(SALE, ("quiet_1",))
        writer.execute("SELECT outbox.record_refund('quiet_1')")
    assert notifications(listener) == []


def test_inserts_ring_once_per_transaction_while_a_daemon_holds_the_doorbell(
    database_url: str, listener: psycopg.Connection[tuple[object, ...]]
) -> None:
    with connect(database_url) as daemon:
        assert arm(daemon) == "armed"
        with connect(database_url, autocommit=False) as writer:
            writer.execute(
                "INSERT INTO outbox.events (event_type, transaction_key, customer_key, amount) "
                "SELECT 'sale', 'bulk_' || g, 'c', 1 FROM generate_series(1, 50) g"
            )
            writer.execute("SELECT outbox.record_refund('bulk_1')")
            writer.commit()
        # Two statements in one transaction fold into one notification, with no payload.
        assert notifications(listener) == [""]
        # Disarming wakes any other daemon (one notification); after it INSERTs are quiet again.
        daemon.execute("SELECT outbox.disarm_doorbell()")
        with connect(database_url) as writer:
            writer.execute(SALE, ("after_disarm",))
        assert notifications(listener) == [""]
        assert doorbell(database_url) == (0, 0)


def test_one_daemon_holds_the_doorbell_and_it_passes_on_when_that_one_dies(
    database_url: str, listener: psycopg.Connection[tuple[object, ...]]
) -> None:
    with connect(database_url) as second:
        with connect(database_url) as first:
            assert arm(first) == "armed"
            assert arm(second) == "taken"  # INSERTs ring for the first one; second may sleep
            with connect(database_url) as writer:
                writer.execute(SALE, ("while_taken",))
            assert notifications(listener) == [""]
        # The first daemon's connection is gone, and its lock with it.
        assert doorbell(database_url) == (0, 0)
        with connect(database_url) as writer:
            writer.execute(SALE, ("after_death",))
        assert notifications(listener) == []
        assert arm(second) == "armed"


def test_arming_waits_until_rows_inserted_without_a_ring_are_committed(
    database_url: str, listener: psycopg.Connection[tuple[object, ...]]
) -> None:
    with (
        connect(database_url) as daemon,
        connect(database_url, autocommit=False) as open_writer,
    ):
        open_writer.execute(SALE, ("inserted_quietly",))  # no daemon waits: no NOTIFY
        assert arm(daemon, wait_ms=50) == "busy"  # that transaction is still open

        result: list[str] = []
        arming = threading.Thread(target=lambda: result.append(arm(daemon, wait_ms=20_000)))
        arming.start()
        try:
            wait_until(lambda: doorbell(database_url) == (0, 1), what="the daemon waiting")
            # While a daemon waits to arm, other INSERTs ring at once instead of holding it up.
            with connect(database_url) as other:
                other.execute(SALE, ("while_arming",))
            assert notifications(listener) == [""]
            assert arming.is_alive()
        finally:
            open_writer.commit()
            arming.join(10)
        assert result == ["armed"]
        # Once armed, the daemon's next claim sees the row that never rang.
        count = daemon.execute(
            "SELECT count(*) FROM outbox.events WHERE transaction_key = 'inserted_quietly'"
        ).fetchone()
        assert count == (1,)


# ---- the daemon ---------------------------------------------------------------------------------


@pytest.fixture
def fake() -> Iterator[FakePartneroThread]:
    with FakePartneroThread(FakeConfig(api_key=API_KEY, seed=3)) as server:
        yield server


def test_the_daemon_holds_the_doorbell_when_idle_and_lets_go_during_a_backlog(
    engine: sa.Engine, database_url: str, fake: FakePartneroThread
) -> None:
    fake.configure(latency_ms=20)
    settings = make_settings(database_url, fake.url, concurrency=2, batch_size=2)
    with DaemonThread(settings):
        wait_until(lambda: doorbell(database_url) == (1, 0), what="the idle daemon armed")
        insert_sales(engine, [f"inv_d{i}" for i in range(100)])
        wait_until(
            lambda: (
                doorbell(database_url) == (0, 0)
                and scalar(engine, "SELECT count(*) FROM outbox.events WHERE status = 'pending'")
            ),
            what="the doorbell let go while rows are pending",
        )
        wait_until(lambda: settled(engine, 100))
        wait_until(lambda: doorbell(database_url) == (1, 0), what="armed again once caught up")


def test_a_row_committed_without_a_ring_is_delivered_without_waiting_for_the_poll(
    engine: sa.Engine, database_url: str, fake: FakePartneroThread
) -> None:
    # Polling every 60 s: only the doorbell's hand-over can deliver the row in time.
    fake.configure(latency_ms=20)
    settings = make_settings(
        database_url, fake.url, concurrency=2, batch_size=2, poll_interval_seconds=60,
        doorbell_wait_seconds=0.1,
    )  # fmt: skip
    with DaemonThread(settings), connect(database_url, autocommit=False) as open_writer:
        # A backlog long enough (about 1 s at 2 x 20 ms) that the INSERT below lands in it.
        insert_sales(engine, [f"inv_b{i}" for i in range(100)])
        wait_until(lambda: doorbell(database_url) == (0, 0), what="a backlog: no doorbell")
        open_writer.execute(SALE, ("inv_late",))  # rings for no one
        wait_until(lambda: settled(engine, 100))
        # The daemon has caught up and tries to arm, held up by the open transaction.
        wait_until(lambda: doorbell(database_url) == (0, 1), what="the daemon waiting to arm")
        open_writer.commit()
        wait_until(lambda: settled(engine, 101), timeout=5, what="inv_late delivered")
    assert "inv_late" in {t["key"] for t in fake.ledger()}
