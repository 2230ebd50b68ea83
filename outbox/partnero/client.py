"""The one seam to the Partnero API.

Every call returns an `Exchange`: what happened, reduced to what the policy needs. HTTP errors
and transport failures are values, not exceptions; the only exceptions are for programming and
configuration errors (`PartneroError` and its subclasses). The API key never appears in an
`Exchange`, an exception, a repr or a log line.

Each call has a hard total deadline (`asyncio.timeout`) on top of httpx's per-phase timeouts,
so a server that trickles its body a byte at a time cannot keep a call alive past it. At most
64 KiB of a response body is read (4 MiB of a lookup page, which holds whole transactions).

Under the httpx API the requests go through aiohttp (`AiohttpTransport`): httpx's default
transport costs about five times the CPU per call and gets slower as concurrency grows
(docs/benchmarks.md). Tests pass their own `transport=` (httpx.MockTransport).
"""

from __future__ import annotations

import asyncio
import copy
import email.utils
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote, urlencode

import httpx

from outbox import __version__
from outbox.domain import Event, Exchange, RequestKind, TransportError
from outbox.partnero.transport import AiohttpTransport
from outbox.text import utcnow

MAX_BODY_BYTES = 64 * 1024
# A lookup page holds up to LOOKUP_PAGE_SIZE whole transactions; read it whole to find the key.
LOOKUP_MAX_BODY_BYTES = 4 * 1024 * 1024
LOOKUP_PAGE_SIZE = 250  # the list filter's documented maximum `limit`
BODY_EXCERPT_CHARS = 500
MESSAGE_MAX_CHARS = 500
ERROR_MAX_CHARS = 300

TRANSACTIONS_PATH = "/v1/transactions"
CUSTOMERS_PATH = "/v1/customers"

# A request body, built only when the call is made (building it may fail: the call is refused).
Body = Callable[[], dict[str, Any]]
PING_PATH = "/v1/test"

# Exceptions after which the request certainly did not reach Partnero: no connection was made,
# or the request was refused before a byte of it went out.
_NOT_SENT_ERRORS: tuple[type[Exception], ...] = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.PoolTimeout,
    httpx.UnsupportedProtocol,
    httpx.ProxyError,
    httpx.LocalProtocolError,
    httpx.InvalidURL,
)

_DELTA_SECONDS = re.compile(r"[+-]?[0-9]+(\.[0-9]*)?")


class PartneroError(Exception):
    """Base of the errors this module raises (never for an HTTP or transport failure)."""


class ConfigurationError(PartneroError, ValueError):
    """A setting the client cannot work with (bad URL, empty key, non-positive timeout)."""


class ClientClosedError(PartneroError, RuntimeError):
    """A call on a client that was already closed."""


