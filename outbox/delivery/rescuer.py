"""The rescuer: clears expired leases (a daemon that died), so their rows are claimed again, a
sale with a lookup first."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import structlog

from outbox.delivery.retrying import DB_ERRORS
from outbox.delivery.store import Rescued, Store
from outbox.delivery.waits import wait_any

log = structlog.get_logger("outbox.rescue")


class Rescuer:
    def __init__(self, store: Store, on_rescued: Callable[[], None]) -> None:
        self._store = store
        self._on_rescued = on_rescued

    async def run_once(self) -> list[Rescued]:
        rescued = await self._store.rescue()
        if rescued:
            owners = sorted({r.lease_owner or "?" for r in rescued})
            log.warning(
                "outbox.rescue.expired_leases",
                rows=len(rescued),
                owners=owners,
                event_ids=[r.event_id for r in rescued[:20]],
            )
            self._on_rescued()
        return rescued

    async def run(self, stopping: asyncio.Event, interval: Callable[[], float]) -> None:
        """Every `interval()` seconds until stopped. A database away is waited out; anything
        else propagates to the supervisor."""
        while not stopping.is_set():
            with contextlib.suppress(*DB_ERRORS):
                await self.run_once()
            await wait_any(stopping, timeout=interval())
