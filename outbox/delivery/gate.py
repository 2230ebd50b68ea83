"""The gate: the daemon-wide go/no-go for sending to Partnero."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime


class Gate:
    """The daemon-wide go/no-go for sending: closed until `GET /v1/test` has answered 2xx (at
    start-up, `verified` False), paused after a refused key, cooling down after 429."""

    def __init__(self, clock: Callable[[], datetime], *, verified: bool = True) -> None:
        self._clock = clock
        self.verified = verified
        self.paused_until: datetime | None = None if verified else clock()
        self.pause_detail: str | None = None if verified else "checking the Partnero API"
        self.cooldown_until: datetime | None = None
        self.refused = False
        self._changed = asyncio.Event()

    def pause(self, until: datetime, detail: str, *, refused: bool = True) -> None:
        """Stop sending until `until` (then GET /v1/test decides). `refused`: Partnero refused
        the API key (401, or 403 on GET /v1/test too); False: Partnero could not be asked."""
        if self.paused_until is None or until > self.paused_until:
            self.paused_until = until
        self.pause_detail = detail
        self.refused = refused
        self._changed.set()

    def check_now(self) -> None:
        """End the current pause early (a new API key): the key is checked at once."""
        if self.paused_until is not None:
            self.paused_until = self._clock()
            self._changed.set()

    @property
    def changed(self) -> asyncio.Event:
        """Set whenever the pause starts, ends or is cut short."""
        return self._changed

    def resume(self) -> None:
        self.verified = True
        self.refused = False
        self.paused_until = None
        self.pause_detail = None
        self._changed.set()

    def cool_down(self, until: datetime) -> None:
        if self.cooldown_until is None or until > self.cooldown_until:
            self.cooldown_until = until

    @property
    def unsent_reason(self) -> str:
        """Why a row is given back without a call: the pause, or else a lease too short."""
        return "paused" if self.paused else "lease too short"

    @property
    def paused(self) -> bool:
        return self.paused_until is not None

    async def wait_for_cooldown(self) -> None:
        while self.cooldown_until is not None:
            remaining = (self.cooldown_until - self._clock()).total_seconds()
            if remaining <= 0:
                self.cooldown_until = None
                return
            await asyncio.sleep(remaining)
