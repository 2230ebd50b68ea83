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
from urllib.parse import parse_qs

import httpx
import pytest

from outbox.decisions import Delivered, Failed, LookupNextPage, LookupResult, Retry
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
from outbox.partnero import (
    BODY_EXCERPT_CHARS,
    LOOKUP_MAX_BODY_BYTES,
    MAX_BODY_BYTES,
    ApiKey,
    ClientClosedError,
    ConfigurationError,
    PartneroClient,
    PartneroError,
    api_root,
    build_create_body,
    parse_retry_after,
)
from outbox.policy import decide, ping_verdict

SECRET = "pk_live_S3cr3tValue0123456789"
BASE_URL = "https://partnero.test"
NOW = datetime(2026, 11, 21, 12, 0, 0, tzinfo=UTC)

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
        "created_at": NOW,  # just recorded: within the unknown-customer grace
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


LIST_URL = "https://partnero.test/v1/transactions?key=inv-1001&limit=250"


def list_page(*rows: str | dict[str, Any], next_link: str | None = None) -> dict[str, Any]:
    """One page of ``GET /v1/transactions?key=...`` in Partnero's pagination shape."""
    return {
        "data": [row if isinstance(row, dict) else {"key": row} for row in rows],
        "links": {
            "first": f"{LIST_URL}&page=1",
            "last": f"{LIST_URL}&page=2",
            "prev": None,
            "next": next_link,
        },
        "meta": {"current_page": 1, "per_page": 250},
        "status": 1,
    }


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
        "created_at": int(NOW.timestamp()),  # the row's own time: Partnero backdates to it
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
        "created_at": int(NOW.timestamp()),
    }
    assert payload["customer"] == {"email": "a@example.com", "partner": {"key": "partner_9"}}
    assert build_create_body(event) == body


def test_create_body_customer_key_replaces_a_payload_customer_key_and_odd_customers() -> None:
    body = build_create_body(sale(payload={"customer": {"key": "evil", "name": "Ann"}}))
    assert body["customer"] == {"key": "cust-42", "name": "Ann"}
    body = build_create_body(sale(payload={"customer": "not an object"}))
    assert body["customer"] == {"key": "cust-42"}


def test_create_body_leaves_out_null_columns() -> None:
    body = build_create_body(sale(currency=None, customer_key=None, amount=None, created_at=None))
    assert body == {"key": "inv-1001", "action": "sale"}


def test_create_body_carries_the_rows_time_unless_the_payload_or_the_setting_says_otherwise() -> (
    None
):
    recorded = datetime(2026, 11, 30, 23, 59, 30, tzinfo=UTC)  # the last minute of a month
    assert build_create_body(sale(created_at=recorded))["created_at"] == 1796083170
    own = build_create_body(sale(created_at=recorded, payload={"created_at": 1700000000}))
    assert own["created_at"] == 1700000000  # the shop said when
    off = build_create_body(sale(created_at=recorded), send_created_at=False)
    assert "created_at" not in off


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


# Keys that must reach Partnero exactly as they are: "/" (an everyday invoice number), URL
# delimiters, percent signs, spaces and plus signs, non-ASCII, and dot segments.
ODD_KEYS = [
    "inv-1001",
    "FV/2026/11/7",
    "a/b c?d#e",
    "100%",
    "%2F",
    "a+b c",
    "k&page=9&limit=1",
    "ü€",
    ".",
    "..",
    "../x",
    'quote"back\\slash',
    " padded key ",
]


@pytest.mark.parametrize("key", ODD_KEYS)
async def test_delete_sends_the_key_in_the_json_body_never_in_the_path(key: str) -> None:
    recorder = Recorder(httpx.Response(200, json={"status": 1}))
    async with make_client(recorder) as client:
        exchange = await client.delete(key)
    (request,) = recorder.requests
    assert request.method == "DELETE"
    assert request.url == "https://partnero.test/v1/transactions"
    assert request.url.raw_path == b"/v1/transactions"
    assert request.headers["Authorization"] == f"Bearer {SECRET}"
    assert request.headers["Accept"] == "application/json"
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers["Content-Length"] == str(len(request.content))
    assert json.loads(request.content) == {"key": key}
    assert (exchange.kind, exchange.method, exchange.path) == (
        RequestKind.DELETE,
        "DELETE",
        "/v1/transactions",
    )


