"""The pure retry policy: every rule of docs/design.md, "Reading Partnero's answers" and
"Delivery rules" 3, as a table."""

from __future__ import annotations

import ast
import json
import math
import sys
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from outbox import policy
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
from outbox.policy import (
    RETRYABLE_OUTCOMES,
    KnownMessage,
    after_access_check,
    backoff_delay,
    decide,
    describe,
    is_retryable,
    lookup_unsettled,
    partnero_message,
    partnero_success,
    ping_verdict,
)

NOW = datetime(2026, 11, 21, 12, 0, 0, tzinfo=UTC)
POLICY = RetryPolicy(
    max_attempts=5,
    base_delay_seconds=1.0,
    max_delay_seconds=600.0,
    auth_pause_seconds=60.0,
    jitter=0.25,
)
CREATE, DELETE, LOOKUP = RequestKind.CREATE, RequestKind.DELETE, RequestKind.LOOKUP
PING = RequestKind.PING
NOT_SENT, UNKNOWN = TransportError.NOT_SENT, TransportError.UNKNOWN_OUTCOME

# An everyday invoice number: a key with "/" in it, and keys that merely contain it.
KEY = "FV/2026/11/7"
LIST_URL = "https://api.partnero.com/v1/transactions?key=FV%2F2026%2F11%2F7&limit=250"

_PATHS = {
    CREATE: ("POST", "/v1/transactions"),
    DELETE: ("DELETE", "/v1/transactions"),
    LOOKUP: ("GET", "/v1/transactions?key=FV%2F2026%2F11%2F7&limit=250&page=1"),
    PING: ("GET", "/v1/test"),
}


def event(attempts: int = 0, *, refund: bool = False, flagged: bool = False) -> Event:
    return Event(
        id=1,
        event_type=EventType.REFUND if refund else EventType.SALE,
        transaction_key=KEY,
        customer_key=None if refund else "c-1",
        amount=None if refund else Decimal("10.50"),
        currency=None if refund else "EUR",
        payload={},
        attempts=attempts,
        lookup_required=flagged,
        created_at=NOW,  # just recorded: well within the unknown-customer grace
    )


def exchange(
    kind: RequestKind,
    status: int | None = None,
    message: str | None = None,
    *,
    body: Any = None,
    text: str | None = None,
    transport: TransportError | None = None,
    error: str | None = None,
    retry_after: float | None = None,
) -> Exchange:
    """An exchange as PartneroClient reports it: `body` is the JSON answer (`message` alone is
    short for ``{"message": message}``), `text` a raw answer that is not JSON."""
    method, path = _PATHS[kind]
    if body is None and message is not None:
        body = {"message": message}
    if body is not None:
        text = json.dumps(body, separators=(",", ":"))
    json_body = body if isinstance(body, dict) else None
    found = json_body.get("message") if json_body is not None else None
    return Exchange(
        kind=kind,
        method=method,
        path=path,
        status_code=status,
        body_excerpt=text or "",
        message=found if isinstance(found, str) else None,
        json_body=json_body,
        retry_after_seconds=retry_after,
        transport_error=transport,
        error=error if error is not None else ("ReadTimeout: timed out" if transport else None),
    )


def run(ex: Exchange, attempts: int = 0, rand: float = 0.5, *, flagged: bool = False) -> Decision:
    ev = event(attempts, refund=ex.kind is DELETE, flagged=flagged)
    return decide(ev, ex, NOW, POLICY, rand)


def list_page(*rows: str | dict[str, Any], next_link: Any = None) -> dict[str, Any]:
    """One page of ``GET /v1/transactions?key=...`` in Partnero's (Laravel's) pagination shape."""
    return {
        "data": [
            row if isinstance(row, dict) else {"key": row, "amount": 10.5, "deleted_at": None}
            for row in rows
        ],
        "links": {
            "first": f"{LIST_URL}&page=1",
            "last": f"{LIST_URL}&page=3",
            "prev": None,
            "next": next_link,
        },
        "meta": {"current_page": 1, "per_page": 250},
        "status": 1,
    }


# ---- expectations -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Retries:
    """Retried (`Retry` with this class), and `Failed` with it once the attempts run out."""

    reason: Outcome
    lookup: bool


@dataclass(frozen=True)
class Fails:
    """`Failed` at once, whatever the attempts, with the answer described as the detail."""

    reason: Outcome
    lookup: bool


# Forbidden and Pause stand for `Forbidden(describe(ex))` and the 401 pause of the policy.
Expect = Decision | Retries | Fails | type[Forbidden] | type[Pause]

CREATED, DUPLICATE = Delivered(Outcome.CREATED), Delivered(Outcome.DUPLICATE)
DELETED, NOT_FOUND = Delivered(Outcome.DELETED), Delivered(Outcome.NOT_FOUND)
FOUND, ABSENT = LookupResult(found=True), LookupResult(found=False)
# Not Partnero's own answer: ask again later, and a create's effect is unknown.
BAD = Retries(Outcome.BAD_RESPONSE, True)
# Another 4xx: a create's effect is unknown (looked up on a retry); a delete keeps the row's flag.
REJECTED_CREATE = Fails(Outcome.REJECTED, True)
REJECTED_DELETE = Fails(Outcome.REJECTED, False)
SERVER = Retries(Outcome.SERVER_ERROR, True)


