"""The Partnero client, driven through httpx.MockTransport: no network."""

from __future__ import annotations

import asyncio
import email.utils
import json
import pickle
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import astuple
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import pytest

from outbox.domain import (
    Delivered,
    Event,
    EventType,
    Exchange,
    Failed,
    LookupResult,
    Outcome,
    RequestKind,
    Retry,
    RetryPolicy,
    TransportError,
)
from outbox.partnero import (
    BODY_EXCERPT_CHARS,
    MAX_BODY_BYTES,
    ApiKey,
    ClientClosedError,
    ConfigurationError,
    PartneroClient,
    PartneroError,
    build_create_body,
    parse_retry_after,
)
from outbox.policy import decide

SECRET = "pk_live_S3cr3tValue0123456789"
BASE_URL = "https://partnero.test"

Handler = Callable[[httpx.Request], Coroutine[None, None, httpx.Response]]


def sale(**changes: Any) -> Event:
    fields: dict[str, Any] = {
        "id": 7,
        "event_type": EventType.SALE,
        "transaction_key": "inv-1001",
        "customer_key": "cust-42",
        "amount": Decimal("99.9900"),
        "currency": "EUR",
        "payload": {},
        "attempts": 0,
        "lookup_required": False,
    }
    fields.update(changes)
    return Event(**fields)


def make_client(handler: Handler, *, timeout: float = 5.0, **kwargs: Any) -> PartneroClient:
    return PartneroClient(
        kwargs.pop("base_url", BASE_URL),
        ApiKey(SECRET),
        timeout_seconds=timeout,
        transport=httpx.MockTransport(handler),
        **kwargs,
    )


def answer(status: int = 200, **kwargs: Any) -> Handler:
    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, **kwargs)

    return handler


class Recorder:
    """A handler that keeps the requests it saw."""

    def __init__(self, response: httpx.Response | None = None) -> None:
        self.requests: list[httpx.Request] = []
        self.response = response or httpx.Response(200, json={"data": {}, "status": 1})

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        await request.aread()
        self.requests.append(request)
        return self.response


def assert_no_secret(*things: object) -> None:
    for thing in things:
        values = astuple(thing) if isinstance(thing, Exchange) else (thing,)
        for value in values:
            assert SECRET not in repr(value)
            assert SECRET not in str(value)


# ---- request shapes ---------------------------------------------------------------------------


async def test_create_request_shape() -> None:
    recorder = Recorder(httpx.Response(201, json={"data": {"key": "inv-1001"}, "status": 1}))
    async with make_client(recorder) as client:
        exchange = await client.create(sale())

    (request,) = recorder.requests
    assert request.method == "POST"
    assert request.url == "https://partnero.test/v1/transactions"
    assert request.headers["Authorization"] == f"Bearer {SECRET}"
    assert request.headers["Accept"] == "application/json"
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers["User-Agent"].startswith("outbox/")
    assert json.loads(request.content) == {
        "key": "inv-1001",
        "action": "sale",
        "customer": {"key": "cust-42"},
        "amount": 99.99,
        "amount_units": "EUR",
    }
    assert exchange.kind is RequestKind.CREATE
    assert (exchange.method, exchange.path, exchange.status_code) == (
        "POST",
        "/v1/transactions",
        201,
    )
    assert exchange.json_body == {"data": {"key": "inv-1001"}, "status": 1}
    assert exchange.transport_error is None
    assert exchange.error is None
    assert exchange.started_at is not None
    assert exchange.finished_at is not None
    assert exchange.started_at.tzinfo is UTC
    assert exchange.started_at <= exchange.finished_at


