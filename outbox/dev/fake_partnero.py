"""A fake Partnero API for the test suite, the benchmark and `outbox demo`.

This is a test and demo tool, not a Partnero emulator: do not trust it for anything else. It
implements the few calls the daemon makes, shaped after Partnero's public docs, and it can be told
to misbehave. Where the docs are silent or contradict each other (is a transaction key unique?),
the behaviour is a choice made for testing, switchable at runtime, not knowledge of Partnero.

API calls (every one needs ``Authorization: Bearer <api_key>`` when an api_key is configured)::

    POST   /v1/transactions        create (201); 422 invalid; 400 Customer not found, Duplicate key
    GET    /v1/transactions        the list: ?key= (substring, case-insensitive), limit (1-250,
                                   default 15), page (>= 1); entries in creation order, deleted
                                   ones included; Laravel's paginator shape; 422 on a bad limit/page
    DELETE /v1/transactions        delete every live entry with the key in the JSON body
                                   {"key": ...} (200), or 404 Transaction not found; 422 no key
    DELETE /v1/transactions/{key}  the same, with the key as ONE decoded path segment
    POST   /v1/customers           create a customer, a signup (201); 200 ignored (no partner);
                                   422 invalid or Duplicate key; 400 Invalid partner key
    GET    /v1/customers/{key}     one customer (200), or 404 Customer not found; the key as
                                   ONE decoded path segment
    GET    /v1/test                200 with a good key, 401 without

Routing is Laravel's: the path (trailing slashes trimmed) is percent-decoded like PHP's
rawurldecode (``+`` stays ``+``) BEFORE routes are matched. So a key holding ``/``, even sent as
``%2F``, makes extra segments and gets the route-level 404 ``{"message": "The route {path} could
not be found."}``, never "Transaction not found" or "Customer not found" ({path} is Laravel's
``$request->path()``: the path as sent, NOT decoded, outer slashes trimmed). There is no ``GET
/v1/transactions/{key}`` (405, ``Allow: DELETE``), no list of customers (``GET /v1/customers``:
405, ``Allow: POST``) and no ``PUT``/``DELETE /v1/customers/{key}`` (405, ``Allow: GET``): the
fake serves what the daemon calls. 405 messages name the supported methods, as Laravel's do
(HEAD is not served). Route 404/405 come before auth (401), then ``forbidden`` (403), then the call.
Successes carry ``"status": 1`` and Partnero's own errors ``"status": 0``; framework errors (401,
403, 404 route, 405, 422, 429, 5xx) carry only ``message`` (422 also ``errors``).

Customers (signups). ``POST /v1/customers`` takes ``key`` (required string, at most 255
characters), ``email`` (a valid address, for the fake: no spaces, one ``@`` with text on both
sides; unique among customers, compared case-insensitively as a MySQL unique index does),
``name``, ``surname`` (strings), ``tags`` (a list of strings), ``options`` (an object;
``options.referral_url`` a string) and ``partner`` (an object: ``key`` and ``email`` strings,
``id`` a string or an integer); null counts as absent everywhere. The checks, in this order (the
order and the answer to an ignored signup are choices: the docs do not settle them):

1. Laravel's validation: 422 ``{"message": "The given data was invalid.", "errors": {...}}``;
   ``"The email has already been taken."`` when another customer has the email (the rule ignores
   the customer with the same key, so repeating a create answers Duplicate key, not this).
2. No partner reference (no ``partner``, or none of its key, id, email non-empty): 200
   ``{"data": null, "status": 1}`` and nothing is created (Partnero's guide: signups without a
   partner are ignored; what it answers is undocumented).
3. The customer key exists: 422 ``{"message": "Duplicate key", "status": 0}`` (no ``errors``).
4. The reference (the first non-empty of partner.key, .id, .email) names none of the config's
   ``partners`` (key and id compared as text, email case-insensitively): 400 ``{"message":
   "Invalid partner key", "status": 0}``.
5. 201 ``{"data": {key, email, name, surname, tags, referral_url, partner: {key, id, email},
   created_at}, "status": 1}``; the customer joins the registry and leaves ``unknown_customers``.

Sales and the registry. With ``customers_must_exist`` true (what Partnero does) a transaction
create whose customer is not in the registry (looked up by customer.key; with only
customer.email, by email or by a key equal to it) answers 400 Customer not found, unless
``options.create_customer`` is true: that registers the customer (key: customer.key, else the
email; its email unless another customer has it; its partner: customer.partner if it names one,
never checked; ``created_seq``: the sale's own seq) and the sale goes on. False, the default, is
a convenience for tests about other things: every customer is known but those in
``unknown_customers`` (create_customer registers those, as above). ``unknown_customers`` answers
400 in both modes. ``POST /_fake/customers`` ``known``
registers each name as a customer key (source "admin": a customer a person added in Partnero's
dashboard; ``created_seq`` is the seq of the last API call so far, 0 for none, so every call with
a higher seq came after it) and takes it out of ``unknown_customers``; ``unknown`` removes every
customer whose key or email it names from the registry and puts the name in
``unknown_customers``. Partners are set with ``POST /_fake/config {"partners": [...]}`` (the
whole list; default one partner, key "partner_1", id 1, email "partner1@example.com").

Admin calls (no auth, never faulted)::

    GET  /_fake/ledger     {"transactions": [...], "customers": [...]} every ledger entry and
                           every customer in creation order; a customer shows key, email,
                           partner (the matched partner's key or null), created_seq,
                           created_at, source ("api" or "admin")
    GET  /_fake/requests   {"requests": [...]} every API call (not admin calls) in decision order
    GET  /_fake/stats      counts by method and status, ledger, customer and connection counts
    GET  /_fake/config     the config, api_key redacted
    POST /_fake/config     {"field": value, ...} change any FakeConfig field; an extra
                           "outage_for_seconds": N clears the outage by itself after N seconds
                           (the only way to end a "refuse" outage over HTTP)
    POST /_fake/customers  {"unknown": [...], "known": [...]} (see Sales and the registry)
    POST /_fake/reset      clear the ledger (customers included, admin-registered ones too), the
                           request log and the counters (not the config: ``unknown_customers``
                           and ``partners`` stay)
    POST /_fake/tamper     {"action": ..., "key": ...} change the ledger behind the API's back
                           (see Tampering): 200 {"transactions": [the entries changed]}; 404
                           when no entry of the key can take the action; 400 a malformed change
    POST /_fake/ledger/bulk  {"transactions": [{"key": str, "amount": number, "amount_units":
                           str, "customer": str, "created_at": Unix seconds}, ...]} append
                           entries as they stand (for the benchmark's ledger of 100,000: no
                           validation, no customer check, no dedupe; only key is required;
                           created_seq the last API call's): 200 {"added": N}; 400 malformed

Tampering (for `outbox reconcile`: the drift a person in Partnero's dashboard, another
integration or a data loss makes). Each action takes the entries whose key is exactly ``key``:
``delete`` marks every live one deleted, as the dashboard or a DELETE would (``deleted_at`` set,
``deleted_seq`` the last API call's seq; the list still shows them); ``purge`` removes every
entry outright (Partnero lost them: the list no longer shows the key); ``duplicate`` appends a
copy of the last live one (a new ``seq``, ``created_at`` now, ``created_seq`` the last API
call's; a second commission); ``amend`` sets ``amount`` (a number) and/or ``amount_units`` on
every live one; ``revive`` clears ``deleted_at`` of the last deleted one (a reversal undone).
``FakePartnero.tamper(action, key, **fields)`` does the same from Python.

Request log ``status`` is the HTTP status answered, or "dropped_before" (read, not applied, no
answer), "dropped_after" (applied, no answer; ``would_status`` says what it would have been),
"hung_after" (applied, never answered: the connection is held open until the client leaves),
"pending"/"timeout" (held by a "timeout" outage, never applied or answered) or "client_closed"
(the client went away while the fake was still sleeping ``latency_ms``). ``seq`` numbers API calls
in the order the fake acted on them (after the latency sleep); a ledger entry's ``created_seq`` and
``deleted_seq`` are the ``seq`` of the call that created or deleted it, and so is a customer's
``created_seq``. ``path`` is the path as sent (not decoded); ``resource`` is "transaction" or
"customer" (null for ``/v1/test`` and unrouted paths); ``key`` is the transaction or customer key
the call names: the body key of a create or body-form delete, the decoded segment of the path
form, the ``key`` query parameter of the list; ``customer_key`` is the customer.key a transaction
create names, or the key of a customer call; ``message`` is the ``message`` of the JSON answer
given (or withheld by drop_after/hang_after), else null. So "signups reach Partnero before their
sales" reads: for each customer of the ledger, no logged ``POST`` with resource "transaction" and
its key as ``customer_key`` has a lower ``seq`` than its ``created_seq`` (a sale carrying
``options.create_customer`` creates its customer with its own seq: equal, not lower).

Faults are drawn in this order from one ``random.Random(seed)``, each only when its rate is above
zero, for every API call but ``GET /v1/test`` (which fails only in an outage or with
``forbidden``, so that the daemon's key check passes while a test faults every row):
drop_before, 429, 5xx (500, 502 with an HTML body, or 503), then the call is routed and
answered, then drop_after, then hang_after. Where the real answer is produced (after routing and
auth) two set-up faults apply, no randomness involved: ``forbidden`` answers every authorised call
403 (a key that lost its permissions), and ``odd_answers`` maps a key to
``{"answer": NAME, "applied": false, "times": null}``: a create or delete (body or path form)
naming that key, or a customer create naming it as the customer key (never a lookup), gets the
odd answer NAME (see ``ODD_ANSWERS``) instead of the real one, after applying the call first when
``applied`` is true (``would_status`` in the log); ``times`` uses (null: every time) before the
entry goes away. The log's ``fault`` is then ``"odd:NAME"``.

Python use: ``FakePartnero`` inside a running event loop, ``FakePartneroThread`` (its own loop in
a daemon thread) from synchronous code; the click command ``fake-partnero`` serves one from the
command line.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import math
import os
import random
import re
import signal
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any, Final, Literal, Self, TypeVar, cast
from urllib.parse import parse_qs, quote, unquote_to_bytes, urlencode

import click

__all__ = [
    "ODD_ANSWERS",
    "OUTAGES",
    "FakeConfig",
    "FakePartnero",
    "FakePartneroThread",
    "Outage",
    "fake_partnero_command",
]

Outage = Literal["refuse", "503", "timeout"]
OUTAGES: Final[tuple[str, ...]] = ("refuse", "503", "timeout")
# Answers a real server (or what stands in front of it) may give instead of the documented one;
# see FakeConfig.odd_answers.
ODD_ANSWERS: Final[tuple[str, ...]] = (
    "status_0",  # 200 {"status": 0}
    "html_200",  # 200 text/html, a small HTML page
    "empty_200",  # 200, JSON content type, empty body
    "route_404",  # Laravel's route-level 404 for the request's path
    "html_404",  # 404 text/html, an nginx-style page
    "html_502",  # 502 text/html, an nginx-style page
    "bad_request",  # 400 {"message": "Duplicate customer key", "status": 0}
    "forbidden",  # 403 {"message": "This action is unauthorized."}
)

JSONDict = dict[str, Any]
_T = TypeVar("_T")

_MAX_HEADER_BYTES: Final = 64 * 1024
_MAX_BODY_BYTES: Final = 10 * 1024 * 1024
_COMMISSION_RATE: Final = 0.3  # only to give `rewards[].amount` a plausible value
_JSON: Final = "application/json"
_HTML_502: Final = (
    b"<html><head><title>502 Bad Gateway</title></head>"
    b"<body><center><h1>502 Bad Gateway</h1></center></body></html>"
)
_HTML_404: Final = (
    b"<html>\r\n<head><title>404 Not Found</title></head>\r\n<body>\r\n"
    b"<center><h1>404 Not Found</h1></center>\r\n<hr><center>nginx</center>\r\n"
    b"</body>\r\n</html>\r\n"
)
_HTML_200: Final = (
    b'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>Partnero</title>'
    b"</head><body><h1>Partnero</h1><p>Sign in to continue.</p></body></html>"
)


_DEFAULT_PARTNER: Final = {"key": "partner_1", "id": 1, "email": "partner1@example.com"}


@dataclass
class FakeConfig:
    """How the fake behaves. Every field can change at runtime (see FakePartnero.configure)."""

    api_key: str | None = field(default=None, repr=False)  # None: no auth check at all
    dedupe: bool = True  # True: a second create with a known key answers 400 Duplicate key
    unknown_customers: set[str] = field(default_factory=set)  # keys/emails answered 400
    # True (what Partnero does): a sale for a customer not in the registry answers 400 Customer
    # not found. False: every customer is known but unknown_customers (for tests about other
    # things). See "Sales and the registry" in the module docstring.
    customers_must_exist: bool = False
    # The partners a signup's partner.key, .id or .email may name: {"key", "id", "email"} each.
    partners: list[dict[str, Any]] = field(default_factory=lambda: [dict(_DEFAULT_PARTNER)])
    latency_ms: float = 0.0  # added before every API answer (asyncio.sleep)
    fail_5xx_rate: float = 0.0  # answer 500/502/503 at random, not applied
    rate_429: float = 0.0  # answer 429 at random, not applied
    retry_after_seconds: float | None = None  # Retry-After on 429 (and outage 503) when set
    drop_before_rate: float = 0.0  # read the request, close without applying or answering
    drop_after_rate: float = 0.0  # apply the request, close without answering
    hang_after_rate: float = 0.0  # apply the request, never answer (until the client leaves)
    outage: Outage | None = None  # "refuse", "503", "timeout" or None
    seed: int | None = None  # for the random faults
    forbidden: bool = False  # True: every authorised API call answers 403
    # transaction or customer key -> {"answer": one of ODD_ANSWERS, "applied": bool, "times": int
    # or None}: creates and deletes naming the key get that answer instead of the real one (see the
    # module docstring); "times" counts down and the entry goes away at 0 (None: forever).
    odd_answers: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, value in _validate_changes(dataclasses.asdict(self)).items():
            setattr(self, name, value)

    def public(self) -> JSONDict:
        """The config as JSON, the api_key replaced by whether one is set."""
        out = dataclasses.asdict(self)
        out["api_key"] = "***" if self.api_key is not None else None
        out["unknown_customers"] = sorted(self.unknown_customers)
        return out

    def copy(self) -> FakeConfig:
        return dataclasses.replace(
            self,
            unknown_customers=set(self.unknown_customers),
            partners=[dict(partner) for partner in self.partners],
            odd_answers={key: dict(spec) for key, spec in self.odd_answers.items()},
        )


_CONFIG_FIELDS: Final = frozenset(f.name for f in dataclasses.fields(FakeConfig))
_RATE_FIELDS: Final = frozenset(
    {"fail_5xx_rate", "rate_429", "drop_before_rate", "drop_after_rate", "hang_after_rate"}
)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _validate_changes(changes: dict[str, Any]) -> JSONDict:
    """Check field names and types of a config change; return it normalised. Raises ValueError."""
    unknown = set(changes) - _CONFIG_FIELDS
    if unknown:
        raise ValueError(f"unknown config field(s): {', '.join(sorted(unknown))}")
    out: JSONDict = {}
    for name, value in changes.items():
        if name in _RATE_FIELDS:
            if not _is_number(value) or not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"{name} must be a number between 0 and 1")
            value = float(value)
        elif name == "latency_ms":
            if not _is_number(value) or not 0.0 <= float(value) < math.inf:
                raise ValueError("latency_ms must be a number >= 0")
            value = float(value)
        elif name == "retry_after_seconds":
            if value is not None:
                if not _is_number(value) or not 0.0 <= float(value) < math.inf:
                    raise ValueError("retry_after_seconds must be null or a number >= 0")
                value = float(value)
        elif name in ("dedupe", "forbidden", "customers_must_exist"):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be a boolean")
        elif name == "odd_answers":
            value = _validate_odd_answers(value)
        elif name == "partners":
            value = _validate_partners(value)
        elif name == "outage":
            if value is not None and value not in OUTAGES:
                raise ValueError(f"outage must be null or one of {', '.join(OUTAGES)}")
        elif name == "seed":
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise ValueError("seed must be null or an integer")
        elif name == "api_key":
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError("api_key must be null or a non-empty string")
        elif name == "unknown_customers":
            if isinstance(value, str | bytes) or not isinstance(value, Iterable):
                raise ValueError("unknown_customers must be a list of strings")
            value = set(value)
            if not all(isinstance(v, str) for v in value):
                raise ValueError("unknown_customers must be a list of strings")
        out[name] = value
    return out


_ODD_FIELDS: Final = frozenset({"answer", "applied", "times"})


def _validate_odd_answers(value: object) -> dict[str, dict[str, Any]]:
    """odd_answers normalised to fresh {"answer", "applied", "times"} dicts. Raises ValueError."""
    if not isinstance(value, dict):
        raise ValueError("odd_answers must be an object mapping transaction keys to answers")
    out: dict[str, dict[str, Any]] = {}
    for key, spec in value.items():
        if not isinstance(key, str):
            raise ValueError("odd_answers keys must be strings")
        if not isinstance(spec, dict) or not set(spec) <= _ODD_FIELDS:
            raise ValueError(
                f"odd_answers[{key!r}] must be an object with answer, applied and times"
            )
        answer = spec.get("answer")
        if answer not in ODD_ANSWERS:
            raise ValueError(f"odd_answers[{key!r}].answer must be one of {', '.join(ODD_ANSWERS)}")
        applied = spec.get("applied", False)
        if not isinstance(applied, bool):
            raise ValueError(f"odd_answers[{key!r}].applied must be a boolean")
        times = spec.get("times")
        if times is not None and (
            not isinstance(times, int) or isinstance(times, bool) or times < 1
        ):
            raise ValueError(f"odd_answers[{key!r}].times must be null or an integer >= 1")
        out[key] = {"answer": answer, "applied": applied, "times": times}
    return out


def _validate_partners(value: object) -> list[dict[str, Any]]:
    """partners normalised to fresh {"key", "id", "email"} dicts. Raises ValueError."""
    if not isinstance(value, list):
        raise ValueError("partners must be a list of objects with key, id and email")
    out: list[dict[str, Any]] = []
    for i, partner in enumerate(value):
        if not isinstance(partner, dict) or set(partner) != {"key", "id", "email"}:
            raise ValueError(f"partners[{i}] must be an object with key, id and email")
        key, id_, email = partner["key"], partner["id"], partner["email"]
        if not (isinstance(key, str) and key and isinstance(email, str) and email):
            raise ValueError(f"partners[{i}].key and .email must be non-empty strings")
        if isinstance(id_, bool) or not isinstance(id_, int | str) or id_ == "":
            raise ValueError(f"partners[{i}].id must be an integer or a non-empty string")
        out.append({"key": key, "id": id_, "email": email})
    return out


def _now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _dumps(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


# ---- HTTP plumbing ----------------------------------------------------------------------------


class _HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True, slots=True)
class _Response:
    status: int
    body: bytes
    content_type: str = _JSON
    headers: tuple[tuple[str, str], ...] = ()
    message: str | None = None  # the JSON body's "message", for the request log


def _json_response(
    status: int, obj: object, headers: tuple[tuple[str, str], ...] = ()
) -> _Response:
    message = obj.get("message") if isinstance(obj, dict) else None
    return _Response(
        status, _dumps(obj), _JSON, headers, message if isinstance(message, str) else None
    )


def _invalid(errors: dict[str, list[str]]) -> _Response:
    """Laravel's 422 validation answer."""
    return _json_response(422, {"message": "The given data was invalid.", "errors": errors})


