"""What the pages read and do, off the event loop: the operator commands' own functions
(outbox/ops/commands.py, the CLI's single source of truth) run in worker threads, so one slow
query does not hold up the other requests; and the few queries only the page needs (the chart,
an action's record), named in outbox/sql/web.sql."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar

import sqlalchemy as sa

from outbox import db
from outbox.db import queries
from outbox.ops import commands, model

SQL_FILE = "web.sql"
CHART_MINUTES = 24 * 60
# The chart's series, bottom to top, as the `activity` query names them.
SERIES = ("delivered", "skipped", "retry", "failed")

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Activity:
    """HTTP calls per minute, by series, over the chart's window (oldest minute first)."""

    first: datetime
    last: datetime
    counts: dict[str, list[int]]  # series -> one count a minute
    other: int  # lookup steps: counted, not drawn


@dataclass(frozen=True, slots=True)
class ActionRecord:
    id: int
    at: datetime
    actor: str
    action: str
    reason: str
    event_count: int
    events: tuple[Mapping[str, Any], ...]


def _q(name: str) -> sa.TextClause:
    return sa.text(queries.get(name, SQL_FILE))


def create_engine(url: str, statement_seconds: float, threads: int) -> sa.Engine:
    """A small pool, one connection per worker thread; each statement bounded (the database
    cancels it) so a page never hangs on a lock or a full pooler."""
    engine = db.create_engine(
        url, pool_size=threads, max_overflow=0, pool_timeout=statement_seconds,
        connect_args={"connect_timeout": max(1, int(statement_seconds))},
    )  # fmt: skip

    @sa.event.listens_for(engine, "connect")
    def _bound(dbapi_connection: Any, _record: Any) -> None:
        with dbapi_connection.cursor() as cursor:
            cursor.execute(
                "SELECT set_config('statement_timeout', %s, false)",
                (f"{int(statement_seconds * 1000)}ms",),
            )
        dbapi_connection.commit()

    return engine


class Store:
    """The engine and the worker threads the pages' database work runs on."""

    def __init__(self, engine: sa.Engine, threads: int) -> None:
        self.engine = engine
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="outbox-web")

    async def run(self, func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._pool, functools.partial(func, self.engine, *args, **kwargs)
        )

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.engine.dispose()

    async def status(self, max_pending_age: timedelta) -> model.StatusReport:
        return await self.run(commands.status, max_pending_age)

    async def attention(self, max_pending_age: timedelta) -> model.AttentionReport:
        return await self.run(commands.attention, max_pending_age)

    async def failed(self, filters: model.Filters, *, limit: int, page: int) -> model.FailedPage:
        return await self.run(commands.failed, filters, limit=limit, page=page)

    async def activity(self) -> Activity:
        return await self.run(activity)

    async def action(self, action_id: int) -> ActionRecord | None:
        return await self.run(action_record, action_id)

    async def ping(self) -> None:
        await self.run(ping)


def activity(engine: sa.Engine) -> Activity:
    with engine.connect() as conn:
        (window,) = conn.execute(_q("activity_window"), {"minutes": CHART_MINUTES}).mappings()
        found = list(conn.execute(_q("activity"), {"first": window["first"]}).mappings())
    first: datetime = window["first"]
    counts = {s: [0] * CHART_MINUTES for s in SERIES}
    other = 0
    for row in found:
        slot = int((row["minute"] - first).total_seconds() // 60)
        if row["kind"] in counts and 0 <= slot < CHART_MINUTES:
            counts[row["kind"]][slot] += int(row["calls"])
        else:
            other += int(row["calls"])
    return Activity(first=first, last=window["last"], counts=counts, other=other)


def action_record(engine: sa.Engine, action_id: int) -> ActionRecord | None:
    with engine.connect() as conn:
        found = list(conn.execute(_q("action"), {"id": action_id}).mappings())
        if not found:
            return None
        events = tuple(
            dict(r) for r in conn.execute(_q("action_events"), {"id": action_id}).mappings()
        )
    row = found[0]
    return ActionRecord(
        id=row["id"],
        at=row["at"],
        actor=row["actor"],
        action=row["action"],
        reason=row["reason"],
        event_count=row["event_count"],
        events=events,
    )


def ping(engine: sa.Engine) -> None:
    with engine.connect() as conn:
        conn.execute(_q("ping"))
