"""Waiting on several things at once, without a sleep that ignores a stop."""

from __future__ import annotations

import asyncio
import math


async def wait_any(*events: asyncio.Event, timeout: float) -> None:
    """Wait until one of the events is set or the timeout passes (math.inf: no timeout)."""
    if any(e.is_set() for e in events):
        return
    waiters = [asyncio.create_task(e.wait()) for e in events]
    try:
        await asyncio.wait(
            waiters,
            timeout=None if math.isinf(timeout) else timeout,
            return_when=asyncio.FIRST_COMPLETED,
        )
    finally:
        for w in waiters:
            w.cancel()