_MALFORMED: Final = object()
_UNSET: Final = object()

# Routes, matched on the decoded path: name -> the methods it supports (in Laravel's order).
_TEST: Final = "test"
_TRANSACTIONS: Final = "transactions"
_TRANSACTION: Final = "transaction"  # /v1/transactions/{key}
_CUSTOMERS: Final = "customers"
_CUSTOMER: Final = "customer"  # /v1/customers/{key}
_ALLOWED: Final[dict[str, tuple[str, ...]]] = {
    _TEST: ("GET",),
    _TRANSACTIONS: ("GET", "POST", "DELETE"),
    _TRANSACTION: ("DELETE",),
    _CUSTOMERS: ("POST",),
    _CUSTOMER: ("GET",),
}
# A collection's path -> (its route, its {key} route).
_COLLECTIONS: Final = {
    "/v1/transactions": (_TRANSACTIONS, _TRANSACTION),
    "/v1/customers": (_CUSTOMERS, _CUSTOMER),
}
# What the request log's "resource" says of a call on a route.
_RESOURCES: Final = {
    _TRANSACTIONS: "transaction",
    _TRANSACTION: "transaction",
    _CUSTOMERS: "customer",
    _CUSTOMER: "customer",
}


def _rawurldecode(raw: str) -> str:
    """PHP's rawurldecode of a request-line string (latin-1 text of the raw bytes): %XX decoded,
    bad escapes and ``+`` kept, the bytes read as UTF-8 (invalid sequences replaced)."""
    if "%" not in raw and raw.isascii():
        return raw
    return unquote_to_bytes(raw.encode("latin-1")).decode("utf-8", "replace")