async def test_create_body_merges_the_payload_and_the_columns_win() -> None:
    payload = {
        "product_id": "prod_1",
        "product_type": "monthly",
        "options": {"create_customer": True},
        "customer": {"email": "a@example.com", "partner": {"key": "partner_9"}},
        "products": [{"product_id": "a", "product_price": 1.5}],
        # the database refuses these; the columns win all the same
        "key": "other",
        "action": "refund",
        "amount": 1,
        "amount_units": "USD",
    }
    event = sale(payload=payload)
    recorder = Recorder()
    async with make_client(recorder) as client:
        await client.create(event)

    body = json.loads(recorder.requests[0].content)
    assert body == {
        "product_id": "prod_1",
        "product_type": "monthly",
        "options": {"create_customer": True},
        "customer": {"email": "a@example.com", "partner": {"key": "partner_9"}, "key": "cust-42"},
        "products": [{"product_id": "a", "product_price": 1.5}],
        "key": "inv-1001",
        "action": "sale",
        "amount": 99.99,
        "amount_units": "EUR",
    }
    assert payload["customer"] == {"email": "a@example.com", "partner": {"key": "partner_9"}}
    assert build_create_body(event) == body


def test_create_body_customer_key_replaces_a_payload_customer_key_and_odd_customers() -> None:
    body = build_create_body(sale(payload={"customer": {"key": "evil", "name": "Ann"}}))
    assert body["customer"] == {"key": "cust-42", "name": "Ann"}
    body = build_create_body(sale(payload={"customer": "not an object"}))
    assert body["customer"] == {"key": "cust-42"}


def test_create_body_leaves_out_null_columns() -> None:
    body = build_create_body(sale(currency=None, customer_key=None, amount=None))
    assert body == {"key": "inv-1001", "action": "sale"}


@pytest.mark.parametrize(
    "amount",
    ["0.0001", "1", "12.3400", "99999999999.9999", "12345678901.2345", "0.1", "1234.5678"],
)
def test_create_body_amounts_survive_the_float_conversion(amount: str) -> None:
    body = build_create_body(sale(amount=Decimal(amount)))
    assert Decimal(json.dumps(body["amount"])) == Decimal(amount)


@pytest.mark.parametrize("amount", ["NaN", "Infinity", "-Infinity"])
async def test_create_with_an_amount_that_is_not_a_number_is_refused(amount: str) -> None:
    recorder = Recorder()
    async with make_client(recorder) as client:
        exchange = await client.create(sale(amount=Decimal(amount)))
    assert recorder.requests == []
    assert exchange.status_code is None
    assert exchange.transport_error is None
    assert exchange.error is not None
    assert "not a finite number" in exchange.error
    decision = decide(sale(), exchange, datetime.now(UTC), RetryPolicy(), 0.5)
    assert isinstance(decision, Failed)
    assert decision.reason is Outcome.REJECTED


@pytest.mark.parametrize(
    ("key", "raw_path"),
    [
        ("inv-1001", "/v1/transactions/inv-1001"),
        ("a/b c?d#e", "/v1/transactions/a%2Fb%20c%3Fd%23e"),
        ("100%", "/v1/transactions/100%25"),
        ("ü€", "/v1/transactions/%C3%BC%E2%82%AC"),
        ("...", "/v1/transactions/..."),
        ("../x", "/v1/transactions/..%2Fx"),
    ],
)
async def test_delete_and_lookup_quote_the_key(key: str, raw_path: str) -> None:
    recorder = Recorder()
    async with make_client(recorder) as client:
        deleted = await client.delete(key)
        looked_up = await client.lookup(key)
    delete_request, get_request = recorder.requests
    assert delete_request.method == "DELETE"
    assert get_request.method == "GET"
    for request in recorder.requests:
        assert request.url.raw_path.decode() == raw_path
        assert request.headers["Authorization"] == f"Bearer {SECRET}"
        assert request.content == b""
    assert (deleted.kind, deleted.method, deleted.path) == (RequestKind.DELETE, "DELETE", raw_path)
    assert (looked_up.kind, looked_up.method, looked_up.path) == (
        RequestKind.LOOKUP,
        "GET",
        raw_path,
    )


@pytest.mark.parametrize("key", ["", ".", ".."])
async def test_keys_that_would_address_another_resource_are_never_sent(key: str) -> None:
    recorder = Recorder()
    async with make_client(recorder) as client:
        for exchange in (await client.delete(key), await client.lookup(key)):
            assert exchange.status_code is None
            assert exchange.transport_error is None
            assert exchange.error is not None
            assert "cannot be used in a URL path" in exchange.error
    assert recorder.requests == []


