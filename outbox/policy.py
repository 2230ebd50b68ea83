"""What to do after one HTTP exchange with Partnero: the pure retry policy (docs/design.md,
"Reading Partnero's answers" and "Delivery rules" 3).

Everything here is a pure function. The clock (`now`) and the randomness (`rand`, a float in
[0, 1)) are passed in, so every rule can be tested with a table and no network. This module
imports no I/O library (import-linter checks it).

`decide` classifies one exchange into exactly one decision:

- `Delivered`: the row is done (created, duplicate, deleted, not found);
- `Skipped`: the row is settled with nothing more to send (a customer Partnero does not know,
  a partner key it refuses: docs/design.md, "Delivery rules" 3);
- `LookupResult`: a lookup answered definitively (the earlier create is there, or it is not);
- `Retry`: try again later, with the reason class that becomes the failed reason when the
  attempts run out, and whether the next step must be a lookup (the call may have reached
  Partnero: docs/design.md, "Delivery rules" 1);
- `LookupNextPage`: the lookup must read the next page of the list filter;
- `Failed`: needs a person;
- `Forbidden`: 403; the executor asks `GET /v1/test` and `after_access_check` settles it;
- `Pause`: 401, the daemon's problem and not the row's; it does not count as an attempt.

Only Partnero's own answers are outcomes ("Reading Partnero's answers" below).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, urlsplit

from outbox.decisions import (
    Decision,
    Delivered,
    Failed,
    Forbidden,
    LookupNextPage,
    LookupResult,
    Pause,
    Retry,
    Skipped,
)
from outbox.domain import (
    Event,
    EventType,
    Exchange,
    Outcome,
    PingVerdict,
    RequestKind,
    RetryPolicy,
    TransportError,
)
from outbox.text import cut, format_duration, one_line

__all__ = [
    "DETAIL_MAX_CHARS",
    "RETRYABLE_OUTCOMES",
    "KnownMessage",
    "after_access_check",
    "backoff_delay",
    "cooldown_until",
    "decide",
    "describe",
    "is_retryable",
    "lookup_unsettled",
    "partner_reference",
    "partnero_message",
    "partnero_success",
    "ping_verdict",
    "retry_delay",
    "unsent_skip",
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


# ---- reading Partnero's answers ---------------------------------------------------------------
#
# An answer is an outcome only when it is Partnero's own: a 2xx in Partnero's success shape, or an
# error whose message is one Partnero documents for that call. Everything here is the one place
# those shapes and messages are written down; tests/test_policy.py has a table row per shape.


class KnownMessage(enum.Enum):
    """The error messages Partnero documents, with the call and status code they belong to."""

    DUPLICATE_KEY = (RequestKind.CREATE, 400, "Duplicate key")
    CUSTOMER_NOT_FOUND = (RequestKind.CREATE, 400, "Customer not found")
    TRANSACTION_NOT_FOUND = (RequestKind.DELETE, 404, "Transaction not found")
    CUSTOMER_EXISTS = (RequestKind.CREATE_CUSTOMER, 422, "Duplicate key")
    INVALID_PARTNER_KEY = (RequestKind.CREATE_CUSTOMER, 400, "Invalid partner key")

    @property
    def text(self) -> str:
        return self.value[2]


def _normalise(message: str) -> str:
    """Case and one trailing period aside, a message must match exactly."""
    text = message[:-1] if message.endswith(".") else message
    return text.casefold()


_KNOWN_MESSAGES = {(m.value[0], m.value[1], _normalise(m.value[2])): m for m in KnownMessage}


def partnero_message(exchange: Exchange) -> KnownMessage | None:
    """The documented Partnero message this answer carries for its call and status, if any.

    The message must be the JSON `message` field of the answer, equal to the documented text but
    for case and a trailing period: "Duplicate customer key" is not "Duplicate key", and an HTML
    page that happens to contain the words is not Partnero's answer."""
    if exchange.transport_error is not None or exchange.status_code is None:
        return None
    message = exchange.message
    if message is None:
        return None
    return _KNOWN_MESSAGES.get((exchange.kind, exchange.status_code, _normalise(message)))