def _match_route(raw_path: str) -> tuple[str | None, str | None]:
    """(route name or None, the {key} segment) for a raw request path, the way Laravel matches:
    trailing slashes trimmed, then percent-decoded, then matched segment by segment."""
    path = _rawurldecode(raw_path.rstrip("/") or "/")
    if path == "/v1/test":
        return _TEST, None
    if path in _COLLECTIONS:
        return _COLLECTIONS[path][0], None
    collection, _, key = path.rpartition("/")
    if key and collection in _COLLECTIONS:
        return _COLLECTIONS[collection][1], key
    return None, None


class _Request:
    __slots__ = (
        "_json",
        "_params",
        "_route",
        "body",
        "headers",
        "keep_alive",
        "method",
        "path",
        "query",
        "received_at",
    )

    def __init__(
        self,
        method: str,
        path: str,
        headers: dict[str, str],
        body: bytes,
        keep_alive: bool,
        query: str = "",
    ) -> None:
        self.method = method
        self.path = path  # raw, as sent, without the query
        self.query = query  # raw, without the "?"
        self.headers = headers
        self.body = body
        self.keep_alive = keep_alive
        self.received_at = time.time()
        self._json: object = _UNSET
        self._route: tuple[str | None, str | None] | None = None
        self._params: dict[str, str] | None = None

    @property
    def route(self) -> tuple[str | None, str | None]:
        """(route name or None for Laravel's route-level 404, the decoded {key} segment)."""
        if self._route is None:
            self._route = _match_route(self.path)
        return self._route

    def params(self) -> dict[str, str]:
        """The query parameters as PHP reads them ("+" and %20 are spaces; the last one wins)."""
        if self._params is None:
            query = self.query
            if not query.isascii():
                query = query.encode("latin-1").decode("utf-8", "replace")
            parsed = parse_qs(query, keep_blank_values=True, errors="replace")
            self._params = {name: values[-1] for name, values in parsed.items()}
        return self._params

    @property
    def is_admin(self) -> bool:
        return self.path.startswith("/_fake/")

    def json(self) -> object:
        """The parsed body ({} when empty), or _MALFORMED."""
        if self._json is _UNSET:
            try:
                self._json = json.loads(self.body) if self.body.strip() else {}
            except (ValueError, RecursionError):
                self._json = _MALFORMED
        return self._json


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


class _HttpProtocol(asyncio.Protocol):
    """One HTTP/1.1 connection: keep-alive, pipelining, Content-Length bodies only."""

    def __init__(self, fake: FakePartnero, listener: _Listener) -> None:
        self._fake = fake
        self._listener = listener
        self._transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._queue: deque[_Request] = deque()
        self._sent_continue = False
        self.task: asyncio.Task[None] | None = None
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed = False
        self.closed_by_server = False
        self.close_after_response = False

    # asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._listener.connections.add(self)
        self._listener.accepted += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.lost.done():
            self.lost.set_result(None)
        self._listener.connections.discard(self)
        for req in self._queue:
            self._fake._log_unanswered(req, self.unanswered_status)
        self._queue.clear()
        if self.task is not None:
            self.task.cancel()

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        self._buf += data
        fake = self._fake
        while not self.closed:
            try:
                req = self._parse()
            except _HttpError as exc:
                self.close_after_response = True
                self.send(_json_response(exc.status, {"message": exc.message}), keep_alive=False)
                return
            if req is None:
                return
            if self.task is None and not self._queue and not fake._needs_async(req):
                fake._handle_now(self, req)
            else:
                self._queue.append(req)
                if self.task is None:
                    self.task = asyncio.get_running_loop().create_task(self._drain())

    # helpers

    @property
    def unanswered_status(self) -> str:
        return "dropped_before" if self.closed_by_server else "client_closed"

    async def _drain(self) -> None:
        try:
            while self._queue and not self.closed:
                await self._fake._handle_later(self, self._queue.popleft())
        finally:
            self.task = None

    def _parse(self) -> _Request | None:
        buf = self._buf
        while buf.startswith(b"\r\n"):  # tolerated between requests (RFC 9112 2.2)
            del buf[:2]
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > _MAX_HEADER_BYTES:
                raise _HttpError(431, "Request header fields too large")
            return None
        lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[0].isalpha() or not parts[1].startswith("/"):
            raise _HttpError(400, "Bad request line")
        method, target, version = parts
        if version not in ("HTTP/1.1", "HTTP/1.0"):
            raise _HttpError(505, "HTTP version not supported")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep or not name or name != name.strip():
                raise _HttpError(400, "Bad header line")
            headers[name.lower()] = value.strip()
        if "transfer-encoding" in headers:
            raise _HttpError(501, "Transfer-Encoding is not supported; send Content-Length")
        length_text = headers.get("content-length", "0")
        if not (length_text.isascii() and length_text.isdigit()):
            raise _HttpError(400, "Bad Content-Length")
        length = int(length_text)
        if length > _MAX_BODY_BYTES:
            raise _HttpError(413, "Request body too large")
        total = end + 4 + length
        if len(buf) < total:
            if (
                not self._sent_continue
                and headers.get("expect", "").lower() == "100-continue"
                and self._transport is not None
            ):
                self._transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                self._sent_continue = True
            return None
        body = bytes(buf[end + 4 : total])
        del buf[:total]
        self._sent_continue = False
        connection = headers.get("connection", "").lower()
        if version == "HTTP/1.1":
            keep_alive = "close" not in connection
        else:
            keep_alive = "keep-alive" in connection
        path, _, query = target.partition("#")[0].partition("?")
        return _Request(method.upper(), path, headers, body, keep_alive, query)

    def send(self, resp: _Response, keep_alive: bool) -> None:
        if self.closed or self._transport is None:
            return
        keep = keep_alive and not self.close_after_response
        head = [
            f"HTTP/1.1 {resp.status} {_reason(resp.status)}\r\n"
            f"Content-Type: {resp.content_type}\r\n"
            f"Content-Length: {len(resp.body)}\r\n"
            "Server: fake-partnero\r\n"
        ]
        head.extend(f"{name}: {value}\r\n" for name, value in resp.headers)
        head.append("Connection: keep-alive\r\n\r\n" if keep else "Connection: close\r\n\r\n")
        self._transport.write("".join(head).encode("latin-1") + resp.body)
        if not keep:
            self.close()

    def close(self) -> None:
        """Close after what was written is flushed (FIN); the client sees no answer if none."""
        if not self.closed:
            self.closed = True
            self.closed_by_server = True
            if self._transport is not None:
                self._transport.close()

    def abort(self) -> None:
        self.closed_by_server = True
        self.closed = True
        if self._transport is not None:
            self._transport.abort()
        if self.task is not None:
            self.task.cancel()


# ---- the ledger --------------------------------------------------------------------------------


# The fields of a ledger entry GET /_fake/ledger shows (body apart), in this order.
_ENTRY_ADMIN_FIELDS: Final = (
    "seq",
    "key",
    "customer_key",
    "customer_email",
    "amount",
    "reward",
    "amount_units",
    "action",
    "created_seq",
    "deleted_seq",
    "created_at",
    "deleted_at",
)


@dataclass(slots=True)
class _Entry:
    seq: int
    key: str | None
    customer_key: str | None
    customer_email: str | None
    partner: str | None
    amount: float | int | None
    reward: float | int | None
    amount_units: str
    action: str
    created_seq: int
    created_at: str
    body: JSONDict
    deleted_seq: int | None = None
    deleted_at: str | None = None

    def admin(self) -> JSONDict:
        """The entry as GET /_fake/ledger shows it: its fields but partner, the body copied."""
        shown = {name: getattr(self, name) for name in _ENTRY_ADMIN_FIELDS}
        shown["body"] = dict(self.body)
        return shown

    def api(self) -> JSONDict:
        """The transaction as Partnero's create/lookup answers show it."""
        reward_amount = (
            self.reward if self.reward is not None else (self.amount or 0) * _COMMISSION_RATE
        )
        customer = self.customer_key if self.customer_key is not None else self.customer_email
        return {
            "key": self.key,
            "action": self.action,
            "amount": self.amount if self.amount is not None else 0,
            "partner": self.partner,
            "customer": customer,
            "credit": False,
            "is_currency": True,
            "amount_units": self.amount_units,
            "created_at": self.created_at,
            "deleted_at": self.deleted_at,
            "rewards": [
                {
                    "key": self.key,
                    "action": self.action,
                    "status": "ok",
                    "customer": customer,
                    "partner": self.partner,
                    "amount": reward_amount,
                    "amount_units": self.amount_units,
                    "is_currency": True,
                    "credit": False,
                    "created_at": self.created_at,
                    "deleted_at": self.deleted_at,
                }
            ],
        }