def check(ev: Event, ex: Exchange, expected: Expect) -> None:
    """`decide` gives `expected` for `ev`, and the attempts limit acts as it should on it."""

    def at(attempts: int) -> Decision:
        return decide(replace(ev, attempts=attempts), ex, NOW, POLICY, 0.5)

    if isinstance(expected, Retries):
        # attempt 2: backoff 2 s, no jitter at rand 0.5
        assert at(1) == Retry(
            at=NOW + timedelta(seconds=2), reason=expected.reason, lookup_required=expected.lookup
        )
        assert is_retryable(expected.reason)
        # attempts 0..3 made 1..4; attempt 5 is the last one allowed
        assert isinstance(at(POLICY.max_attempts - 2), Retry)
        for attempts in (POLICY.max_attempts - 1, POLICY.max_attempts, POLICY.max_attempts + 7):
            if expected.reason is Outcome.CUSTOMER_NOT_FOUND:
                # A customer Partnero does not know ends skipped, never failed.
                why = f"not known to Partnero after {attempts + 1} attempts"
                assert at(attempts) == Skipped(expected.reason, f"{describe(ex)} [{why}]")
                continue
            assert at(attempts) == Failed(
                expected.reason,
                f"{describe(ex)} [gave up after {attempts + 1} attempts]",
                lookup_required=expected.lookup,
            )
        return
    if isinstance(expected, Fails):
        wanted: Decision = Failed(expected.reason, describe(ex), lookup_required=expected.lookup)
        assert not is_retryable(expected.reason)
    elif expected is Forbidden:
        # A 403 is no message Partnero documents: a create's effect stays unknown.
        wanted = Forbidden(
            detail=describe(ex), lookup_required=ev.lookup_required or ex.kind is CREATE
        )
    elif expected is Pause:
        wanted = Pause(
            until=NOW + timedelta(seconds=POLICY.auth_pause_seconds),
            detail=f"{describe(ex)} [check PARTNERO_API_KEY]",
        )
    else:
        assert isinstance(expected, Delivered | LookupResult | LookupNextPage)
        wanted = expected
    # Definitive answers (and 401/403, which never count) do not care how many attempts came
    # before.
    for attempts in (0, POLICY.max_attempts - 1, POLICY.max_attempts + 10):
        assert at(attempts) == wanted


# ---- reading Partnero's answers: one row per answer shape -------------------------------------


@dataclass(frozen=True)
class Shape:
    """One answer, and what it means to each call (None: the call never gets this answer).

    `body` is the JSON answer, `text` a raw one that is not JSON."""

    name: str
    status: int | None
    create: Expect | None
    delete: Expect | None
    lookup: Expect | None
    body: Any = None
    text: str | None = None
    transport: TransportError | None = None


def same(name: str, status: int | None, expected: Expect, body: Any = None, **kw: Any) -> Shape:
    """An answer that means the same to every call."""
    return Shape(name, status, expected, expected, expected, body, **kw)


def page(name: str, body: dict[str, Any], expected: Expect) -> Shape:
    """A 200 that only a lookup gets."""
    return Shape(name, 200, None, None, expected, body)


def msg(text: str) -> dict[str, str]:
    return {"message": text}


HTML_502 = (
    "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    "<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n"
    "</body>\r\n</html>\r\n"
)
HTML_404 = "<html><title>404 Not Found</title><body>Transaction not found</body></html>"
HTML_400 = "<html><body><h1>Bad Request</h1><p>Duplicate key</p></body></html>"
ROUTE_404 = msg("The route api/v1/transactions/FV/2026/11/7 could not be found.")
INVALID = {"message": "The given data was invalid.", "errors": {"amount": ["Required."]}}
OK_BODY = {"data": {"key": KEY}, "status": 1}
NO_LOOKUP = Fails(Outcome.VALIDATION_ERROR, False)
NEXT_2 = f"{LIST_URL}&page=2"
OTHERS = ("FV/2026/11/70", "XFV/2026/11/7")  # keys that merely contain ours
CUSTOMER = Retries(Outcome.CUSTOMER_NOT_FOUND, False)
RATE = Retries(Outcome.RATE_LIMITED, False)
RATE_LOOKUP = Retries(Outcome.RATE_LIMITED, True)
NETWORK = Retries(Outcome.NETWORK_ERROR, False)
NETWORK_LOOKUP = Retries(Outcome.NETWORK_ERROR, True)
TIMEOUT = Retries(Outcome.TIMEOUT, True)
REJ_C, REJ_D = REJECTED_CREATE, REJECTED_DELETE