def partnero_success(exchange: Exchange) -> bool:
    """A complete 2xx in Partnero's success shape: a JSON object whose `status` is 1 or absent.

    `{"status": 0}` is Partnero saying it failed; an HTML page, an empty body or anything that
    is not a JSON object comes from something else (a proxy, a wrong URL) and says nothing about
    what Partnero did. A 204 No Content, which has no body by definition, counts."""
    if exchange.transport_error is not None or not _is_2xx(exchange.status_code):
        return False
    body = exchange.json_body
    if body is None:
        return exchange.status_code == 204 and not exchange.body_excerpt.strip()
    if "status" not in body:
        return True
    status = body["status"]
    return isinstance(status, int) and not isinstance(status, bool) and status == 1


def ping_verdict(exchange: Exchange) -> PingVerdict:
    """What a `GET /v1/test` says: the key works, is refused, the URL is not Partnero's API, or
    Partnero could not be asked (try again later)."""
    code = exchange.status_code
    if exchange.transport_error is not None or code is None:
        return PingVerdict.UNREACHABLE
    if partnero_success(exchange):
        return PingVerdict.OK
    if code in (401, 403):
        return PingVerdict.REFUSED
    if _is_2xx(code):
        # The body of GET /v1/test is undocumented: plain text or nothing is taken as a yes.
        # `{"status": 0}` is Partnero saying no, and a web page (a maintenance page, a portal)
        # is not Partnero's answer: ask again later.
        text = exchange.body_excerpt.lstrip()
        if exchange.json_body is None and not text.startswith("<"):
            return PingVerdict.OK
        return PingVerdict.UNREACHABLE
    if code in (404, 405) or 300 <= code <= 399:
        # No such route, or a redirect (say http:// to https://; redirects are not followed):
        # nothing at this URL is Partnero's API, and waiting will not change that.
        return PingVerdict.NOT_PARTNERO
    return PingVerdict.UNREACHABLE


def after_access_check(
    forbidden: Forbidden, key_check: PingVerdict, now: datetime, policy: RetryPolicy
) -> Failed | Pause:
    """A row was answered 403: if `GET /v1/test` still answers 2xx (`key_check` OK) the row
    itself is refused (failed, reason `forbidden`); if the key check is refused the key is the
    problem and the whole daemon pauses, as for 401; if it got no answer, sending waits until
    it does (the row is not charged either way)."""
    if key_check is PingVerdict.OK:
        return Failed(
            Outcome.FORBIDDEN,
            _cut_with_suffix(forbidden.detail, " [GET /v1/test: OK]"),
            lookup_required=forbidden.lookup_required,
        )
    until = now + timedelta(seconds=policy.auth_pause_seconds)
    unknown = forbidden.lookup_required  # a create's 403 leaves its effect unknown
    if key_check is PingVerdict.UNREACHABLE:
        detail = _cut_with_suffix(forbidden.detail, " [GET /v1/test: no usable answer]")
        return Pause(until=until, detail=detail, refused=False, lookup_required=unknown)
    detail = _cut_with_suffix(forbidden.detail, " [check PARTNERO_API_KEY]")
    return Pause(until=until, detail=detail, lookup_required=unknown)


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
        raise ValueError("a ping is not a delivery; use ping_verdict()")

    verdict = _classify(
        exchange, now, policy, maybe_applied=event.lookup_required, key=event.transaction_key or ""
    )
    if not isinstance(verdict, _RetryClass):
        return verdict
    if verdict.reason is Outcome.CUSTOMER_NOT_FOUND:
        return _unknown_customer(event, exchange, now, policy, rand)
    return _settle(verdict, event, exchange, now, policy, rand)


def lookup_unsettled(
    event: Event, exchange: Exchange, now: datetime, policy: RetryPolicy, rand: float, why: str
) -> Retry | Failed:
    """A lookup whose pages did not settle found or absent (`why`: the next page went backwards,
    or there were more pages than a lookup reads): ask again later, as for an unreadable answer;
    the attempts limit ends it with the reason."""
    verdict = _RetryClass(Outcome.BAD_RESPONSE, lookup_required=True)
    return _settle(verdict, event, exchange, now, policy, rand, note=why)