@pytest.mark.parametrize("key", ODD_KEYS)
async def test_lookup_sends_the_key_in_the_query_never_in_the_path(key: str) -> None:
    recorder = Recorder(httpx.Response(200, json=list_page()))
    async with make_client(recorder) as client:
        first = await client.lookup(key)
        third = await client.lookup(key, page=3)
    assert len(recorder.requests) == 2
    for request, exchange, page in zip(recorder.requests, (first, third), (1, 3), strict=True):
        assert request.method == "GET"
        assert request.url.path == "/v1/transactions"
        assert request.url.fragment == ""
        query = parse_qs(request.url.query.decode("ascii"), strict_parsing=True)
        assert query == {"key": [key], "limit": ["250"], "page": [str(page)]}
        assert request.headers["Authorization"] == f"Bearer {SECRET}"
        assert request.headers["Accept"] == "application/json"
        assert request.content == b""
        assert (exchange.kind, exchange.method) == (RequestKind.LOOKUP, "GET")
        # the attempt log shows the request as it was sent
        assert exchange.path == request.url.raw_path.decode("ascii")
        assert exchange.path.startswith("/v1/transactions?")


@pytest.mark.parametrize("page", [0, -1])
async def test_lookup_pages_start_at_one(page: int) -> None:
    recorder = Recorder()
    async with make_client(recorder) as client:
        with pytest.raises(ValueError, match="page"):
            await client.lookup("inv-1001", page=page)
    assert recorder.requests == []


async def test_list_page_asks_the_whole_ledger_one_page_at_a_time() -> None:
    recorder = Recorder(httpx.Response(200, json=list_page()))
    async with make_client(recorder) as client:
        first = await client.list_page(1)
        second = await client.list_page(2, limit=100)
        with pytest.raises(ValueError, match="page"):
            await client.list_page(0)
        with pytest.raises(ValueError, match="limit"):
            await client.list_page(1, limit=251)
    assert len(recorder.requests) == 2
    for request, exchange, query in zip(
        recorder.requests,
        (first, second),
        ({"limit": ["250"], "page": ["1"]}, {"limit": ["100"], "page": ["2"]}),
        strict=True,
    ):
        assert (request.method, request.url.path) == ("GET", "/v1/transactions")
        assert request.content == b""
        assert parse_qs(request.url.query.decode("ascii"), strict_parsing=True) == query
        assert request.headers["Authorization"] == f"Bearer {SECRET}"
        assert (exchange.kind, exchange.method, exchange.status_code) == (
            RequestKind.LOOKUP,
            "GET",
            200,
        )
        assert exchange.path == request.url.raw_path.decode("ascii")
        assert exchange.json_body == list_page()


async def test_ping() -> None:
    recorder = Recorder(httpx.Response(200, json={"status": 1}))
    async with make_client(recorder) as client:
        exchange = await client.ping()
    (request,) = recorder.requests
    assert (request.method, request.url.path) == ("GET", "/v1/test")
    assert (exchange.kind, exchange.status_code) == (RequestKind.PING, 200)


# PARTNERO_API_URL as Partnero's docs write it, with or without "/" and "/v1", and behind a proxy.
BASE_URLS = [
    ("https://api.partnero.com", "https://api.partnero.com"),
    ("https://api.partnero.com/", "https://api.partnero.com"),
    ("https://api.partnero.com/v1", "https://api.partnero.com"),
    ("https://api.partnero.com/v1/", "https://api.partnero.com"),
    ("http://proxy/partnero", "http://proxy/partnero"),
    ("http://proxy/partnero/", "http://proxy/partnero"),
    ("http://proxy/partnero/v1/", "http://proxy/partnero"),
    ("http://127.0.0.1:8080/partnero/v1", "http://127.0.0.1:8080/partnero"),
    # only a whole "/v1" segment at the end is the API version
    ("http://proxy/partnerov1", "http://proxy/partnerov1"),
]


@pytest.mark.parametrize(("base_url", "root"), BASE_URLS)
def test_api_root(base_url: str, root: str) -> None:
    assert api_root(base_url) == root


@pytest.mark.parametrize(("base_url", "root"), BASE_URLS)
async def test_every_call_goes_to_the_api_root(base_url: str, root: str) -> None:
    recorder = Recorder()
    async with make_client(recorder, base_url=base_url) as client:
        await client.create(sale())
        await client.delete("FV/1")
        await client.lookup("FV/1")
        await client.ping()
    assert [str(request.url) for request in recorder.requests] == [
        f"{root}/v1/transactions",
        f"{root}/v1/transactions",
        f"{root}/v1/transactions?key=FV%2F1&limit=250&page=1",
        f"{root}/v1/test",
    ]


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