# fmt: off
SHAPES = [
    # -- 2xx: only Partnero's success shape is an outcome
    Shape("200 status 1", 200, CREATED, DELETED, BAD, OK_BODY),
    Shape("201 status 1", 201, CREATED, DELETED, BAD, OK_BODY),
    Shape("200 no status field", 200, CREATED, DELETED, BAD, {"data": {"key": KEY}}),
    Shape("202 empty object", 202, CREATED, DELETED, BAD, {}),
    Shape("204 empty", 204, CREATED, DELETED, BAD, text=""),
    same("200 status 0", 200, BAD, {"status": 0, "message": "Something went wrong"}),
    same("200 status '1' (a string)", 200, BAD, {**OK_BODY, "status": "1"}),
    same("200 status true", 200, BAD, {**OK_BODY, "status": True}),
    same("200 HTML page", 200, BAD, text="<!DOCTYPE html><html><body>Welcome</body></html>"),
    same("200 empty", 200, BAD, text=""),
    same("200 JSON that is not an object", 200, BAD, [{"key": KEY}]),
    same("204 with an HTML body", 204, BAD, text="<html><body>ok</body></html>"),
    # -- 404: Partnero's "Transaction not found" (a delete's outcome) or a route-level 404
    Shape("404 Transaction not found", 404, BAD, NOT_FOUND, BAD, msg("Transaction not found")),
    Shape("404 transaction NOT FOUND.", 404, BAD, NOT_FOUND, BAD, msg("transaction NOT FOUND.")),
    same("404 Transaction not found..", 404, BAD, msg("Transaction not found..")),
    same("404 route-level", 404, BAD, ROUTE_404),
    same("404 HTML page", 404, BAD, text=HTML_404),
    same("404 plain text", 404, BAD, text="Transaction not found"),
    same("404 empty", 404, BAD, text=""),
    # -- 400: a create's documented messages, matched exactly (case and one trailing period aside)
    Shape("400 Duplicate key", 400, DUPLICATE, REJ_D, BAD, msg("Duplicate key")),
    Shape("400 duplicate key.", 400, DUPLICATE, REJ_D, BAD, msg("duplicate key.")),
    Shape("400 DUPLICATE KEY", 400, DUPLICATE, REJ_D, BAD, msg("DUPLICATE KEY")),
    Shape("400 Duplicate customer key", 400, REJ_C, REJ_D, BAD, msg("Duplicate customer key")),
    Shape("400 Duplicate key for customer", 400, REJ_C, REJ_D, BAD,
          msg("Duplicate key for customer")),
    Shape("400 duplicate key here", 400, REJ_C, REJ_D, BAD, msg("duplicate key here")),
    Shape("400 Duplicate key..", 400, REJ_C, REJ_D, BAD, msg("Duplicate key..")),
    Shape("400 Duplicate key, other field", 400, REJ_C, REJ_D, BAD, {"error": "Duplicate key"}),
    Shape("400 HTML mentioning Duplicate key", 400, REJ_C, REJ_D, BAD, text=HTML_400),
    Shape("400 plain text Duplicate key", 400, REJ_C, REJ_D, BAD, text="Duplicate key"),
    Shape("400 Customer not found", 400, CUSTOMER, REJ_D, BAD, msg("Customer not found")),
    Shape("400 customer NOT FOUND.", 400, CUSTOMER, REJ_D, BAD, msg("customer NOT FOUND.")),
    Shape("400 Customer not found here", 400, REJ_C, REJ_D, BAD,
          msg("Customer not found for this program")),
    # a customer create's message, and a delete's message for another status
    Shape("400 Invalid partner key", 400, REJ_C, REJ_D, BAD, msg("Invalid partner key")),
    Shape("400 Transaction not found", 400, REJ_C, REJ_D, BAD, msg("Transaction not found")),
    Shape("409 Duplicate key", 409, REJ_C, REJ_D, BAD, msg("Duplicate key")),
    Shape("422 Duplicate key", 422, REJ_C, REJ_D, BAD, msg("Duplicate key")),
    # -- 422: a validation error (with an `errors` object) or just another refusal
    Shape("422 with errors", 422, NO_LOOKUP, NO_LOOKUP, BAD, INVALID),
    Shape("422 without errors", 422, REJ_C, REJ_D, BAD, msg("The given data was invalid.")),
    Shape("422 errors not an object", 422, REJ_C, REJ_D, BAD, {**INVALID, "errors": ["amount"]}),
    # -- the key or the account
    same("401", 401, Pause, msg("Unauthenticated.")),
    same("403", 403, Forbidden, msg("This action is unauthorized.")),
    same("403 HTML page", 403, Forbidden, text="<html><h1>403 Forbidden</h1></html>"),
    # -- other status codes
    same("405", 405, BAD, msg("The DELETE method is not supported for route api/v1.")),
    same("408", 408, TIMEOUT, text=""),
    Shape("429", 429, RATE, RATE, RATE_LOOKUP, msg("Too Many Attempts.")),
    Shape("409 Conflict", 409, REJ_C, REJ_D, BAD, msg("Conflict")),
    Shape("410", 410, REJ_C, REJ_D, BAD, text=""),
    Shape("499", 499, REJ_C, REJ_D, BAD, text=""),
    same("500 JSON", 500, SERVER, msg("Server Error")),
    same("502 proxy HTML page", 502, SERVER, text=HTML_502),
    same("503 empty", 503, SERVER, text=""),
    same("504 empty", 504, SERVER, text=""),
    same("599", 599, SERVER, text=""),
    *[same(f"{code}", code, BAD, text="") for code in (100, 199, 301, 302, 304, 600, 0)],
    # -- no complete answer
    Shape("not sent", None, NETWORK, NETWORK, NETWORK_LOOKUP, transport=NOT_SENT),
    same("no answer", None, TIMEOUT, transport=UNKNOWN),
    # a 2xx whose body then broke off: the transport error wins over the status and the body
    same("201 status 1, then cut", 201, TIMEOUT, OK_BODY, transport=UNKNOWN),
    # -- lookup pages: found only on an exact key, absent only on the last page
    page("page: found", list_page(KEY), FOUND),
    page("page: found, deleted", list_page({"key": KEY, "deleted_at": "2026-11-20"}), FOUND),
    page("page: found among others", list_page(*OTHERS, KEY, next_link=NEXT_2), FOUND),
    page("page: empty, last", list_page(), ABSENT),
    page("page: substring keys only", list_page(*OTHERS), ABSENT),
    page("page: key in other case", list_page("fv/2026/11/7"), ABSENT),
    page("page: next", list_page(*OTHERS, next_link=NEXT_2), LookupNextPage(2)),
    page("page: empty, next", list_page(next_link=f"{LIST_URL}&page=3"), LookupNextPage(3)),
    *[
        page(f"page: next link {link!r}", list_page(*OTHERS, next_link=link), BAD)
        for link in (
            f"{LIST_URL}&page=1",
            f"{LIST_URL}&page=0",
            f"{LIST_URL}&page=-2",
            f"{LIST_URL}&page=%2B2",
            f"{LIST_URL}&page=two",
            f"{LIST_URL}&page=%C2%B2",  # "²": a digit to str.isdigit, not a page number
            f"{LIST_URL}&page=2&page=3",
            LIST_URL,
            "",
            2,
        )
    ],
    page("page: status 0", {**list_page(KEY), "status": 0}, BAD),
    page("page: status '1'", {**list_page(KEY), "status": "1"}, BAD),
    page("page: data is one object", {**list_page(), "data": {"key": KEY}}, BAD),
    page("page: data is null", {**list_page(), "data": None}, BAD),
    page("page: no links", {"data": [{"key": KEY}], "status": 1}, BAD),
    page("page: links not an object", {**list_page(KEY), "links": [None]}, BAD),
    # Absent only when Partnero says this is the last page, and only from rows it could read.
    page("page: links without next", {**list_page(), "links": {}}, BAD),
    page("page: a row that is not an object", {**list_page(), "data": [KEY]}, BAD),
    page("page: a row without a key is not ours", list_page({"id": 5}), ABSENT),
    page("page: null key is not ours", list_page({"key": None}), ABSENT),
    page("page: true is not a key", list_page({"key": True}), ABSENT),
]
# fmt: on