class ApiKey:
    """The Partnero API key. Shows as ``ApiKey('***')``; only `reveal()` gives the value."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        # Surrounding whitespace (a newline at the end of a credential file) is not part of it.
        value = value.strip()
        if not value:
            raise ConfigurationError("the Partnero API key is empty")
        if any(ch.isspace() or not ch.isprintable() for ch in value) or not value.isascii():
            # The message must not quote the key, even a broken one.
            raise ConfigurationError(
                "the Partnero API key contains spaces, control or non-ASCII characters"
            )
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "ApiKey('***')"

    __str__ = __repr__

    def __reduce__(self) -> Any:
        raise TypeError("an ApiKey cannot be pickled")


def api_root(base_url: str) -> str:
    """The API's root URL, without a trailing ``/`` or ``/v1``: Partnero's docs write the base
    URL both as ``https://api.partnero.com`` and as ``https://api.partnero.com/v1/``, and the
    client adds ``/v1/...`` itself."""
    root = base_url.rstrip("/")
    if root.endswith("/v1"):
        root = root[: -len("/v1")].rstrip("/")
    return root


def _api_url(base_url: str) -> httpx.URL:
    """The Partnero API URL, parsed; ConfigurationError for one the client cannot use."""
    try:
        url = httpx.URL(base_url)
    except (httpx.InvalidURL, TypeError) as exc:
        raise ConfigurationError(f"the Partnero API URL is not a URL: {exc}") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise ConfigurationError(
            f"the Partnero API URL must be http(s)://host[:port][/path], not {base_url!r}"
        )
    if url.userinfo or url.query or url.fragment:
        raise ConfigurationError(
            "the Partnero API URL must not carry credentials, a query or a fragment"
        )
    return url


def build_customer_body(event: Event) -> dict[str, Any]:
    """The JSON body of ``POST /v1/customers`` for a signup: the payload (the partner
    reference, email, name, surname, tags, options) with `key` = the row's customer_key, which
    always wins (the database refuses a payload that sets `key`)."""
    body: dict[str, Any] = copy.deepcopy(dict(event.payload or {}))
    body["key"] = event.customer_key
    return body


def build_create_body(event: Event, *, send_created_at: bool = True) -> dict[str, Any]:
    """The JSON body of ``POST /v1/transactions`` for a sale.

    `event.payload` (further Partnero fields: product_id, product_type, options,
    customer.partner, products, ...) deep-merged with the columns: `key`, `action`,
    `customer.key` (merged into any `customer` object from the payload), `amount` and
    `amount_units`. The columns always win (the database also refuses payloads that try to
    override them); a column that is NULL is left out. With `send_created_at`, `created_at` is
    the row's own time in Unix seconds (Partnero backdates the transaction to it, so a late
    delivery keeps its commission period), unless the payload sets `created_at` itself.

    `amount` becomes a JSON number through float: the database limits amounts to 4 decimal
    places and less than 1e11, about 15 significant digits, which a double holds exactly enough
    to print back the same decimal. Raises ValueError for an amount that is not finite.
    """
    body: dict[str, Any] = copy.deepcopy(dict(event.payload or {}))
    if send_created_at and event.created_at is not None and "created_at" not in body:
        body["created_at"] = int(event.created_at.timestamp())
    columns: dict[str, Any] = {"key": event.transaction_key, "action": "sale"}
    if event.customer_key is not None:
        columns["customer"] = {"key": event.customer_key}
    if event.amount is not None:
        amount = float(event.amount)
        if not math.isfinite(amount):
            raise ValueError(f"amount {event.amount} is not a finite number")
        columns["amount"] = amount
    if event.currency is not None:
        columns["amount_units"] = event.currency
    return _deep_merge(body, columns)


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """Seconds from a Retry-After header: delta-seconds or an HTTP date (relative to `now`).

    Negative values and dates in the past give 0; a missing or unparseable header gives None.
    """
    if value is None:
        return None
    text = value.strip()
    if _DELTA_SECONDS.fullmatch(text):
        seconds = float(text)
        return max(0.0, seconds) if math.isfinite(seconds) else None
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when is None:  # older Pythons returned None instead of raising
        return None  # pragma: no cover
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - now).total_seconds())


class PartneroClient:
    """An async client for the Partnero calls the daemon makes. Use as an async context manager
    or call `aclose()`."""

    def __init__(
        self,
        base_url: str,
        api_key: ApiKey,
        *,
        timeout_seconds: float,
        max_connections: int = 16,
        verify_tls: bool = True,
        transport: httpx.AsyncBaseTransport | None = None,
        user_agent: str = f"outbox/{__version__}",
        clock: Callable[[], datetime] = utcnow,
        send_created_at: bool = True,
    ) -> None:
        if not isinstance(api_key, ApiKey):
            raise ConfigurationError("api_key must be an ApiKey")
        if not (math.isfinite(timeout_seconds) and timeout_seconds > 0):
            raise ConfigurationError(f"timeout_seconds must be > 0, not {timeout_seconds!r}")
        if max_connections < 1:
            raise ConfigurationError(f"max_connections must be >= 1, not {max_connections!r}")
        url = _api_url(base_url)
        self._api_key = api_key
        self._clock = clock  # the times of each Exchange (the daemon's database clock)
        self._send_created_at = send_created_at
        self._base_url = str(url)
        # Paths are appended to the API root (the base URL with any path prefix of its own, but
        # without a trailing / or /v1, which the paths bring).
        self._prefix = api_root(self._base_url)
        self._host = url.netloc  # the Host header httpx would add
        # Parsed once: every create goes to the same URL (parsing one costs as much as a call's
        # whole JSON encoding).
        self._urls = {p: httpx.URL(self._prefix + p) for p in (TRANSACTIONS_PATH, PING_PATH)}
        self._timeout = float(timeout_seconds)
        # httpx's per-phase timeouts, as httpx.Timeout(timeout_seconds) would set them.
        self._timeouts = {phase: self._timeout for phase in ("connect", "read", "write", "pool")}
        self._user_agent = user_agent
        self._headers = self._base_headers()
        if transport is None:
            transport = AiohttpTransport(max_connections=max_connections, verify_tls=verify_tls)
        # The requests go straight to the transport: httpx.AsyncClient's per-request machinery
        # (URL merging, cookies, auth and redirect flows) cost about as much CPU as the HTTP
        # exchange itself, and the client uses none of it (docs/benchmarks.md).
        self._transport = transport
        self._closed = False

    def __repr__(self) -> str:
        return (
            f"PartneroClient(base_url={self._base_url!r}, api_key={self._api_key!r}, "
            f"timeout_seconds={self._timeout!r})"
        )

    def set_api_key(self, api_key: ApiKey) -> None:
        """Use another key from the next call on (key rotation on SIGHUP)."""
        if not isinstance(api_key, ApiKey):
            raise ConfigurationError("api_key must be an ApiKey")
        self._api_key = api_key
        self._headers = self._base_headers()

    def _base_headers(self) -> list[tuple[bytes, bytes]]:
        # Complete, as httpx would send them: the requests are built with stream=, for which
        # httpx adds no header itself (see _call).
        return [
            (b"Host", self._host),
            (b"Authorization", f"Bearer {self._api_key.reveal()}".encode("ascii")),
            (b"Accept", b"application/json"),
            (b"User-Agent", self._user_agent.encode("ascii")),
        ]

    @property
    def base_url(self) -> str:
        return self._base_url

    @property
    def timeout_seconds(self) -> float:
        return self._timeout

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            await self._transport.aclose()

    # ---- the calls ---------------------------------------------------------------------------

    async def create(self, event: Event) -> Exchange:
        """``POST /v1/transactions`` for a sale."""
        send = self._send_created_at
        body = lambda: build_create_body(event, send_created_at=send)  # noqa: E731
        return await self._json_call(RequestKind.CREATE, "POST", body)

    async def create_customer(self, event: Event) -> Exchange:
        """``POST /v1/customers`` for a signup."""
        body = lambda: build_customer_body(event)  # noqa: E731
        return await self._json_call(RequestKind.CREATE_CUSTOMER, "POST", body, CUSTOMERS_PATH)

    async def delete(self, transaction_key: str) -> Exchange:
        """``DELETE /v1/transactions`` with the JSON body ``{"key": ...}``, for a refund.

        The key is never put in a path segment: Partnero (Laravel) decodes the path before it
        matches routes, so a key holding ``/`` there, even as ``%2F``, reaches no route."""
        return await self._json_call(RequestKind.DELETE, "DELETE", lambda: {"key": transaction_key})

    async def _json_call(
        self, kind: RequestKind, method: str, body: Body, path: str = TRANSACTIONS_PATH
    ) -> Exchange:
        """A call with a JSON body. A body that cannot be encoded (an amount that is not a
        finite number, a key that is not valid Unicode) is refused unsent."""
        try:
            content = json.dumps(
                body(), ensure_ascii=False, separators=(",", ":"), allow_nan=False
            ).encode("utf-8")
        except (TypeError, ValueError) as exc:
            return self._refused(kind, method, path, exc)
        return await self._call(
            kind, method, path, content=content, content_type="application/json"
        )

    async def lookup(self, transaction_key: str, page: int = 1) -> Exchange:
        """``GET /v1/transactions?key=...``, one page of the documented list filter: did an
        earlier create reach Partnero? (`outbox.policy` reads the page; the key must be on it
        exactly, and `links.next` says whether another page follows.)"""
        if page < 1:
            raise ValueError(f"page must be >= 1, not {page!r}")
        try:
            query = urlencode(
                {"key": transaction_key, "limit": LOOKUP_PAGE_SIZE, "page": page}, quote_via=quote
            )
        except ValueError as exc:  # a key that is not valid Unicode (a lone surrogate)
            return self._refused(RequestKind.LOOKUP, "GET", TRANSACTIONS_PATH, exc)
        return await self._call(
            RequestKind.LOOKUP,
            "GET",
            f"{TRANSACTIONS_PATH}?{query}",
            max_body=LOOKUP_MAX_BODY_BYTES,
        )

    async def list_page(self, page: int, limit: int = LOOKUP_PAGE_SIZE) -> Exchange:
        """``GET /v1/transactions?limit=...&page=...``: a page of the whole ledger, no key filter
        (`outbox reconcile`'s listing; `outbox.policy.listing_page` reads it)."""
        if page < 1 or not 1 <= limit <= LOOKUP_PAGE_SIZE:
            raise ValueError(f"page must be >= 1 and limit 1-{LOOKUP_PAGE_SIZE}")
        path = f"{TRANSACTIONS_PATH}?{urlencode({'limit': limit, 'page': page})}"
        return await self._call(RequestKind.LOOKUP, "GET", path, max_body=LOOKUP_MAX_BODY_BYTES)

    async def ping(self) -> Exchange:
        """``GET /v1/test``: does the API key work? (see `outbox.policy.ping_verdict`)"""
        return await self._call(RequestKind.PING, "GET", PING_PATH)

    # ---- internals ---------------------------------------------------------------------------

    def _refused(self, kind: RequestKind, method: str, path: str, exc: Exception) -> Exchange:
        """Nothing was sent because the request could not be built (no status, no transport
        error; the policy fails the row with the error)."""
        now = self._clock()
        return Exchange(
            kind=kind,
            method=method,
            path=path,
            error=self._describe_error(exc),
            started_at=now,
            finished_at=now,
        )

    async def _call(
        self,
        kind: RequestKind,
        method: str,
        path: str,
        *,
        content: bytes | None = None,
        content_type: str | None = None,
        max_body: int = MAX_BODY_BYTES,
    ) -> Exchange:
        if self._closed:
            raise ClientClosedError("the Partnero client is closed")
        received = _Received()
        failure: tuple[TransportError, str] | None = None
        started_at = self._clock()
        try:
            async with asyncio.timeout(self._timeout):
                request = self._request(method, path, content, content_type)
                await self._send(request, max_body, received)
        except TimeoutError:
            # The total deadline; httpx's own timeouts are httpx.TimeoutException, not this.
            failure = (
                TransportError.UNKNOWN_OUTCOME,
                f"TimeoutError: no complete answer within {self._timeout:g} s",
            )
        except _NOT_SENT_ERRORS as exc:
            failure = (TransportError.NOT_SENT, self._describe_error(exc))
        except Exception as exc:
            # ReadTimeout, WriteTimeout, ReadError, WriteError, RemoteProtocolError, a body that
            # fails to decode, anything unexpected from a transport: it may have arrived.
            # CancelledError is a BaseException and propagates.
            failure = (TransportError.UNKNOWN_OUTCOME, self._describe_error(exc))
        times = (started_at, self._clock())
        return _exchange(kind, method, path, received, failure, times, max_body)

    def _request(
        self, method: str, path: str, content: bytes | None, content_type: str | None
    ) -> httpx.Request:
        headers = self._headers
        if content is not None:
            headers = [
                *headers,
                (b"Content-Type", (content_type or "application/octet-stream").encode("ascii")),
                (b"Content-Length", str(len(content)).encode("ascii")),
            ]
        # stream= rather than content=: httpx then adds no headers of its own (it would re-scan
        # and rebuild the header list for Host and Content-Length per call).
        request = httpx.Request(
            method,
            self._urls.get(path) or self._prefix + path,
            headers=headers,
            stream=httpx.ByteStream(content or b""),
            extensions={"timeout": self._timeouts},
        )
        request.read()
        return request

    async def _send(self, request: httpx.Request, max_body: int, received: _Received) -> None:
        """Send, and read at most `max_body` bytes of the answer into `received` (which keeps
        what arrived when the call fails half-way)."""
        response = await self._transport.handle_async_request(request)
        received.status_code = response.status_code
        received.retry_after = response.headers.get("Retry-After")
        try:
            async for chunk in response.aiter_bytes():
                received.body += chunk
                if len(received.body) > max_body:
                    return
            received.complete = True
        finally:
            await response.aclose()

    def _describe_error(self, exc: BaseException) -> str:
        """``ReadTimeout: ...``, short, and never with the API key in it."""
        text = " ".join(str(exc).split())
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
        text = text.replace(self._api_key.reveal(), "***")
        if len(text) > ERROR_MAX_CHARS:
            text = text[: ERROR_MAX_CHARS - 1] + "…"
        return text


@dataclass(slots=True)
class _Received:
    """What came back of one call so far: the status line and as much body as was read."""

    status_code: int | None = None
    retry_after: str | None = None
    body: bytearray = field(default_factory=bytearray)
    complete: bool = False


def _exchange(
    kind: RequestKind,
    method: str,
    path: str,
    received: _Received,
    failure: tuple[TransportError, str] | None,
    times: tuple[datetime, datetime],
    max_body: int,
) -> Exchange:
    """The Exchange for what came back (`received`) and how the call ended (`failure`), which
    started and finished at `times`."""
    started_at, finished_at = times
    transport_error, error = failure if failure is not None else (None, None)
    if received.status_code is not None and transport_error is not None:
        # The status line and headers arrived, then the body failed: the status is kept and the
        # transport error says the answer is incomplete (never "not sent": it was).
        transport_error = TransportError.UNKNOWN_OUTCOME
    exchange = Exchange(
        kind=kind,
        method=method,
        path=path,
        transport_error=transport_error,
        error=error,
        started_at=started_at,
        finished_at=finished_at,
    )
    if received.status_code is None:
        return exchange
    data = bytes(received.body[:max_body])
    whole = received.complete and transport_error is None
    json_body = _parse_json_object(data) if whole else None
    message = json_body.get("message") if json_body is not None else None
    excerpt = data[: BODY_EXCERPT_CHARS * 4].decode("utf-8", errors="replace")
    return replace(
        exchange,
        status_code=received.status_code,
        body_excerpt=excerpt[:BODY_EXCERPT_CHARS],
        message=message[:MESSAGE_MAX_CHARS] if isinstance(message, str) else None,
        json_body=json_body,
        retry_after_seconds=parse_retry_after(received.retry_after, finished_at),
    )


def _deep_merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """`override` merged into `base` (in place): nested objects merge, everything else is
    replaced by the value from `override`."""
    for name, value in override.items():
        current = base.get(name)
        if isinstance(value, Mapping) and isinstance(current, dict):
            _deep_merge(current, value)
        elif isinstance(value, Mapping):
            base[name] = _deep_merge({}, value)
        else:
            base[name] = value
    return base


def _parse_json_object(data: bytes) -> dict[str, Any] | None:
    """The body as a JSON object, or None (empty, not JSON, not an object, too deep, ...)."""
    if not data.strip():
        return None
    try:
        parsed = json.loads(data)
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueError
        return None
    return parsed if isinstance(parsed, dict) else None