class _Ledger:
    """Partnero's transactions: every entry in creation order (deleted ones included), indexed by
    key, and the calls on them: create, delete and the paginated list."""

    __slots__ = ("_by_key", "_config", "_customers", "entries")

    def __init__(self, config: FakeConfig, customers: _Customers) -> None:
        self._config = config  # for dedupe
        self._customers = customers  # whether a sale's customer exists
        self.entries: list[_Entry] = []
        self._by_key: dict[str, list[_Entry]] = {}

    def clear(self) -> None:
        self.entries.clear()
        self._by_key.clear()

    def admin(self) -> list[JSONDict]:
        """Every entry in creation order, as the admin API shows it (copies)."""
        return [e.admin() for e in self.entries]

    def counts(self) -> JSONDict:
        deleted = sum(1 for e in self.entries if e.deleted_seq is not None)
        total = len(self.entries)
        return {"entries": total, "alive": total - deleted, "deleted": deleted}

    def create(self, body: object, seq: int) -> _Response:
        """POST /v1/transactions by call `seq`: 201, 422 invalid, 400 unknown customer or key."""
        data, errors = _validate_create(body)
        if errors:
            return _invalid(errors)
        customer: JSONDict = data["customer"]
        if not self._customers.admit(customer, data.get("options"), seq):
            return _json_response(400, _NO_CUSTOMER)
        key: str | None = data.get("key")
        if self._config.dedupe and key is not None and key in self._by_key:
            return _json_response(400, {"message": "Duplicate key", "status": 0})
        partner = customer.get("partner")
        backdate = data.get("created_at")
        entry = _Entry(
            seq=self.entries[-1].seq + 1 if self.entries else 1,
            key=key,
            customer_key=customer.get("key") or None,
            customer_email=customer.get("email") or None,
            partner=partner.get("key") if isinstance(partner, dict) else None,
            amount=data.get("amount"),
            reward=data.get("reward"),
            amount_units=data.get("amount_units") or "USD",
            action=data.get("action") or "sale",
            created_seq=seq,
            created_at=_iso(backdate) if isinstance(backdate, int) else _now_iso(),
            body=data,
        )
        self.entries.append(entry)
        if key is not None:
            self._by_key.setdefault(key, []).append(entry)
        return _json_response(201, {"data": entry.api(), "status": 1})

    def delete(self, key: str, seq: int) -> _Response:
        """Delete every live entry with `key` by call `seq`: 200, or 404 Transaction not found."""
        alive = [e for e in self._by_key.get(key, ()) if e.deleted_seq is None]
        if not alive:
            return _json_response(404, _NOT_FOUND)
        now = _now_iso()
        for e in alive:
            e.deleted_seq, e.deleted_at = seq, now
        return _json_response(200, {"status": 1})

    def tamper(self, change: object, seq: int) -> _Response:
        """Admin: change the entries of one key behind the API's back, as a person in Partnero's
        dashboard or a data loss would (see "Tampering" in the module docstring). `seq`: the
        last API call's, recorded as an admin delete's ``deleted_seq`` and a copy's
        ``created_seq``."""
        if not isinstance(change, dict) or not isinstance(change.get("key"), str):
            return _json_response(400, {"message": 'expected {"action": ..., "key": ...}'})
        action, key = change.get("action"), change["key"]
        entries = self._by_key.get(key, [])
        live = [e for e in entries if e.deleted_seq is None]
        chosen = (
            {
                "delete": live,
                "purge": list(entries),
                "duplicate": live[-1:],
                "amend": live,
                "revive": [e for e in entries if e.deleted_seq is not None][-1:],
            }.get(action)
            if isinstance(action, str)
            else None
        )
        if chosen is None:
            return _json_response(400, {"message": f"action must be one of {', '.join(_TAMPER)}"})
        amended = {n: change[n] for n in ("amount", "amount_units") if n in change}
        if action == "amend" and not _valid_amendment(amended):
            return _json_response(400, {"message": "amend takes amount (a number), amount_units"})
        if not chosen:
            return _json_response(404, {"message": f"no transaction to {action} with that key"})
        if action == "duplicate":
            copy = dataclasses.replace(
                chosen[0], seq=self.entries[-1].seq + 1, created_seq=seq, created_at=_now_iso()
            )
            chosen = [copy]
            self.entries.append(copy)
            entries.append(copy)
        for e in chosen:
            if action == "delete":
                e.deleted_seq, e.deleted_at = seq, _now_iso()
            elif action == "revive":
                e.deleted_seq = e.deleted_at = None
            elif action == "amend":
                for name, value in amended.items():
                    setattr(e, name, value)
        if action == "purge":
            self.entries[:] = [e for e in self.entries if e.key != key]
            del self._by_key[key]
        return _json_response(200, {"transactions": [e.admin() for e in chosen], "status": 1})

    def bulk(self, body: object, seq: int) -> _Response:
        """Admin: append entries as they stand (POST /_fake/ledger/bulk), all or none."""
        items = body.get("transactions") if isinstance(body, dict) else None
        if not isinstance(items, list) or not all(_bulk_item_ok(i) for i in items):
            return _json_response(400, {"message": _BULK_SHAPE})
        next_seq = self.entries[-1].seq + 1 if self.entries else 1
        for n, item in enumerate(items):
            stamp = item.get("created_at")
            entry = _Entry(
                seq=next_seq + n,
                key=item["key"],
                customer_key=item.get("customer"),
                customer_email=None,
                partner=None,
                amount=item.get("amount"),
                reward=None,
                amount_units=item.get("amount_units") or "USD",
                action="sale",
                created_seq=seq,
                created_at=_iso(stamp) if stamp is not None else _now_iso(),
                body=dict(item),
            )
            self.entries.append(entry)
            self._by_key.setdefault(entry.key or "", []).append(entry)
        return _json_response(200, {"added": len(items), "status": 1})

    def page(self, params: dict[str, str], base: str) -> _Response:
        """GET /v1/transactions: Laravel's paginator over the ledger, filtered by ?key=.

        `base` is the list's own URL, for the paginator's links."""
        errors: dict[str, list[str]] = {}
        limit = _int_param(params, "limit", 15, 250, errors)
        page = _int_param(params, "page", 1, None, errors)
        if errors:
            return _invalid(errors)
        wanted = params.get("key") or None  # Laravel turns an empty string into null
        rows: list[_Entry] = self.entries
        if wanted is not None:
            needle = wanted.casefold()
            rows = [e for e in rows if e.key is not None and needle in e.key.casefold()]
        query: JSONDict = {"key": wanted} if wanted is not None else {}
        query["limit"] = limit
        return _json_response(200, _paginate(rows, page, limit, base, query))