SHAPE_CASES = [
    pytest.param(shape, kind, expected, id=f"{shape.name} -> {kind.value}")
    for shape in SHAPES
    for kind, expected in ((CREATE, shape.create), (DELETE, shape.delete), (LOOKUP, shape.lookup))
    if expected is not None
]


@pytest.mark.parametrize(("shape", "kind", "expected"), SHAPE_CASES)
def test_answer_shapes(shape: Shape, kind: RequestKind, expected: Expect) -> None:
    ex = exchange(kind, shape.status, body=shape.body, text=shape.text, transport=shape.transport)
    if kind is LOOKUP:
        # A lookup is made because the row is flagged; its reading does not depend on the flag.
        check(event(flagged=True), ex, expected)
        check(event(flagged=False), ex, expected)
    else:
        check(event(refund=kind is DELETE), ex, expected)


def test_every_answer_shape_is_read_for_every_call_it_can_answer() -> None:
    for shape in SHAPES:
        if not shape.name.startswith("page:"):
            assert None not in (shape.create, shape.delete, shape.lookup), shape.name


# What the row's flag (an earlier call may have been applied) changes: (answer, unflagged row,
# flagged row). A delete carries the flag on; a create's flagged row was looked up just before.
FLAG_CASES = [
    (exchange(DELETE, 404, "Transaction not found"), NOT_FOUND, DELETED),
    (exchange(DELETE, 404, "TRANSACTION NOT FOUND."), NOT_FOUND, DELETED),
    (exchange(DELETE, 404, "The route api/v1/transactions could not be found."), BAD, BAD),
    (
        exchange(DELETE, 429),
        Retries(Outcome.RATE_LIMITED, False),
        Retries(Outcome.RATE_LIMITED, True),
    ),
    (
        exchange(DELETE, transport=NOT_SENT),
        Retries(Outcome.NETWORK_ERROR, False),
        Retries(Outcome.NETWORK_ERROR, True),
    ),
    (exchange(DELETE, 400, "Bad request"), REJECTED_DELETE, Fails(Outcome.REJECTED, True)),
    (exchange(DELETE, 400, "Duplicate key"), REJECTED_DELETE, Fails(Outcome.REJECTED, True)),
    (
        exchange(DELETE, 422, body={"message": "Invalid.", "errors": {"key": ["Bad."]}}),
        Fails(Outcome.VALIDATION_ERROR, False),
        Fails(Outcome.VALIDATION_ERROR, True),
    ),
    (
        exchange(CREATE, 429),
        Retries(Outcome.RATE_LIMITED, False),
        Retries(Outcome.RATE_LIMITED, True),
    ),
    (
        exchange(CREATE, transport=NOT_SENT),
        Retries(Outcome.NETWORK_ERROR, False),
        Retries(Outcome.NETWORK_ERROR, True),
    ),
    (
        exchange(CREATE, 422, body={"message": "Invalid.", "errors": {"amount": ["Bad."]}}),
        Fails(Outcome.VALIDATION_ERROR, False),
        Fails(Outcome.VALIDATION_ERROR, True),
    ),
    # Partnero refused the create: nothing was applied, whatever came before.
    (
        exchange(CREATE, 400, "Customer not found"),
        Retries(Outcome.CUSTOMER_NOT_FOUND, False),
        Retries(Outcome.CUSTOMER_NOT_FOUND, False),
    ),
    (exchange(CREATE, 400, "Duplicate key"), DUPLICATE, DUPLICATE),
    (exchange(CREATE, 409), REJECTED_CREATE, REJECTED_CREATE),
    # the client refused to send: nothing went out this time
    (
        exchange(CREATE, error="ValueError: amount NaN is not a finite number"),
        Fails(Outcome.REJECTED, False),
        Fails(Outcome.REJECTED, True),
    ),
]


@pytest.mark.parametrize(("ex", "unflagged", "flagged"), FLAG_CASES)
def test_the_rows_flag(ex: Exchange, unflagged: Expect, flagged: Expect) -> None:
    refund = ex.kind is DELETE
    check(event(refund=refund), ex, unflagged)
    check(event(refund=refund, flagged=True), ex, flagged)


