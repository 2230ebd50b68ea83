"""The operator surface: what `outbox status | failed | show | retry | discard | prune` ask of the
database and do to it. No click here (outbox/ops_cli.py renders); every function returns a plain,
JSON-ready dict whose shape is documented in docs/operations.md.

The queries are in outbox/sql/ops.sql; `status` and `failed` read the views of migration 0002
(outbox.delivery_summary, outbox.failed_deliveries, outbox.blocked_deliveries), so the CLI and a
plain SQL client give the same answers.

Actions (retry, discard) run in one transaction: the selected rows are locked, checked, changed,
recorded in outbox.operator_actions / outbox.operator_action_events, and a NOTIFY wakes a running
daemon when the transaction commits. A dry run does the same selection and checks under the same
locks, reports what would change, and rolls back without writing anything.
"""

from __future__ import annotations

import getpass
import json
import os
import re
import socket
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from uuid import UUID

import sqlalchemy as sa

from outbox import queries
from outbox.domain import DELIVERED_OUTCOMES, EventType, Outcome

JSONDict = dict[str, Any]

SQL_FILE = "ops.sql"
LOCK_TIMEOUT = "10s"  # an action waits at most this long for a row another transaction holds

FAILED_OUTCOMES: tuple[str, ...] = tuple(o.value for o in Outcome if o not in DELIVERED_OUTCOMES)
STATES = ("failed", "blocked")
EVENT_TYPES: tuple[str, ...] = tuple(t.value for t in EventType)
REFUND_CHOICES = ("keep", "discard", "release")


class OpsError(Exception):
    """A one-line reason why a command cannot do what was asked (unknown id, wrong state...)."""


# ---- parsing what the operator typed -----------------------------------------------------------

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"(\d+)([smhdw])")


def parse_duration(text: str) -> timedelta:
    """`30m`, `2h`, `7d`, `1h30m` (units s, m, h, d, w). Raises ValueError with a clear line."""
    cleaned = text.strip().lower()
    if cleaned and _DURATION.sub("", cleaned) == "":
        seconds = sum(int(n) * _UNITS[u] for n, u in _DURATION.findall(cleaned))
        if seconds > 0:
            return timedelta(seconds=seconds)
    raise ValueError(f"{text!r} is not a duration like 30m, 2h, 7d")


@dataclass(frozen=True, slots=True)
class TimeBound:
    """`--since` / `--until`: a duration before now (resolved with the database's clock), or a
    point in time (ISO 8601; without an offset it is UTC)."""

    ago: timedelta | None = None
    at: datetime | None = None

    def resolve(self, now: datetime) -> datetime:
        if self.at is not None:
            return self.at
        assert self.ago is not None
        return now - self.ago

    def text(self) -> str:
        if self.at is not None:
            return self.at.isoformat()
        assert self.ago is not None
        return format_duration(self.ago.total_seconds()) + " ago"


def parse_time_bound(text: str) -> TimeBound:
    try:
        return TimeBound(ago=parse_duration(text))
    except ValueError:
        pass
    try:
        at = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"{text!r} is not a duration like 30m, 2h, 7d or a time like 2026-01-31T14:00"
        ) from None
    return TimeBound(at=at if at.tzinfo else at.replace(tzinfo=UTC))


def format_duration(seconds: float | None) -> str:
    """A short human duration, two units at most: 45s, 12m, 2m08s, 3h05m, 2h, 30d, 2d04h."""
    if seconds is None:
        return "-"
    total = max(0, round(seconds))
    units = (("d", 86400), ("h", 3600), ("m", 60), ("s", 1))
    for n, (unit, size) in enumerate(units):
        if total >= size or unit == "s":
            big, rest = divmod(total, size)
            if unit == "s":
                return f"{big}s"
            small_unit, small_size = units[n + 1]
            small = rest // small_size
            return f"{big}{unit}{small:02d}{small_unit}" if small else f"{big}{unit}"
    raise AssertionError("unreachable")


def parse_ids(text: str) -> list[int]:
    """Event ids separated by spaces or commas."""
    ids: list[int] = []
    for part in text.replace(",", " ").split():
        if not (part.isascii() and part.isdigit()) or int(part) <= 0:
            raise ValueError(f"{part!r} is not an event id")
        ids.append(int(part))
    return sorted(set(ids))


