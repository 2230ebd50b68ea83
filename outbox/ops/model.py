"""The operator surface's vocabulary: what an operator can select (filters, ids, times) and
the typed result of every command, whose fields, in their order, are the JSON shapes documented
in docs/operations.md. Pure data and parsing: importing it costs no database library, so the
CLI can build its commands and their help without one."""

from __future__ import annotations

import dataclasses
import enum
import getpass
import os
import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from outbox.decisions import DecisionKind, parse_decision_label
from outbox.domain import DELIVERED_OUTCOMES, SKIPPED_OUTCOMES, EventType, Outcome, Status
from outbox.text import format_duration

JSONDict = dict[str, Any]


class ProblemState(enum.StrEnum):
    """Why `outbox failed` lists a row."""

    FAILED = "failed"
    BLOCKED = "blocked"  # pending, behind a failed or discarded row of its key (or customer)
    # settled by rule, needs no one: never listed by `outbox failed`; selected only by
    # `outbox retry --status skipped`
    SKIPPED = "skipped"


class ActionKind(enum.StrEnum):
    """An operator action, as outbox.operator_actions.action records it."""

    RETRY = "retry"
    DISCARD = "discard"
    PRUNE = "prune"


class ChangeKind(enum.StrEnum):
    """What an action does to one row (outbox.operator_action_events.change; wake is not
    recorded)."""

    RETRY = "retry"
    DISCARD = "discard"
    RELEASE = "release"  # a refund sent although its sale was discarded
    WAKE = "wake"  # a parked row of the same key, made due now


class RefundChoice(enum.StrEnum):
    """`outbox discard --refunds`: what becomes of the refunds a discarded sale leaves waiting."""

    KEEP = "keep"
    DISCARD = "discard"
    RELEASE = "release"


# The reasons a failed row may have: customer_not_found only on rows failed before migration
# 0006 (since then such a sale is skipped).
FAILED_OUTCOMES: tuple[Outcome, ...] = (
    Outcome.CUSTOMER_NOT_FOUND,
    *(o for o in Outcome if o not in DELIVERED_OUTCOMES | SKIPPED_OUTCOMES),
)
# Why a skipped row was skipped, in the order of the Outcome vocabulary.
SKIPPED_ROW_OUTCOMES: tuple[Outcome, ...] = tuple(o for o in Outcome if o in SKIPPED_OUTCOMES)
# What `outbox retry --status` selects by filter.
RETRY_STATUSES: tuple[Status, ...] = (Status.FAILED, Status.SKIPPED)


class OpsError(Exception):
    """A one-line reason why a command cannot do what was asked (unknown id, wrong state...)."""


# ---- parsing what the operator typed -----------------------------------------------------------

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"(\d+)([smhdw])")


def parse_duration(text: str) -> timedelta:
    """`30m`, `2h`, `7d`, `1h30m`, `0s` (units s, m, h, d, w). Raises ValueError with a clear
    line. Zero is a duration: `outbox prune --older-than 0s` means every settled row."""
    cleaned = text.strip().lower()
    if cleaned and _DURATION.sub("", cleaned) == "":
        seconds = sum(int(n) * _UNITS[u] for n, u in _DURATION.findall(cleaned))
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


def parse_ids(text: str) -> list[int]:
    """Event ids separated by spaces or commas."""
    ids: list[int] = []
    for part in text.replace(",", " ").split():
        if not (part.isascii() and part.isdigit()) or int(part) <= 0:
            raise ValueError(f"{part!r} is not an event id")
        ids.append(int(part))
    return sorted(set(ids))


def parse_positive_int(text: str) -> int:
    """A whole number of at least 1 (--limit, --page, --batch-size; the page's limit and page)."""
    if not (text.strip().isascii() and text.strip().isdigit()) or int(text) < 1:
        raise ValueError(f"{text!r} is not a whole number of at least 1")
    return int(text)