def test_a_flag_once_raised_survives_a_retry_that_was_certainly_not_sent() -> None:
    flagged = event(1, refund=True, flagged=True)
    decision = decide(flagged, exchange(DELETE, transport=NOT_SENT), NOW, POLICY, 0.5)
    assert isinstance(decision, Retry) and decision.lookup_required
    decision = decide(flagged, exchange(DELETE, 429), NOW, POLICY, 0.5)
    assert isinstance(decision, Retry) and decision.lookup_required


@pytest.mark.parametrize(
    ("ex", "expected"),
    [
        (exchange(CREATE, 200, body={"status": 1}), True),
        (exchange(CREATE, 201, body={"data": {"key": KEY}, "status": 1}), True),
        (exchange(CREATE, 200, body={"data": {"key": KEY}}), True),
        (exchange(CREATE, 299, body={"status": 1}), True),
        (exchange(DELETE, 204, text=""), True),
        (exchange(DELETE, 204, text=" \r\n"), True),
        (exchange(CREATE, 200, body={"status": 0}), False),
        (exchange(CREATE, 200, body={"status": 2}), False),
        (exchange(CREATE, 200, body={"status": "1"}), False),
        (exchange(CREATE, 200, body={"status": True}), False),
        (exchange(CREATE, 200, body={"status": 1.0}), False),
        (exchange(CREATE, 200, body={"status": None}), False),
        (exchange(CREATE, 200, body=[{"status": 1}]), False),
        (exchange(CREATE, 200, text=""), False),
        (exchange(CREATE, 200, text="<html>status: 1</html>"), False),
        (exchange(DELETE, 204, text="<html></html>"), False),
        (exchange(DELETE, 204, body={"status": 0}), False),
        (exchange(CREATE, 199, body={"status": 1}), False),
        (exchange(CREATE, 300, body={"status": 1}), False),
        (exchange(CREATE, 400, body={"status": 1}), False),
        (exchange(CREATE, 201, body={"status": 1}, transport=UNKNOWN), False),
        (exchange(CREATE, transport=NOT_SENT), False),
    ],
)
def test_partnero_success(ex: Exchange, expected: bool) -> None:
    assert partnero_success(ex) is expected


@pytest.mark.parametrize(
    ("ex", "expected"),
    [
        (exchange(CREATE, 400, "Duplicate key"), KnownMessage.DUPLICATE_KEY),
        (exchange(CREATE, 400, "duplicate key."), KnownMessage.DUPLICATE_KEY),
        (exchange(CREATE, 400, "DUPLICATE KEY"), KnownMessage.DUPLICATE_KEY),
        (exchange(CREATE, 400, "Customer not found"), KnownMessage.CUSTOMER_NOT_FOUND),
        (exchange(CREATE, 400, "Customer Not Found."), KnownMessage.CUSTOMER_NOT_FOUND),
        (exchange(DELETE, 404, "Transaction not found"), KnownMessage.TRANSACTION_NOT_FOUND),
        (exchange(DELETE, 404, "transaction not found."), KnownMessage.TRANSACTION_NOT_FOUND),
        (exchange(CREATE, 400, "Duplicate customer key"), None),
        (exchange(CREATE, 400, "Duplicate key for customer"), None),
        (exchange(CREATE, 400, "duplicate key here"), None),
        (exchange(CREATE, 400, "Duplicate key.."), None),
        (exchange(CREATE, 400, "Duplicate  key"), None),
        (exchange(CREATE, 400, " Duplicate key "), None),
        (exchange(CREATE, 400, body={"error": "Duplicate key"}), None),
        (exchange(CREATE, 400, text="<html><p>Duplicate key</p></html>"), None),
        (exchange(CREATE, 400, text="Duplicate key"), None),
        # the right words for another call or another status
        (exchange(CREATE, 409, "Duplicate key"), None),
        (exchange(CREATE, 422, "Duplicate key"), None),
        (exchange(DELETE, 400, "Duplicate key"), None),
        (exchange(CREATE, 404, "Transaction not found"), None),
        (exchange(DELETE, 400, "Transaction not found"), None),
        (exchange(LOOKUP, 404, "Transaction not found"), None),
        (exchange(DELETE, 404, "The route api/v1/transactions could not be found."), None),
        (exchange(CREATE, 400, "Duplicate key", transport=UNKNOWN), None),
    ],
)
def test_partnero_message(ex: Exchange, expected: KnownMessage | None) -> None:
    assert partnero_message(ex) is expected


# ---- 401 and 403 ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [CREATE, DELETE, LOOKUP])
@pytest.mark.parametrize("attempts", [0, POLICY.max_attempts - 1, POLICY.max_attempts + 50])
def test_401_pauses_and_never_counts(kind: RequestKind, attempts: int) -> None:
    decision = run(exchange(kind, 401, "Unauthenticated."), attempts=attempts)
    assert decision == Pause(
        until=NOW + timedelta(seconds=POLICY.auth_pause_seconds),
        detail="HTTP 401: Unauthenticated. [check PARTNERO_API_KEY]",
    )


@pytest.mark.parametrize("kind", [CREATE, DELETE, LOOKUP])
@pytest.mark.parametrize("attempts", [0, POLICY.max_attempts - 1, POLICY.max_attempts + 50])
def test_403_asks_for_an_access_check_and_never_fails_by_itself(
    kind: RequestKind, attempts: int
) -> None:
    decision = run(exchange(kind, 403, "This action is unauthorized."), attempts=attempts)
    assert decision == Forbidden(
        detail="HTTP 403: This action is unauthorized.", lookup_required=kind is CREATE
    )


