"""One clock: a daemon whose host clock is minutes off still keeps its backoff and writes
attempt times in the database's time (docs/design.md, "Decisions", one clock)."""

from __future__ import annotations

import asyncio
import functools
import itertools
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from structlog.testing import capture_logs

from outbox.daemon import Daemon
from outbox.delivery.clock import DatabaseClock
from outbox.dev import demo
from outbox.dev.fake_partnero import FakeConfig, FakePartneroThread
from outbox.text import utcnow
from tests.daemon_helpers import (
    API_KEY,
    DaemonThread,
    insert_sales,
    make_settings,
    rows,
    wait_until,
)

FIVE_MINUTES = timedelta(minutes=5)


def test_the_offset_is_taken_against_the_middle_of_the_round_trip() -> None:
    ticks = iter(
        [datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC), datetime(2026, 1, 1, 12, 0, 2, tzinfo=UTC)]
    )
    clock = DatabaseClock(lambda: next(ticks))

    async def database_now() -> datetime:
        return datetime(2026, 1, 1, 12, 5, 1, tzinfo=UTC)  # 5 minutes ahead of the host

    offset = asyncio.run(clock.measure(database_now))
    assert offset == FIVE_MINUTES
    assert clock.offset == FIVE_MINUTES


@pytest.fixture
def fake() -> Iterator[FakePartneroThread]:
    with FakePartneroThread(FakeConfig(api_key=API_KEY, seed=5)) as server:
        yield server


@pytest.mark.parametrize("skew", [-FIVE_MINUTES, FIVE_MINUTES], ids=["behind", "ahead"])
def test_retries_keep_their_backoff_on_a_host_clock_minutes_off(
    engine: sa.Engine,
    database_url: str,
    fake: FakePartneroThread,
    monkeypatch: pytest.MonkeyPatch,
    skew: timedelta,
) -> None:
    monkeypatch.setattr(demo, "Daemon", functools.partial(Daemon, clock=lambda: utcnow() + skew))
    settings = make_settings(
        database_url,
        fake.url,
        max_attempts=3,
        retry_base_delay_seconds=0.5,
        retry_max_delay_seconds=5,
    )
    with capture_logs() as logs, DaemonThread(settings) as running:
        running.wait_verified()
        fake.configure(fail_5xx_rate=1.0)  # every call but the key check: 5xx
        insert_sales(engine, ["inv_clock"])
        wait_until(
            lambda: len(rows(engine, "SELECT id FROM outbox.attempts")) == 3,
            what="three attempts",  # ahead by 5 minutes, the first retry would wait 5 minutes
        )
    times = rows(
        engine,
        "SELECT a.started_at, a.finished_at, e.created_at FROM outbox.attempts a "
        "JOIN outbox.events e ON e.id = a.event_id ORDER BY a.id",
    )
    created = times[0].created_at
    # Attempt times are the database's: none before the row existed, none minutes later.
    assert all(
        created - timedelta(seconds=1) <= t.started_at <= created + timedelta(seconds=20)
        for t in times
    )
    # The backoff held: 0.5 s then 1 s, each within the +-25 % jitter.
    gaps = [(b.started_at - a.finished_at).total_seconds() for a, b in itertools.pairwise(times)]
    assert gaps[0] >= 0.5 * 0.75 - 0.05, gaps
    assert gaps[1] >= 1.0 * 0.75 - 0.05, gaps
    (measured,) = [e for e in logs if e["event"] == "outbox.daemon.clock_off"]
    assert abs(measured["offset_seconds"] + skew.total_seconds()) < 1.0
