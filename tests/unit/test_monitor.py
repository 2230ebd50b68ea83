"""The monitor (backlog figures, gauges, STATUS=), the watchdog and the rescuer, each driven
through `run_once()` with a scripted store and a fake notifier."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import structlog

from outbox.delivery.context import Context
from outbox.delivery.health import Health
from outbox.delivery.monitor import Monitor, Watchdog
from outbox.delivery.rescuer import Rescuer
from outbox.delivery.store import Backlog, Rescued
from outbox.service.metrics import Metrics
from outbox.service.settings import Settings, load
from outbox.text import utcnow
from unit.fakes import FakeNotifier


def settings() -> Settings:
    raw = {"database_url": "postgresql://outbox@localhost/shop", "status_interval_seconds": "5"}
    return load(raw, environ={}, need_api_key=False)


class ScriptedStore:
    def __init__(self, *answers: Backlog | Exception) -> None:
        self.answers = list(answers)
        self.closed = 0
        self.rescued: list[list[Rescued]] = []

    async def backlog(self) -> Backlog:
        await asyncio.sleep(0)
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def close(self) -> None:
        self.closed += 1

    async def rescue(self) -> list[Rescued]:
        await asyncio.sleep(0)
        return self.rescued.pop(0)


@pytest.fixture
def logs() -> Iterator[list[dict[str, Any]]]:
    with structlog.testing.capture_logs() as captured:
        yield captured


class Rig:
    def __init__(self, *answers: Backlog | Exception) -> None:
        self.store = ScriptedStore(*answers)
        self.health = Health(database_ok=True, listening=True)
        self.metrics = Metrics()
        self.notifier = FakeNotifier()
        self.leases = 3
        ctx = Context(
            self.health,
            self.metrics,
            self.notifier,  # type: ignore[arg-type]
            settings,
            utcnow,
            asyncio.Event(),
        )
        self.monitor = Monitor(ctx, store=self.store, leases_held=lambda: self.leases)  # type: ignore[arg-type]
        self.watchdog = Watchdog(ctx)

    def gauge(self, name: str) -> float | None:
        return self.metrics.registry.get_sample_value(name)


async def test_the_monitor_refreshes_figures_gauges_and_status() -> None:
    rig = Rig(Backlog(pending=12, oldest_pending_seconds=45.0, failed=2))
    rig.health.database_ok = False

    backlog = await rig.monitor.run_once()

    assert backlog == Backlog(12, 45.0, 2)
    assert rig.health.database_ok is True
    assert (rig.health.backlog, rig.health.oldest_pending_seconds, rig.health.failed_rows) == (
        12,
        45.0,
        2,
    )
    assert rig.gauge("outbox_backlog_rows") == 12
    assert rig.gauge("outbox_oldest_pending_age_seconds") == 45.0
    assert rig.gauge("outbox_failed_rows") == 2
    assert rig.gauge("outbox_leases_held") == 3
    assert rig.notifier.statuses == [
        "backlog 12 (oldest 45s); failed 2; delivered 0, skipped 0 since start"
    ]


async def test_the_monitor_with_the_database_away() -> None:
    rig = Rig(
        Backlog(5, None, 0),
        psycopg.OperationalError("connection refused\nDETAIL: more"),
        Backlog(4, None, 0),
    )
    await rig.monitor.run_once()

    assert await rig.monitor.run_once() is None

    assert rig.health.database_ok is False
    assert rig.health.last_error == "database: connection refused"
    assert "database not answering" in rig.health.problems()
    assert rig.store.closed == 1  # the next round reconnects
    assert rig.health.backlog == 5  # the last figures known are kept
    assert rig.notifier.statuses[-1].endswith("last error: database: connection refused")

    await rig.monitor.run_once()
    assert rig.health.database_ok is True
    assert rig.health.backlog == 4


async def test_the_monitor_lets_a_bug_reach_the_supervisor() -> None:
    rig = Rig(ValueError("a bug"))

    with pytest.raises(ValueError, match="a bug"):
        await rig.monitor.run_once()


def test_the_watchdog_pings_while_healthy() -> None:
    rig = Rig()

    assert rig.watchdog.run_once() is True

    assert rig.notifier.watchdogs == 1
    assert rig.gauge("outbox_healthy") == 1


@pytest.mark.parametrize(
    "harm",
    [
        lambda h: setattr(h, "database_ok", False),
        lambda h: setattr(h, "listening", False),
        lambda h: setattr(h, "next_tick_due", time.monotonic() - 1),
        lambda h: h.services_down.update(writer="ValueError: boom"),
        lambda h: setattr(h, "unwritten_since", time.monotonic() - 3600),
    ],
    ids=["database", "listener", "wedged", "crashed", "unwritten"],
)
def test_the_watchdog_stays_silent_while_unhealthy(harm: Any, logs: list[dict[str, Any]]) -> None:
    rig = Rig()
    harm(rig.health)

    assert rig.watchdog.run_once() is False

    assert rig.notifier.watchdogs == 0
    assert rig.gauge("outbox_healthy") == 0
    (line,) = [e for e in logs if e["event"] == "outbox.watchdog.unhealthy"]
    assert line["problems"] == rig.health.problems()


async def test_the_rescuer_wakes_the_claimer_when_it_freed_rows(
    logs: list[dict[str, Any]],
) -> None:
    store = ScriptedStore()
    store.rescued = [[Rescued(1, "K1", "host:1"), Rescued(2, "K2", None)], []]
    woken: list[None] = []
    rescuer = Rescuer(store, lambda: woken.append(None))  # type: ignore[arg-type]

    assert [r.event_id for r in await rescuer.run_once()] == [1, 2]
    assert len(woken) == 1
    (line,) = [e for e in logs if e["event"] == "outbox.rescue.expired_leases"]
    assert (line["rows"], line["owners"], line["event_ids"]) == (2, ["?", "host:1"], [1, 2])

    assert await rescuer.run_once() == []
    assert len(woken) == 1
