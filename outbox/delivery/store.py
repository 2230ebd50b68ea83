"""The delivery engine's database side: claim, complete, rescue, next-due, notify.

Each method runs one named statement on its own connection in autocommit mode, so every write
is atomic and no transaction is ever held open across an HTTP call (docs/design.md, "Delivery
rules" 4). A lost connection raises psycopg.OperationalError; the services reconnect and retry.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any
from uuid import UUID

import psycopg
from psycopg.rows import dict_row

from outbox.db import libpq_url, queries
from outbox.domain import Event, EventType, Exchange, Outcome, Status


@dataclass(frozen=True, slots=True)
class Claimed:
    event: Event
    token: UUID
    lease_expires_at: datetime
    known_duplicate: bool  # an earlier sale with this key was already delivered
    sale_skipped: bool = False  # a refund whose sales were skipped: settled without a call


@dataclass(frozen=True, slots=True)
class ClaimResult:
    claimed: list[Claimed]
    parked: int


@dataclass(frozen=True, slots=True)
class AttemptRecord:
    """The outbox.attempts row for one HTTP call: the call as made and answered, and what was
    decided on it."""

    event_id: int
    attempt: int
    exchange: Exchange
    decision: str  # the decision's label (outbox.decisions.label_of)
    daemon: str
    decided_at: datetime  # stands in for a start or finish time the exchange lacks


@dataclass(frozen=True, slots=True)
class RowState:
    """What one claim leaves in a row's state columns."""

    status: Status
    outcome: Outcome | None  # the delivered outcome, or the failed reason
    reason: Outcome | None  # the retry class of a retry (for metrics), or the failed reason
    next_attempt_at: datetime
    lookup_required: bool
    last_error: str | None


@dataclass(frozen=True, slots=True)
class Completion:
    """The new state of one claimed row, written only while its lease token still holds."""

    event_id: int
    token: UUID
    state: RowState
    attempts: int
    last_status_code: int | None
    attempt_records: tuple[AttemptRecord, ...] = field(default=())


@dataclass(frozen=True, slots=True)
class CompleteResult:
    completed: int  # rows whose lease still held and were updated
    woken: int  # parked rows woken because a row they waited for settled
    applied: frozenset[UUID] = frozenset()  # the lease tokens of those rows


@dataclass(frozen=True, slots=True)
class Backlog:
    pending: int
    oldest_pending_seconds: float | None
    failed: int


@dataclass(frozen=True, slots=True)
class Rescued:
    event_id: int
    transaction_key: str | None
    lease_owner: str | None


# A row parked behind a row that is in flight is looked at again this soon (or at
# OUTBOX_BLOCKED_RECHECK_SECONDS if sooner): the in-flight row's result may be written while the
# claim that parks it runs, and then the wake-up of that write cannot see the park.
IN_FLIGHT_RECHECK_SECONDS = 1.0

# The default bound on one statement (OUTBOX_DATABASE_TIMEOUT_SECONDS).
DEFAULT_STATEMENT_TIMEOUT_SECONDS = 10.0