def _settle(
    verdict: _RetryClass,
    event: Event,
    exchange: Exchange,
    now: datetime,
    policy: RetryPolicy,
    rand: float,
    note: str | None = None,
) -> Retry | Failed:
    attempt = event.attempts + 1
    if attempt >= policy.max_attempts:
        text = describe(exchange) if note is None else f"{note}: {describe(exchange)}"
        detail = _cut_with_suffix(text, f" [gave up after {attempt} attempts]")
        return Failed(reason=verdict.reason, detail=detail, lookup_required=verdict.lookup_required)
    return Retry(
        at=now + timedelta(seconds=retry_delay(attempt, exchange, policy, rand)),
        reason=verdict.reason,
        lookup_required=verdict.lookup_required,
        note=note,
    )


def _unknown_customer(
    event: Event, exchange: Exchange, now: datetime, policy: RetryPolicy, rand: float
) -> Retry | Skipped:
    """400 Customer not found: Partnero's normal answer for a customer no partner referred
    (docs/design.md, "Delivery rules" 3). Skipped at once when the customer's signup was
    skipped; otherwise retried until OUTBOX_UNKNOWN_CUSTOMER_GRACE_SECONDS after the sale was
    recorded (the customer may be created a moment later, by the JS snippet or a signup that
    commits after the sale), the last retry at the end of the grace; then skipped. The attempts
    limit ends it skipped as well: never failed."""
    detail = describe(exchange)
    if event.customer_signup_skipped:
        return Skipped(
            Outcome.CUSTOMER_NOT_FOUND,
            _cut_with_suffix(detail, " [the customer's signup was skipped: never referred]"),
        )
    grace = timedelta(seconds=policy.unknown_customer_grace_seconds)
    grace_end = None if event.created_at is None else event.created_at + grace
    attempt = event.attempts + 1
    if grace_end is None or now >= grace_end or attempt >= policy.max_attempts:
        waited = format_duration(grace.total_seconds())
        why = f" [not known to Partnero {waited} after the sale was recorded]"
        if grace_end is not None and now < grace_end:
            why = f" [not known to Partnero after {attempt} attempts]"
        return Skipped(Outcome.CUSTOMER_NOT_FOUND, _cut_with_suffix(detail, why))
    at = now + timedelta(seconds=retry_delay(attempt, exchange, policy, rand))
    return Retry(at=min(at, grace_end), reason=Outcome.CUSTOMER_NOT_FOUND)


def partner_reference(payload: dict[str, Any] | None) -> str | None:
    """The partner a signup names (`partner.key`, `.id` or `.email`, the partnero_partner
    cookie), as `field=value`; None when it names none (no `partner`, or only empty values:
    an application that copies a missing cookie writes `{"partner": {"key": null}}`)."""
    partner = (payload or {}).get("partner")
    if not isinstance(partner, dict):
        return None
    for field in ("key", "id", "email"):
        value = partner.get(field)
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, int | float) or (isinstance(value, str) and value.strip()):
            return f"{field}={value}"
    return None


def unsent_skip(event: Event, *, sale_skipped: bool) -> Skipped | None:
    """A row settled without any call (docs/design.md, "Delivery rules" 3): a signup that names
    no partner (Partnero ignores it), or a refund whose sale was skipped (nothing to reverse).
    None: the row is sent."""
    if event.event_type is EventType.SIGNUP and partner_reference(event.payload) is None:
        return Skipped(
            Outcome.NOT_REFERRED,
            "no partner reference (payload.partner.key, .id or .email): Partnero ignores a "
            "signup no partner referred; not sent",
        )
    if event.event_type is EventType.REFUND and sale_skipped:
        return Skipped(
            Outcome.SALE_SKIPPED,
            "its sale was skipped (Partnero does not know its customer): nothing to reverse; "
            "not sent",
        )
    return None