def parse_status_code(text: str | None) -> int | None:
    if text is None:
        return None
    cleaned = text.strip()
    if not (cleaned.isascii() and cleaned.isdigit()) or not 100 <= int(cleaned) <= 599:
        raise ValueError(f"{text!r} is not an HTTP status code (100-599)")
    return int(cleaned)


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
    """What `outbox failed` (and `retry` / `discard` by filter) select. None means any. `status`
    is `outbox retry --status`: skipped selects skipped rows instead of failed ones."""

    state: ProblemState | None = None
    outcome: Outcome | None = None
    status_code: int | None = None
    since: TimeBound | None = None
    until: TimeBound | None = None
    key: str | None = None
    customer: str | None = None
    event_type: EventType | None = None
    status: Status | None = None

    def given(self) -> bool:
        """Whether a filter narrows the rows (`--status` alone does not: it says which rows the
        others apply to, so retrying every skipped row takes --all)."""
        narrowing = (f.name for f in dataclasses.fields(self) if f.name != "status")
        return any(getattr(self, name) is not None for name in narrowing)

    def describe(self) -> JSONDict:
        """The filters as given, for the JSON output and the action record."""
        out: JSONDict = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, TimeBound):
                out[f.name] = value.text()
            elif value is not None:
                out[f.name] = value.value if isinstance(value, enum.Enum) else value
        return out

    def states(self) -> tuple[ProblemState, ...]:
        """Which rows the filters read: skipped ones for --status skipped, else the --state
        given, else failed and blocked rows (what `outbox failed` lists)."""
        if self.status is Status.SKIPPED:
            return (ProblemState.SKIPPED,)
        if self.state is not None:
            return (self.state,)
        return (ProblemState.FAILED, ProblemState.BLOCKED)

    def params(self, now: datetime, ids: Sequence[int] | None = None) -> JSONDict:
        """The bound parameters of the `problems` query (every row: no :limit, no :offset)."""
        return {
            "ids": list(ids) if ids is not None else None,
            "states": [s.value for s in self.states()],
            "outcome": enum_value(self.outcome),
            "status_code": self.status_code,
            "since": self.since.resolve(now) if self.since else None,
            "until": self.until.resolve(now) if self.until else None,
            "key": self.key,
            "customer": self.customer,
            "event_type": enum_value(self.event_type),
            "limit": None,
            "offset": 0,
        }


def enum_value(member: enum.StrEnum | None) -> str | None:
    return None if member is None else member.value


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


# ---- results (the field order is the documented JSON's) ----------------------------------------
# A command's result is keyword-only: built by field name, so a field added to its JSON cannot
# shift the others.


@dataclass(frozen=True, slots=True)
class CountRow:
    """`outbox status`: the rows of one type, status and outcome."""

    event_type: EventType
    status: Status
    outcome: Outcome | None
    events: int
    oldest_created_at: datetime
    oldest_age_seconds: float
    last_delivered_at: datetime | None


@dataclass(frozen=True, slots=True)
class Totals:
    pending: int
    delivered: int
    failed: int
    discarded: int
    skipped: int  # last: a field added to the JSON shape goes at the end


@dataclass(frozen=True, slots=True)
class PendingOverview:
    events: int
    in_flight: int
    blocked: int
    oldest_created_at: datetime | None
    oldest_age_seconds: float | None
    oldest_waiting_created_at: datetime | None
    oldest_waiting_age_seconds: float | None


@dataclass(frozen=True, slots=True)
class Lease:
    owner: str
    events: int
    expired: int
    expires_at: datetime
    expires_in_seconds: float


@dataclass(frozen=True, slots=True)
class LastAttempt:
    event_id: int
    started_at: datetime
    age_seconds: float
    method: str
    path: str
    status_code: int | None
    decision: str  # the stored label, e.g. `retry:timeout+lookup` (outbox.domain.DecisionKind)
    error: str | None
    daemon: str

    @property
    def paused_sending(self) -> bool:
        """401/403: the daemon's key is refused and it sends nothing until the key works."""
        label = parse_decision_label(self.decision)
        return label is not None and label.kind is DecisionKind.PAUSE


@dataclass(frozen=True, slots=True, kw_only=True)
class StatusReport:
    ok: bool
    problems: tuple[str, ...]
    checked_at: datetime
    max_pending_age_seconds: float
    totals: Totals
    counts: tuple[CountRow, ...]
    pending: PendingOverview
    last_delivered_at: datetime | None
    last_delivery_age_seconds: float | None
    leases: tuple[Lease, ...]
    last_attempt: LastAttempt | None


@dataclass(frozen=True, slots=True, kw_only=True)
class AttentionReport:
    """What needs a person, and whether the daemons keep up: `outbox status` without the counts
    of delivered rows, which take a scan of the whole table (`outbox web`'s overview, which a
    person opens first and often). The problems are `outbox status`'s, worded the same."""

    ok: bool
    problems: tuple[str, ...]
    checked_at: datetime
    max_pending_age_seconds: float
    undelivered: tuple[CountRow, ...]  # pending, failed, discarded and skipped, as in `counts`
    pending: PendingOverview
    last_delivered_at: datetime | None
    last_delivery_age_seconds: float | None
    leases: tuple[Lease, ...]
    last_attempt: LastAttempt | None

    def total(self, status: Status) -> int:
        return sum(row.events for row in self.undelivered if row.status is status)


@dataclass(frozen=True, slots=True)
class BlockedBy:
    """The failed or discarded row a blocked row waits for (for a sale, maybe a failed signup
    of its customer)."""

    id: int
    event_type: EventType
    status: Status
    outcome: Outcome | None


