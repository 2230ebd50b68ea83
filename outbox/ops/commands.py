"""The operator surface: what `outbox status | failed | show | retry | discard | prune` ask of the
database and do to it. No click here (outbox/ops/cli.py renders); every function returns a frozen
dataclass whose fields, in their order, are the JSON shape documented in docs/operations.md
(ops_cli serialises it at the edge: times, amounts and enums stay typed until then).

The queries are named, in outbox/sql/ops.sql; `status` and `failed` read the views of migration
0002 (outbox.delivery_summary, outbox.failed_deliveries, outbox.blocked_deliveries), so the CLI
and a plain SQL client give the same answers.

Actions (retry, discard) run in one transaction: the selected rows are locked, checked, changed,
recorded in outbox.operator_actions / outbox.operator_action_events, and a NOTIFY wakes a running
daemon when the transaction commits. A dry run does the same selection and checks under the same
locks, reports what would change, and rolls back without writing anything.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import json
import typing
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar

import sqlalchemy as sa

from outbox.db import queries
from outbox.domain import (
    EventType,
    Outcome,
    Status,
)
from outbox.ops.model import (
    ActionEntry,
    ActionKind,
    ActionResult,
    Attempt,
    AttentionReport,
    BlockedBy,
    Change,
    ChangeKind,
    CountRow,
    CustomerShown,
    DiscardResult,
    EventDetail,
    EventShown,
    FailedPage,
    Filters,
    JSONDict,
    KeyShown,
    LastAttempt,
    Lease,
    LeftBlocked,
    OpsError,
    PendingOverview,
    Problem,
    ProblemState,
    PruneCounts,
    PruneResult,
    RefundChoice,
    Selection,
    StatusReport,
    Totals,
    enum_value,
)
from outbox.text import format_duration, plural

if TYPE_CHECKING:
    from _typeshed import DataclassInstance


SQL_FILE = "ops.sql"
LOCK_TIMEOUT = "10s"  # an action waits at most this long for a row another transaction holds


D = TypeVar("D", bound="DataclassInstance")
R = TypeVar("R")


@functools.cache
def _enum_fields(cls: type[DataclassInstance]) -> dict[str, type[enum.Enum]]:
    """The fields of a result whose type is an enum (or an optional one), by name."""
    hints = typing.get_type_hints(cls)
    found: dict[str, type[enum.Enum]] = {}
    for f in dataclasses.fields(cls):
        for hint in (hints[f.name], *typing.get_args(hints[f.name])):
            if isinstance(hint, type) and issubclass(hint, enum.Enum):
                found[f.name] = hint
    return found


def _from_row(cls: type[D], row: Mapping[Any, Any], **given: Any) -> D:
    """A result from a query row: each field from the column of its name (unless given), a
    status, outcome or other enum field read from its text."""
    enums = _enum_fields(cls)
    values: JSONDict = {}
    for f in dataclasses.fields(cls):
        value = given[f.name] if f.name in given else row[f.name]
        if f.name in enums and value is not None:
            value = enums[f.name](value)
        values[f.name] = value
    return cls(**values)


def _field_values(result: DataclassInstance) -> JSONDict:
    """A result's fields by name, not copied (dataclasses.asdict would convert the nested ones)."""
    return {f.name: getattr(result, f.name) for f in dataclasses.fields(result)}


def _blocked_by(row: Mapping[Any, Any]) -> BlockedBy | None:
    if row["blocked_by_id"] is None:
        return None
    outcome = row["blocked_by_outcome"]
    return BlockedBy(
        id=row["blocked_by_id"],
        event_type=EventType(row["blocked_by_type"]),
        status=Status(row["blocked_by_status"]),
        outcome=None if outcome is None else Outcome(outcome),
    )


def _q(name: str) -> sa.TextClause:
    return sa.text(queries.get(name, SQL_FILE))


def _rows(
    conn: sa.Connection, name: str, params: Mapping[str, Any] | None = None
) -> list[sa.RowMapping]:
    return list(conn.execute(_q(name), dict(params or {})).mappings())


def _snapshot(engine: sa.Engine) -> sa.Connection:
    """A read-only connection whose statements all see one snapshot, so the numbers of one
    command agree with each other."""
    return engine.connect().execution_options(isolation_level="REPEATABLE READ")


def _db_now(conn: sa.Connection) -> datetime:
    now: datetime = conn.execute(_q("now")).scalar_one()
    return now