def default_actor() -> str:
    """Who is acting: $SUDO_USER (the person behind sudo) or $USER, at this host."""
    user = os.environ.get("SUDO_USER") or os.environ.get("USER")
    if not user:
        try:
            user = getpass.getuser()
        except Exception:  # no name for this uid (a container): say so rather than guess
            user = f"uid{os.getuid()}"
    return f"{user}@{socket.gethostname()}"


@dataclass(frozen=True, slots=True)
class Filters:
    """What `outbox failed` (and `retry` / `discard` by filter) select. None means any."""

    state: str | None = None
    outcome: str | None = None
    status_code: int | None = None
    since: TimeBound | None = None
    until: TimeBound | None = None
    key: str | None = None
    customer: str | None = None
    event_type: str | None = None

    def given(self) -> bool:
        return any(getattr(self, name) is not None for name in self.__slots__)

    def describe(self) -> JSONDict:
        """The filters as given, for the JSON output and the action record."""
        out: JSONDict = {}
        for name in self.__slots__:
            value = getattr(self, name)
            if value is not None:
                out[name] = value.text() if isinstance(value, TimeBound) else value
        return out

    def params(self, now: datetime, ids: Sequence[int] | None = None) -> JSONDict:
        return {
            "ids": list(ids) if ids is not None else None,
            "state": self.state,
            "outcome": self.outcome,
            "status_code": self.status_code,
            "since": self.since.resolve(now) if self.since else None,
            "until": self.until.resolve(now) if self.until else None,
            "key": self.key,
            "customer": self.customer,
            "event_type": self.event_type,
        }


def parse_status_code(text: str | None) -> int | None:
    if text is None:
        return None
    cleaned = text.strip()
    if not (cleaned.isascii() and cleaned.isdigit()) or not 100 <= int(cleaned) <= 599:
        raise ValueError(f"{text!r} is not an HTTP status code (100-599)")
    return int(cleaned)


# ---- JSON-ready values -------------------------------------------------------------------------


def jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat()
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, float):
        return round(value, 3)
    return value


def _pick(row: Mapping[Any, Any], names: Iterable[str]) -> JSONDict:
    return {name: jsonable(row[name]) for name in names}


def _q(name: str) -> sa.TextClause:
    return sa.text(queries.get(name, SQL_FILE))


def _snapshot(engine: sa.Engine) -> sa.Connection:
    """A read-only connection whose statements all see one snapshot, so the numbers of one
    command agree with each other."""
    return engine.connect().execution_options(isolation_level="REPEATABLE READ")


def _db_now(conn: sa.Connection) -> datetime:
    now: datetime = conn.execute(sa.text("SELECT now()")).scalar_one()
    return now


# ---- outbox status -----------------------------------------------------------------------------

SUMMARY_FIELDS = (
    "event_type",
    "status",
    "outcome",
    "events",
    "oldest_created_at",
    "oldest_age_seconds",
    "last_delivered_at",
)
PENDING_FIELDS = (
    "events",
    "in_flight",
    "blocked",
    "oldest_created_at",
    "oldest_age_seconds",
    "oldest_waiting_created_at",
    "oldest_waiting_age_seconds",
)
LEASE_FIELDS = ("owner", "events", "expired", "expires_at", "expires_in_seconds")
LAST_ATTEMPT_FIELDS = (
    "event_id",
    "started_at",
    "age_seconds",
    "method",
    "path",
    "status_code",
    "decision",
    "error",
    "daemon",
)