@pytest.mark.parametrize("flagged", [False, True])
def test_after_access_check(flagged: bool) -> None:
    forbidden = Forbidden(detail="HTTP 403: This action is unauthorized.", lookup_required=flagged)
    # The key works: the row alone is refused, and keeps what is known of its effect.
    assert after_access_check(forbidden, PingVerdict.OK, NOW, POLICY) == Failed(
        Outcome.FORBIDDEN,
        "HTTP 403: This action is unauthorized. [GET /v1/test: OK]",
        lookup_required=flagged,
    )
    assert not is_retryable(Outcome.FORBIDDEN)
    until = NOW + timedelta(seconds=POLICY.auth_pause_seconds)
    # Paused either way; a create's 403 keeps its effect unknown for the next attempt.
    for refused in (PingVerdict.REFUSED, PingVerdict.NOT_PARTNERO):
        assert after_access_check(forbidden, refused, NOW, POLICY) == Pause(
            until=until,
            detail="HTTP 403: This action is unauthorized. [check PARTNERO_API_KEY]",
            lookup_required=flagged,
        )
    # No answer to the key check: sending waits, but nobody is told the key was refused.
    assert after_access_check(forbidden, PingVerdict.UNREACHABLE, NOW, POLICY) == Pause(
        until=until,
        detail="HTTP 403: This action is unauthorized. [GET /v1/test: no usable answer]",
        refused=False,
        lookup_required=flagged,
    )


def test_after_access_check_keeps_details_short() -> None:
    forbidden = Forbidden(detail="x" * policy.DETAIL_MAX_CHARS)
    for verdict in PingVerdict:
        decision = after_access_check(forbidden, verdict, NOW, POLICY)
        assert isinstance(decision, Failed | Pause)
        assert len(decision.detail) == policy.DETAIL_MAX_CHARS
        assert decision.detail.endswith("]")


def test_pause_ignores_retry_after() -> None:
    decision = run(exchange(CREATE, 401, retry_after=5000.0))
    assert isinstance(decision, Pause)
    assert decision.until == NOW + timedelta(seconds=60)


# ---- GET /v1/test -----------------------------------------------------------------------------


def test_ping_is_not_decided() -> None:
    with pytest.raises(ValueError, match="ping"):
        run(exchange(PING, 200, body={"status": 1}))


@pytest.mark.parametrize(
    ("ex", "verdict"),
    [
        (exchange(PING, 200, body={"status": 1}), PingVerdict.OK),
        (exchange(PING, 200, body={"message": "API key is valid"}), PingVerdict.OK),
        (exchange(PING, 204, text=""), PingVerdict.OK),
        # The body of GET /v1/test is undocumented: plain text or nothing is a yes; a web page
        # or Partnero's own "no" is asked again (a maintenance page must not stop start-up).
        (exchange(PING, 200, text="OK"), PingVerdict.OK),
        (exchange(PING, 200, text=""), PingVerdict.OK),
        (exchange(PING, 200, text="<html><body>It works!</body></html>"), PingVerdict.UNREACHABLE),
        (exchange(PING, 200, text="  <!DOCTYPE html><html></html>"), PingVerdict.UNREACHABLE),
        (exchange(PING, 200, body={"status": 0}), PingVerdict.UNREACHABLE),
        (
            exchange(PING, 404, "The route api/v1/v1/test could not be found."),
            PingVerdict.NOT_PARTNERO,
        ),
        (exchange(PING, 404, text="<html>Not Found</html>"), PingVerdict.NOT_PARTNERO),
        (exchange(PING, 405, text=""), PingVerdict.NOT_PARTNERO),
        (exchange(PING, 401, "Unauthenticated."), PingVerdict.REFUSED),
        (exchange(PING, 403, "This action is unauthorized."), PingVerdict.REFUSED),
        (exchange(PING, 500, "Server Error"), PingVerdict.UNREACHABLE),
        (exchange(PING, 502, text=HTML_502), PingVerdict.UNREACHABLE),
        (exchange(PING, 503, text=""), PingVerdict.UNREACHABLE),
        (exchange(PING, 429, "Too Many Attempts."), PingVerdict.UNREACHABLE),
        (exchange(PING, 408, text=""), PingVerdict.UNREACHABLE),
        (exchange(PING, 400, "Bad request"), PingVerdict.UNREACHABLE),
        (exchange(PING, 301, text=""), PingVerdict.NOT_PARTNERO),  # http:// for https://
        (exchange(PING, 302, text=""), PingVerdict.NOT_PARTNERO),
        (exchange(PING, transport=NOT_SENT), PingVerdict.UNREACHABLE),
        (exchange(PING, transport=UNKNOWN), PingVerdict.UNREACHABLE),
        (exchange(PING, 200, body={"status": 1}, transport=UNKNOWN), PingVerdict.UNREACHABLE),
    ],
)
def test_ping_verdict(ex: Exchange, verdict: PingVerdict) -> None:
    assert ping_verdict(ex) is verdict


# ---- the attempts limit -----------------------------------------------------------------------


def test_max_attempts_of_one_fails_the_first_retryable_answer() -> None:
    one = RetryPolicy(max_attempts=1)
    decision = decide(event(), exchange(CREATE, 503), NOW, one, 0.5)
    assert decision == Failed(
        Outcome.SERVER_ERROR,
        "HTTP 503 Service Unavailable [gave up after 1 attempts]",
        lookup_required=True,
    )


