"""What to do after one HTTP exchange with Partnero: the pure retry policy (SPEC section 3).

Everything here is a pure function. The clock (`now`) and the randomness (`rand`, a float in
[0, 1)) are passed in, so every rule can be tested with a table and no network. This module
imports no I/O library (import-linter checks it).

`decide` classifies one exchange into exactly one decision:

- `Delivered`: the row is done (created, duplicate, deleted, not found);
- `LookupResult`: a lookup answered definitively (the earlier create is there, or it is not);
- `Retry`: try again later, with the reason class that becomes the failed reason when the
  attempts run out, and whether the next step must be a lookup (the call may have reached
  Partnero, SPEC rule 1);
- `Failed`: needs a person;
- `Pause`: 401/403, the daemon's problem and not the row's; it does not count as an attempt.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from http import HTTPStatus
from typing import Any

from outbox.domain import (
    Decision,
    Delivered,
    Event,
    Exchange,
    Failed,
    LookupResult,
    Outcome,
    Pause,
    RequestKind,
    Retry,
    RetryPolicy,
    TransportError,
)

__all__ = [
    "DETAIL_MAX_CHARS",
    "RETRYABLE_OUTCOMES",
    "backoff_delay",
    "decide",
    "describe",
    "is_retryable",
    "ping_ok",
]

DETAIL_MAX_CHARS = 500

# The reason classes that are retried until OUTBOX_MAX_ATTEMPTS runs out. A failed row with one
# of these reasons failed because it ran out of attempts; the others failed at once.
RETRYABLE_OUTCOMES = frozenset(
    {
        Outcome.CUSTOMER_NOT_FOUND,
        Outcome.NETWORK_ERROR,
        Outcome.TIMEOUT,
        Outcome.SERVER_ERROR,
        Outcome.RATE_LIMITED,
        Outcome.BAD_RESPONSE,
    }
)

# 2**62 seconds is far beyond any max delay; capping the exponent keeps the float finite.
_MAX_EXPONENT = 62


def is_retryable(outcome: Outcome) -> bool:
    """True for the reason classes that are retried until the attempts run out."""
    return outcome in RETRYABLE_OUTCOMES


def ping_ok(exchange: Exchange) -> bool:
    """A `GET /v1/test` answered 2xx: the API key works."""
    return _is_2xx(exchange.status_code)


def backoff_delay(attempt: int, policy: RetryPolicy, rand: float) -> float:
    """Seconds to wait after failed attempt number `attempt` (1-based).

    Capped exponential backoff with jitter: ``min(max, base * 2**(attempt-1))`` scaled by
    ``1 + jitter * (2*rand - 1)``, then kept within ``[0, max]``. For a fixed `rand` the delay
    never shrinks as `attempt` grows.
    """
    exponent = min(max(attempt, 1) - 1, _MAX_EXPONENT)
    delay = min(policy.max_delay_seconds, policy.base_delay_seconds * 2.0**exponent)
    delay *= 1.0 + policy.jitter * (2.0 * rand - 1.0)
    return min(policy.max_delay_seconds, max(0.0, delay))


def decide(
    event: Event, exchange: Exchange, now: datetime, policy: RetryPolicy, rand: float
) -> Decision:
    """Classify the exchange produced by attempt number ``event.attempts + 1`` of `event`."""
    if exchange.kind is RequestKind.PING:
        raise ValueError("a ping is not a delivery; use ping_ok()")

    verdict = _classify(exchange, now, policy, maybe_applied=event.lookup_required)
    if not isinstance(verdict, _RetryClass):
        return verdict

    attempt = event.attempts + 1
    if attempt >= policy.max_attempts:
        detail = _cut_with_suffix(describe(exchange), f" [gave up after {attempt} attempts]")
        return Failed(reason=verdict.reason, detail=detail)
    return Retry(
        at=now + timedelta(seconds=_retry_delay(attempt, exchange, policy, rand)),
        reason=verdict.reason,
        lookup_required=verdict.lookup_required,
    )


def describe(exchange: Exchange) -> str:
    """A short human sentence: the HTTP status and Partnero's message, or the transport error.

    For example ``HTTP 422: The given data was invalid. (amount: The amount field is
    required.)``. At most DETAIL_MAX_CHARS characters.
    """
    code = exchange.status_code
    if exchange.transport_error is TransportError.NOT_SENT:
        text = f"Not sent: {exchange.error or 'the request could not be sent'}"
    elif exchange.transport_error is TransportError.UNKNOWN_OUTCOME:
        text = f"No complete answer, outcome unknown: {exchange.error or 'no answer'}"
        if code is not None:
            text = f"HTTP {code}, then {text[0].lower()}{text[1:]}"
    elif code is None:
        text = f"Not sent: {exchange.error or 'refused by the client'}"
    elif exchange.message:
        text = f"HTTP {code}: {_one_line(exchange.message)}"
    else:
        text = f"HTTP {code} {_phrase(code)}".rstrip()
        excerpt = _one_line(exchange.body_excerpt)[:200]
        if excerpt:
            text = f"{text}: {excerpt}"
    errors = _format_errors(exchange.json_body)
    if errors:
        text = f"{text} ({errors})"
    return _cut(text, DETAIL_MAX_CHARS)


# ---- classification ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _RetryClass:
    """A retryable verdict before the attempt limit and the retry time are applied."""

    reason: Outcome
    lookup_required: bool


def _classify(
    exchange: Exchange, now: datetime, policy: RetryPolicy, *, maybe_applied: bool
) -> Decision | _RetryClass:
    """`maybe_applied`: an earlier call for this row may have been applied (the row's
    lookup_required). A create is then preceded by a lookup; a delete is simply sent again, and
    its 404 then means that earlier DELETE already reversed the sale."""
    kind = exchange.kind
    code = exchange.status_code
    # Any call that fails in an unknown way may have been applied: flag it. For a create (and a
    # lookup still owed) this means a lookup first; for a delete, how a later 404 reads.
    look_up = True

    # A transport error wins over a status code: when the body could not be read in full the
    # client keeps the status it saw but reports UNKNOWN_OUTCOME, and the safe reading is that
    # the outcome is unknown (a create is then looked up, a delete sent again).
    if exchange.transport_error is TransportError.NOT_SENT:
        # Certainly not sent: a create or a delete is simply sent again; a lookup is still owed.
        return _RetryClass(Outcome.NETWORK_ERROR, kind is RequestKind.LOOKUP or maybe_applied)
    if exchange.transport_error is TransportError.UNKNOWN_OUTCOME:
        return _RetryClass(Outcome.TIMEOUT, look_up)
    if code is None:
        # The client refused to send the request (a key that cannot be put in a URL path, an
        # amount that is not a finite number): nothing went out, and sending again would not
        # help, so it needs a person.
        return Failed(Outcome.REJECTED, describe(exchange))

    if code in (401, 403):
        return Pause(
            until=now + timedelta(seconds=policy.auth_pause_seconds),
            detail=_cut_with_suffix(describe(exchange), " [check PARTNERO_API_KEY]"),
        )

    if kind is RequestKind.CREATE:
        if _is_2xx(code):
            return Delivered(Outcome.CREATED)
        if code == 400:
            text = _message_text(exchange)
            if "duplicate" in text:
                return Delivered(Outcome.DUPLICATE)
            if "customer not found" in text:
                return _RetryClass(Outcome.CUSTOMER_NOT_FOUND, lookup_required=False)
    elif kind is RequestKind.DELETE:
        if _is_2xx(code):
            return Delivered(Outcome.DELETED)
        if code == 404:
            # After a DELETE whose answer was lost, a 404 is most likely that DELETE's doing: the
            # sale was delivered before its refund was sent, so the transaction did exist.
            return Delivered(Outcome.DELETED if maybe_applied else Outcome.NOT_FOUND)
    elif kind is RequestKind.LOOKUP:
        if _is_2xx(code) and isinstance((exchange.json_body or {}).get("data"), dict):
            # Found, even when `deleted_at` is set: our earlier create reached Partnero, and
            # creating the key again would make a second transaction.
            return LookupResult(found=True)
        if code == 404:
            return LookupResult(found=False)
        # Anything else leaves the question open: ask again later (counted as an attempt).
        return _RetryClass(_status_class(code), lookup_required=True)

    if code == 408:
        # Partnero lists 408 as a timeout on its side, so for a create the request may have
        # been applied: look it up first.
        return _RetryClass(Outcome.TIMEOUT, look_up)
    if code == 429:
        return _RetryClass(Outcome.RATE_LIMITED, lookup_required=maybe_applied)
    if 500 <= code <= 599:
        # A 500, or a gateway 502/504, may come after Partnero applied the create.
        return _RetryClass(Outcome.SERVER_ERROR, look_up)
    if code == 422:
        return Failed(Outcome.VALIDATION_ERROR, describe(exchange))
    if 400 <= code <= 499:
        return Failed(Outcome.REJECTED, describe(exchange))
    # 1xx, 3xx (redirects are not followed), an unexpected 2xx, or a code outside 100-599.
    return _RetryClass(Outcome.BAD_RESPONSE, look_up)


def _status_class(code: int) -> Outcome:
    """The retry class of a lookup answer that did not say found or not found.

    A 400 or 422 to a GET is an answer the daemon cannot read (BAD_RESPONSE), not a rejection of
    the row: the row has not been sent again, and the retry classes stay the retryable ones.
    """
    if code == 408:
        return Outcome.TIMEOUT
    if code == 429:
        return Outcome.RATE_LIMITED
    if 500 <= code <= 599:
        return Outcome.SERVER_ERROR
    return Outcome.BAD_RESPONSE


def _retry_delay(attempt: int, exchange: Exchange, policy: RetryPolicy, rand: float) -> float:
    """The backoff, or Partnero's Retry-After when that is longer.

    Retry-After is capped at the policy's max delay: a wild value (a date next year, a typo
    with too many digits) must not park a row for days. Past the cap the row simply comes back
    and, if Partnero still refuses, backs off again.
    """
    delay = backoff_delay(attempt, policy, rand)
    retry_after = exchange.retry_after_seconds
    if retry_after is not None and math.isfinite(retry_after):
        delay = max(delay, min(max(retry_after, 0.0), policy.max_delay_seconds))
    return delay


# ---- helpers ----------------------------------------------------------------------------------


def _is_2xx(code: int | None) -> bool:
    return code is not None and 200 <= code <= 299


def _message_text(exchange: Exchange) -> str:
    """Partnero's message in lower case, or the body when it had no JSON message."""
    return (exchange.message if exchange.message is not None else exchange.body_excerpt).lower()


def _phrase(code: int) -> str:
    try:
        return HTTPStatus(code).phrase
    except ValueError:
        return ""


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _format_errors(body: dict[str, Any] | None) -> str:
    """Laravel-style validation errors, ``{"field": ["message", ...]}``, as one line."""
    errors = (body or {}).get("errors")
    if not isinstance(errors, dict):
        return ""
    parts = []
    for field, value in errors.items():
        items = value if isinstance(value, list) else [value]
        text = _one_line(" ".join(str(item) for item in items if item is not None))
        parts.append(f"{field}: {text}" if text else str(field))
    return "; ".join(parts)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _cut_with_suffix(text: str, suffix: str) -> str:
    return _cut(text, DETAIL_MAX_CHARS - len(suffix)) + suffix