def status(engine: sa.Engine, max_pending_age: timedelta) -> JSONDict:
    """The backlog, what needs a person, and whether the daemons keep up. `ok` is False when a
    row is failed, a row is blocked behind a failed or discarded row, the oldest pending row
    that is not blocked has waited longer than `max_pending_age`, or the last HTTP call was
    refused with 401/403 (the daemons pause sending until the API key works)."""
    with _snapshot(engine) as conn:
        counts = [dict(r) for r in conn.execute(_q("summary")).mappings()]
        pending = dict(conn.execute(_q("pending_overview")).mappings().one())
        leases = [dict(r) for r in conn.execute(_q("leases")).mappings()]
        last = conn.execute(_q("last_attempt")).mappings().first()
    totals = {s: 0 for s in ("pending", "delivered", "failed", "discarded")}
    for row in counts:
        totals[row["status"]] += row["events"]
    delivered_at = [r["last_delivered_at"] for r in counts if r["last_delivered_at"] is not None]
    last_delivered = max(delivered_at) if delivered_at else None
    checked_at: datetime = pending["checked_at"]
    pending["events"] = pending.pop("pending")
    problems: list[str] = []
    if totals["failed"]:
        problems.append(f"{_n(totals['failed'], 'failed row')}")
    if pending["blocked"]:
        problems.append(f"{_n(pending['blocked'], 'row')} blocked behind a failed or discarded row")
    waiting_age = pending["oldest_waiting_age_seconds"]
    limit = max_pending_age.total_seconds()
    if waiting_age is not None and waiting_age > limit:
        problems.append(
            f"the oldest pending row has waited {format_duration(waiting_age)} "
            f"(more than {format_duration(limit)})"
        )
    if last is not None and str(last["decision"]).startswith("pause:"):
        # 401/403: the daemon's key is refused and it sends nothing until the key works again.
        problems.append(
            f"the last call to Partnero was refused (HTTP {last['status_code']}, "
            f"{format_duration(last['age_seconds'])} ago): sending is paused; check the API key"
        )
    return {
        "ok": not problems,
        "problems": problems,
        "checked_at": jsonable(checked_at),
        "max_pending_age_seconds": limit,
        "totals": totals,
        "counts": [_pick(r, SUMMARY_FIELDS) for r in counts],
        "pending": _pick(pending, PENDING_FIELDS),
        "last_delivered_at": jsonable(last_delivered),
        "last_delivery_age_seconds": (
            jsonable((checked_at - last_delivered).total_seconds()) if last_delivered else None
        ),
        "leases": [_pick(r, LEASE_FIELDS) for r in leases],
        "last_attempt": _pick(last, LAST_ATTEMPT_FIELDS) if last is not None else None,
    }


