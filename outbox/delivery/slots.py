"""The slots: at most `concurrency` calls to Partnero in flight."""

from __future__ import annotations

import asyncio
from collections import deque


class Slots:
    """At most `limit` holders at once, first come first served; the limit can change while
    rows wait (a SIGHUP reload of `concurrency`)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    async def acquire(self) -> None:
        if self.used < self.limit and not self._waiters:
            self.used += 1
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter  # resolved by _hand_out, which counts the slot as used for us
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # handed a slot, then cancelled before using it
            else:
                self._waiters.remove(waiter)
            raise

    def release(self) -> None:
        self.used -= 1
        self._hand_out()

    def resize(self, limit: int) -> None:
        self.limit = limit
        self._hand_out()

    def _hand_out(self) -> None:
        while self._waiters and self.used < self.limit:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.used += 1
                waiter.set_result(None)
