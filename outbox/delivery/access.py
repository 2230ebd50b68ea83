"""The key check for a row answered 403: is it the row, or the key?"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Protocol

from outbox import policy
from outbox.domain import Exchange, PingVerdict


class Pinger(Protocol):
    def ping(self) -> Awaitable[Exchange]: ...


class AccessCheck:
    """`GET /v1/test`, one at a time, for the rows answered 403. A key check that started after
    a 403 came back, and answered 2xx, speaks for that 403 as well: a burst of 403s costs one
    check."""

    def __init__(
        self,
        client: Pinger,
        clock: Callable[[], datetime],
        observe: Callable[[Exchange], None] | None = None,
    ) -> None:
        self._client = client
        self._clock = clock
        self._observe = observe
        self._lock = asyncio.Lock()
        self._ok_since: datetime | None = None  # when the last key check that said OK started

    async def check(self, answered_at: datetime) -> tuple[PingVerdict, Exchange | None]:
        """The verdict on the key for a 403 that came back at `answered_at`, and the key check
        made for it (None when an earlier one already answered for it)."""
        async with self._lock:
            if self._ok_since is not None and self._ok_since >= answered_at:
                return PingVerdict.OK, None
            started = self._clock()
            ping = await self._client.ping()
            if self._observe is not None:
                self._observe(ping)
            verdict = policy.ping_verdict(ping)
            if verdict is PingVerdict.OK:
                self._ok_since = started
            return verdict, ping