@dataclass(frozen=True, slots=True)
class Problem:
    """`outbox failed`: a failed row, or a row blocked behind one (or, for `outbox retry
    --status skipped`, a skipped row)."""

    id: int
    state: ProblemState
    event_type: EventType
    transaction_key: str | None
    customer_key: str | None
    amount: Decimal | None
    currency: str | None
    outcome: Outcome | None
    last_status_code: int | None
    last_error: str | None
    attempts: int
    created_at: datetime
    updated_at: datetime
    age_seconds: float
    rows_waiting: int
    blocked_by: BlockedBy | None


@dataclass(frozen=True, slots=True, kw_only=True)
class FailedPage:
    filters: JSONDict  # the filters as given (Filters.describe)
    total: int
    page: int
    limit: int
    pages: int
    rows: tuple[Problem, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class EventShown:
    """`outbox show ID`."""

    event: EventDetail


@dataclass(frozen=True, slots=True, kw_only=True)
class KeyShown:
    """`outbox show --key KEY`: the key's events in delivery order."""

    transaction_key: str
    events: tuple[EventDetail, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class CustomerShown:
    """`outbox show --customer KEY`: the customer's signups, its sales and their refunds, in
    delivery order."""

    customer_key: str
    events: tuple[EventDetail, ...]


@dataclass(frozen=True, slots=True)
class EventDetail:
    """`outbox show`: every column of outbox.events but the lease token, and the history."""

    id: int
    event_type: EventType
    transaction_key: str | None
    customer_key: str | None
    amount: Decimal | None
    currency: str | None
    payload: dict[str, Any] | None
    status: Status
    outcome: Outcome | None
    attempts: int
    next_attempt_at: datetime | None
    lookup_required: bool
    parked: bool
    order_released: bool
    lease_owner: str | None
    lease_expires_at: datetime | None
    last_error: str | None
    last_status_code: int | None
    created_at: datetime
    updated_at: datetime
    delivered_at: datetime | None
    age_seconds: float
    blocked_by: BlockedBy | None
    attempt_history: tuple[Attempt, ...]
    operator_actions: tuple[ActionEntry, ...]


@dataclass(frozen=True, slots=True)
class Attempt:
    """One HTTP call made for an event."""

    attempt: int
    started_at: datetime
    finished_at: datetime  # outbox.attempts.finished_at is NOT NULL
    duration_ms: float
    method: str
    path: str
    status_code: int | None
    response_excerpt: str | None
    error: str | None
    decision: str
    daemon: str


@dataclass(frozen=True, slots=True)
class ActionEntry:
    """One operator action as it changed one event."""

    action_id: int
    at: datetime
    actor: str
    action: ActionKind
    change: ChangeKind
    reason: str
    previous_status: Status
    previous_outcome: Outcome | None
    previous_attempts: int


@dataclass(frozen=True, slots=True)
class Change:
    """A row an action changes (or, on a dry run, would change)."""

    event_id: int
    event_type: EventType
    transaction_key: str | None
    customer_key: str | None
    change: ChangeKind
    previous_status: Status
    previous_outcome: Outcome | None
    previous_attempts: int
    new_status: Status


@dataclass(frozen=True, slots=True, kw_only=True)
class ActionResult:
    """`outbox retry` (and the first fields of `outbox discard`)."""

    action: ActionKind
    dry_run: bool
    action_id: int | None
    at: datetime | None
    actor: str
    reason: str | None
    selection: JSONDict  # as recorded: {"ids": [...]} or {"filters": {...}, "all": bool}
    count: int
    changes: tuple[Change, ...]
    notified: bool


@dataclass(frozen=True, slots=True)
class LeftBlocked:
    """A refund that stays blocked behind its discarded sale (`--refunds keep`)."""

    event_id: int
    event_type: EventType
    transaction_key: str
    sale_id: int


@dataclass(frozen=True, slots=True, kw_only=True)
class DiscardResult(ActionResult):
    left_blocked: tuple[LeftBlocked, ...]


@dataclass(frozen=True, slots=True)
class PruneCounts:
    delivered: int
    discarded: int
    attempts: int
    skipped: int  # last: a field added to the JSON shape goes at the end

    @property
    def events(self) -> int:
        return self.delivered + self.discarded + self.skipped


@dataclass(frozen=True, slots=True, kw_only=True)
class PruneResult:
    dry_run: bool
    cutoff: datetime
    older_than_seconds: float
    include_discarded: bool
    batch_size: int
    batches: int
    pruned: PruneCounts
    kept_open_key: int
    action_id: int | None


# ---- query rows into results -------------------------------------------------------------------