def cooldown_until(
    exchange: Exchange, now: datetime, policy: RetryPolicy, rand: float
) -> datetime | None:
    """After a 429 the whole daemon waits: until Partnero's Retry-After, or a first backoff
    step when it gave none; never longer than the policy's max delay. None for other answers."""
    if exchange.status_code != 429:
        return None
    wait = exchange.retry_after_seconds
    if wait is None or not math.isfinite(wait):
        wait = backoff_delay(1, policy, rand)
    return now + timedelta(seconds=min(max(wait, 0.0), policy.max_delay_seconds))


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
        text = f"HTTP {code}: {one_line(exchange.message)}"
    else:
        text = f"HTTP {code} {_phrase(code)}".rstrip()
        excerpt = one_line(exchange.body_excerpt)[:200]
        if excerpt:
            text = f"{text}: {excerpt}"
    errors = _format_errors(exchange.json_body)
    if errors:
        text = f"{text} ({errors})"
    return cut(text, DETAIL_MAX_CHARS)


# ---- classification ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _RetryClass:
    """A retryable verdict before the attempt limit and the retry time are applied."""

    reason: Outcome
    lookup_required: bool


def _classify(
    exchange: Exchange, now: datetime, policy: RetryPolicy, *, maybe_applied: bool, key: str
) -> Decision | _RetryClass:
    """`maybe_applied`: an earlier call for this row may have been applied (the row's
    lookup_required). A create is then preceded by a lookup; a delete is simply sent again, and
    its 404 then means that earlier DELETE already reversed the sale.

    Only Partnero's own answers are outcomes (see `partnero_success` and `partnero_message`).
    Anything else leaves the effect of the call unknown: the row is flagged so that a create is
    looked up before it is sent again, and it is never recorded as delivered."""
    kind = exchange.kind
    code = exchange.status_code
    if exchange.transport_error is not None or code is None:
        return _classify_unanswered(exchange, maybe_applied)
    if code == 401:
        return Pause(
            until=now + timedelta(seconds=policy.auth_pause_seconds),
            detail=_cut_with_suffix(describe(exchange), " [check PARTNERO_API_KEY]"),
        )
    if code == 403:
        # Not a message Partnero documents for the call: a create's effect stays unknown.
        return Forbidden(
            detail=describe(exchange),
            lookup_required=maybe_applied or kind is RequestKind.CREATE,
        )
    if kind is RequestKind.LOOKUP:
        return _classify_lookup(exchange, key)
    return _classify_answer(exchange, maybe_applied) or _classify_status(exchange, maybe_applied)


def _classify_unanswered(exchange: Exchange, maybe_applied: bool) -> Decision | _RetryClass:
    """No HTTP answer to read. A transport error wins over a status code: when the body could
    not be read in full the client keeps the status it saw but reports UNKNOWN_OUTCOME, and the
    safe reading is that the outcome is unknown (a create is then looked up, a delete sent
    again)."""
    if exchange.transport_error is TransportError.NOT_SENT:
        # Certainly not sent: a create or a delete is simply sent again; a lookup is still owed.
        owed = exchange.kind is RequestKind.LOOKUP or maybe_applied
        return _RetryClass(Outcome.NETWORK_ERROR, owed)
    if exchange.transport_error is TransportError.UNKNOWN_OUTCOME:
        return _RetryClass(Outcome.TIMEOUT, lookup_required=True)
    # The client refused to send the request (an amount that is not a finite number, a payload
    # that cannot be encoded): nothing went out, and sending again would not help, so it needs
    # a person.
    return Failed(Outcome.REJECTED, describe(exchange), lookup_required=maybe_applied)


