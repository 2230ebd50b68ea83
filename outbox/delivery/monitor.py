"""The monitor (backlog figures, gauges, the STATUS= line) and the watchdog (pings systemd only
while `Health.problems()` is empty)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from outbox.delivery.clock import DatabaseClock
from outbox.delivery.context import Context
from outbox.delivery.retrying import DB_ERRORS
from outbox.delivery.store import Backlog, Store
from outbox.delivery.waits import wait_any
from outbox.text import first_line

log = structlog.get_logger("outbox.watchdog")


# Above this the daemon's clock is said to be off (the daemon goes on, on the database's time).
CLOCK_WARNING_SECONDS = 1.0


@dataclass(eq=False, repr=False)
class Monitor:
    ctx: Context
    store: Store
    leases_held: Callable[[], int]  # rows this daemon holds a lease on now
    database_clock: DatabaseClock | None = None  # None: the host's offset is not measured
    _clock_warned: bool = field(init=False, default=False)

    async def measure_clock(self, *, first: bool = False) -> None:
        """Measure this host's offset from the database's clock; log it at start-up, and warn
        (once per excursion) while it is above CLOCK_WARNING_SECONDS."""
        if self.database_clock is None:
            return
        offset = (await self.database_clock.measure(self.store.database_now)).total_seconds()
        off = abs(offset) > CLOCK_WARNING_SECONDS
        if off and not self._clock_warned:
            log.warning(
                "outbox.daemon.clock_off",
                offset_seconds=round(offset, 3),
                note=f"this host's clock is {abs(offset):.1f} s "
                f"{'behind' if offset > 0 else 'ahead of'} the database's; the daemon uses the "
                "database's time for retries and attempts: fix the host's time sync (NTP)",
            )
        elif first:
            log.info("outbox.daemon.clock", offset_seconds=round(offset, 3))
        self._clock_warned = off

    async def run_once(self) -> Backlog | None:
        """Refresh the backlog figures, the gauges and the STATUS= line."""
        backlog: Backlog | None = None
        interval = self.ctx.settings().status_interval_seconds
        try:
            backlog = await asyncio.wait_for(self.store.backlog(), timeout=max(1.0, interval))
            await asyncio.wait_for(self.measure_clock(), timeout=max(1.0, interval))
        except (TimeoutError, *DB_ERRORS) as exc:
            self.ctx.health.database_ok = False
            self.ctx.health.last_error = f"database: {first_line(exc) or 'no answer in time'}"
            await self.store.close()
        if backlog is not None:
            self.ctx.health.database_ok = True
            self.ctx.health.backlog = backlog.pending
            self.ctx.health.oldest_pending_seconds = backlog.oldest_pending_seconds
            self.ctx.health.failed_rows = backlog.failed
            self.ctx.metrics.backlog.set(backlog.pending)
            self.ctx.metrics.oldest_pending.set(backlog.oldest_pending_seconds or 0.0)
            self.ctx.metrics.failed.set(backlog.failed)
        self.ctx.metrics.leases.set(self.leases_held())
        self.ctx.notifier.status(self.ctx.health.status_line())
        return backlog

    async def run(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            await self.run_once()
            await wait_any(stopping, timeout=self.ctx.settings().status_interval_seconds)


class Watchdog:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def run_once(self) -> bool:
        """Ping systemd's watchdog only while the daemon is really healthy."""
        problems = self.ctx.health.problems()
        self.ctx.metrics.healthy.set(0 if problems else 1)
        if problems:
            log.error("outbox.watchdog.unhealthy", problems=problems)
            return False
        self.ctx.notifier.watchdog()
        return True

    async def run(self, stopping: asyncio.Event, interval: float) -> None:
        loop = asyncio.get_running_loop()
        while not stopping.is_set():
            self.run_once()
            expected = loop.time() + interval
            await wait_any(stopping, timeout=interval)
            self.ctx.metrics.loop_lag.set(max(0.0, loop.time() - expected))