def _paginate(rows: list[_Entry], page: int, limit: int, base: str, query: JSONDict) -> JSONDict:
    """Laravel's LengthAwarePaginator shape for one page of `rows`; `query` goes into the links."""
    total = len(rows)
    last_page = max(1, -(-total // limit))
    start = (page - 1) * limit
    chunk = rows[start : start + limit]

    def link(number: int) -> str:
        return f"{base}?{urlencode(query | {'page': number}, quote_via=quote)}"

    return {
        "data": [e.api() for e in chunk],
        "links": {
            "first": link(1),
            "last": link(last_page),
            "prev": link(page - 1) if page > 1 else None,
            "next": link(page + 1) if page < last_page else None,
        },
        "meta": {
            "current_page": page,
            "from": start + 1 if chunk else None,
            "last_page": last_page,
            "path": base,
            "per_page": limit,
            "to": start + len(chunk) if chunk else None,
            "total": total,
        },
        "status": 1,
    }


_NOT_FOUND: Final = {"message": "Transaction not found", "status": 0}
_BULK_SHAPE: Final = (
    'expected {"transactions": [{"key": str, "amount": number, "amount_units": str, '
    '"customer": str, "created_at": Unix seconds}, ...]}'
)


def _bulk_item_ok(item: object) -> bool:
    """One entry of POST /_fake/ledger/bulk: a key, and the optional fields of their types."""
    if not isinstance(item, dict) or not isinstance(item.get("key"), str):
        return False
    amount, stamp = item.get("amount", 0), item.get("created_at", 0)
    return (
        _is_number(amount)
        and _is_number(stamp)
        and isinstance(item.get("amount_units", ""), str)
        and isinstance(item.get("customer", ""), str)
    )


_TAMPER: Final = ("delete", "purge", "duplicate", "amend", "revive")


def _valid_amendment(amended: JSONDict) -> bool:
    """An amend's changes: at least one, amount a number, amount_units a non-empty string."""
    amount, units = amended.get("amount", 0), amended.get("amount_units", "EUR")
    return bool(amended) and _is_number(amount) and isinstance(units, str) and units != ""


# What PHP's filter_var(FILTER_VALIDATE_INT), behind Laravel's `integer` rule, accepts.
_INTEGER: Final = re.compile(r"\s*[+-]?(?:0|[1-9][0-9]*)\s*")


def _int_param(
    params: dict[str, str], name: str, default: int, most: int | None, errors: dict[str, list[str]]
) -> int:
    """A Laravel ``integer|min:1|max:most`` query parameter (empty or absent: the default)."""
    text = params.get(name, "")
    if text == "":
        return default
    if not _INTEGER.fullmatch(text):
        errors[name] = [f"The {name} field must be an integer."]
        return default
    value = int(text)
    if value < 1:
        errors[name] = [f"The {name} field must be at least 1."]
    elif most is not None and value > most:
        errors[name] = [f"The {name} field must not be greater than {most}."]
    return value


def _validate_create(body: object) -> tuple[JSONDict, dict[str, list[str]]]:
    """Laravel-style validation of a create body: (body as dict, errors)."""
    data: JSONDict = body if isinstance(body, dict) else {}
    errors: dict[str, list[str]] = {}
    customer = data.get("customer")
    ckey = cemail = None
    if customer is not None and not isinstance(customer, dict):
        errors["customer"] = ["The customer field must be an array."]
    elif isinstance(customer, dict):
        ckey, cemail = customer.get("key"), customer.get("email")
        _check_strings(customer, ("key", "email"), errors, "customer.")
    if not ckey and not cemail and "customer" not in errors:
        errors.setdefault(
            "customer.key",
            ["The customer.key field is required when customer.email is not present."],
        )
        errors.setdefault(
            "customer.email",
            ["The customer.email field is required when customer.key is not present."],
        )
    amount, reward = data.get("amount"), data.get("reward")
    for name, value in (("amount", amount), ("reward", reward)):
        if value is not None and not _is_number(value):
            errors[name] = [f"The {name} field must be a number."]
    if amount is None and reward is None:
        errors["amount"] = ["The amount field is required."]
    _check_strings(data, ("key", "amount_units", "action"), errors)
    created_at = data.get("created_at")
    if created_at is not None and (not isinstance(created_at, int) or isinstance(created_at, bool)):
        errors["created_at"] = ["The created_at field must be an integer."]
    elif created_at is not None and not _MIN_TIMESTAMP <= created_at <= _MAX_TIMESTAMP:
        errors["created_at"] = ["The created_at field must be a valid Unix timestamp."]
    return data, errors


# What datetime.fromtimestamp can turn into a date (years 1 to 9999, UTC).
_MIN_TIMESTAMP: Final = -62135596800
_MAX_TIMESTAMP: Final = 253402300799


# ---- the customers -----------------------------------------------------------------------------

_NO_CUSTOMER: Final = {"message": "Customer not found", "status": 0}
_IGNORED: Final = _json_response(200, {"data": None, "status": 1})
_DUPLICATE_CUSTOMER: Final = _json_response(422, {"message": "Duplicate key", "status": 0})
_INVALID_PARTNER: Final = _json_response(400, {"message": "Invalid partner key", "status": 0})
# The fake's stand-in for Laravel's email rule: no spaces, one "@" with text on both sides.
_EMAIL: Final = re.compile(r"[^@\s]+@[^@\s]+")


@dataclass(slots=True)
class _Customer:
    key: str
    email: str | None
    partner: JSONDict | None  # the matched partner (a copy); None when none was named
    created_seq: int
    source: str  # "api" or "admin"
    name: str | None = None
    surname: str | None = None
    tags: list[str] = field(default_factory=list)
    referral_url: str | None = None
    created_at: str = field(default_factory=_now_iso)

    def admin(self) -> JSONDict:
        return {
            "key": self.key,
            "email": self.email,
            "partner": self.partner["key"] if self.partner is not None else None,
            "created_seq": self.created_seq,
            "created_at": self.created_at,
            "source": self.source,
        }

    def api(self) -> JSONDict:
        """The customer as Partnero's create and read answers show it."""
        return {
            "key": self.key,
            "email": self.email,
            "name": self.name,
            "surname": self.surname,
            "tags": list(self.tags),
            "referral_url": self.referral_url,
            "partner": dict(self.partner) if self.partner is not None else None,
            "created_at": self.created_at,
        }


class _Customers:
    """Partnero's customers: the registry in creation order, indexed by key and by email
    (casefolded), and the calls on it: create, read, and the check a sale makes."""

    __slots__ = ("_by_email", "_by_key", "_config", "entries")

    def __init__(self, config: FakeConfig) -> None:
        self._config = config  # for partners, unknown_customers and customers_must_exist
        self.entries: list[_Customer] = []
        self._by_key: dict[str, _Customer] = {}
        self._by_email: dict[str, _Customer] = {}

    def clear(self) -> None:
        self.entries.clear()
        self._by_key.clear()
        self._by_email.clear()

    def admin(self) -> list[JSONDict]:
        """Every customer in creation order, as the admin API shows it (copies)."""
        return [c.admin() for c in self.entries]

    def counts(self) -> JSONDict:
        api = sum(1 for c in self.entries if c.source == "api")
        return {"entries": len(self.entries), "api": api, "admin": len(self.entries) - api}

    def create(self, body: object, seq: int) -> _Response:
        """POST /v1/customers by call `seq`; the checks are in the module docstring."""
        data, errors = _validate_customer(body)
        key, email = data.get("key"), data.get("email") or None
        if "email" not in errors and email is not None:
            holder = self._by_email.get(email.casefold())
            if holder is not None and holder.key != key:
                errors["email"] = ["The email has already been taken."]
        if errors:
            return _invalid(errors)
        ref = _partner_ref(data.get("partner"))
        if ref is None:
            return _IGNORED
        if key in self._by_key:
            return _DUPLICATE_CUSTOMER
        partner = _find_partner(self._config.partners, *ref)
        if partner is None:
            return _INVALID_PARTNER
        options = data.get("options") or {}
        customer = _Customer(
            data["key"],  # a string: validated
            email,
            partner,
            seq,
            "api",
            name=data.get("name"),
            surname=data.get("surname"),
            tags=list(data.get("tags") or ()),
            referral_url=options.get("referral_url"),
        )
        self._add(customer)
        self._config.unknown_customers.difference_update((key, email or ""))
        return _json_response(201, {"data": customer.api(), "status": 1})

    def show(self, key: str) -> _Response:
        """GET /v1/customers/{key}: 200, or 404 Customer not found."""
        customer = self._by_key.get(key)
        if customer is None:
            return _json_response(404, _NO_CUSTOMER)
        return _json_response(200, {"data": customer.api(), "status": 1})

    def admit(self, customer: JSONDict, options: object, seq: int) -> bool:
        """Whether a sale by call `seq` naming `customer` goes on ("Sales and the registry" in the
        module docstring); with options.create_customer an unknown customer is registered."""
        ckey: str | None = customer.get("key") or None
        cemail: str | None = customer.get("email") or None
        unknown = self._config.unknown_customers
        known = ckey not in unknown and cemail not in unknown
        if known and self._config.customers_must_exist:
            known = self._find(ckey, cemail) is not None
        if known:
            return True
        if not (isinstance(options, dict) and options.get("create_customer") is True):
            return False
        unknown.difference_update((ckey or "", cemail or ""))
        key = ckey or cemail
        if key is not None and key not in self._by_key:
            taken = cemail is not None and cemail.casefold() in self._by_email
            ref = _partner_ref(customer.get("partner"))
            partner = _find_partner(self._config.partners, *ref) if ref is not None else None
            self._add(_Customer(key, None if taken else cemail, partner, seq, "api"))
        return True

    def register(self, keys: Iterable[str], seq: int) -> None:
        """Admin: a customer (source "admin") for each key not registered yet."""
        for key in keys:
            if key not in self._by_key:
                self._add(_Customer(key, None, None, seq, "admin"))

    def remove(self, names: Iterable[str]) -> None:
        """Admin: remove every customer whose key or email (case aside) is one of `names`."""
        keys = set(names)
        emails = {name.casefold() for name in keys}
        kept = [
            c
            for c in self.entries
            if c.key not in keys and (c.email is None or c.email.casefold() not in emails)
        ]
        self.clear()
        for customer in kept:
            self._add(customer)

    def _find(self, key: str | None, email: str | None) -> _Customer | None:
        """The customer a sale names: by key; with only an email, by email or by that key."""
        if key is not None:
            return self._by_key.get(key)
        if email is None:
            return None
        return self._by_email.get(email.casefold()) or self._by_key.get(email)

    def _add(self, customer: _Customer) -> None:
        self.entries.append(customer)
        self._by_key[customer.key] = customer
        if customer.email is not None:
            self._by_email.setdefault(customer.email.casefold(), customer)


def _check_strings(
    data: JSONDict, names: Iterable[str], errors: dict[str, list[str]], prefix: str = ""
) -> None:
    """Laravel's ``nullable|string`` on each of `names` in `data`; errors named prefix + name."""
    for name in names:
        value = data.get(name)
        if value is not None and not isinstance(value, str):
            errors[prefix + name] = [f"The {prefix}{name} field must be a string."]


def _validate_customer(body: object) -> tuple[JSONDict, dict[str, list[str]]]:
    """Laravel-style validation of a customer create body: (body as dict, errors). The email's
    uniqueness is the registry's to check."""
    data: JSONDict = body if isinstance(body, dict) else {}
    errors: dict[str, list[str]] = {}
    key = data.get("key")
    if key is None or key == "":
        errors["key"] = ["The key field is required."]
    elif isinstance(key, str) and len(key) > 255:
        errors["key"] = ["The key field must not be greater than 255 characters."]
    _check_strings(data, ("key", "email", "name", "surname"), errors)
    email = data.get("email")
    if isinstance(email, str) and email and not _EMAIL.fullmatch(email):
        errors["email"] = ["The email field must be a valid email address."]
    tags = data.get("tags")
    if tags is not None and not isinstance(tags, list):
        errors["tags"] = ["The tags field must be an array."]
    elif tags is not None:
        numbered = {str(i): tag for i, tag in enumerate(tags)}
        _check_strings(numbered, numbered, errors, "tags.")
    for name, fields in (("options", ("referral_url",)), ("partner", ("key", "email"))):
        value = data.get(name)
        if value is not None and not isinstance(value, dict):
            errors[name] = [f"The {name} field must be an array."]
        elif value is not None:
            _check_strings(value, fields, errors, f"{name}.")
    partner = data.get("partner")
    partner_id = partner.get("id") if isinstance(partner, dict) else None
    if partner_id is not None and (
        isinstance(partner_id, bool) or not isinstance(partner_id, int | str)
    ):
        errors["partner.id"] = ["The partner.id field must be a string."]
    return data, errors


def _partner_ref(partner: object) -> tuple[str, str] | None:
    """A signup's partner reference: (field, value as text) of the first non-empty of
    partner.key, .id and .email; None when there is none."""
    if isinstance(partner, dict):
        for name in ("key", "id", "email"):
            value = partner.get(name)
            if isinstance(value, str | int) and not isinstance(value, bool) and value != "":
                return name, str(value)
    return None


def _find_partner(partners: list[JSONDict], name: str, value: str) -> JSONDict | None:
    """A copy of the partner whose `name` is `value` (key and id as text, email case aside)."""
    for partner in partners:
        theirs = str(partner[name])
        if theirs == value or (name == "email" and theirs.casefold() == value.casefold()):
            return dict(partner)
    return None


# ---- the API: routing, auth, odd answers ---------------------------------------------------------

_OK: Final = _json_response(200, {"status": 1})
_UNAUTHENTICATED: Final = _json_response(401, {"message": "Unauthenticated."})
_FORBIDDEN: Final = _json_response(403, {"message": "This action is unauthorized."})
_MALFORMED_JSON: Final = _json_response(400, {"message": "Malformed JSON"})
_KEY_REQUIRED: Final = _invalid({"key": ["The key field is required."]})
_ODD_FIXED: Final = {
    "status_0": _json_response(200, {"status": 0}),
    "html_200": _Response(200, _HTML_200, "text/html; charset=UTF-8"),
    "empty_200": _Response(200, b"", _JSON),
    "html_404": _Response(404, _HTML_404, "text/html"),
    "html_502": _Response(502, _HTML_502, "text/html"),
    "bad_request": _json_response(400, {"message": "Duplicate customer key", "status": 0}),
    "forbidden": _FORBIDDEN,
}


def _laravel_path(req: _Request) -> str:
    """Laravel's $request->path(): the path as sent (not decoded), without outer slashes."""
    return req.path.strip("/") or "/"


def _route_not_found(req: _Request) -> _Response:
    return _json_response(404, {"message": f"The route {_laravel_path(req)} could not be found."})


def _method_not_allowed(req: _Request, allowed: tuple[str, ...]) -> _Response:
    methods = ", ".join(allowed)
    return _json_response(
        405,
        {
            "message": f"The {req.method} method is not supported for route "
            f"{_laravel_path(req)}. Supported methods: {methods}."
        },
        (("Allow", methods),),
    )


def _odd_response(answer: str, req: _Request) -> _Response:
    if answer == "route_404":
        return _route_not_found(req)
    return _ODD_FIXED[answer]


class _Api:
    """The API calls as Laravel and Partnero answer them when no random fault is drawn: the route
    (matched on the decoded path), 405, auth (401), ``forbidden`` (403), the odd answers, and then
    the call on the ledger or the customers."""

    __slots__ = ("_config", "_customers", "_ledger", "_list_url")

    def __init__(
        self,
        config: FakeConfig,
        ledger: _Ledger,
        customers: _Customers,
        list_url: Callable[[], str],
    ) -> None:
        self._config = config
        self._ledger = ledger
        self._customers = customers
        self._list_url = list_url  # GET /v1/transactions's own URL, for the paginator's links

    def answer(self, req: _Request, entry: JSONDict) -> _Response:
        """The answer to the API call `req`, logged as `entry` (which gets the odd-answer fault)."""
        method = req.method
        name, key = req.route
        if name is None:
            return _route_not_found(req)
        allowed = _ALLOWED[name]
        if method not in allowed:
            return _method_not_allowed(req, allowed)
        if not self._authorized(req):
            return _UNAUTHENTICATED
        if self._config.forbidden:
            return _FORBIDDEN
        if name == _TEST:
            return _OK
        ledger = self._ledger
        seq: int = entry["seq"]
        if name == _CUSTOMER:
            assert key is not None
            return self._customers.show(key)
        if name == _TRANSACTION:
            assert key is not None
            return self._odd_or(req, entry, key, lambda: ledger.delete(key, seq))
        if method == "GET":
            return ledger.page(req.params(), self._list_url())
        body = req.json()
        if body is _MALFORMED:
            return _MALFORMED_JSON
        body_key = body.get("key") if isinstance(body, dict) else None
        if method == "POST":
            create = self._customers.create if name == _CUSTOMERS else ledger.create
            return self._odd_or(req, entry, body_key, lambda: create(body, seq))
        if not isinstance(body_key, str) or not body_key:
            return _KEY_REQUIRED
        return self._odd_or(req, entry, body_key, lambda: ledger.delete(body_key, seq))

    def _authorized(self, req: _Request) -> bool:
        expected = self._config.api_key
        if expected is None:
            return True
        scheme, _, token = req.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            token.strip().encode("latin-1"), expected.encode()
        )

    def _odd_or(
        self, req: _Request, entry: JSONDict, key: object, apply: Callable[[], _Response]
    ) -> _Response:
        """`apply()`'s answer, or the odd answer configured for `key` (after applying the call
        first if asked)."""
        odd = self._config.odd_answers
        if not odd or not isinstance(key, str) or key not in odd:
            return apply()
        spec = odd[key]
        times = spec["times"]
        if times is not None:
            if times <= 1:
                del odd[key]
            else:
                spec["times"] = times - 1
        answer: str = spec["answer"]
        entry["fault"] = f"odd:{answer}"
        if spec["applied"]:
            entry["would_status"] = apply().status
        return _odd_response(answer, req)


# ---- the random faults -------------------------------------------------------------------------

_SERVER_ERRORS: Final = {
    500: _json_response(500, {"message": "Server Error"}),
    502: _Response(502, _HTML_502, "text/html"),
    503: _json_response(503, {"message": "Service Unavailable"}),
}
# The state of a call a fault drawn after applying it leaves in the request log.
_AFTER_STATUS: Final = {"drop_after": "dropped_after", "hang_after": "hung_after"}


class _Faults:
    """The faults an API call may get instead of, or after, its real answer: the outage, then the
    random ones, drawn in the documented order from one ``random.Random(seed)``, each only when
    its rate is above zero."""

    __slots__ = ("_config", "_rng")

    def __init__(self, config: FakeConfig) -> None:
        self._config = config
        self._rng = random.Random(config.seed)

    def reseed(self) -> None:
        self._rng = random.Random(self._config.seed)

    def before(self, faulty: bool) -> tuple[str, _Response | None] | None:
        """The fault that replaces the call, or None: (fault, its answer or None for closing the
        connection unanswered). Only an outage hits a call that is not `faulty`."""
        cfg, rng = self._config, self._rng
        if cfg.outage is not None:
            # Other than "503": a call on a connection that outlived "refuse", or a race with
            # "timeout"; either way it is dropped.
            return "outage", (self._unavailable() if cfg.outage == "503" else None)
        if not faulty:
            return None
        if cfg.drop_before_rate > 0 and rng.random() < cfg.drop_before_rate:
            return "drop_before", None
        if cfg.rate_429 > 0 and rng.random() < cfg.rate_429:
            return "rate_429", _json_response(
                429, {"message": "Too Many Attempts."}, self._retry_after()
            )
        if cfg.fail_5xx_rate > 0 and rng.random() < cfg.fail_5xx_rate:
            return "fail_5xx", _SERVER_ERRORS[rng.choice((500, 502, 503))]
        return None

    def after(self) -> str | None:
        """The fault drawn once a faulty call is applied: "drop_after", "hang_after" or None."""
        cfg, rng = self._config, self._rng
        if cfg.drop_after_rate > 0 and rng.random() < cfg.drop_after_rate:
            return "drop_after"
        if cfg.hang_after_rate > 0 and rng.random() < cfg.hang_after_rate:
            return "hang_after"
        return None

    def _retry_after(self) -> tuple[tuple[str, str], ...]:
        seconds = self._config.retry_after_seconds
        if seconds is None:
            return ()
        text = str(int(seconds)) if seconds == int(seconds) else repr(seconds)
        return (("Retry-After", text),)

    def _unavailable(self) -> _Response:
        return _json_response(503, {"message": "Service Unavailable"}, self._retry_after())


# ---- the request log and the admin calls -------------------------------------------------------


def _request_subject(req: _Request) -> tuple[str | None, str | None, str | None]:
    """(resource, key, customer_key) of an API call as the request log shows them (see the
    module docstring); Nones for calls on no resource."""
    name, key = req.route
    if req.is_admin or name is None or name == _TEST:
        return None, None, None
    resource = _RESOURCES[name]
    if key is not None:  # the {key} routes
        return resource, key, (key if name == _CUSTOMER else None)
    if req.method == "GET":
        return resource, req.params().get("key") or None, None
    body = req.json()
    if not isinstance(body, dict):
        return resource, None, None
    body_key = _text(body.get("key"))
    if name == _CUSTOMERS:
        return resource, body_key, body_key
    customer = body.get("customer")
    if req.method == "POST" and isinstance(customer, dict):
        return resource, body_key, _text(customer.get("key"))
    return resource, body_key, None


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


class _RequestLog:
    """Every API call (not admin calls) in the order the fake acted on it; ``seq`` numbers them."""

    __slots__ = ("_seq", "entries")

    def __init__(self) -> None:
        self.entries: list[JSONDict] = []
        self._seq = 0

    @property
    def last_seq(self) -> int:
        """The seq of the last call logged (0: none since the start or the last reset)."""
        return self._seq

    def add(self, req: _Request, status: int | str | None = None) -> JSONDict:
        """Log the API call `req`; the entry returned is updated as the call goes on."""
        self._seq += 1
        resource, key, customer_key = _request_subject(req)
        entry: JSONDict = {
            "seq": self._seq,
            "method": req.method,
            "path": req.path,
            "resource": resource,
            "key": key,
            "customer_key": customer_key,
            "status": status,
            "message": None,
            "fault": None,
            "received_at": req.received_at,
            "time": time.time(),
        }
        self.entries.append(entry)
        return entry

    def clear(self) -> None:
        self.entries.clear()
        self._seq = 0

    def copies(self) -> list[JSONDict]:
        return [dict(e) for e in self.entries]

    def counts(self) -> JSONDict:
        """The number of calls, by method, by status and by both."""
        by_method: Counter[str] = Counter()
        by_status: Counter[str] = Counter()
        by_both: Counter[str] = Counter()
        for e in self.entries:
            status = str(e["status"])
            by_method[e["method"]] += 1
            by_status[status] += 1
            by_both[f"{e['method']} {status}"] += 1
        return {
            "requests": len(self.entries),
            "by_method": dict(by_method),
            "by_status": dict(by_status),
            "by_method_status": dict(by_both),
        }


class _Admin:
    """The admin calls under /_fake/ (no auth, never faulted), on the fake's public methods."""

    _ROUTES: Final = {
        "/_fake/ledger": "GET",
        "/_fake/requests": "GET",
        "/_fake/stats": "GET",
        "/_fake/config": "GET, POST",
        "/_fake/customers": "POST",
        "/_fake/reset": "POST",
        "/_fake/tamper": "POST",
        "/_fake/ledger/bulk": "POST",
    }

    def __init__(self, fake: FakePartnero) -> None:
        self._fake = fake

    @staticmethod
    def needs_async(req: _Request) -> bool:
        """Whether the call must run as a task: only POST /_fake/config awaits anything."""
        return req.method == "POST" and req.path == "/_fake/config"

    async def answer_later(self, conn: _HttpProtocol, req: _Request) -> _Response:
        if self.needs_async(req):
            return await self._post_config(conn, req)
        return self.answer(req)

    def answer(self, req: _Request) -> _Response:
        """The answer to any admin call but POST /_fake/config (see answer_later)."""
        path, method = req.path, req.method
        allowed = self._ROUTES.get(path)
        if allowed is None:
            return _json_response(404, {"message": "Not found"})
        if method not in allowed.split(", "):
            return _json_response(
                405, {"message": f"{method} not allowed on {path}"}, (("Allow", allowed),)
            )
        fake = self._fake
        if method == "GET":
            if path == "/_fake/ledger":
                return _json_response(
                    200, {"transactions": fake.ledger(), "customers": fake.customers()}
                )
            if path == "/_fake/requests":
                return _json_response(200, {"requests": fake._log.entries})
            if path == "/_fake/stats":
                return _json_response(200, fake.stats())
            return _json_response(200, fake.config.public())
        if path == "/_fake/reset":
            fake.reset()
            return _json_response(200, {"status": 1})
        if path == "/_fake/tamper":
            body = req.json()
            return _MALFORMED_JSON if body is _MALFORMED else fake._tamper(body)
        if path == "/_fake/ledger/bulk":
            body = req.json()
            if body is _MALFORMED:
                return _MALFORMED_JSON
            loaded = fake._ledger.bulk(body, fake._log.last_seq)
            fake._changed()
            return loaded
        return self._post_customers(req)

    def _post_customers(self, req: _Request) -> _Response:
        body = req.json()
        if body is _MALFORMED:
            return _MALFORMED_JSON
        lists = {}
        for name in ("unknown", "known"):
            value = body.get(name, []) if isinstance(body, dict) else None
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                return _json_response(400, {"message": f"{name} must be a list of strings"})
            lists[name] = value
        fake = self._fake
        fake.set_customers(lists["unknown"], lists["known"])
        unknown = sorted(fake.config.unknown_customers)
        registered = [c["key"] for c in fake.customers()]
        return _json_response(200, {"unknown_customers": unknown, "customers": registered})

    async def _post_config(self, conn: _HttpProtocol, req: _Request) -> _Response:
        body = req.json()
        if body is _MALFORMED:
            return _MALFORMED_JSON
        if not isinstance(body, dict):
            return _json_response(400, {"message": "Expected a JSON object"})
        changes = dict(body)
        outage_for = changes.pop("outage_for_seconds", None)
        try:
            await self._fake._configure(changes, outage_for, conn)
        except ValueError as exc:
            return _json_response(400, {"message": str(exc)})
        except OSError as exc:
            return _json_response(500, {"message": f"cannot listen again: {exc.strerror}"})
        return _json_response(200, self._fake.config.public())


# ---- the server --------------------------------------------------------------------------------


class _Listener:
    """The listening socket and the open connections. A "refuse" outage closes the socket and
    drops every connection; a "timeout" outage holds calls until it ends."""

    def __init__(self, fake: FakePartnero) -> None:
        self._fake = fake
        self.host = "127.0.0.1"
        self.port = 0
        self.started = False
        self.stopping = False
        self.connections: set[_HttpProtocol] = set()
        self.accepted = 0  # connections accepted since start or reset
        self._server: asyncio.AbstractServer | None = None
        self._release: asyncio.Event | None = None  # set when a "timeout" outage ends

    @property
    def url(self) -> str:
        if not self.started:
            raise RuntimeError("FakePartnero is not started")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def start(self, host: str, port: int, outage: str | None) -> None:
        if self.started:
            raise RuntimeError("FakePartnero is already started")
        self.host, self.port = host, port
        await self._listen()
        self.started = True
        if outage == "refuse":
            await self._unlisten(None)

    async def stop(self, tasks: list[asyncio.Task[None]]) -> None:
        """Close the socket and every connection, release held calls, and wait for `tasks`."""
        self.stopping = True
        if self._server is not None:
            self._server.close()
        if self._release is not None:
            self._release.set()
        await self._abort_all(tasks, keep=None)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def apply_outage(
        self, old: str | None, new: str | None, conn: _HttpProtocol | None
    ) -> None:
        """Go from outage `old` to `new`; `conn` (making the change) may still send its answer."""
        if old == "timeout" and new != "timeout" and self._release is not None:
            self._release.set()
            self._release = None
        if not self.started or self.stopping:
            return
        if new == "refuse" and self._server is not None:
            await self._unlisten(conn)
        elif new != "refuse" and self._server is None:
            await self._listen()

    async def held(self) -> None:
        """Return once the "timeout" outage ends (or the fake stops)."""
        if self._release is None:
            self._release = asyncio.Event()
        await self._release.wait()

    async def _listen(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _HttpProtocol(self._fake, self),
            self.host,
            self.port,
            backlog=1024,
            reuse_address=True,
        )
        if self.port == 0:
            self.port = int(self._server.sockets[0].getsockname()[1])

    async def _unlisten(self, keep: _HttpProtocol | None) -> None:
        """Stop listening and drop every connection (but let `keep` send its answer first)."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        await self._abort_all([], keep)
        if keep is None:
            await server.wait_closed()

    async def _abort_all(self, tasks: list[asyncio.Task[None]], keep: _HttpProtocol | None) -> None:
        """Abort every connection but `keep`; return once they are closed and their tasks done."""
        waits: list[asyncio.Future[None]] = list(tasks)
        for conn in list(self.connections):
            if conn is keep:
                conn.close_after_response = True
                continue
            if conn.task is not None:
                waits.append(conn.task)
            waits.append(conn.lost)
            conn.abort()
        if waits:
            await asyncio.gather(*waits, return_exceptions=True)


class _Address:
    """``url`` and ``port`` of a fake, read from its _Listener (set only while it starts, so
    they may be read from any thread)."""

    _listener: _Listener

    @property
    def url(self) -> str:
        return self._listener.url

    @property
    def port(self) -> int:
        return self._listener.port


class FakePartnero(_Address):
    """The fake, inside the running event loop. Use FakePartneroThread from synchronous code.

    ``config`` is the live FakeConfig: plain fields may be set directly from the loop's thread;
    changes to ``outage`` (which opens/closes the socket and releases held calls) and ``seed``
    take effect only through ``await configure(...)``.
    """

    def __init__(self, config: FakeConfig | None = None) -> None:
        self._config = config if config is not None else FakeConfig()
        self._customers = _Customers(self._config)
        self._ledger = _Ledger(self._config, self._customers)
        self._log = _RequestLog()
        self._faults = _Faults(self._config)
        self._api = _Api(
            self._config, self._ledger, self._customers, lambda: f"{self.url}/v1/transactions"
        )
        self._admin = _Admin(self)
        self._listener = _Listener(self)
        self._outage_task: asyncio.Task[None] | None = None  # clears an outage after a while
        self._version = 0  # bumped on every change, for wait_for
        self._cond = threading.Condition()
        self._waiters: list[asyncio.Future[None]] = []

    # -- public API

    @property
    def config(self) -> FakeConfig:
        return self._config

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """Listen on host:port (0 picks a free port; see .url)."""
        await self._listener.start(host, port, self._config.outage)

    async def stop(self) -> None:
        """Close the socket and every connection; calls in flight are not answered."""
        listener = self._listener
        if not listener.started or listener.stopping:
            return
        tasks: list[asyncio.Task[None]] = []
        if self._outage_task is not None:
            self._outage_task.cancel()
            tasks.append(self._outage_task)
            self._outage_task = None
        await listener.stop(tasks)
        self._changed()

    async def configure(
        self, *, outage_for_seconds: float | None = None, **changes: Any
    ) -> FakeConfig:
        """Change config fields (validated; ValueError when bad) and apply outage changes.

        With ``outage_for_seconds`` the outage set now is cleared after that many seconds.
        """
        return await self._configure(changes, outage_for_seconds, None)

    def ledger(self) -> list[JSONDict]:
        """Every ledger entry in creation order (copies)."""
        return self._ledger.admin()

    def customers(self) -> list[JSONDict]:
        """Every customer of the registry in creation order (copies)."""
        return self._customers.admin()

    def requests(self) -> list[JSONDict]:
        """Every API call in the order the fake acted on it (copies)."""
        return self._log.copies()

    def stats(self) -> JSONDict:
        connections = self._listener.connections
        return self._log.counts() | {
            "ledger": self._ledger.counts(),
            "customers": self._customers.counts(),
            "connections": {"accepted": self._listener.accepted, "open": len(connections)},
        }

    def set_customers(self, unknown: Iterable[str] = (), known: Iterable[str] = ()) -> None:
        """Mark customers (keys or emails) unknown: out of the registry and into
        unknown_customers; or known: out of unknown_customers and registered by key."""
        unknown, known = list(unknown), list(known)
        unknown_set = self._config.unknown_customers
        unknown_set.update(unknown)
        unknown_set.difference_update(known)
        self._customers.remove(unknown)
        self._customers.register(known, self._log.last_seq)
        self._changed()

    def tamper(self, action: str, key: str, **fields: Any) -> list[JSONDict]:
        """Change the ledger entries of `key` behind the API's back (see "Tampering" in the
        module docstring): the entries changed, as the admin API shows them. ValueError when
        the change is malformed or nothing has that key."""
        response = self._tamper({"action": action, "key": key, **fields})
        answer = json.loads(response.body)
        if response.status != 200:
            raise ValueError(answer["message"])
        changed: list[JSONDict] = answer["transactions"]
        return changed

    def load_ledger(self, transactions: list[JSONDict]) -> int:
        """Append ledger entries as they stand (see POST /_fake/ledger/bulk): how many.
        ValueError when one is malformed."""
        response = self._ledger.bulk({"transactions": transactions}, self._log.last_seq)
        self._changed()
        answer = json.loads(response.body)
        if "added" not in answer:
            raise ValueError(answer["message"])
        return int(answer["added"])

    def _tamper(self, change: object) -> _Response:
        response = self._ledger.tamper(change, self._log.last_seq)
        self._changed()
        return response

    def reset(self) -> None:
        """Clear the ledger (customers too), the request log and the sequence counter (not the
        config)."""
        self._ledger.clear()
        self._customers.clear()
        self._log.clear()
        self._listener.accepted = 0
        self._changed()

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        """Return once predicate() is true, re-checking after every change; else TimeoutError."""
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):
            while not predicate():
                fut: asyncio.Future[None] = loop.create_future()
                self._waiters.append(fut)
                await fut

    # -- internals: config, outages and change notices

    async def _configure(
        self,
        changes: dict[str, Any],
        outage_for_seconds: float | None,
        conn: _HttpProtocol | None,
    ) -> FakeConfig:
        clean = _validate_changes(changes)
        if outage_for_seconds is not None and (
            not _is_number(outage_for_seconds) or not 0 < outage_for_seconds < math.inf
        ):
            raise ValueError("outage_for_seconds must be a number > 0")
        old_outage = self._config.outage
        for name, value in clean.items():
            setattr(self._config, name, value)
        if "seed" in clean:
            self._faults.reseed()
        if "outage" in clean or outage_for_seconds is not None:
            if self._outage_task is not None and self._outage_task is not asyncio.current_task():
                self._outage_task.cancel()
            self._outage_task = None
            await self._listener.apply_outage(old_outage, self._config.outage, conn)
            if outage_for_seconds is not None and self._config.outage is not None:
                self._outage_task = asyncio.get_running_loop().create_task(
                    self._clear_outage_after(outage_for_seconds)
                )
        self._changed()
        return self._config

    async def _clear_outage_after(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        self._outage_task = None
        await self._configure({"outage": None}, None, None)

    def _changed(self) -> None:
        with self._cond:
            self._version += 1
            self._cond.notify_all()
        if self._waiters:
            waiters, self._waiters = self._waiters, []
            for fut in waiters:
                if not fut.done():
                    fut.set_result(None)

    # -- internals: answering the calls (called by _HttpProtocol)

    def _needs_async(self, req: _Request) -> bool:
        if req.is_admin:
            return self._admin.needs_async(req)
        return self._config.latency_ms > 0 or self._config.outage == "timeout"

    def _handle_now(self, conn: _HttpProtocol, req: _Request) -> None:
        if req.is_admin:
            conn.send(self._admin.answer(req), req.keep_alive)
        else:
            self._answer(conn, req)

    async def _handle_later(self, conn: _HttpProtocol, req: _Request) -> None:
        if req.is_admin:
            conn.send(await self._admin.answer_later(conn, req), req.keep_alive)
            return
        latency = self._config.latency_ms
        if latency > 0:
            try:
                await asyncio.sleep(latency / 1000.0)
            except asyncio.CancelledError:
                self._log_unanswered(req, conn.unanswered_status)
                raise
            if conn.closed:
                self._log_unanswered(req, conn.unanswered_status)
                return
        if self._config.outage == "timeout":
            await self._hold(conn, req)
        else:
            self._answer(conn, req)

    def _log_unanswered(self, req: _Request, status: str) -> None:
        if not req.is_admin:
            self._log.add(req, status)
            self._changed()

    async def _hold(self, conn: _HttpProtocol, req: _Request) -> None:
        """A "timeout" outage: never answer; close once the outage ends."""
        entry = self._log.add(req, "pending")
        entry["fault"] = "outage"
        self._changed()
        try:
            await self._listener.held()
        finally:
            entry["status"] = "timeout"
            self._changed()
        conn.close()

    def _answer(self, conn: _HttpProtocol, req: _Request) -> None:
        """Answer an API call: with a fault drawn before it, or for real and maybe then faulted.

        The random faults hit the transaction calls; the key check (GET /v1/test) fails only in
        an outage or with `forbidden`, so a test can fault every call of a row while the daemon's
        start-up check still passes."""
        entry = self._log.add(req)
        faulty = req.path != "/v1/test"
        drawn = self._faults.before(faulty)
        resp: _Response | None
        if drawn is None:
            resp = self._api.answer(req, entry)
            entry["message"] = resp.message
            after = self._faults.after() if faulty else None
            if after is not None:
                entry["status"], entry["fault"] = _AFTER_STATUS[after], after
                entry["would_status"] = resp.status
                if after == "drop_after":
                    conn.close()
                # hang_after: applied, and the answer never comes; the connection stays open
                # until the client gives up or dies (a daemon killed while this call is in flight).
                self._changed()
                return
        else:
            entry["fault"], resp = drawn
            if resp is None:
                entry["status"] = "dropped_before"
                conn.close()
                self._changed()
                return
        entry["status"], entry["message"] = resp.status, resp.message
        conn.send(resp, req.keep_alive)
        self._changed()


# ---- thread runner -------------------------------------------------------------------------------


class FakePartneroThread(_Address):
    """A FakePartnero on its own event loop in a daemon thread, for synchronous code.

    Every method runs on the fake's loop and waits for it, so it is thread-safe. ``config``
    returns a snapshot copy; change the fake with ``configure(...)`` or by assigning a whole
    FakeConfig to ``config``.
    """

    def __init__(
        self,
        config: FakeConfig | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        call_timeout: float = 30.0,
    ) -> None:
        self._fake = FakePartnero(config)
        self._listener = self._fake._listener  # for url and port
        self._host, self._port = host, port
        self._call_timeout = call_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> Self:
        if self._loop is not None:
            raise RuntimeError("FakePartneroThread is already started")
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(
            target=self._run_loop, args=(loop,), name="fake-partnero", daemon=True
        )
        self._thread.start()
        try:
            self._run(self._fake.start(self._host, self._port))
        except BaseException:
            self._close_loop()
            raise
        return self

    def stop(self) -> None:
        if self._loop is None:
            return
        try:
            self._run(self._fake.stop())
        finally:
            self._close_loop()

    @property
    def fake(self) -> FakePartnero:
        """The underlying FakePartnero; touch it only from its loop."""
        return self._fake

    @property
    def config(self) -> FakeConfig:
        return self._call(self._fake.config.copy)

    @config.setter
    def config(self, value: FakeConfig) -> None:
        changes = {f.name: getattr(value, f.name) for f in dataclasses.fields(FakeConfig)}
        self._run(self._fake.configure(**changes))

    def configure(self, *, outage_for_seconds: float | None = None, **changes: Any) -> FakeConfig:
        """Change config fields (see FakePartnero.configure); returns a snapshot."""
        self._run(self._fake.configure(outage_for_seconds=outage_for_seconds, **changes))
        return self.config

    def ledger(self) -> list[JSONDict]:
        return self._call(self._fake.ledger)

    def customers(self) -> list[JSONDict]:
        return self._call(self._fake.customers)

    def requests(self) -> list[JSONDict]:
        return self._call(self._fake.requests)

    def stats(self) -> JSONDict:
        return self._call(self._fake.stats)

    def reset(self) -> None:
        self._call(self._fake.reset)

    def set_customers(self, unknown: Iterable[str] = (), known: Iterable[str] = ()) -> None:
        unknown, known = list(unknown), list(known)
        self._call(lambda: self._fake.set_customers(unknown, known))

    def tamper(self, action: str, key: str, **fields: Any) -> list[JSONDict]:
        """See FakePartnero.tamper."""
        return self._call(lambda: self._fake.tamper(action, key, **fields))

    def load_ledger(self, transactions: list[JSONDict]) -> int:
        """See FakePartnero.load_ledger."""
        return self._call(lambda: self._fake.load_ledger(transactions))

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        """Block until predicate() is true, re-checking after every change; else TimeoutError.

        The predicate runs in the calling thread and may call ledger(), requests(), etc.
        """
        fake = self._fake
        deadline = time.monotonic() + timeout
        while True:
            version = fake._version
            if predicate():
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"condition not met within {timeout} s")

            def changed(seen: int = version) -> bool:
                return fake._version != seen

            with fake._cond:
                fake._cond.wait_for(changed, timeout=remaining)

    # internals

    @staticmethod
    def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
        asyncio.set_event_loop(loop)
        loop.run_forever()

    def _run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        loop = self._loop
        if loop is None or loop.is_closed():
            coro.close()
            raise RuntimeError("FakePartneroThread is not running")
        return asyncio.run_coroutine_threadsafe(coro, loop).result(self._call_timeout)

    def _call(self, fn: Callable[[], _T]) -> _T:
        async def call() -> _T:
            return fn()

        return self._run(call())

    def _close_loop(self) -> None:
        loop, thread = self._loop, self._thread
        self._loop = self._thread = None
        if loop is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        if thread is not None:
            thread.join(self._call_timeout)
        loop.close()


# ---- command line ----------------------------------------------------------------------------


async def _serve(config: FakeConfig, host: str, port: int) -> None:
    fake = FakePartnero(config)
    try:
        await fake.start(host, port)
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    dedupe = "on" if config.dedupe else "off"
    click.echo(f"fake-partnero listening on {fake.url} (dedupe={dedupe})")
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        await fake.stop()


_RATE = click.FloatRange(0.0, 1.0)


@click.command("fake-partnero")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8789, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--api-key-env",
    default="PARTNERO_API_KEY",
    show_default=True,
    metavar="NAME",
    help="Environment variable holding the API key to expect; unset or empty: no auth check.",
)
@click.option(
    "--no-dedupe", is_flag=True, help="Every create adds a ledger entry, even a known key."
)
@click.option(
    "--customers-must-exist",
    is_flag=True,
    help="A sale for a customer never created answers 400 Customer not found, as Partnero does.",
)
@click.option("--latency-ms", default=0.0, type=click.FloatRange(min=0.0), show_default=True)
@click.option("--fail-5xx-rate", default=0.0, type=_RATE, show_default=True)
@click.option("--rate-429", default=0.0, type=_RATE, show_default=True)
@click.option(
    "--retry-after",
    "retry_after_seconds",
    default=None,
    type=click.FloatRange(min=0.0),
    help="Seconds sent in Retry-After with each 429.",
)
@click.option("--drop-before-rate", default=0.0, type=_RATE, show_default=True)
@click.option("--drop-after-rate", default=0.0, type=_RATE, show_default=True)
@click.option("--hang-after-rate", default=0.0, type=_RATE, show_default=True)
@click.option("--seed", default=None, type=int, help="Seed for the random faults.")
def fake_partnero_command(
    host: str, port: int, api_key_env: str, no_dedupe: bool, **options: Any
) -> None:
    """Serve a fake Partnero API (a test and demo tool) until SIGINT or SIGTERM."""
    api_key = os.environ.get(api_key_env) or None
    if api_key is None:
        click.echo(f"warning: {api_key_env} is not set; accepting any API key", err=True)
    # Every other option is named after the FakeConfig field it sets.
    config = FakeConfig(api_key=api_key, dedupe=not no_dedupe, **options)
    asyncio.run(_serve(config, host, port))