def test_lookup_unsettled() -> None:
    ex = exchange(LOOKUP, 200, body=list_page("FV/2026/11/70", next_link=f"{LIST_URL}&page=2"))
    why = "the lookup of page 2 pointed to page 2"
    ev = event(1, flagged=True)
    assert lookup_unsettled(ev, ex, NOW, POLICY, 0.5, why) == Retry(
        at=NOW + timedelta(seconds=2), reason=Outcome.BAD_RESPONSE, lookup_required=True, note=why
    )
    last = replace(ev, attempts=POLICY.max_attempts - 1)
    failed = lookup_unsettled(last, ex, NOW, POLICY, 0.5, why)
    assert isinstance(failed, Failed)
    assert (failed.reason, failed.lookup_required) == (Outcome.BAD_RESPONSE, True)
    assert failed.detail == f"{why}: {describe(ex)} [gave up after {POLICY.max_attempts} attempts]"


FAILED_CASES = [
    (
        exchange(
            CREATE,
            422,
            body={
                "message": "The given data was invalid.",
                "errors": {"amount": ["The amount field is required."]},
            },
        ),
        Failed(
            Outcome.VALIDATION_ERROR,
            "HTTP 422: The given data was invalid. (amount: The amount field is required.)",
        ),
    ),
    (
        exchange(CREATE, 400, "Invalid partner key"),
        Failed(Outcome.REJECTED, "HTTP 400: Invalid partner key", lookup_required=True),
    ),
    (
        exchange(CREATE, 409, "Conflict"),
        Failed(Outcome.REJECTED, "HTTP 409: Conflict", lookup_required=True),
    ),
    (exchange(CREATE, 410), Failed(Outcome.REJECTED, "HTTP 410 Gone", lookup_required=True)),
    (
        exchange(CREATE, 406, text="<h1>Nope</h1>"),
        Failed(Outcome.REJECTED, "HTTP 406 Not Acceptable: <h1>Nope</h1>", lookup_required=True),
    ),
    (exchange(CREATE, 499), Failed(Outcome.REJECTED, "HTTP 499", lookup_required=True)),
    (
        exchange(
            DELETE,
            422,
            body={"message": "Invalid.", "errors": {"key": "Bad key."}},
        ),
        Failed(Outcome.VALIDATION_ERROR, "HTTP 422: Invalid. (key: Bad key.)"),
    ),
    (exchange(DELETE, 400, "Bad request"), Failed(Outcome.REJECTED, "HTTP 400: Bad request")),
    # the client refused to send (no status, no transport error): nothing would change next time
    (
        exchange(CREATE, error="ValueError: amount NaN is not a finite number"),
        Failed(Outcome.REJECTED, "Not sent: ValueError: amount NaN is not a finite number"),
    ),
]


@pytest.mark.parametrize(("ex", "expected"), FAILED_CASES)
def test_fails_at_once_with_the_answer_as_the_detail(ex: Exchange, expected: Failed) -> None:
    assert run(ex) == expected
    assert not is_retryable(expected.reason)


def test_retryable_outcomes() -> None:
    assert {o for o in Outcome if is_retryable(o)} == RETRYABLE_OUTCOMES
    assert {
        Outcome.CUSTOMER_NOT_FOUND,
        Outcome.NETWORK_ERROR,
        Outcome.TIMEOUT,
        Outcome.SERVER_ERROR,
        Outcome.RATE_LIMITED,
        Outcome.BAD_RESPONSE,
    } == RETRYABLE_OUTCOMES


# ---- retry time: backoff and Retry-After ------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "kind"), [(429, CREATE), (503, CREATE), (503, DELETE), (500, LOOKUP), (400, CREATE)]
)
def test_retry_after_is_honoured_for_any_retryable_answer(status: int, kind: RequestKind) -> None:
    message = "Customer not found" if status == 400 else None
    decision = run(exchange(kind, status, message, retry_after=120.0))
    assert isinstance(decision, Retry)
    assert decision.at == NOW + timedelta(seconds=120)


def test_retry_after_shorter_than_the_backoff_does_not_shorten_it() -> None:
    decision = run(exchange(CREATE, 429, retry_after=1.0), attempts=4 - 1, rand=0.5)
    assert isinstance(decision, Retry)
    assert decision.at == NOW + timedelta(seconds=8)  # attempt 4: 1 * 2**3


@pytest.mark.parametrize("retry_after", [600.0, 601.0, 86_400.0 * 365, 1e300])
def test_retry_after_is_capped_at_the_max_delay(retry_after: float) -> None:
    decision = run(exchange(CREATE, 429, retry_after=retry_after))
    assert isinstance(decision, Retry)
    assert decision.at == NOW + timedelta(seconds=POLICY.max_delay_seconds)


@pytest.mark.parametrize("retry_after", [-30.0, 0.0, math.nan, math.inf, -math.inf])
def test_odd_retry_after_values_fall_back_to_the_backoff(retry_after: float) -> None:
    decision = run(exchange(CREATE, 429, retry_after=retry_after), attempts=0, rand=0.5)
    assert isinstance(decision, Retry)
    assert decision.at == NOW + timedelta(seconds=1)


def test_retry_time_includes_jitter() -> None:
    low = run(exchange(CREATE, 503), attempts=2, rand=0.0)
    high = run(exchange(CREATE, 503), attempts=2, rand=0.999999)
    assert isinstance(low, Retry)
    assert isinstance(high, Retry)
    assert low.at == NOW + timedelta(seconds=3)  # 4 s * 0.75
    assert NOW + timedelta(seconds=4.99) < high.at < NOW + timedelta(seconds=5)


@pytest.mark.parametrize(
    ("attempt", "expected"),
    [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (10, 512.0), (11, 600.0), (12, 600.0), (5000, 600.0)],
)
def test_backoff_without_jitter(attempt: int, expected: float) -> None:
    assert backoff_delay(attempt, POLICY, 0.5) == expected


