"""Riding out database outages: the errors that mean "the database is away" and the back-off
the services use to wait for it."""

from __future__ import annotations

import asyncio

import psycopg
import structlog
from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential_jitter

from outbox.text import first_line

log = structlog.get_logger("outbox.db")

DB_ERRORS = (psycopg.OperationalError, psycopg.InterfaceError, OSError)


def retrying(stopping: asyncio.Event, what: str) -> AsyncRetrying:
    """Retry database work with capped, jittered back-off until it works or we are stopping."""

    def stop_when_stopping(_state: object) -> bool:
        return stopping.is_set()

    def before_sleep(state: object) -> None:
        outcome = getattr(state, "outcome", None)
        error = outcome.exception() if outcome is not None else None
        log.warning("outbox.db.retrying", operation=what, error=first_line(error))

    return AsyncRetrying(
        retry=retry_if_exception_type(DB_ERRORS),
        wait=wait_exponential_jitter(multiplier=0.2, max=10.0),
        stop=stop_when_stopping,
        before_sleep=before_sleep,
        reraise=True,
    )