async def test_ping() -> None:
    recorder = Recorder(httpx.Response(200, json={"status": 1}))
    async with make_client(recorder) as client:
        exchange = await client.ping()
    (request,) = recorder.requests
    assert (request.method, request.url.path) == ("GET", "/v1/test")
    assert (exchange.kind, exchange.status_code) == (RequestKind.PING, 200)


async def test_base_url_with_a_path_prefix() -> None:
    recorder = Recorder()
    async with make_client(recorder, base_url="http://127.0.0.1:8080/partnero") as client:
        await client.lookup("k")
    assert recorder.requests[0].url == "http://127.0.0.1:8080/partnero/v1/transactions/k"


async def test_custom_user_agent() -> None:
    recorder = Recorder()
    async with make_client(recorder, user_agent="shop/2") as client:
        await client.ping()
    assert recorder.requests[0].headers["User-Agent"] == "shop/2"


async def test_redirects_are_not_followed() -> None:
    recorder = Recorder(httpx.Response(302, headers={"Location": "https://elsewhere.test/"}))
    async with make_client(recorder) as client:
        exchange = await client.create(sale())
    assert len(recorder.requests) == 1
    assert exchange.status_code == 302


# ---- answers and odd bodies -------------------------------------------------------------------


async def test_error_answer_keeps_message_and_errors() -> None:
    body = {"message": "The given data was invalid.", "errors": {"amount": ["Required."]}}
    async with make_client(answer(422, json=body)) as client:
        exchange = await client.create(sale())
    assert exchange.status_code == 422
    assert exchange.message == "The given data was invalid."
    assert exchange.json_body == body
    assert exchange.body_excerpt == json.dumps(body, separators=(",", ":"))


@pytest.mark.parametrize(
    ("content", "excerpt", "json_body"),
    [
        (b"<html><body><h1>502 Bad Gateway</h1></body></html>", None, None),
        (b"", "", None),
        (b"   \r\n", None, None),
        (b"{not json", None, None),
        (b'{"message": "unterminated', None, None),
        (b"[1, 2, 3]", None, None),
        (b'"just a string"', None, None),
        (b"null", None, None),
        (b"\xff\xfe\xfa not utf-8 \xc3", "\ufffd\ufffd\ufffd not utf-8 \ufffd", None),
        (b'{"message": "caf\xe9"}', '{"message": "caf\ufffd"}', None),
        (b"[" * 60_000, "[" * BODY_EXCERPT_CHARS, None),  # too deep for the json module
        (b"1" * 60_000, "1" * BODY_EXCERPT_CHARS, None),  # too many digits for an int
        (b'{"message": 42}', None, {"message": 42}),
        (b'{"message": null, "errors": "x"}', None, {"message": None, "errors": "x"}),
    ],
)
async def test_odd_bodies_never_crash(
    content: bytes, excerpt: str | None, json_body: dict[str, Any] | None
) -> None:
    async with make_client(answer(502, content=content)) as client:
        exchange = await client.create(sale())
    assert exchange.status_code == 502
    assert exchange.transport_error is None
    assert exchange.message is None
    assert exchange.json_body == json_body
    expected = excerpt if excerpt is not None else content.decode()[:BODY_EXCERPT_CHARS]
    assert exchange.body_excerpt == expected
    assert len(exchange.body_excerpt) <= BODY_EXCERPT_CHARS


async def test_a_huge_body_is_cut_and_not_parsed() -> None:
    huge = {"message": "big", "padding": "x" * 1_000_000}
    async with make_client(answer(400, json=huge)) as client:
        exchange = await client.create(sale())
    assert exchange.status_code == 400
    assert exchange.json_body is None
    assert exchange.message is None
    assert len(exchange.body_excerpt) == BODY_EXCERPT_CHARS
    assert exchange.body_excerpt.startswith('{"message":"big"')