# ---- outbox status -----------------------------------------------------------------------------


def status(engine: sa.Engine, max_pending_age: timedelta) -> StatusReport:
    """The backlog, what needs a person, and whether the daemons keep up. `ok` is False when a
    row is failed, a row is blocked behind a failed or discarded row, the oldest pending row
    that is not blocked has waited longer than `max_pending_age`, or the last HTTP call was
    refused with 401/403 (the daemons pause sending until the API key works)."""
    with _snapshot(engine) as conn:
        counts = tuple(_from_row(CountRow, r) for r in _rows(conn, "summary"))
        live = _live(conn)
    per_status = Counter[Status]()
    for row in counts:
        per_status[row.status] += row.events
    totals = Totals(**{s.value: per_status[s] for s in Status})
    delivered_at = [r.last_delivered_at for r in counts if r.last_delivered_at is not None]
    last_delivered = max(delivered_at) if delivered_at else None
    return _report(
        StatusReport,
        live,
        totals.failed,
        last_delivered,
        max_pending_age,
        totals=totals,
        counts=counts,
    )


def attention(engine: sa.Engine, max_pending_age: timedelta) -> AttentionReport:
    """`status` without the delivered rows' counts (the whole table's scan): the same problems,
    from the rows that are not delivered (two partial indexes) and the live state."""
    with _snapshot(engine) as conn:
        undelivered = tuple(_from_row(CountRow, r) for r in _rows(conn, "undelivered_summary"))
        last_delivered = next((r["last_delivered_at"] for r in _rows(conn, "last_delivered")), None)
        live = _live(conn)
    failed = sum(row.events for row in undelivered if row.status is Status.FAILED)
    return _report(
        AttentionReport, live, failed, last_delivered, max_pending_age, undelivered=undelivered
    )


@dataclass(frozen=True, slots=True)
class _Live:
    """What status and attention read alike: the pending rows (as of `checked_at`, the
    database's now), the leases and the last call."""

    overview: PendingOverview
    checked_at: datetime
    leases: tuple[Lease, ...]
    last: LastAttempt | None


def _live(conn: sa.Connection) -> _Live:
    (overview,) = _rows(conn, "pending_overview")
    return _Live(
        overview=_from_row(PendingOverview, overview),
        checked_at=overview["checked_at"],
        leases=tuple(_from_row(Lease, r) for r in _rows(conn, "leases")),
        last=next((_from_row(LastAttempt, r) for r in _rows(conn, "last_attempt")), None),
    )


_Report = TypeVar("_Report", StatusReport, AttentionReport)


def _report(
    cls: type[_Report],
    live: _Live,
    failed: int,
    last_delivered: datetime | None,
    max_pending_age: timedelta,
    **own: Any,
) -> _Report:
    """A report of `status` or `attention`: the fields the two share, worked out here once (the
    problems from the failed rows and the live state), and `own`, the report's counts (`totals`
    and `counts`, or `undelivered`)."""
    limit = max_pending_age.total_seconds()
    problems = _attention(failed, live, limit)
    return cls(
        ok=not problems,
        problems=problems,
        checked_at=live.checked_at,
        max_pending_age_seconds=limit,
        pending=live.overview,
        last_delivered_at=last_delivered,
        last_delivery_age_seconds=_age(live.checked_at, last_delivered),
        leases=live.leases,
        last_attempt=live.last,
        **own,
    )


def _age(now: datetime, then: datetime | None) -> float | None:
    return (now - then).total_seconds() if then else None


def _attention(failed: int, live: _Live, limit: float) -> tuple[str, ...]:
    """What needs a person, one line each (`outbox status` exits 1 when there is any)."""
    problems: list[str] = []
    pending, last = live.overview, live.last
    if failed:
        problems.append(plural(failed, "failed row"))
    if pending.blocked:
        problems.append(
            f"{plural(pending.blocked, 'row')} blocked behind a failed or discarded row"
        )
    waiting_age = pending.oldest_waiting_age_seconds
    if waiting_age is not None and waiting_age > limit:
        problems.append(
            f"the oldest pending row has waited {format_duration(waiting_age)} "
            f"(more than {format_duration(limit)})"
        )
    if last is not None and last.paused_sending:
        problems.append(
            f"the last call to Partnero was refused (HTTP {last.status_code}, "
            f"{format_duration(last.age_seconds)} ago): sending is paused; check the API key"
        )
    return tuple(problems)


