"""The listener: LISTEN outbox_events on its own connection, so new rows wake the claimer."""

from __future__ import annotations

import asyncio
import contextlib

import psycopg
import structlog

from outbox.db import libpq_url
from outbox.delivery.health import Health
from outbox.delivery.retrying import retrying

log = structlog.get_logger("outbox.listener")


class Listener:
    """LISTEN outbox_events; sets `wake` on every notification and after each (re)connect."""

    def __init__(self, url: str, wake: asyncio.Event, health: Health, check_seconds: float) -> None:
        self._url = libpq_url(url)
        self._wake = wake
        self._health = health
        self._check_seconds = check_seconds
        self.ready = asyncio.Event()  # set once LISTEN is active (for READY=1)

    async def run_once(self) -> int:
        """One connection's life: listen until it breaks. Returns notifications received."""
        received = 0
        conn = await psycopg.AsyncConnection.connect(
            self._url, autocommit=True, application_name="outbox-listener", connect_timeout=10
        )
        try:
            await conn.execute("LISTEN outbox_events")
            self._health.listening = True
            self.ready.set()
            self._wake.set()  # anything committed while we were not listening
            log.info("outbox.listener.listening")
            while True:
                async for _ in conn.notifies(timeout=self._check_seconds):
                    received += 1
                    self._wake.set()
                await conn.execute("SELECT 1")  # a quiet connection is checked, not trusted
        finally:
            self._health.listening = False
            with contextlib.suppress(Exception):
                await conn.close()

    async def run(self, stopping: asyncio.Event) -> None:
        async for attempt in retrying(stopping, "listen"):
            with attempt:
                await self.run_once()