class Store:
    def __init__(
        self,
        database_url: str,
        *,
        connect_timeout: float = 10.0,
        statement_timeout: float = DEFAULT_STATEMENT_TIMEOUT_SECONDS,
    ) -> None:
        self._url = libpq_url(database_url)
        self._connect_timeout = connect_timeout
        # Every statement, and the wait for a connection (a pooler's queue), is bounded: past
        # it the database counts as not answering (a DB error: the services retry and the
        # daemon says why), never as a hang. The server gets the same bound, so a statement the
        # daemon gave up on does not go on to be applied.
        self._statement_timeout = statement_timeout
        self._conn: psycopg.AsyncConnection[dict[str, Any]] | None = None
        self._connecting = asyncio.Lock()  # several services may share one Store
        # Bumped for every new connection: session state (the doorbell lock) lives and dies
        # with one connection.
        self.generation = 0

    async def _connection(self) -> psycopg.AsyncConnection[dict[str, Any]]:
        async with self._connecting:
            if self._conn is None or self._conn.closed or self._conn.broken:
                if self._conn is not None:
                    await self._conn.close()
                    self._conn = None
                self._conn = await psycopg.AsyncConnection.connect(
                    self._url,
                    autocommit=True,
                    row_factory=dict_row,
                    connect_timeout=max(1, int(self._connect_timeout)),
                    application_name="outbox",
                )
                self.generation += 1
                milliseconds = max(1, round(self._statement_timeout * 1000))
                await self._conn.execute(f"SET statement_timeout = {milliseconds}")
            return self._conn

    async def _fetch(self, name: str, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        conn: psycopg.AsyncConnection[dict[str, Any]] | None = None
        try:
            async with asyncio.timeout(self._statement_timeout + self._connect_timeout):
                conn = await self._connection()
                cursor = await conn.execute(queries.get(name), params, prepare=True)
                return await cursor.fetchall()
        except TimeoutError:
            await self._drop(conn)
            raise psycopg.OperationalError(
                f"no answer from the database within {self._statement_timeout:g} s "
                "(a pooler's queue full? see docs/operations.md, PgBouncer and other poolers)"
            ) from None
        except psycopg.OperationalError:
            await self._drop(conn)
            raise

    async def _drop(self, conn: psycopg.AsyncConnection[dict[str, Any]] | None) -> None:
        """Close a connection that failed or did not answer; the next call opens a new one."""
        if conn is None:
            conn = self._conn
        if conn is not None:
            await conn.close()
        if self._conn is conn:
            self._conn = None

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    async def claim(
        self,
        *,
        owner: str,
        limit: int,
        lease_seconds: float,
        recheck_seconds: float,
        orphan_grace_seconds: float,
    ) -> ClaimResult:
        rows = await self._fetch(
            "claim",
            {
                "owner": owner,
                "limit": limit,
                "lease_seconds": lease_seconds,
                "recheck_seconds": recheck_seconds,
                "orphan_grace_seconds": orphan_grace_seconds,
                "in_flight_recheck_seconds": IN_FLIGHT_RECHECK_SECONDS,
            },
        )
        claimed = [
            Claimed(
                event=Event(
                    id=row["id"],
                    event_type=EventType(row["event_type"]),
                    transaction_key=row["transaction_key"],
                    customer_key=row["customer_key"],
                    amount=Decimal(row["amount"]) if row["amount"] is not None else None,
                    currency=row["currency"],
                    payload=_payload(row["payload"]),
                    attempts=row["attempts"],
                    lookup_required=row["lookup_required"],
                    created_at=row["created_at"],
                    customer_signup_skipped=bool(row["customer_signup_skipped"]),
                ),
                token=row["lease_token"],
                lease_expires_at=row["lease_expires_at"],
                known_duplicate=row["known_duplicate"],
                sale_skipped=row["sale_skipped"],
            )
            for row in rows
        ]
        parked = int(rows[0]["parked_count"]) if rows else 0
        return ClaimResult(claimed=claimed, parked=parked)

    async def complete(self, completions: list[Completion]) -> CompleteResult:
        if not completions:
            return CompleteResult(0, 0)
        states = [c.state for c in completions]
        params: dict[str, Any] = {
            "ids": [c.event_id for c in completions],
            "tokens": [c.token for c in completions],
            "statuses": [s.status.value for s in states],
            "outcomes": [None if s.outcome is None else s.outcome.value for s in states],
            "attempts": [c.attempts for c in completions],
            "next_attempt_at": [s.next_attempt_at for s in states],
            "lookup_required": [s.lookup_required for s in states],
            "last_error": [s.last_error for s in states],
            "last_status_code": [c.last_status_code for c in completions],
            **_attempt_params([r for c in completions for r in c.attempt_records]),
        }
        (row,) = await self._fetch("complete", params)
        applied = frozenset(row["applied_tokens"])
        return CompleteResult(int(row["completed"]), int(row["woken"]), applied)

    async def rescue(self) -> list[Rescued]:
        rows = await self._fetch("rescue")
        return [Rescued(r["id"], r["transaction_key"], r["lease_owner"]) for r in rows]

    async def database_now(self) -> datetime:
        (row,) = await self._fetch("database_now")
        value: datetime = row["now"]
        return value

    async def next_due(self) -> datetime | None:
        (row,) = await self._fetch("next_due")
        value: datetime | None = row["next_due"]
        return value

    async def backlog(self) -> Backlog:
        (row,) = await self._fetch("status_line")
        oldest = row["oldest_pending_seconds"]
        return Backlog(
            pending=int(row["backlog"]),
            oldest_pending_seconds=float(oldest) if oldest is not None else None,
            failed=int(row["failed"]),
        )

    async def arm_doorbell(self, wait_seconds: float) -> tuple[str, int]:
        """Hold the doorbell on this connection; the state and the connection it holds on."""
        (row,) = await self._fetch("arm_doorbell", {"wait_ms": max(1, round(wait_seconds * 1000))})
        return str(row["state"]), self.generation

    async def disarm_doorbell(self) -> None:
        await self._fetch("disarm_doorbell")


def _attempt_params(records: list[AttemptRecord]) -> dict[str, list[Any]]:
    """The outbox.attempts columns of `records`, one array each (the complete query's a_*)."""
    calls = [r.exchange for r in records]
    return {
        "a_event_id": [r.event_id for r in records],
        "a_attempt": [r.attempt for r in records],
        "a_started_at": [r.exchange.started_at or r.decided_at for r in records],
        "a_finished_at": [r.exchange.finished_at or r.decided_at for r in records],
        "a_method": [x.method for x in calls],
        "a_path": [x.path for x in calls],
        "a_status_code": [x.status_code for x in calls],
        "a_response_excerpt": [x.body_excerpt or None for x in calls],
        "a_error": [x.error for x in calls],
        "a_decision": [r.decision for r in records],
        "a_daemon": [r.daemon for r in records],
    }


def _payload(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if isinstance(value, str):  # a driver without jsonb loading
        loaded = json.loads(value)
        return loaded if isinstance(loaded, dict) else {}
    return dict(value)