async def test_a_body_of_exactly_the_cap_is_parsed() -> None:
    prefix = b'{"message":"ok","pad":"'
    content = prefix + b"x" * (MAX_BODY_BYTES - len(prefix) - 2) + b'"}'
    assert len(content) == MAX_BODY_BYTES
    async with make_client(answer(200, content=content)) as client:
        exchange = await client.lookup("k")
    assert exchange.message == "ok"
    assert exchange.json_body is not None


async def test_reading_stops_at_the_cap() -> None:
    chunks_sent = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal chunks_sent
        while True:
            chunks_sent += 1
            yield b"x" * 8192

    async with make_client(answer(200, content=endless())) as client:
        exchange = await client.lookup("k")
    assert exchange.status_code == 200
    assert exchange.json_body is None
    assert chunks_sent <= MAX_BODY_BYTES // 8192 + 2


async def test_long_messages_are_cut() -> None:
    async with make_client(answer(400, json={"message": "m" * 5000})) as client:
        exchange = await client.create(sale())
    assert exchange.message == "m" * 500


async def test_a_body_that_breaks_off_keeps_the_status_and_reports_an_unknown_outcome() -> None:
    async def broken() -> AsyncIterator[bytes]:
        yield b'{"data": {"key": '
        raise httpx.ReadError("connection reset by peer")

    async with make_client(answer(201, content=broken())) as client:
        exchange = await client.create(sale())
    assert exchange.status_code == 201
    assert exchange.transport_error is TransportError.UNKNOWN_OUTCOME
    assert exchange.error == "ReadError: connection reset by peer"
    assert exchange.json_body is None
    assert exchange.body_excerpt == '{"data": {"key": '
    decision = decide(sale(), exchange, datetime.now(UTC), RetryPolicy(), 0.5)
    assert isinstance(decision, Retry)
    assert decision.lookup_required


# ---- Retry-After ------------------------------------------------------------------------------

NOW = datetime(2026, 11, 21, 12, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (None, None),
        ("120", 120.0),
        ("  7 ", 7.0),
        ("0", 0.0),
        ("-5", 0.0),
        ("1.5", 1.5),
        ("99999999999999999999", 99999999999999999999.0),
        ("Sat, 21 Nov 2026 12:01:00 GMT", 60.0),
        ("Sat, 21 Nov 2026 11:00:00 GMT", 0.0),
        ("Saturday, 21-Nov-26 12:00:30 GMT", 30.0),
        ("Sat Nov 21 12:00:10 2026", 10.0),
        ("", None),
        ("soon", None),
        ("1e400", None),
        ("nan", None),
        ("inf", None),
        ("12 seconds", None),
        ("Sat, 99 Nov 2026 12:01:00 GMT", None),
        ("Sat, 21 Nov 99999 12:01:00 GMT", None),
    ],
)
def test_parse_retry_after(value: str | None, seconds: float | None) -> None:
    assert parse_retry_after(value, NOW) == seconds


@pytest.mark.parametrize(
    ("header", "low", "high"),
    [
        ("30", 30.0, 30.0),
        ("in one hour", 3590, 3600),
        ("Mon, 01 Jan 2001 00:00:00 GMT", 0.0, 0.0),
    ],
)
async def test_retry_after_from_the_answer(header: str, low: float, high: float) -> None:
    if header == "in one hour":  # an HTTP date made now, not when the tests were collected
        header = email.utils.format_datetime(datetime.now(UTC) + timedelta(hours=1), usegmt=True)
    async with make_client(answer(429, headers={"Retry-After": header})) as client:
        exchange = await client.create(sale())
    assert exchange.retry_after_seconds is not None
    assert low <= exchange.retry_after_seconds <= high


@pytest.mark.parametrize("headers", [{}, {"Retry-After": "whenever"}])
async def test_missing_or_junk_retry_after(headers: dict[str, str]) -> None:
    async with make_client(answer(503, headers=headers)) as client:
        exchange = await client.create(sale())
    assert exchange.retry_after_seconds is None