async def call(client: PartneroClient, name: str) -> Exchange:
    if name == "create":
        return await client.create(sale())
    if name == "delete":
        return await client.delete("inv-1001")
    if name == "lookup":
        return await client.lookup("inv-1001")
    return await client.ping()


# At most 64 KiB of an answer is read, but a lookup page (up to 250 whole transactions) is read
# up to 4 MiB.
CAPS = [
    ("create", MAX_BODY_BYTES),
    ("delete", MAX_BODY_BYTES),
    ("ping", MAX_BODY_BYTES),
    ("lookup", LOOKUP_MAX_BODY_BYTES),
]


def padded(size: int) -> bytes:
    prefix = b'{"message":"ok","pad":"'
    return prefix + b"x" * (size - len(prefix) - 2) + b'"}'


@pytest.mark.parametrize(("name", "cap"), CAPS)
async def test_a_body_of_exactly_the_cap_is_parsed(name: str, cap: int) -> None:
    content = padded(cap)
    assert len(content) == cap
    async with make_client(answer(200, content=content)) as client:
        exchange = await call(client, name)
    assert exchange.message == "ok"
    assert exchange.json_body is not None
    assert exchange.transport_error is None


@pytest.mark.parametrize(("name", "cap"), CAPS)
async def test_a_body_one_byte_over_the_cap_is_not_parsed(name: str, cap: int) -> None:
    async with make_client(answer(200, content=padded(cap + 1))) as client:
        exchange = await call(client, name)
    assert exchange.status_code == 200
    assert exchange.json_body is None
    assert exchange.message is None
    assert exchange.body_excerpt.startswith('{"message":"ok"')
    assert len(exchange.body_excerpt) == BODY_EXCERPT_CHARS


@pytest.mark.parametrize(("name", "cap"), CAPS)
async def test_reading_stops_at_the_cap(name: str, cap: int) -> None:
    chunks_sent = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal chunks_sent
        while True:
            chunks_sent += 1
            yield b"x" * 8192

    async with make_client(answer(200, content=endless())) as client:
        exchange = await call(client, name)
    assert exchange.status_code == 200
    assert exchange.json_body is None
    assert cap // 8192 <= chunks_sent <= cap // 8192 + 2


def transaction(key: str) -> dict[str, Any]:
    """A list row about the size Partnero's are (about 1 KB)."""
    return {
        "key": key,
        "action": "sale",
        "amount": 99.99,
        "amount_units": "EUR",
        "customer": {"key": "cust-42", "email": "someone@example.com", "name": "Some One"},
        "products": [{"product_id": f"prod-{i}", "product_price": 9.99} for i in range(20)],
        "created_at": "2026-11-20T10:00:00.000000Z",
        "deleted_at": None,
    }


@pytest.mark.parametrize(
    ("last_key", "next_link", "expected"),
    [
        ("inv-1001", None, LookupResult(found=True)),
        ("inv-10010", f"{LIST_URL}&page=2", LookupNextPage(2)),
    ],
)
async def test_a_full_lookup_page_is_read_whole(
    last_key: str, next_link: str | None, expected: object
) -> None:
    rows = [transaction(f"inv-1001-{i}") for i in range(249)] + [transaction(last_key)]
    body = list_page(*rows, next_link=next_link)
    assert MAX_BODY_BYTES < len(json.dumps(body)) < LOOKUP_MAX_BODY_BYTES
    async with make_client(answer(200, json=body)) as client:
        exchange = await client.lookup("inv-1001")
    assert exchange.json_body == body
    assert decide(sale(lookup_required=True), exchange, NOW, RetryPolicy(), 0.5) == expected


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
        if request.content and json.loads(request.content).get("key") == "boom":
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


PAGE = list_page("inv-10010", "INV-1001", "inv-1001")
ROUTE_404 = {"message": "The route api/v1/transactions/inv-1001 could not be found."}
HTML = "<!DOCTYPE html><html><body><h1>Duplicate key</h1>Transaction not found</body></html>"


def summary(decision: object) -> object:
    """A retry or a failure as (type, reason, lookup_required); anything else as it is."""
    if isinstance(decision, Retry | Failed):
        return (type(decision), decision.reason, decision.lookup_required)
    return decision


