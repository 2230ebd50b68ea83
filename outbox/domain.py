"""The vocabulary every other module speaks: events, HTTP exchanges and decisions.

Pure data. This module imports no I/O library (import-linter checks it), so the policy that
turns an exchange into a decision can be tested without a network or a database.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any


class EventType(enum.StrEnum):
    SIGNUP = "signup"
    SALE = "sale"
    REFUND = "refund"


class Status(enum.StrEnum):
    PENDING = "pending"  # waiting, retrying or in flight
    DELIVERED = "delivered"
    SKIPPED = "skipped"  # settled with nothing (more) to send, by rule; needs no one
    FAILED = "failed"  # needs a person
    DISCARDED = "discarded"  # a person gave up on it


class Outcome(enum.StrEnum):
    """What happened to a row: the result for delivered and skipped rows, the reason class for
    failed ones."""

    # delivered
    CREATED = "created"  # signup, sale: Partnero answered 2xx, or a lookup found our create
    DUPLICATE = "duplicate"  # Partnero (or an earlier sale of ours) already has the key
    DELETED = "deleted"  # refund: Partnero answered 2xx
    NOT_FOUND = "not_found"  # refund: 404, nothing to reverse
    # skipped
    NOT_REFERRED = "not_referred"  # signup without a partner reference: not sent
    INVALID_PARTNER = "invalid_partner"  # signup: 400 Invalid partner key
    SALE_SKIPPED = "sale_skipped"  # refund whose sale was skipped: not sent
    # skipped (a customer Partnero does not know) or, for rows failed before 0006, failed
    CUSTOMER_NOT_FOUND = "customer_not_found"  # 400 Customer not found
    # failed (reason classes)
    VALIDATION_ERROR = "validation_error"  # 422
    REJECTED = "rejected"  # any other 4xx Partnero will not accept
    NETWORK_ERROR = "network_error"  # could not connect, retried until the limit
    TIMEOUT = "timeout"  # no answer in time, or 408; retried until the limit
    SERVER_ERROR = "server_error"  # 5xx, retried until the limit
    RATE_LIMITED = "rate_limited"  # 429, retried until the limit
    BAD_RESPONSE = "bad_response"  # an answer that is not Partnero's own, retried until the limit
    FORBIDDEN = "forbidden"  # 403 on this row while GET /v1/test still answers 2xx


DELIVERED_OUTCOMES = frozenset(
    {Outcome.CREATED, Outcome.DUPLICATE, Outcome.DELETED, Outcome.NOT_FOUND}
)
SKIPPED_OUTCOMES = frozenset(
    {
        Outcome.NOT_REFERRED,
        Outcome.INVALID_PARTNER,
        Outcome.CUSTOMER_NOT_FOUND,
        Outcome.SALE_SKIPPED,
    }
)


class RequestKind(enum.StrEnum):
    CREATE_CUSTOMER = "create_customer"  # POST /v1/customers (a signup)
    CREATE = "create"  # POST /v1/transactions
    DELETE = "delete"  # DELETE /v1/transactions, the key in the JSON body
    LOOKUP = "lookup"  # GET /v1/transactions?key=... (one page of the list filter)
    PING = "ping"  # GET /v1/test


class TransportError(enum.StrEnum):
    """How an HTTP call ended when no complete HTTP answer came back.

    A status line may have arrived before the body failed: then `Exchange.status_code` is set as
    well, and the transport error is what decides (the policy looks at it first)."""

    # The request certainly did not reach Partnero (connect refused, DNS, pool timeout).
    NOT_SENT = "not_sent"
    # The request may have reached Partnero: timeout while waiting for the answer, connection
    # dropped after sending, a cancelled call. The outcome is unknown (docs/design.md,
    # "Delivery rules" 1).
    UNKNOWN_OUTCOME = "unknown_outcome"


@dataclass(frozen=True, slots=True)
class Event:
    """One row of outbox.events as the delivery engine sees it."""

    id: int
    event_type: EventType
    transaction_key: str | None  # None for a signup (its customer_key identifies it)
    customer_key: str | None
    amount: Decimal | None
    currency: str | None
    payload: dict[str, Any]
    attempts: int  # attempts already made (not counting 401/403 pauses)
    lookup_required: bool  # an earlier create may have reached Partnero: look it up first
    created_at: datetime | None = None  # when the row was recorded (the unknown-customer grace)
    customer_signup_skipped: bool = False  # a sale: its customer's signup was skipped


@dataclass(frozen=True, slots=True)
class Exchange:
    """What one HTTP call produced, reduced to what decisions need. No secrets in here."""

    kind: RequestKind
    method: str
    path: str
    status_code: int | None = None  # None when no status line came back
    body_excerpt: str = ""  # at most a few hundred characters of the answer
    message: str | None = None  # Partnero's `message` field, when the body had one
    json_body: dict[str, Any] | None = None  # the parsed body, when it was a small JSON object
    retry_after_seconds: float | None = None  # parsed Retry-After (seconds or HTTP date)
    transport_error: TransportError | None = None
    error: str | None = None  # a short description of the transport error
    started_at: datetime | None = None
    finished_at: datetime | None = None


# ---- decisions -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Delivered:
    outcome: Outcome


@dataclass(frozen=True, slots=True)
class Skipped:
    """Settled with nothing (more) to send, by rule: a customer no partner referred."""

    outcome: Outcome  # one of SKIPPED_OUTCOMES
    detail: str


@dataclass(frozen=True, slots=True)
class Retry:
    at: datetime
    reason: Outcome  # the reason class; becomes the failed outcome when attempts run out
    lookup_required: bool = False  # the call may have reached Partnero
    note: str | None = None  # why, when the answer alone does not say (an unsettled lookup)


@dataclass(frozen=True, slots=True)
class Failed:
    reason: Outcome
    detail: str
    lookup_required: bool = False  # a create whose effect is unknown: look it up on a retry


@dataclass(frozen=True, slots=True)
class Pause:
    """401 (or a 403 while GET /v1/test fails too): the daemon's problem, not the row's. Stop
    sending; the row stays pending."""

    until: datetime
    detail: str
    refused: bool = True  # Partnero refused the key; False: GET /v1/test got no answer at all
    lookup_required: bool = False  # the call that led here was a create with an unknown effect


@dataclass(frozen=True, slots=True)
class Forbidden:
    """403 on a row: the row's problem if the API key still works (GET /v1/test answers 2xx),
    the daemon's if it does not. Settled by `outbox.policy.after_access_check`."""

    detail: str
    lookup_required: bool = False  # a create: its effect is not Partnero's documented answer