# ---- transport errors -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (httpx.ConnectError, TransportError.NOT_SENT),
        (httpx.ConnectTimeout, TransportError.NOT_SENT),
        (httpx.PoolTimeout, TransportError.NOT_SENT),
        (httpx.UnsupportedProtocol, TransportError.NOT_SENT),
        (httpx.ProxyError, TransportError.NOT_SENT),
        (httpx.LocalProtocolError, TransportError.NOT_SENT),
        (httpx.ReadTimeout, TransportError.UNKNOWN_OUTCOME),
        (httpx.WriteTimeout, TransportError.UNKNOWN_OUTCOME),
        (httpx.ReadError, TransportError.UNKNOWN_OUTCOME),
        (httpx.WriteError, TransportError.UNKNOWN_OUTCOME),
        (httpx.CloseError, TransportError.UNKNOWN_OUTCOME),
        (httpx.RemoteProtocolError, TransportError.UNKNOWN_OUTCOME),
        (httpx.DecodingError, TransportError.UNKNOWN_OUTCOME),
        (httpx.NetworkError, TransportError.UNKNOWN_OUTCOME),
        (httpx.TransportError, TransportError.UNKNOWN_OUTCOME),
        (OSError, TransportError.UNKNOWN_OUTCOME),
        (RuntimeError, TransportError.UNKNOWN_OUTCOME),
    ],
)
async def test_transport_errors_are_classified(
    error: type[Exception], expected: TransportError
) -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        if issubclass(error, httpx.HTTPError):
            raise error("it broke", request=request)  # type: ignore[call-arg]
        raise error("it broke")

    async with make_client(handler) as client:
        for exchange in (
            await client.create(sale()),
            await client.delete("k"),
            await client.lookup("k"),
            await client.ping(),
        ):
            assert exchange.status_code is None
            assert exchange.transport_error is expected
            assert exchange.error == f"{error.__name__}: it broke"
            assert exchange.started_at is not None
            assert exchange.finished_at is not None


async def test_an_error_without_a_message_is_named_by_its_type() -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("", request=request)

    async with make_client(handler) as client:
        exchange = await client.lookup("k")
    assert exchange.error == "ReadTimeout"


# ---- the total deadline and cancellation ------------------------------------------------------


async def test_a_trickling_body_cannot_outlive_the_deadline() -> None:
    never = asyncio.Event()

    async def trickle() -> AsyncIterator[bytes]:
        yield b'{"data": '
        await never.wait()
        yield b"{}}"

    async with make_client(answer(200, content=trickle()), timeout=0.05) as client:
        exchange = await client.lookup("k")
    assert exchange.status_code == 200
    assert exchange.transport_error is TransportError.UNKNOWN_OUTCOME
    assert exchange.error is not None
    assert exchange.error.startswith("TimeoutError")
    assert exchange.json_body is None
    assert exchange.body_excerpt == '{"data": '


async def test_no_answer_before_the_deadline_is_an_unknown_outcome() -> None:
    never = asyncio.Event()

    async def handler(request: httpx.Request) -> httpx.Response:
        await never.wait()
        raise AssertionError("unreachable")

    async with make_client(handler, timeout=0.05) as client:
        exchange = await client.create(sale())
    assert exchange.status_code is None
    assert exchange.transport_error is TransportError.UNKNOWN_OUTCOME
    decision = decide(sale(), exchange, datetime.now(UTC), RetryPolicy(), 0.5)
    assert isinstance(decision, Retry)
    assert (decision.reason, decision.lookup_required) == (Outcome.TIMEOUT, True)


async def test_cancellation_propagates() -> None:
    started = asyncio.Event()
    never = asyncio.Event()

    async def handler(request: httpx.Request) -> httpx.Response:
        started.set()
        await never.wait()
        raise AssertionError("unreachable")

    async with make_client(handler) as client:
        task = asyncio.create_task(client.create(sale()))
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


# ---- the API key ------------------------------------------------------------------------------