def _classify_answer(exchange: Exchange, maybe_applied: bool) -> Decision | _RetryClass | None:
    """Partnero's own answers to a create or a delete: its success shapes, its documented
    messages, and any other 2xx (which is not Partnero's: {"status": 0}, an HTML page from a
    proxy or a wrong URL; the call may or may not have landed). None: none of these."""
    code = exchange.status_code
    kind = exchange.kind
    if _is_2xx(code):
        if not partnero_success(exchange):
            return _RetryClass(Outcome.BAD_RESPONSE, lookup_required=True)
        return Delivered(Outcome.DELETED if kind is RequestKind.DELETE else Outcome.CREATED)
    known = partnero_message(exchange)
    if known is KnownMessage.DUPLICATE_KEY:
        return Delivered(Outcome.DUPLICATE)
    if known is KnownMessage.CUSTOMER_EXISTS:
        # Customer keys are unique at Partnero, so sending a signup again is safe: after a call
        # whose answer was lost, "Duplicate key" is most likely that call's customer.
        return Delivered(Outcome.CREATED if maybe_applied else Outcome.DUPLICATE)
    if known is KnownMessage.INVALID_PARTNER_KEY:
        return Skipped(Outcome.INVALID_PARTNER, describe(exchange))
    if known is KnownMessage.CUSTOMER_NOT_FOUND:
        return _RetryClass(Outcome.CUSTOMER_NOT_FOUND, lookup_required=False)
    if known is KnownMessage.TRANSACTION_NOT_FOUND:
        # After a DELETE whose answer was lost, a 404 is most likely that DELETE's doing: the
        # sale was delivered before its refund was sent, so the transaction did exist.
        return Delivered(Outcome.DELETED if maybe_applied else Outcome.NOT_FOUND)
    return None


def _classify_status(exchange: Exchange, maybe_applied: bool) -> Decision | _RetryClass:
    """Every other answer, by its status code. Any that may follow an applied call flags the
    row: for a create that means a lookup first; for a delete, how a later 404 reads."""
    code = exchange.status_code
    assert code is not None
    if code == 408:
        # Partnero lists 408 as a timeout on its side: the request may have been applied.
        return _RetryClass(Outcome.TIMEOUT, lookup_required=True)
    if code == 429:
        return _RetryClass(Outcome.RATE_LIMITED, lookup_required=maybe_applied)
    if 500 <= code <= 599:
        # A 500, or a gateway 502/504, may come after Partnero applied the create.
        return _RetryClass(Outcome.SERVER_ERROR, lookup_required=True)
    if code in (404, 405):
        # Our calls go to documented routes: a 404 or 405 that is not Partnero's own "not
        # found" comes from the routing (a proxy, a deploy, a wrong URL), not from Partnero's
        # answer to this row. Ask again later; the attempts limit ends it with the text.
        return _RetryClass(Outcome.BAD_RESPONSE, lookup_required=True)
    if code == 422 and isinstance((exchange.json_body or {}).get("errors"), dict):
        # Laravel's validation answer: refused before anything was applied.
        return Failed(Outcome.VALIDATION_ERROR, describe(exchange), lookup_required=maybe_applied)
    if 400 <= code <= 499:
        # Another 4xx, or a documented code with a message Partnero does not document for it:
        # needs a person. For a create its effect is unknown, so a retry looks it up first.
        flagged = maybe_applied or exchange.kind is RequestKind.CREATE
        return Failed(Outcome.REJECTED, describe(exchange), lookup_required=flagged)
    # 1xx, 3xx (redirects are not followed), or a code outside 100-599.
    return _RetryClass(Outcome.BAD_RESPONSE, lookup_required=True)


def _classify_lookup(exchange: Exchange, key: str) -> Decision | _RetryClass:
    """One page of ``GET /v1/transactions?key=...``.

    How the filter matches is undocumented (it may match substrings), so the earlier create
    landed only when a returned row's `key` equals ours exactly. A page without it settles
    "absent" only when Partnero says it is the last (`links.next` is null). A 404 is never
    "absent": the list answers an empty `data` for a key it does not have, so a 404 means the
    request did not reach the list."""
    code = exchange.status_code
    assert code is not None
    page = list_page_matches(exchange, key)
    if page is not None:
        matches, next_page = page
        if matches:
            # Found, even when `deleted_at` is set: our earlier create reached Partnero, and
            # creating the key again would make a second transaction.
            return LookupResult(found=True)
        if next_page is None:
            return LookupResult(found=False)
        return LookupNextPage(next_page)
    # Anything else leaves the question open: ask again later (counted as an attempt).
    return _RetryClass(_status_class(code), lookup_required=True)