@pytest.mark.parametrize("rand", [0.0, 0.1, 0.5, 0.9, 0.999999])
def test_backoff_is_monotone_and_capped(rand: float) -> None:
    delays = [backoff_delay(attempt, POLICY, rand) for attempt in range(1, 300)]
    assert delays == sorted(delays)
    assert all(0.0 <= d <= POLICY.max_delay_seconds for d in delays)
    assert delays[-1] == pytest.approx(
        min(POLICY.max_delay_seconds, 600.0 * (1 + 0.25 * (2 * rand - 1)))
    )


@pytest.mark.parametrize("attempt", [1, 2, 5, 9, 10, 11, 50])
def test_backoff_jitter_bounds(attempt: int) -> None:
    nominal = min(POLICY.max_delay_seconds, 2.0 ** (attempt - 1))
    for i in range(100):
        delay = backoff_delay(attempt, POLICY, i / 100)
        assert nominal * 0.75 <= delay <= min(nominal * 1.25, POLICY.max_delay_seconds)
    assert backoff_delay(attempt, POLICY, 0.0) == nominal * 0.75


def test_backoff_never_goes_below_zero_or_above_the_cap() -> None:
    wild = RetryPolicy(base_delay_seconds=20.0, max_delay_seconds=30.0, jitter=2.0)
    assert backoff_delay(1, wild, 0.0) == 0.0
    assert backoff_delay(1, wild, 0.999) == 30.0
    assert backoff_delay(100, wild, 0.999) == 30.0


@pytest.mark.parametrize("attempt", [0, -3])
def test_backoff_treats_attempts_below_one_as_the_first(attempt: int) -> None:
    assert backoff_delay(attempt, POLICY, 0.5) == 1.0


def test_backoff_with_huge_attempt_numbers_does_not_overflow() -> None:
    assert backoff_delay(10**9, POLICY, 0.5) == POLICY.max_delay_seconds


# ---- details ----------------------------------------------------------------------------------


def test_details_are_cut_to_500_characters() -> None:
    long = exchange(
        CREATE,
        422,
        "x" * 2000,
        body={"message": "x" * 2000, "errors": {"a": ["y" * 1000]}},
    )
    failed = run(long)
    assert isinstance(failed, Failed)
    assert len(failed.detail) == 500
    assert failed.detail.startswith("HTTP 422: xxx")
    assert failed.detail.endswith("…")

    gave_up = run(exchange(CREATE, 503, "z" * 2000), attempts=POLICY.max_attempts)
    assert isinstance(gave_up, Failed)
    assert len(gave_up.detail) == 500
    assert gave_up.detail.endswith(f"[gave up after {POLICY.max_attempts + 1} attempts]")


def test_detail_of_several_validation_errors_is_one_line() -> None:
    ex = exchange(
        CREATE,
        422,
        "The given data was invalid.",
        body={
            "message": "The given data was invalid.",
            "errors": {
                "amount": ["The amount field is required.", "The amount must be a number."],
                "customer.key": ["The customer.key field\nis required."],
            },
        },
    )
    assert describe(ex) == (
        "HTTP 422: The given data was invalid. (amount: The amount field is required. "
        "The amount must be a number.; customer.key: The customer.key field is required.)"
    )


@pytest.mark.parametrize(
    ("ex", "text"),
    [
        (
            exchange(CREATE, transport=NOT_SENT, error="ConnectError: refused"),
            "Not sent: ConnectError: refused",
        ),
        (
            exchange(CREATE, transport=UNKNOWN, error="ReadTimeout: timed out"),
            "No complete answer, outcome unknown: ReadTimeout: timed out",
        ),
        (
            exchange(CREATE, 201, transport=UNKNOWN, error="ReadError: reset"),
            "HTTP 201, then no complete answer, outcome unknown: ReadError: reset",
        ),
        (
            exchange(CREATE, 502, text="<html>\n  <h1>502</h1>\n</html>"),
            "HTTP 502 Bad Gateway: <html> <h1>502</h1> </html>",
        ),
        (exchange(CREATE, 500, "Server Error"), "HTTP 500: Server Error"),
    ],
)
def test_describe(ex: Exchange, text: str) -> None:
    assert describe(ex) == text


def test_failed_after_transport_errors_names_the_error() -> None:
    decision = run(
        exchange(CREATE, transport=NOT_SENT, error="ConnectError: [Errno 111] Connection refused"),
        attempts=POLICY.max_attempts - 1,
    )
    assert decision == Failed(
        Outcome.NETWORK_ERROR,
        "Not sent: ConnectError: [Errno 111] Connection refused [gave up after 5 attempts]",
    )


# ---- purity -----------------------------------------------------------------------------------


def test_policy_imports_only_the_standard_library_and_the_pure_modules() -> None:
    source = Path(policy.__file__).read_text(encoding="utf-8")
    imported: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
    for name in imported:
        top = name.split(".")[0]
        assert name in ("outbox.domain", "outbox.decisions", "outbox.text") or (
            top in sys.stdlib_module_names and top not in {"asyncio", "socket", "ssl"}
        ), name


@pytest.mark.parametrize(
    ("their_key", "found"),
    [(17, True), ("17", True), (17.0, False), (170, False), (True, False), (None, False)],
)
def test_a_numeric_key_given_back_as_a_json_integer_is_still_ours(
    their_key: object, found: bool
) -> None:
    """Shops use invoice numbers like 17; a list answer may carry them as JSON integers."""
    ev = replace(event(flagged=True), transaction_key="17")
    ex = exchange(LOOKUP, 200, body={"data": [{"key": their_key}], "links": {"next": None}})
    assert decide(ev, ex, NOW, POLICY, 0.5) == LookupResult(found=found)