def test_api_key_hides_its_value() -> None:
    key = ApiKey(SECRET)
    assert repr(key) == "ApiKey('***')"
    assert str(key) == "ApiKey('***')"
    assert f"{key}" == "ApiKey('***')"
    assert key.reveal() == SECRET
    assert ApiKey(f"  {SECRET}\n").reveal() == SECRET
    with pytest.raises(TypeError):
        pickle.dumps(key)


@pytest.mark.parametrize("value", ["", "   \n", "abc def", "abc\ndef", "abc\x00", "kéy"])
def test_api_key_refuses_unusable_values_without_quoting_them(value: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        ApiKey(value)
    if value.strip():
        assert value.strip() not in str(info.value)


async def test_the_key_appears_nowhere() -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/boom"):
            raise httpx.ConnectError(f"proxy said no to {request.headers['Authorization']}")
        return httpx.Response(200, json={"data": {"key": "k"}, "status": 1})

    client = make_client(handler)
    exchanges = [
        await client.create(sale()),
        await client.lookup("k"),
        await client.delete("boom"),
        await client.ping(),
    ]
    assert exchanges[2].error == "ConnectError: proxy said no to Bearer ***"
    assert_no_secret(client, ApiKey(SECRET), *exchanges)
    await client.aclose()
    with pytest.raises(ClientClosedError) as info:
        await client.ping()
    assert_no_secret(info.value)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"base_url": "api.partnero.com"}, "http(s)://"),
        ({"base_url": "ftp://api.partnero.com"}, "http(s)://"),
        ({"base_url": "https://"}, "http(s)://"),
        ({"base_url": "https://user:pw@api.partnero.com"}, "credentials"),
        ({"base_url": "https://api.partnero.com/?x=1"}, "query"),
        ({"timeout_seconds": 0}, "timeout_seconds"),
        ({"timeout_seconds": -1}, "timeout_seconds"),
        ({"timeout_seconds": float("nan")}, "timeout_seconds"),
        ({"max_connections": 0}, "max_connections"),
        ({"api_key": SECRET}, "ApiKey"),
    ],
)
def test_bad_settings(kwargs: dict[str, Any], fragment: str) -> None:
    settings: dict[str, Any] = {
        "base_url": "https://api.partnero.com",
        "api_key": ApiKey(SECRET),
        "timeout_seconds": 10.0,
    }
    settings.update(kwargs)
    with pytest.raises(ConfigurationError) as info:
        PartneroClient(
            settings.pop("base_url"),
            settings.pop("api_key"),
            **settings,
        )
    assert fragment in str(info.value)
    assert SECRET not in str(info.value)
    assert isinstance(info.value, PartneroError)


def test_repr() -> None:
    client = PartneroClient("https://api.partnero.com", ApiKey(SECRET), timeout_seconds=10)
    assert repr(client) == (
        "PartneroClient(base_url='https://api.partnero.com', api_key=ApiKey('***'), "
        "timeout_seconds=10.0)"
    )


# ---- together with the policy -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "body", "call", "expected"),
    [
        (201, {"data": {}, "status": 1}, "create", Delivered(Outcome.CREATED)),
        (400, {"message": "Duplicate key"}, "create", Delivered(Outcome.DUPLICATE)),
        (200, {"status": 1}, "delete", Delivered(Outcome.DELETED)),
        (404, {"message": "Transaction not found"}, "delete", Delivered(Outcome.NOT_FOUND)),
        (200, {"data": {"key": "inv-1001", "deleted_at": None}}, "lookup", LookupResult(True)),
        (404, {"message": "Not found"}, "lookup", LookupResult(False)),
    ],
)
async def test_answers_through_the_policy(
    status: int, body: dict[str, Any], call: str, expected: object
) -> None:
    async with make_client(answer(status, json=body)) as client:
        if call == "create":
            exchange = await client.create(sale())
        elif call == "delete":
            exchange = await client.delete("inv-1001")
        else:
            exchange = await client.lookup("inv-1001")
    assert decide(sale(), exchange, datetime.now(UTC), RetryPolicy(), 0.5) == expected