def _key_text(theirs: object) -> str | None:
    """A row's `key` as text: a string as it is, a JSON integer by its digits; None for
    anything else (such a row matches no key)."""
    if isinstance(theirs, str):
        return theirs
    if isinstance(theirs, int) and not isinstance(theirs, bool):
        return str(theirs)
    return None


def _lookup_page(exchange: Exchange) -> tuple[list[dict[str, Any]], int | None] | None:
    """(rows, next page number or None) of a list answer in Partnero's pagination shape, or
    None when the answer does not have that shape."""
    body = exchange.json_body
    if body is None:
        return None
    rows = body.get("data")
    links = body.get("links")
    if not isinstance(rows, list) or not isinstance(links, dict):
        return None
    if "next" not in links or not all(isinstance(row, dict) for row in rows):
        return None
    following = links["next"]
    if following is None:
        return rows, None
    if not isinstance(following, str):
        return None
    # The next page's number, taken from the link: the request itself is built by the client
    # from its own base URL, so the API key never goes to a host named in an answer.
    values = parse_qs(urlsplit(following).query).get("page", [])
    if len(values) != 1 or not values[0].isascii() or not values[0].isdigit():
        return None
    number = int(values[0])
    return (rows, number) if number >= 2 else None


def list_page_matches(
    exchange: Exchange, key: str
) -> tuple[list[dict[str, Any]], int | None] | None:
    """One page of ``GET /v1/transactions?key=...`` read as a lookup reads it, for `outbox
    reconcile`: (the rows whose `key` is exactly ours, the next page's number or None on the
    last page), or None when the answer is not a list page in Partnero's success shape."""
    page = _lookup_page(exchange) if partnero_success(exchange) else None
    if page is None:
        return None
    rows, next_page = page
    return [row for row in rows if _key_text(row.get("key")) == key], next_page


def listing_page(
    exchange: Exchange,
) -> tuple[list[tuple[str, dict[str, Any]]], int | None, int | None] | None:
    """One page of the whole list, ``GET /v1/transactions?limit=...&page=...`` (no key
    filter), for `outbox reconcile`'s listing: (each row with its key as text, by the rule of
    `_key_text`: a string as is, a JSON integer by its digits, rows with any other key left out;
    the next page's number or None on the last page; ``meta.last_page`` when an integer >= 1,
    else None), or None when the answer is not a list page in Partnero's success shape."""
    page = _lookup_page(exchange) if partnero_success(exchange) else None
    if page is None:
        return None
    rows, next_page = page
    keyed = [(key, row) for row in rows if (key := _key_text(row.get("key"))) is not None]
    meta = (exchange.json_body or {}).get("meta")
    last = meta.get("last_page") if isinstance(meta, dict) else None
    valid = isinstance(last, int) and not isinstance(last, bool) and last >= 1
    return keyed, next_page, last if valid else None


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


def retry_delay(attempt: int, exchange: Exchange, policy: RetryPolicy, rand: float) -> float:
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


def _phrase(code: int) -> str:
    try:
        return HTTPStatus(code).phrase
    except ValueError:
        return ""


def _format_errors(body: dict[str, Any] | None) -> str:
    """Laravel-style validation errors, ``{"field": ["message", ...]}``, as one line."""
    errors = (body or {}).get("errors")
    if not isinstance(errors, dict):
        return ""
    parts = []
    for field, value in errors.items():
        items = value if isinstance(value, list) else [value]
        text = one_line(" ".join(str(item) for item in items if item is not None))
        parts.append(f"{field}: {text}" if text else str(field))
    return "; ".join(parts)


def _cut_with_suffix(text: str, suffix: str) -> str:
    return cut(text, DETAIL_MAX_CHARS - len(suffix)) + suffix
