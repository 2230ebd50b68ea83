"""The pure retry policy: every rule of SPEC section 3 as a table."""

from __future__ import annotations

import ast
import math
import sys
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from outbox import policy
from outbox.domain import (
    Decision,
    Delivered,
    Event,
    EventType,
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
from outbox.policy import (
    RETRYABLE_OUTCOMES,
    backoff_delay,
    decide,
    describe,
    is_retryable,
    ping_ok,
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
NOT_SENT, UNKNOWN = TransportError.NOT_SENT, TransportError.UNKNOWN_OUTCOME

_PATHS = {
    CREATE: ("POST", "/v1/transactions"),
    DELETE: ("DELETE", "/v1/transactions/t-1"),
    LOOKUP: ("GET", "/v1/transactions/t-1"),
    RequestKind.PING: ("GET", "/v1/test"),
}


def event(attempts: int = 0, *, refund: bool = False) -> Event:
    return Event(
        id=1,
        event_type=EventType.REFUND if refund else EventType.SALE,
        transaction_key="t-1",
        customer_key=None if refund else "c-1",
        amount=None if refund else Decimal("10.50"),
        currency=None if refund else "EUR",
        payload={},
        attempts=attempts,
        lookup_required=False,
    )


def exchange(
    kind: RequestKind,
    status: int | None = None,
    message: str | None = None,
    *,
    json_body: dict[str, Any] | None = None,
    body: str | None = None,
    transport: TransportError | None = None,
    error: str | None = None,
    retry_after: float | None = None,
) -> Exchange:
    method, path = _PATHS[kind]
    if json_body is None and message is not None:
        json_body = {"message": message}
    return Exchange(
        kind=kind,
        method=method,
        path=path,
        status_code=status,
        body_excerpt=body if body is not None else ("" if message is None else f'"{message}"'),
        message=message,
        json_body=json_body,
        retry_after_seconds=retry_after,
        transport_error=transport,
        error=error if error is not None else ("ReadTimeout: timed out" if transport else None),
    )


def run(ex: Exchange, attempts: int = 0, rand: float = 0.5) -> Decision:
    return decide(event(attempts, refund=ex.kind is DELETE), ex, NOW, POLICY, rand)


def retry(reason: Outcome, lookup: bool) -> tuple[Outcome, bool]:
    return (reason, lookup)


# ---- the rules, kind by kind -----------------------------------------------------------------


def test_delete_404_after_a_delete_that_may_have_applied_reads_as_deleted() -> None:
    ex = exchange(DELETE, 404, "Transaction not found")
    flagged = replace(event(1, refund=True), lookup_required=True)
    assert decide(flagged, ex, NOW, POLICY, 0.5) == Delivered(Outcome.DELETED)
    assert decide(event(1, refund=True), ex, NOW, POLICY, 0.5) == Delivered(Outcome.NOT_FOUND)


def test_a_flag_once_raised_survives_a_retry_that_was_certainly_not_sent() -> None:
    flagged = replace(event(1, refund=True), lookup_required=True)
    decision = decide(flagged, exchange(DELETE, transport=NOT_SENT), NOW, POLICY, 0.5)
    assert isinstance(decision, Retry) and decision.lookup_required
    decision = decide(flagged, exchange(DELETE, 429), NOW, POLICY, 0.5)
    assert isinstance(decision, Retry) and decision.lookup_required


DELIVERED_CASES = [
    # create (sale)
    (exchange(CREATE, 200), Delivered(Outcome.CREATED)),
    (exchange(CREATE, 201), Delivered(Outcome.CREATED)),
    (exchange(CREATE, 202), Delivered(Outcome.CREATED)),
    (exchange(CREATE, 204), Delivered(Outcome.CREATED)),
    (exchange(CREATE, 400, "Duplicate key"), Delivered(Outcome.DUPLICATE)),
    (exchange(CREATE, 400, "DUPLICATE KEY for transaction"), Delivered(Outcome.DUPLICATE)),
    (exchange(CREATE, 400, body="Duplicate key"), Delivered(Outcome.DUPLICATE)),
    # delete (refund)
    (exchange(DELETE, 200, json_body={"status": 1}), Delivered(Outcome.DELETED)),
    (exchange(DELETE, 204), Delivered(Outcome.DELETED)),
    (exchange(DELETE, 404, "Transaction not found"), Delivered(Outcome.NOT_FOUND)),
    (exchange(DELETE, 404), Delivered(Outcome.NOT_FOUND)),
    # lookup
    (exchange(LOOKUP, 200, json_body={"data": {"key": "t-1"}}), LookupResult(found=True)),
    (
        exchange(LOOKUP, 200, json_body={"data": {"key": "t-1", "deleted_at": "2026-01-01"}}),
        LookupResult(found=True),
    ),
    (exchange(LOOKUP, 404, "Transaction not found"), LookupResult(found=False)),
    (exchange(LOOKUP, 404), LookupResult(found=False)),
]


@pytest.mark.parametrize(("ex", "expected"), DELIVERED_CASES)
def test_definitive_answers(ex: Exchange, expected: Decision) -> None:
    assert run(ex) == expected
    # Definitive answers do not care how many attempts came before.
    assert run(ex, attempts=POLICY.max_attempts + 10) == expected


RETRY_CASES = [
    # create: a create that may have been applied is looked up before it is sent again
    (exchange(CREATE, 400, "Customer not found"), retry(Outcome.CUSTOMER_NOT_FOUND, False)),
    (exchange(CREATE, 400, "customer NOT FOUND."), retry(Outcome.CUSTOMER_NOT_FOUND, False)),
    (exchange(CREATE, 408), retry(Outcome.TIMEOUT, True)),
    (exchange(CREATE, 429, "Too Many Attempts."), retry(Outcome.RATE_LIMITED, False)),
    (exchange(CREATE, 500, "Server Error"), retry(Outcome.SERVER_ERROR, True)),
    (exchange(CREATE, 502, body="<html>Bad Gateway</html>"), retry(Outcome.SERVER_ERROR, True)),
    (exchange(CREATE, 503), retry(Outcome.SERVER_ERROR, True)),
    (exchange(CREATE, 504), retry(Outcome.SERVER_ERROR, True)),
    (exchange(CREATE, 599), retry(Outcome.SERVER_ERROR, True)),
    (exchange(CREATE, 100), retry(Outcome.BAD_RESPONSE, True)),
    (exchange(CREATE, 199), retry(Outcome.BAD_RESPONSE, True)),
    (exchange(CREATE, 301), retry(Outcome.BAD_RESPONSE, True)),
    (exchange(CREATE, 302), retry(Outcome.BAD_RESPONSE, True)),
    (exchange(CREATE, 304), retry(Outcome.BAD_RESPONSE, True)),
    (exchange(CREATE, 600), retry(Outcome.BAD_RESPONSE, True)),
    (exchange(CREATE, 0), retry(Outcome.BAD_RESPONSE, True)),
    (exchange(CREATE, transport=NOT_SENT), retry(Outcome.NETWORK_ERROR, False)),
    (exchange(CREATE, transport=UNKNOWN), retry(Outcome.TIMEOUT, True)),
    # a 201 whose body then broke off: the transport error wins, and the create is looked up
    (exchange(CREATE, 201, transport=UNKNOWN), retry(Outcome.TIMEOUT, True)),
    # delete: sent again (it is idempotent), flagged when it may have been applied, so that a
    # later 404 reads as "our earlier DELETE did it"
    (exchange(DELETE, 408), retry(Outcome.TIMEOUT, True)),
    (exchange(DELETE, 429), retry(Outcome.RATE_LIMITED, False)),
    (exchange(DELETE, 500), retry(Outcome.SERVER_ERROR, True)),
    (exchange(DELETE, 502), retry(Outcome.SERVER_ERROR, True)),
    (exchange(DELETE, 503), retry(Outcome.SERVER_ERROR, True)),
    (exchange(DELETE, 302), retry(Outcome.BAD_RESPONSE, True)),
    (exchange(DELETE, transport=NOT_SENT), retry(Outcome.NETWORK_ERROR, False)),
    (exchange(DELETE, transport=UNKNOWN), retry(Outcome.TIMEOUT, True)),
    (exchange(DELETE, 204, transport=UNKNOWN), retry(Outcome.TIMEOUT, True)),
    # lookup: anything but a definitive answer asks again, and the lookup still comes first
    (exchange(LOOKUP, 200, json_body={"data": None}), retry(Outcome.BAD_RESPONSE, True)),
    (exchange(LOOKUP, 200, json_body={"data": []}), retry(Outcome.BAD_RESPONSE, True)),
    (exchange(LOOKUP, 200, json_body={"status": 1}), retry(Outcome.BAD_RESPONSE, True)),
    (exchange(LOOKUP, 200, body="<html>ok</html>"), retry(Outcome.BAD_RESPONSE, True)),
    (exchange(LOOKUP, 302), retry(Outcome.BAD_RESPONSE, True)),
    (exchange(LOOKUP, 408), retry(Outcome.TIMEOUT, True)),
    (exchange(LOOKUP, 429), retry(Outcome.RATE_LIMITED, True)),
    (exchange(LOOKUP, 500), retry(Outcome.SERVER_ERROR, True)),
    (exchange(LOOKUP, 503), retry(Outcome.SERVER_ERROR, True)),
    (exchange(LOOKUP, 400, "Bad request"), retry(Outcome.BAD_RESPONSE, True)),
    (exchange(LOOKUP, 405), retry(Outcome.BAD_RESPONSE, True)),
    (exchange(LOOKUP, 422, "Invalid"), retry(Outcome.BAD_RESPONSE, True)),
    (exchange(LOOKUP, transport=NOT_SENT), retry(Outcome.NETWORK_ERROR, True)),
    (exchange(LOOKUP, transport=UNKNOWN), retry(Outcome.TIMEOUT, True)),
    (
        exchange(LOOKUP, 200, json_body=None, transport=UNKNOWN),
        retry(Outcome.TIMEOUT, True),
    ),
]


@pytest.mark.parametrize(("ex", "expected"), RETRY_CASES)
def test_retries(ex: Exchange, expected: tuple[Outcome, bool]) -> None:
    reason, lookup = expected
    decision = run(ex, attempts=1, rand=0.5)  # attempt 2: backoff 2 s, no jitter at rand 0.5
    assert decision == Retry(at=NOW + timedelta(seconds=2), reason=reason, lookup_required=lookup)
    assert is_retryable(reason)


@pytest.mark.parametrize(("ex", "expected"), RETRY_CASES)
def test_max_attempts_turn_every_retry_class_into_failed(
    ex: Exchange, expected: tuple[Outcome, bool]
) -> None:
    reason, _ = expected
    # attempts 0..3 made 1..4; attempt 5 is the last one allowed
    assert isinstance(run(ex, attempts=POLICY.max_attempts - 2), Retry)
    for attempts in (POLICY.max_attempts - 1, POLICY.max_attempts, POLICY.max_attempts + 7):
        decision = run(ex, attempts=attempts)
        assert isinstance(decision, Failed)
        assert decision.reason is reason
        assert f"gave up after {attempts + 1} attempts" in decision.detail
        assert len(decision.detail) <= policy.DETAIL_MAX_CHARS


def test_max_attempts_of_one_fails_the_first_retryable_answer() -> None:
    one = RetryPolicy(max_attempts=1)
    decision = decide(event(), exchange(CREATE, 503), NOW, one, 0.5)
    assert decision == Failed(
        Outcome.SERVER_ERROR, "HTTP 503 Service Unavailable [gave up after 1 attempts]"
    )


FAILED_CASES = [
    (
        exchange(
            CREATE,
            422,
            json_body={
                "message": "The given data was invalid.",
                "errors": {"amount": ["The amount field is required."]},
            },
            message="The given data was invalid.",
        ),
        Outcome.VALIDATION_ERROR,
        "HTTP 422: The given data was invalid. (amount: The amount field is required.)",
    ),
    (
        exchange(CREATE, 400, "Invalid partner key"),
        Outcome.REJECTED,
        "HTTP 400: Invalid partner key",
    ),
    (exchange(CREATE, 404, "Not found"), Outcome.REJECTED, "HTTP 404: Not found"),
    (exchange(CREATE, 405), Outcome.REJECTED, "HTTP 405 Method Not Allowed"),
    (exchange(CREATE, 409, "Conflict"), Outcome.REJECTED, "HTTP 409: Conflict"),
    (exchange(CREATE, 410), Outcome.REJECTED, "HTTP 410 Gone"),
    (
        exchange(CREATE, 406, body="<h1>Nope</h1>"),
        Outcome.REJECTED,
        "HTTP 406 Not Acceptable: <h1>Nope</h1>",
    ),
    (exchange(CREATE, 499), Outcome.REJECTED, "HTTP 499"),
    (
        exchange(
            DELETE,
            422,
            json_body={"message": "Invalid.", "errors": {"key": "Bad key."}},
            message="Invalid.",
        ),
        Outcome.VALIDATION_ERROR,
        "HTTP 422: Invalid. (key: Bad key.)",
    ),
    (exchange(DELETE, 400, "Bad request"), Outcome.REJECTED, "HTTP 400: Bad request"),
    (exchange(DELETE, 405), Outcome.REJECTED, "HTTP 405 Method Not Allowed"),
    # the client refused to send (no status, no transport error): nothing would change next time
    (
        exchange(CREATE, error="ValueError: amount NaN is not a finite number"),
        Outcome.REJECTED,
        "Not sent: ValueError: amount NaN is not a finite number",
    ),
    (
        exchange(DELETE, error="ValueError: transaction key '..' cannot be used in a URL path"),
        Outcome.REJECTED,
        "Not sent: ValueError: transaction key '..' cannot be used in a URL path",
    ),
]


@pytest.mark.parametrize(("ex", "reason", "detail"), FAILED_CASES)
def test_fails_at_once(ex: Exchange, reason: Outcome, detail: str) -> None:
    assert run(ex) == Failed(reason, detail)
    assert not is_retryable(reason)


@pytest.mark.parametrize("kind", [CREATE, DELETE, LOOKUP])
@pytest.mark.parametrize("status", [401, 403])
@pytest.mark.parametrize("attempts", [0, POLICY.max_attempts - 1, POLICY.max_attempts + 50])
def test_auth_errors_pause_and_never_count(kind: RequestKind, status: int, attempts: int) -> None:
    decision = run(exchange(kind, status, "Unauthenticated."), attempts=attempts)
    assert decision == Pause(
        until=NOW + timedelta(seconds=POLICY.auth_pause_seconds),
        detail=f"HTTP {status}: Unauthenticated. [check PARTNERO_API_KEY]",
    )


def test_pause_ignores_retry_after() -> None:
    decision = run(exchange(CREATE, 401, retry_after=5000.0))
    assert isinstance(decision, Pause)
    assert decision.until == NOW + timedelta(seconds=60)


def test_ping_is_not_decided() -> None:
    with pytest.raises(ValueError, match="ping"):
        run(exchange(RequestKind.PING, 200))


@pytest.mark.parametrize(
    ("status", "ok"),
    [
        (200, True),
        (204, True),
        (299, True),
        (None, False),
        (199, False),
        (301, False),
        (401, False),
    ],
)
def test_ping_ok(status: int | None, ok: bool) -> None:
    assert ping_ok(exchange(RequestKind.PING, status)) is ok


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
        json_body={"message": "x" * 2000, "errors": {"a": ["y" * 1000]}},
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
        json_body={
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
            exchange(CREATE, 502, body="<html>\n  <h1>502</h1>\n</html>"),
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


def test_policy_imports_only_the_standard_library_and_the_domain() -> None:
    source = Path(policy.__file__).read_text(encoding="utf-8")
    imported: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
    for name in imported:
        top = name.split(".")[0]
        assert name == "outbox.domain" or (
            top in sys.stdlib_module_names and top not in {"asyncio", "socket", "ssl"}
        ), name