@dataclass(frozen=True, slots=True)
class LookupResult:
    """A lookup answered definitively: the transaction is there (found) or it is not."""

    found: bool


@dataclass(frozen=True, slots=True)
class LookupNextPage:
    """This page of the list filter did not hold the key, and Partnero says there is another."""

    page: int


Decision = Delivered | Skipped | Retry | Failed | Pause | Forbidden | LookupResult | LookupNextPage


class DecisionKind(enum.StrEnum):
    """The first part of a decision's label, as outbox.attempts.decision stores it: `kind:detail`
    (`delivered:created`, `retry:timeout+lookup`, `lookup:next_page:2`, `pause:auth`...; the
    labels are listed in docs/operations.md)."""

    DELIVERED = "delivered"
    SKIPPED = "skipped"
    RETRY = "retry"
    FAILED = "failed"
    LOOKUP = "lookup"
    FORBIDDEN = "forbidden"
    PAUSE = "pause"


_LABEL_SEPARATOR = ":"


@dataclass(frozen=True, slots=True)
class DecisionLabel:
    """A stored decision label, read: its kind and the rest of the text."""

    kind: DecisionKind
    detail: str


def decision_label(kind: DecisionKind, detail: str) -> str:
    """The text stored for a decision: `decision_label(DecisionKind.PAUSE, "auth")` is
    `pause:auth`."""
    return f"{kind.value}{_LABEL_SEPARATOR}{detail}"


def label_of(decision: Decision) -> str:
    """The label the executor stores for a decision in outbox.attempts.decision."""
    if isinstance(decision, Delivered):
        return decision_label(DecisionKind.DELIVERED, decision.outcome.value)
    if isinstance(decision, Skipped):
        return decision_label(DecisionKind.SKIPPED, decision.outcome.value)
    if isinstance(decision, Retry):
        suffix = "+lookup" if decision.lookup_required else ""
        return decision_label(DecisionKind.RETRY, f"{decision.reason.value}{suffix}")
    if isinstance(decision, Failed):
        return decision_label(DecisionKind.FAILED, decision.reason.value)
    if isinstance(decision, Pause):
        return decision_label(DecisionKind.PAUSE, "auth")
    if isinstance(decision, Forbidden):
        return decision_label(DecisionKind.FORBIDDEN, "check_key")
    if isinstance(decision, LookupNextPage):
        return decision_label(DecisionKind.LOOKUP, f"next_page:{decision.page}")
    return decision_label(DecisionKind.LOOKUP, "found" if decision.found else "absent")


def parse_decision_label(text: str) -> DecisionLabel | None:
    """The kind and detail of a stored label; None for text that is not `kind:detail` with a
    kind this vocabulary knows (a label written by another version stays readable as text)."""
    kind, separator, detail = text.partition(_LABEL_SEPARATOR)
    try:
        return DecisionLabel(DecisionKind(kind), detail) if separator else None
    except ValueError:
        return None


class PingVerdict(enum.StrEnum):
    """What one `GET /v1/test` says about sending."""

    OK = "ok"  # 2xx, Partnero's own success shape: the key works
    REFUSED = "refused"  # 401/403: the key does not work
    NOT_PARTNERO = "not_partnero"  # 404/405 or a 2xx that is not Partnero's: a wrong URL
    UNREACHABLE = "unreachable"  # no answer, 5xx, 429, ...: ask again later


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Settings the pure policy needs; every value is a setting (see outbox.service.settings)."""

    max_attempts: int = 20
    base_delay_seconds: float = 1.0
    max_delay_seconds: float = 1800.0
    auth_pause_seconds: float = 60.0
    jitter: float = 0.25  # +/- fraction of the delay
    unknown_customer_grace_seconds: float = 900.0