# Partnero's answers (and others') as they come over the wire, through the client and the policy.
@pytest.mark.parametrize(
    ("name", "status", "content", "expected"),
    [
        ("create", 201, {"data": {"key": "inv-1001"}, "status": 1}, Delivered(Outcome.CREATED)),
        ("create", 200, {"data": {"key": "inv-1001"}}, Delivered(Outcome.CREATED)),
        ("create", 200, {"status": 0}, (Retry, Outcome.BAD_RESPONSE, True)),
        ("create", 200, HTML, (Retry, Outcome.BAD_RESPONSE, True)),
        ("create", 200, "", (Retry, Outcome.BAD_RESPONSE, True)),
        ("create", 400, {"message": "Duplicate key"}, Delivered(Outcome.DUPLICATE)),
        ("create", 400, {"message": "duplicate key."}, Delivered(Outcome.DUPLICATE)),
        ("create", 400, {"message": "Duplicate customer key"}, (Failed, Outcome.REJECTED, True)),
        ("create", 400, "Duplicate key", (Failed, Outcome.REJECTED, True)),
        ("create", 400, HTML, (Failed, Outcome.REJECTED, True)),
        (
            "create",
            400,
            {"message": "Customer not found"},
            (Retry, Outcome.CUSTOMER_NOT_FOUND, False),
        ),
        ("create", 502, HTML, (Retry, Outcome.SERVER_ERROR, True)),
        ("delete", 200, {"status": 1}, Delivered(Outcome.DELETED)),
        ("delete", 204, "", Delivered(Outcome.DELETED)),
        ("delete", 200, HTML, (Retry, Outcome.BAD_RESPONSE, True)),
        ("delete", 404, {"message": "Transaction not found"}, Delivered(Outcome.NOT_FOUND)),
        ("delete", 404, ROUTE_404, (Retry, Outcome.BAD_RESPONSE, True)),
        ("delete", 404, HTML, (Retry, Outcome.BAD_RESPONSE, True)),
        ("lookup", 200, PAGE, LookupResult(found=True)),
        ("lookup", 200, list_page("inv-10010", "INV-1001"), LookupResult(found=False)),
        ("lookup", 200, list_page(next_link=f"{LIST_URL}&page=2"), LookupNextPage(2)),
        (
            "lookup",
            200,
            {"data": {"key": "inv-1001"}, "status": 1},
            (Retry, Outcome.BAD_RESPONSE, True),
        ),
        ("lookup", 200, HTML, (Retry, Outcome.BAD_RESPONSE, True)),
        ("lookup", 404, {"message": "Transaction not found"}, (Retry, Outcome.BAD_RESPONSE, True)),
        ("lookup", 404, ROUTE_404, (Retry, Outcome.BAD_RESPONSE, True)),
    ],
)
async def test_answers_through_the_policy(
    name: str, status: int, content: dict[str, Any] | str, expected: object
) -> None:
    if isinstance(content, dict):
        handler = answer(status, json=content)
    else:
        handler = answer(status, text=content, headers={"Content-Type": "text/html"})
    async with make_client(handler) as client:
        exchange = await call(client, name)
    event = sale(lookup_required=name == "lookup")
    if name == "delete":
        event = sale(event_type=EventType.REFUND, customer_key=None, amount=None, currency=None)
    assert summary(decide(event, exchange, NOW, RetryPolicy(), 0.5)) == expected


@pytest.mark.parametrize(
    ("status", "content", "verdict"),
    [
        (200, {"status": 1}, PingVerdict.OK),
        (204, "", PingVerdict.OK),
        (200, HTML, PingVerdict.UNREACHABLE),
        (200, "", PingVerdict.OK),
        (
            404,
            {"message": "The route api/v1/v1/test could not be found."},
            PingVerdict.NOT_PARTNERO,
        ),
        (404, HTML, PingVerdict.NOT_PARTNERO),
        (401, {"message": "Unauthenticated."}, PingVerdict.REFUSED),
        (403, {"message": "This action is unauthorized."}, PingVerdict.REFUSED),
        (502, HTML, PingVerdict.UNREACHABLE),
        (429, {"message": "Too Many Attempts."}, PingVerdict.UNREACHABLE),
    ],
)
async def test_ping_answers_through_the_policy(
    status: int, content: dict[str, Any] | str, verdict: PingVerdict
) -> None:
    if isinstance(content, dict):
        handler = answer(status, json=content)
    else:
        handler = answer(status, text=content, headers={"Content-Type": "text/html"})
    async with make_client(handler) as client:
        exchange = await client.ping()
    assert ping_verdict(exchange) is verdict