def _n(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


# ---- outbox failed -----------------------------------------------------------------------------

PROBLEM_FIELDS = (
    "id",
    "state",
    "event_type",
    "transaction_key",
    "customer_key",
    "amount",
    "currency",
    "outcome",
    "last_status_code",
    "last_error",
    "attempts",
    "created_at",
    "updated_at",
    "age_seconds",
    "rows_waiting",
)


def _problem(row: Mapping[Any, Any], now: datetime) -> JSONDict:
    out = _pick({**row, "age_seconds": (now - row["created_at"]).total_seconds()}, PROBLEM_FIELDS)
    out["blocked_by"] = (
        {
            "id": row["blocked_by_id"],
            "event_type": row["blocked_by_type"],
            "status": row["blocked_by_status"],
            "outcome": row["blocked_by_outcome"],
        }
        if row["blocked_by_id"] is not None
        else None
    )
    return out


def _problems_sql(suffix: str) -> sa.TextClause:
    return sa.text(f"SELECT * FROM (\n{queries.get('problems', SQL_FILE)}\n) problems {suffix}")


def failed(engine: sa.Engine, filters: Filters, *, limit: int = 50, page: int = 1) -> JSONDict:
    """Failed rows and rows blocked behind one, newest first (by created_at), one page."""
    with _snapshot(engine) as conn:
        now = _db_now(conn)
        params = filters.params(now)
        total = conn.execute(
            sa.text(f"SELECT count(*) FROM (\n{queries.get('problems', SQL_FILE)}\n) p"), params
        ).scalar_one()
        rows = conn.execute(
            _problems_sql("ORDER BY created_at DESC, id DESC LIMIT :limit OFFSET :offset"),
            {**params, "limit": limit, "offset": (page - 1) * limit},
        ).mappings()
        found = [_problem(r, now) for r in rows]
    return {
        "filters": filters.describe(),
        "total": total,
        "page": page,
        "limit": limit,
        "pages": max(1, -(-total // limit)),
        "rows": found,
    }


# ---- outbox show -------------------------------------------------------------------------------

EVENT_FIELDS = (
    "id",
    "event_type",
    "transaction_key",
    "customer_key",
    "amount",
    "currency",
    "payload",
    "status",
    "outcome",
    "attempts",
    "next_attempt_at",
    "lookup_required",
    "parked",
    "order_released",
    "lease_owner",
    "lease_expires_at",
    "last_error",
    "last_status_code",
    "created_at",
    "updated_at",
    "delivered_at",
    "age_seconds",
)
ATTEMPT_FIELDS = (
    "attempt",
    "started_at",
    "finished_at",
    "duration_ms",
    "method",
    "path",
    "status_code",
    "response_excerpt",
    "error",
    "decision",
    "daemon",
)
ACTION_FIELDS = (
    "action_id",
    "at",
    "actor",
    "action",
    "change",
    "reason",
    "previous_status",
    "previous_outcome",
    "previous_attempts",
)


def _events(conn: sa.Connection, *, event_id: int | None, key: str | None) -> list[JSONDict]:
    rows = list(conn.execute(_q("events"), {"id": event_id, "key": key}).mappings())
    ids = [r["id"] for r in rows]
    attempts: dict[int, list[JSONDict]] = {i: [] for i in ids}
    actions: dict[int, list[JSONDict]] = {i: [] for i in ids}
    if ids:
        for a in conn.execute(_q("attempts"), {"ids": ids}).mappings():
            attempts[a["event_id"]].append(_pick(a, ATTEMPT_FIELDS))
        for a in conn.execute(_q("actions"), {"ids": ids}).mappings():
            actions[a["event_id"]].append(_pick(a, ACTION_FIELDS))
    out = []
    for r in rows:
        event = _pick(r, EVENT_FIELDS)
        event["blocked_by"] = (
            {
                "id": r["blocked_by_id"],
                "event_type": r["blocked_by_type"],
                "status": r["blocked_by_status"],
                "outcome": r["blocked_by_outcome"],
            }
            if r["blocked_by_id"] is not None
            else None
        )
        event["attempt_history"] = attempts[r["id"]]
        event["operator_actions"] = actions[r["id"]]
        out.append(event)
    return out


def show_event(engine: sa.Engine, event_id: int) -> JSONDict:
    with _snapshot(engine) as conn:
        found = _events(conn, event_id=event_id, key=None)
    if not found:
        raise OpsError(f"no event with id {event_id}")
    return {"event": found[0]}


def show_key(engine: sa.Engine, key: str) -> JSONDict:
    with _snapshot(engine) as conn:
        found = _events(conn, event_id=None, key=key)
    if not found:
        raise OpsError(f"no event with transaction key {key!r}")
    return {"transaction_key": key, "events": found}


# ---- outbox retry / outbox discard -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Selection:
    """Which rows an action is about: explicit ids, or filters (or every candidate: all_rows)."""

    ids: tuple[int, ...] = ()
    filters: Filters = field(default_factory=Filters)
    all_rows: bool = False

    def describe(self) -> JSONDict:
        if self.ids:
            return {"ids": list(self.ids)}
        return {"filters": self.filters.describe(), "all": self.all_rows}


CHANGE_FIELDS = (
    "event_id",
    "event_type",
    "transaction_key",
    "customer_key",
    "change",
    "previous_status",
    "previous_outcome",
    "previous_attempts",
    "new_status",
)


def _change(row: Mapping[Any, Any], change: str, new_status: str) -> JSONDict:
    return {
        "event_id": row["id"],
        "event_type": row["event_type"],
        "transaction_key": row["transaction_key"],
        "customer_key": row.get("customer_key"),
        "change": change,
        "previous_status": row["status"],
        "previous_outcome": row["outcome"],
        "previous_attempts": row["attempts"],
        "new_status": new_status,
    }


def _lock_selected(
    conn: sa.Connection, selection: Selection, *, state: str | None
) -> list[dict[str, Any]]:
    """Lock the selected rows. Explicit ids must all exist; a filter selects what `outbox
    failed` lists with the same filters (narrowed to `state` when given), checked again once the
    rows are locked."""
    if selection.ids:
        ids = list(selection.ids)
        rows = [dict(r) for r in conn.execute(_q("lock_events"), {"ids": ids}).mappings()]
        missing = sorted(set(ids) - {r["id"] for r in rows})
        if len(missing) == 1:
            raise OpsError(f"no event with id {missing[0]}")
        if missing:
            raise OpsError(f"no events with ids {', '.join(map(str, missing))}")
        return rows
    filters = selection.filters
    if state is not None:
        if filters.state not in (None, state):
            raise OpsError(f"--state {filters.state}: this action applies to {state} rows only")
        filters = Filters(**{**_filter_dict(filters), "state": state})
    now = _db_now(conn)
    found = conn.execute(_problems_sql(""), filters.params(now)).mappings()
    candidates = [r["id"] for r in found]
    if not candidates:
        return []
    locked = {
        r["id"]: dict(r) for r in conn.execute(_q("lock_events"), {"ids": candidates}).mappings()
    }
    # Under the locks: still failed or blocked, still matching?
    again = conn.execute(_problems_sql(""), filters.params(now, candidates)).mappings()
    still = [r["id"] for r in again]
    return [locked[i] for i in sorted(still) if i in locked]


def _filter_dict(filters: Filters) -> dict[str, Any]:
    return {name: getattr(filters, name) for name in filters.__slots__}


def _blockers(conn: sa.Connection, ids: list[int]) -> dict[int, Mapping[Any, Any]]:
    rows = conn.execute(_q("blockers"), {"ids": ids}).mappings()
    return {r["id"]: r for r in rows}


def _refuse(problems: list[str]) -> None:
    if problems:
        raise OpsError("; ".join(problems))


def _record(
    conn: sa.Connection,
    *,
    action: str,
    actor: str,
    reason: str,
    selection: JSONDict,
    changes: list[JSONDict],
    event_count: int | None = None,
) -> tuple[int, datetime]:
    recorded = [c for c in changes if c["change"] != "wake"]
    row = (
        conn.execute(
            _q("record_action"),
            {
                "actor": actor,
                "action": action,
                "reason": reason,
                "selection": json.dumps(selection),
                "event_count": len(recorded) if event_count is None else event_count,
            },
        )
        .mappings()
        .one()
    )
    if recorded:
        conn.execute(
            _q("record_action_events"),
            {
                "action_id": row["id"],
                "event_ids": [c["event_id"] for c in recorded],
                "event_types": [c["event_type"] for c in recorded],
                "keys": [c["transaction_key"] for c in recorded],
                "changes": [c["change"] for c in recorded],
                "statuses": [c["previous_status"] for c in recorded],
                "outcomes": [c["previous_outcome"] for c in recorded],
                "attempts": [c["previous_attempts"] for c in recorded],
            },
        )
    return int(row["id"]), row["at"]


def _result(
    action: str,
    *,
    dry_run: bool,
    actor: str,
    reason: str | None,
    selection: JSONDict,
    changes: list[JSONDict],
    recorded: tuple[int, datetime] | None,
) -> JSONDict:
    return {
        "action": action,
        "dry_run": dry_run,
        "action_id": recorded[0] if recorded else None,
        "at": jsonable(recorded[1]) if recorded else None,
        "actor": actor,
        "reason": reason,
        "selection": selection,
        "count": sum(1 for c in changes if c["change"] != "wake"),
        "changes": changes,
        "notified": recorded is not None and bool(changes),
    }


def _begin(conn: sa.Connection) -> None:
    """Settings for a short writing transaction: never wait long for a lock, and no JIT (these
    statements touch a few rows; a stale estimate could make compiling them cost more than
    running them)."""
    conn.execute(sa.text(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'"))
    conn.execute(sa.text("SET LOCAL jit = off"))


def _run_action(
    engine: sa.Engine, dry_run: bool, body: Callable[[sa.Connection], JSONDict]
) -> JSONDict:
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


def retry(
    engine: sa.Engine,
    selection: Selection,
    *,
    dry_run: bool,
    actor: str,
    reason: str | None,
) -> JSONDict:
    """Send failed (or, by id, discarded) rows again: pending, due now, attempts back to 0 so
    every retry class has its full budget; lookup_required is kept. Parked rows of their keys are
    woken, and a NOTIFY wakes a running daemon."""

    def body(conn: sa.Connection) -> JSONDict:
        rows = _lock_selected(conn, selection, state=None if selection.ids else "failed")
        problems = []
        blockers = _blockers(conn, [r["id"] for r in rows if r["status"] == "pending"])
        for r in rows:
            if r["status"] in ("failed", "discarded"):
                continue
            if r["id"] in blockers:
                b = blockers[r["id"]]
                problems.append(
                    f"event {r['id']} is pending, blocked behind event {b['blocked_by_id']} "
                    f"({b['blocked_by_type']}, {b['blocked_by_status']}): retry or discard that one"
                )
            elif r["status"] == "pending":
                problems.append(f"event {r['id']} is pending already: nothing to retry")
            else:
                problems.append(f"event {r['id']} is delivered ({r['outcome']}): nothing to retry")
        _refuse(problems)
        sales = [r for r in rows if r["status"] == "discarded" and r["event_type"] == "sale"]
        if sales:
            keys = sorted({r["transaction_key"] for r in sales})
            for refund in conn.execute(_q("delivered_refunds"), {"keys": keys}).mappings():
                sale = next(s for s in sales if s["transaction_key"] == refund["transaction_key"])
                problems.append(
                    f"event {sale['id']}: its refund (event {refund['id']}) was delivered after "
                    "the sale was discarded; sending the sale now would create a commission "
                    "that stays"
                )
        _refuse(problems)
        changes = [_change(r, "retry", "pending") for r in rows]
        ids = [r["id"] for r in rows]
        keys = sorted({r["transaction_key"] for r in rows})
        parked = list(conn.execute(_q("parked_rows"), {"keys": keys, "ids": ids}).mappings())
        changes += [_change(r, "wake", "pending") for r in parked]
        recorded = None
        if rows and not dry_run:
            assert reason is not None
            conn.execute(_q("apply_retry"), {"ids": ids})
            conn.execute(_q("apply_wake"), {"ids": [r["id"] for r in parked]})
            recorded = _record(
                conn,
                action="retry",
                actor=actor,
                reason=reason,
                selection=selection.describe(),
                changes=changes,
            )
            conn.execute(_q("notify"))
        return _result(
            "retry",
            dry_run=dry_run,
            actor=actor,
            reason=reason,
            selection=selection.describe(),
            changes=changes,
            recorded=recorded,
        )

    return _run_action(engine, dry_run, body)


def discard(
    engine: sa.Engine,
    selection: Selection,
    *,
    refunds: str,
    dry_run: bool,
    actor: str,
    reason: str | None,
) -> JSONDict:
    """Give up on rows: failed or blocked ones by filter, failed or pending ones (not in flight)
    by id. `refunds` says what becomes of refunds that the discarded sales leave waiting: keep
    (they stay blocked, visibly), discard (discarded too, recorded), release (sent anyway)."""
    if refunds not in REFUND_CHOICES:
        raise OpsError(f"--refunds: {refunds!r} is not one of {', '.join(REFUND_CHOICES)}")

    def body(conn: sa.Connection) -> JSONDict:
        selected = _lock_selected(conn, selection, state=None)
        # A sale discarded earlier may be named again to decide about its refunds now.
        earlier = [
            r
            for r in selected
            if r["status"] == "discarded" and r["event_type"] == "sale" and refunds != "keep"
        ]
        rows = [r for r in selected if r not in earlier]
        _refuse([p for p in (_discard_problem(r) for r in rows) if p])
        ids = [r["id"] for r in rows]
        behind = [
            dict(r)
            for r in conn.execute(
                _q("refunds_left_behind"), {"ids": ids + [r["id"] for r in earlier]}
            ).mappings()
        ]
        changes = [_change(r, "discard", "discarded") for r in rows]
        released: list[int] = []
        left_blocked: list[JSONDict] = []
        if refunds == "keep":
            sale_of = {
                r["transaction_key"]: r["id"]
                for r in sorted(rows + earlier, key=lambda r: -int(r["id"]))
                if r["event_type"] == "sale"
            }
            left_blocked = [
                {
                    "event_id": r["id"],
                    "event_type": r["event_type"],
                    "transaction_key": r["transaction_key"],
                    "sale_id": sale_of[r["transaction_key"]],
                }
                for r in behind
            ]
        else:
            _refuse([p for p in (_discard_problem(r) for r in behind) if p])
            if refunds == "discard":
                changes += [_change(r, "discard", "discarded") for r in behind]
                ids += [r["id"] for r in behind]
            else:
                changes += [_change(r, "release", "pending") for r in behind]
                released = [r["id"] for r in behind]
        keys = sorted({r["transaction_key"] for r in rows})
        not_woken = ids + [r["id"] for r in behind]
        parked = list(conn.execute(_q("parked_rows"), {"keys": keys, "ids": not_woken}).mappings())
        changes += [_change(r, "wake", "pending") for r in parked]
        recorded = None
        if (rows or behind) and not dry_run:
            assert reason is not None
            conn.execute(_q("apply_discard"), {"ids": ids})
            conn.execute(_q("apply_release"), {"ids": released})
            conn.execute(_q("apply_wake"), {"ids": [r["id"] for r in parked]})
            recorded = _record(
                conn,
                action="discard",
                actor=actor,
                reason=reason,
                selection={**selection.describe(), "refunds": refunds},
                changes=changes,
            )
            conn.execute(_q("notify"))
        result = _result(
            "discard",
            dry_run=dry_run,
            actor=actor,
            reason=reason,
            selection={**selection.describe(), "refunds": refunds},
            changes=changes,
            recorded=recorded,
        )
        result["left_blocked"] = left_blocked
        return result

    return _run_action(engine, dry_run, body)


def _discard_problem(row: Mapping[Any, Any]) -> str | None:
    if row["status"] == "delivered":
        return f"event {row['id']} is delivered ({row['outcome']}): it cannot be discarded"
    if row["status"] == "discarded":
        return (
            f"event {row['id']} is discarded already (for a sale, --refunds release|discard "
            "decides about the refunds queued behind it)"
        )
    if row["leased"]:
        return (
            f"event {row['id']} is in flight (leased by {row['lease_owner']}): try again when "
            "its call is over"
        )
    return None


# ---- outbox prune ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PruneBatch:
    status: str
    events: int
    attempts: int


def prune(
    engine: sa.Engine,
    older_than: timedelta,
    *,
    include_discarded: bool,
    batch_size: int,
    dry_run: bool,
    actor: str,
    reason: str,
    on_batch: Callable[[PruneBatch], None] | None = None,
) -> JSONDict:
    """Delete delivered rows (and, when asked, discarded rows) older than `older_than`, with
    their attempts, `batch_size` rows per transaction. Failed and pending rows are never
    deleted, nor any row whose transaction key still has a pending or failed row."""
    with engine.connect() as conn:
        cutoff: datetime = conn.execute(
            _q("prune_cutoff"), {"seconds": older_than.total_seconds()}
        ).scalar_one()
        preview = dict(
            conn.execute(
                _q("prune_preview"), {"cutoff": cutoff, "include_discarded": include_discarded}
            )
            .mappings()
            .one()
        )
    pruned = {"delivered": 0, "discarded": 0, "attempts": 0}
    batches = 0
    recorded: tuple[int, datetime] | None = None
    if dry_run:
        pruned = {k: int(preview[k]) for k in pruned}
        batches = sum(-(-pruned[s] // batch_size) for s in ("delivered", "discarded"))
        kept = int(preview["kept_open_key"])
    else:
        statuses = ["delivered", "discarded"] if include_discarded else ["delivered"]
        for status_ in statuses:
            while True:
                with engine.begin() as conn:
                    _begin(conn)
                    done = (
                        conn.execute(
                            _q(f"prune_{status_}_batch"),
                            {"cutoff": cutoff, "batch_size": batch_size},
                        )
                        .mappings()
                        .one()
                    )
                if done["events"]:
                    batches += 1
                    pruned[status_] += int(done["events"])
                    pruned["attempts"] += int(done["attempts"])
                    if on_batch is not None:
                        on_batch(PruneBatch(status_, int(done["events"]), int(done["attempts"])))
                if done["events"] < batch_size:
                    break
        with engine.connect() as conn:
            kept = int(
                conn.execute(
                    _q("prune_preview"), {"cutoff": cutoff, "include_discarded": include_discarded}
                )
                .mappings()
                .one()["kept_open_key"]
            )
        if pruned["delivered"] or pruned["discarded"]:
            with engine.begin() as conn:
                recorded = _record(
                    conn,
                    action="prune",
                    actor=actor,
                    reason=reason,
                    selection={
                        "older_than": format_duration(older_than.total_seconds()),
                        "cutoff": jsonable(cutoff),
                        "include_discarded": include_discarded,
                        "batch_size": batch_size,
                        "delivered": pruned["delivered"],
                        "discarded": pruned["discarded"],
                        "attempts": pruned["attempts"],
                    },
                    changes=[],
                    event_count=pruned["delivered"] + pruned["discarded"],
                )
    return {
        "dry_run": dry_run,
        "cutoff": jsonable(cutoff),
        "older_than_seconds": older_than.total_seconds(),
        "include_discarded": include_discarded,
        "batch_size": batch_size,
        "batches": batches,
        "pruned": pruned,
        "kept_open_key": kept,
        "action_id": recorded[0] if recorded else None,
    }
