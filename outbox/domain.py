"""The vocabulary every other module speaks: events, outcomes and HTTP exchanges (the policy's
decisions are in outbox.decisions).

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