# ---- outbox failed -----------------------------------------------------------------------------


def failed(engine: sa.Engine, filters: Filters, *, limit: int = 50, page: int = 1) -> FailedPage:
    """Failed rows and rows blocked behind one, newest first (by created_at), one page."""
    with _snapshot(engine) as conn:
        params = {**filters.params(_db_now(conn)), "limit": limit, "offset": (page - 1) * limit}
        found = _rows(conn, "problems", params)
    total: int = found[0]["total"]  # a page past the end is one row of NULLs with the total
    return FailedPage(
        filters=filters.describe(),
        total=total,
        page=page,
        limit=limit,
        pages=max(1, -(-total // limit)),
        rows=tuple(
            _from_row(Problem, r, blocked_by=_blocked_by(r)) for r in found if r["id"] is not None
        ),
    )


def _problem_ids(conn: sa.Connection, params: Mapping[str, Any]) -> list[int]:
    """The ids of every row the `problems` query selects with these parameters."""
    return [r["id"] for r in _rows(conn, "problems", params) if r["id"] is not None]


# ---- outbox show -------------------------------------------------------------------------------


def _events(
    conn: sa.Connection,
    *,
    event_id: int | None = None,
    key: str | None = None,
    customer: str | None = None,
) -> list[EventDetail]:
    """The rows by id, transaction key or customer, each with its attempts and actions."""
    rows = _rows(conn, "events", {"id": event_id, "key": key, "customer": customer})
    ids = [r["id"] for r in rows]
    attempts: dict[int, list[Attempt]] = {i: [] for i in ids}
    actions: dict[int, list[ActionEntry]] = {i: [] for i in ids}
    if ids:
        for a in _rows(conn, "attempts", {"ids": ids}):
            attempts[a["event_id"]].append(_from_row(Attempt, a))
        for a in _rows(conn, "actions", {"ids": ids}):
            actions[a["event_id"]].append(_from_row(ActionEntry, a))
    return [
        _from_row(
            EventDetail,
            r,
            blocked_by=_blocked_by(r),
            attempt_history=tuple(attempts[r["id"]]),
            operator_actions=tuple(actions[r["id"]]),
        )
        for r in rows
    ]


def _found(engine: sa.Engine, missing: str, **which: Any) -> tuple[EventDetail, ...]:
    """The rows `which` selects (in one snapshot), or OpsError(missing) when there are none."""
    with _snapshot(engine) as conn:
        found = _events(conn, **which)
    if not found:
        raise OpsError(missing)
    return tuple(found)


def show_event(engine: sa.Engine, event_id: int) -> EventShown:
    (event,) = _found(engine, f"no event with id {event_id}", event_id=event_id)
    return EventShown(event=event)


def show_key(engine: sa.Engine, key: str) -> KeyShown:
    found = _found(engine, f"no event with transaction key {key!r}", key=key)
    return KeyShown(transaction_key=key, events=found)


def show_customer(engine: sa.Engine, customer: str) -> CustomerShown:
    """A customer's signups, sales and the refunds of those sales, in delivery order."""
    found = _found(engine, f"no event with customer key {customer!r}", customer=customer)
    return CustomerShown(customer_key=customer, events=found)


# ---- outbox retry / outbox discard -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Row:
    """A row an action looks at, locked for the rest of its transaction."""

    id: int
    event_type: EventType
    transaction_key: str | None
    customer_key: str | None
    status: Status
    outcome: Outcome | None
    attempts: int
    parked: bool
    lease_owner: str | None
    leased: bool  # a daemon holds it right now


def _keys(rows: Iterable[_Row]) -> list[str]:
    """The transaction keys of the rows (signups have none)."""
    return sorted({r.transaction_key for r in rows if r.transaction_key is not None})


_NEW_STATUS = {
    ChangeKind.RETRY: Status.PENDING,
    ChangeKind.DISCARD: Status.DISCARDED,
    ChangeKind.RELEASE: Status.PENDING,
    ChangeKind.WAKE: Status.PENDING,
}
# The statement that carries out each change, in the order they run.
_APPLY = {
    ChangeKind.RETRY: "apply_retry",
    ChangeKind.DISCARD: "apply_discard",
    ChangeKind.RELEASE: "apply_release",
    ChangeKind.WAKE: "apply_wake",
}


def _change(row: _Row, change: ChangeKind) -> Change:
    return Change(
        event_id=row.id,
        event_type=row.event_type,
        transaction_key=row.transaction_key,
        customer_key=row.customer_key,
        change=change,
        previous_status=row.status,
        previous_outcome=row.outcome,
        previous_attempts=row.attempts,
        new_status=_NEW_STATUS[change],
    )


def _locked(conn: sa.Connection, name: str, params: Mapping[str, Any]) -> list[_Row]:
    return [_from_row(_Row, r) for r in _rows(conn, name, params)]


def _lock_selected(
    conn: sa.Connection, selection: Selection, *, state: ProblemState | None
) -> list[_Row]:
    """Lock the selected rows. Explicit ids must all exist; a filter selects what `outbox
    failed` lists with the same filters (narrowed to `state` when given), checked again once the
    rows are locked."""
    if selection.ids:
        ids = list(selection.ids)
        rows = _locked(conn, "lock_events", {"ids": ids})
        missing = sorted(set(ids) - {r.id for r in rows})
        if len(missing) == 1:
            raise OpsError(f"no event with id {missing[0]}")
        if missing:
            raise OpsError(f"no events with ids {', '.join(map(str, missing))}")
        return rows
    filters = selection.filters
    if state is not None:
        if filters.state not in (None, state):
            raise OpsError(f"--state {filters.state}: this action applies to {state} rows only")
        filters = dataclasses.replace(filters, state=state)
    now = _db_now(conn)
    candidates = _problem_ids(conn, filters.params(now))
    if not candidates:
        return []
    locked = {r.id: r for r in _locked(conn, "lock_events", {"ids": candidates})}
    # Under the locks: still failed or blocked, still matching?
    still = _problem_ids(conn, filters.params(now, candidates))
    return [locked[i] for i in sorted(still) if i in locked]


class _Related:
    """The other rows of the keys of the rows an action selected, and the parked sales of the
    customers of the signups among them, locked for the rest of its transaction (the query
    `related_rows`), by key."""

    def __init__(self, conn: sa.Connection, rows: list[_Row], *, besides: list[_Row]) -> None:
        signups = [r for r in rows if r.event_type is EventType.SIGNUP]
        params = {
            "keys": _keys(rows),
            "customers": sorted({r.customer_key for r in signups if r.customer_key is not None}),
            "ids": [r.id for r in besides],
        }
        self.rows = _locked(conn, "related_rows", params)
        self._by_key: dict[str, list[_Row]] = {}
        for r in self.rows:
            if r.transaction_key is not None:
                self._by_key.setdefault(r.transaction_key, []).append(r)

    def of(self, row: _Row, event_type: EventType, status_: Status) -> list[_Row]:
        """The rows of `row`'s key with this type and status."""
        same_key = self._by_key.get(row.transaction_key or "", [])
        return [r for r in same_key if r.event_type is event_type and r.status is status_]

    def wake(self) -> list[Change]:
        """The parked ones: they are made due now."""
        parked = [r for r in self.rows if r.parked and r.status is Status.PENDING]
        return [_change(r, ChangeKind.WAKE) for r in parked]


def _refuse(problems: list[str]) -> None:
    if problems:
        raise OpsError("; ".join(problems))


def _record(
    conn: sa.Connection,
    *,
    action: ActionKind,
    actor: str,
    reason: str,
    selection: JSONDict,
    changes: Sequence[Change],
    event_count: int,
) -> tuple[int, datetime]:
    """The action and the rows it changed (their state before), in the record."""
    (row,) = _rows(
        conn,
        "record_action",
        {
            "actor": actor,
            "action": action.value,
            "reason": reason,
            "selection": json.dumps(selection),
            "event_count": event_count,
        },
    )
    if changes:
        conn.execute(
            _q("record_action_events"),
            {
                "action_id": row["id"],
                "event_ids": [c.event_id for c in changes],
                "event_types": [c.event_type.value for c in changes],
                "keys": [c.transaction_key for c in changes],
                "changes": [c.change.value for c in changes],
                "statuses": [c.previous_status.value for c in changes],
                "outcomes": [enum_value(c.previous_outcome) for c in changes],
                "attempts": [c.previous_attempts for c in changes],
            },
        )
    return int(row["id"]), row["at"]


def _commit(
    conn: sa.Connection,
    action: ActionKind,
    changes: list[Change],
    *,
    selection: JSONDict,
    dry_run: bool,
    actor: str,
    reason: str | None,
) -> ActionResult:
    """Carry out the changes (not on a dry run, not when only wake-ups are left), record them and
    ring the doorbell; the result says what changed or would."""
    counted = [c for c in changes if c.change is not ChangeKind.WAKE]
    recorded = None
    if counted and not dry_run:
        assert reason is not None
        for kind, statement in _APPLY.items():
            ids = [c.event_id for c in changes if c.change is kind]
            if ids:
                conn.execute(_q(statement), {"ids": ids})
        recorded = _record(
            conn,
            action=action,
            actor=actor,
            reason=reason,
            selection=selection,
            changes=counted,
            event_count=len(counted),
        )
        conn.execute(_q("notify"))
    return ActionResult(
        action=action,
        dry_run=dry_run,
        action_id=recorded[0] if recorded else None,
        at=recorded[1] if recorded else None,
        actor=actor,
        reason=reason,
        selection=selection,
        count=len(counted),
        changes=tuple(changes),
        notified=recorded is not None,
    )


def _begin(conn: sa.Connection) -> None:
    """Settings for a short writing transaction (lock timeout, no JIT), until it ends."""
    conn.execute(_q("action_settings"), {"lock_timeout": LOCK_TIMEOUT})


def _run_action(engine: sa.Engine, dry_run: bool, body: Callable[[sa.Connection], R]) -> R:
    with engine.connect() as conn:
        try:
            with conn.begin() as tx:
                _begin(conn)
                result = body(conn)
                if dry_run:
                    tx.rollback()
        except sa.exc.OperationalError as exc:
            if getattr(exc.orig, "sqlstate", None) == "55P03":  # lock_not_available
                raise OpsError(
                    f"the rows are held by another transaction for more than {LOCK_TIMEOUT}; "
                    "try again"
                ) from None
            raise
    return result


_RETRYABLE = (Status.FAILED, Status.DISCARDED, Status.SKIPPED)


def _retry_problems(conn: sa.Connection, rows: list[_Row]) -> list[str]:
    """Why rows that are neither failed, discarded nor skipped cannot be retried."""
    pending = [r.id for r in rows if r.status is Status.PENDING]
    blockers = {b["id"]: b for b in _rows(conn, "blockers", {"ids": pending})}
    problems = []
    for r in rows:
        if r.status in _RETRYABLE:
            continue
        if r.id in blockers:
            b = blockers[r.id]
            problems.append(
                f"event {r.id} is pending, blocked behind event {b['blocked_by_id']} "
                f"({b['blocked_by_type']}, {b['blocked_by_status']}): retry or discard that one"
            )
        elif r.status is Status.PENDING:
            problems.append(f"event {r.id} is pending already: nothing to retry")
        else:
            problems.append(f"event {r.id} is delivered ({r.outcome}): nothing to retry")
    return problems


def _refunds_alone(rows: list[_Row], related: _Related) -> list[str]:
    """Refunds skipped because their sale was, named without that sale: sent alone they would
    only be skipped again."""
    problems = []
    for refund in rows:
        if refund.status is not Status.SKIPPED or refund.outcome is not Outcome.SALE_SKIPPED:
            continue
        sales = related.of(refund, EventType.SALE, Status.SKIPPED)
        if sales:
            problems.append(
                f"event {refund.id} is a refund skipped because its sale was: retry the sale "
                f"(event {sales[0].id}), and its skipped refunds go back to pending with it"
            )
    return problems


def _refunds_already_sent(rows: list[_Row], related: _Related) -> list[str]:
    """Discarded or skipped sales whose refund was delivered: sending them now would create a
    commission that stays."""
    problems = []
    for sale in filter(_unsent_sale, rows):
        when = "after the sale was discarded" if sale.status is Status.DISCARDED else "already"
        for refund in related.of(sale, EventType.REFUND, Status.DELIVERED):
            problems.append(
                f"event {sale.id}: its refund (event {refund.id}) was delivered {when}; sending "
                "the sale now would create a commission that stays"
            )
    return problems


def _refunds_behind(rows: list[_Row], related: _Related) -> list[_Row]:
    """The refunds skipped because their sale was (sale_skipped), behind the sales being
    retried: they go back to pending with them, behind them; else the sale would be created and
    its refund never sent."""
    return [
        refund
        for sale in rows
        if sale.event_type is EventType.SALE
        for refund in related.of(sale, EventType.REFUND, Status.SKIPPED)
        if refund.outcome is Outcome.SALE_SKIPPED
    ]


def retry(
    engine: sa.Engine,
    selection: Selection,
    *,
    dry_run: bool,
    actor: str,
    reason: str | None,
) -> ActionResult:
    """Send failed, skipped (or, by id, discarded) rows again: pending, due now, attempts back
    to 0 so every retry class has its full budget; lookup_required is kept. The refunds skipped
    behind a retried sale are retried with it. Parked rows of their keys (and the parked sales of
    a retried signup's customer) are woken, and a NOTIFY wakes a running daemon."""
    narrow = ProblemState.FAILED
    if selection.filters.status is Status.SKIPPED:
        narrow = ProblemState.SKIPPED

    def body(conn: sa.Connection) -> ActionResult:
        rows = _lock_selected(conn, selection, state=None if selection.ids else narrow)
        related = _Related(conn, rows, besides=rows)
        _refuse(_retry_problems(conn, rows) + _refunds_alone(rows, related))
        _refuse(_refunds_already_sent(rows, related))
        changes = [_change(r, ChangeKind.RETRY) for r in rows + _refunds_behind(rows, related)]
        changes += related.wake()
        return _commit(
            conn,
            ActionKind.RETRY,
            changes,
            selection=selection.describe(),
            dry_run=dry_run,
            actor=actor,
            reason=reason,
        )

    return _run_action(engine, dry_run, body)


def discard(
    engine: sa.Engine,
    selection: Selection,
    *,
    refunds: RefundChoice,
    dry_run: bool,
    actor: str,
    reason: str | None,
) -> DiscardResult:
    """Give up on rows: failed or blocked ones by filter, failed or pending ones (not in flight)
    by id. `refunds` says what becomes of refunds that the discarded sales leave waiting: keep
    (they stay blocked, visibly), discard (discarded too, recorded), release (sent anyway)."""

    def body(conn: sa.Connection) -> DiscardResult:
        selected = _lock_selected(conn, selection, state=None)
        # A sale discarded earlier may be named again to decide about its refunds now.
        earlier = [r for r in selected if _discarded_sale(r) and refunds is not RefundChoice.KEEP]
        rows = [r for r in selected if r not in earlier]
        _refuse(_discard_problems(rows))
        behind = _locked(conn, "refunds_left_behind", {"ids": [r.id for r in rows + earlier]})
        changes = [_change(r, ChangeKind.DISCARD) for r in rows]
        left_blocked: tuple[LeftBlocked, ...] = ()
        if refunds is RefundChoice.KEEP:
            left_blocked = _left_blocked(rows, behind)
        else:
            _refuse(_discard_problems(behind))
            kind = ChangeKind.DISCARD if refunds is RefundChoice.DISCARD else ChangeKind.RELEASE
            changes += [_change(r, kind) for r in behind]
        changes += _Related(conn, rows, besides=rows + behind).wake()
        result = _commit(
            conn,
            ActionKind.DISCARD,
            changes,
            selection={**selection.describe(), "refunds": refunds.value},
            dry_run=dry_run,
            actor=actor,
            reason=reason,
        )
        return DiscardResult(**_field_values(result), left_blocked=left_blocked)

    return _run_action(engine, dry_run, body)


def _discarded_sale(row: _Row) -> bool:
    return row.status is Status.DISCARDED and row.event_type is EventType.SALE


def _unsent_sale(row: _Row) -> bool:
    """A sale settled without reaching Partnero: discarded, or skipped."""
    return row.status in (Status.DISCARDED, Status.SKIPPED) and row.event_type is EventType.SALE


def _left_blocked(sales: list[_Row], refunds: list[_Row]) -> tuple[LeftBlocked, ...]:
    """The refunds that stay blocked, each with the (first) discarded sale of its key."""
    sale_of: dict[str, int] = {}
    for r in sorted(sales, key=lambda r: r.id):
        if r.event_type is EventType.SALE and r.transaction_key is not None:
            sale_of.setdefault(r.transaction_key, r.id)
    return tuple(
        LeftBlocked(
            event_id=r.id,
            event_type=r.event_type,
            transaction_key=r.transaction_key,
            sale_id=sale_of[r.transaction_key],
        )
        for r in refunds
        if r.transaction_key is not None  # a refund always has one
    )


def _discard_problems(rows: list[_Row]) -> list[str]:
    return [p for p in map(_discard_problem, rows) if p]


def _discard_problem(row: _Row) -> str | None:
    if row.status is Status.DELIVERED:
        return f"event {row.id} is delivered ({row.outcome}): it cannot be discarded"
    if row.status is Status.SKIPPED:
        return (
            f"event {row.id} is skipped ({row.outcome}): settled, it is never sent; there is "
            "nothing to discard (outbox prune deletes it in time)"
        )
    if row.status is Status.DISCARDED:
        return (
            f"event {row.id} is discarded already (for a sale, --refunds release|discard "
            "decides about the refunds queued behind it)"
        )
    if row.leased:
        return (
            f"event {row.id} is in flight (leased by {row.lease_owner}): try again when "
            "its call is over"
        )
    return None


# ---- outbox prune ------------------------------------------------------------------------------

# Settled rows pruned by default: they need no one (a skipped row is a customer no partner
# referred, most of a shop's sales maybe). Discarded ones only when asked.
_PRUNED = (Status.DELIVERED, Status.SKIPPED)
_PRUNE_COUNTS = tuple(f.name for f in dataclasses.fields(PruneCounts))


def prune(
    engine: sa.Engine,
    older_than: timedelta,
    *,
    include_discarded: bool,
    batch_size: int,
    dry_run: bool,
    actor: str,
    reason: str,
) -> PruneResult:
    """Delete delivered and skipped rows (and, when asked, discarded rows) settled longer ago
    than `older_than`, with their attempts, `batch_size` rows per transaction, oldest first.
    Failed and pending rows are never deleted, nor any row whose transaction key still has a
    pending or failed row."""
    pruned_statuses = _PRUNED + ((Status.DISCARDED,) if include_discarded else ())
    statuses = [s.value for s in pruned_statuses]
    with engine.connect() as conn:
        cutoff: datetime = conn.execute(
            _q("prune_cutoff"), {"seconds": older_than.total_seconds()}
        ).scalar_one()
    params = {"cutoff": cutoff, "statuses": statuses, "batch_size": batch_size}
    if dry_run:
        preview = _prune_preview(engine, params)
        pruned = _from_row(PruneCounts, preview)
        batches = -(-pruned.events // batch_size)
    else:
        pruned, batches = _prune_batches(engine, params)
        preview = _prune_preview(engine, params)  # for the rows it kept
    result = PruneResult(
        dry_run=dry_run,
        cutoff=cutoff,
        older_than_seconds=older_than.total_seconds(),
        include_discarded=include_discarded,
        batch_size=batch_size,
        batches=batches,
        pruned=pruned,
        kept_open_key=int(preview["kept_open_key"]),
        action_id=None,
    )
    if dry_run or not pruned.events:
        return result
    action_id = _record_prune(engine, result, actor=actor, reason=reason)
    return dataclasses.replace(result, action_id=action_id)


def _prune_preview(engine: sa.Engine, params: Mapping[str, Any]) -> sa.RowMapping:
    """What a run would delete, and the old rows it keeps for their key."""
    with engine.connect() as conn:
        (row,) = _rows(conn, "prune_preview", params)
    return row


def _record_prune(engine: sa.Engine, result: PruneResult, *, actor: str, reason: str) -> int:
    """A run that deleted rows, in the record: what it was asked and what it deleted."""
    selection = {
        "older_than": format_duration(result.older_than_seconds),
        "cutoff": result.cutoff.astimezone(UTC).isoformat(),
        "include_discarded": result.include_discarded,
        "batch_size": result.batch_size,
        **_field_values(result.pruned),
    }
    with engine.begin() as conn:
        action_id, _ = _record(
            conn,
            action=ActionKind.PRUNE,
            actor=actor,
            reason=reason,
            selection=selection,
            changes=[],
            event_count=result.pruned.events,
        )
    return action_id


def _prune_batches(engine: sa.Engine, params: Mapping[str, Any]) -> tuple[PruneCounts, int]:
    """Delete in batches, one transaction each, the oldest settled rows first, until a batch
    comes back short."""
    pruned = Counter[str]()
    batches = 0
    while True:
        with engine.begin() as conn:
            _begin(conn)
            (done,) = _rows(conn, "prune_batch", params)
        if done["events"]:
            batches += 1
            pruned.update({name: int(done[name]) for name in _PRUNE_COUNTS})
        if done["events"] < params["batch_size"]:
            break
    return _from_row(PruneCounts, pruned), batches
