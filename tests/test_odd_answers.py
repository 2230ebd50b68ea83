"""Partnero answers of every odd shape, from a real HTTP server on loopback, through the real
daemon: HTML error pages, empty bodies, invalid JSON, huge bodies, a slow trickle, a body cut
short, a wrong content type, garbage instead of HTTP, a connection closed after the request was
applied, absurd Retry-After values. Each is classified without crashing the daemon, without
storing unbounded data, and without a second transaction at Partnero."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

import pytest
import sqlalchemy as sa

from outbox.partnero import BODY_EXCERPT_CHARS, ERROR_MAX_CHARS
from outbox.policy import DETAIL_MAX_CHARS
from tests.daemon_helpers import DaemonThread, make_settings, rows, wait_until
from tests.helpers import LoopbackServer


def response(
    status: int | str,
    body: bytes = b"",
    *,
    content_type: str = "application/json",
    headers: dict[str, str] | None = None,
    length: int | None = None,
) -> bytes:
    """Raw HTTP/1.1 answer bytes (Connection: close); `length` may lie about the body."""
    reason = "Odd" if isinstance(status, str) else "Status"
    lines = [f"HTTP/1.1 {status} {reason}", f"Content-Type: {content_type}"]
    lines.append(f"Content-Length: {len(body) if length is None else length}")
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


@dataclass(frozen=True)
class Odd:
    """One scripted answer to the next request of `method` for a key."""

    method: str
    raw: bytes = b""  # what to send (nothing: close at once)
    applied: bool = False  # the server applies a create before answering (oddly, or not)
    trickle: bool = False  # send `raw` a byte at a time, slowly, until the client gives up


HTML_500 = b"<!DOCTYPE html><html><head><title>Server Error</title></head><body>" + b"x" * 2000
HUGE = 5 * 1024 * 1024

# key -> (scripted answers, the decision on the first attempt, final status, final outcome)
CASES: dict[str, tuple[list[Odd], str, str, str]] = {
    "html-500": (
        [Odd("POST", response(500, HTML_500, content_type="text/html"))],
        "retry:server_error+lookup",
        "delivered",
        "created",
    ),
    # A 2xx that is not Partnero's JSON: the create may have landed; looked up, never delivered.
    "html-200": (
        [Odd("POST", response(200, b"<html>OK</html>", content_type="text/html"), applied=True)],
        "retry:bad_response+lookup",
        "delivered",
        "created",
    ),
    "empty-502": (
        [Odd("POST", response(502))],
        "retry:server_error+lookup",
        "delivered",
        "created",
    ),
    "empty-201": (
        [Odd("POST", response(201), applied=True)],
        "retry:bad_response+lookup",
        "delivered",
        "created",
    ),
    "invalid-json-503": (
        [Odd("POST", response(503, b'{"message": "Service Unav'))],
        "retry:server_error+lookup",
        "delivered",
        "created",
    ),
    "invalid-json-400": (
        [Odd("POST", response(400, b"{{{ not json at all"))],
        "failed:rejected",
        "failed",
        "rejected",
    ),
    "huge-201": (
        [Odd("POST", response(201, b'{"data": "' + b"y" * HUGE + b'"}'), applied=True)],
        "retry:bad_response+lookup",
        "delivered",
        "created",
    ),
    "huge-500": (
        [Odd("POST", response(500, b"z" * HUGE, content_type="text/plain"))],
        "retry:server_error+lookup",
        "delivered",
        "created",
    ),
    # A 422 without Laravel's `errors` is not Partnero's validation answer: rejected.
    "huge-422": (
        [Odd("POST", response(422, json.dumps({"message": "m" * 100_000}).encode()))],
        "failed:rejected",
        "failed",
        "rejected",
    ),
    "status-0-200": (
        [Odd("POST", response(200, b'{"status": 0}'))],
        "retry:bad_response+lookup",
        "delivered",
        "created",
    ),
    "other-wording-400": (
        [Odd("POST", response(400, b'{"message": "Duplicate customer key", "status": 0}'))],
        "failed:rejected",
        "failed",
        "rejected",
    ),
    "trickle-201": (
        [Odd("POST", response(201, b'{"data": {}}' + b" " * 200), applied=True, trickle=True)],
        "retry:timeout+lookup",
        "delivered",
        "created",
    ),
    "cut-short-201": (
        [Odd("POST", response(201, b'{"data": {"ke', length=500), applied=True)],
        "retry:timeout+lookup",
        "delivered",
        "created",
    ),
    "closed-after-applied": (
        [Odd("POST", b"", applied=True)],
        "retry:timeout+lookup",
        "delivered",
        "created",
    ),
    "closed-before-applied": (
        [Odd("POST", b"")],
        "retry:timeout+lookup",
        "delivered",
        "created",
    ),
    "garbage-not-http": (
        [Odd("POST", b"SMTP READY\r\n\r\n", applied=True)],
        "retry:timeout+lookup",
        "delivered",
        "created",
    ),
    "wrong-type-duplicate": (
        [
            Odd(
                "POST",
                response(400, b'{"message":"Duplicate key","status":0}', content_type="text/plain"),
            )
        ],
        "delivered:duplicate",
        "delivered",
        "duplicate",
    ),
    "redirect-302": (
        [Odd("POST", response(302, b"", headers={"Location": "https://elsewhere.test/"}))],
        "retry:bad_response+lookup",
        "delivered",
        "created",
    ),
    "status-999": (
        [Odd("POST", response(999, b"{}"))],
        "retry:bad_response+lookup",
        "delivered",
        "created",
    ),
    "not-utf8-500": (
        [Odd("POST", response(500, b"\xff\xfe\x80 broken \xc3\x28", content_type="text/plain"))],
        "retry:server_error+lookup",
        "delivered",
        "created",
    ),
    "deep-json-500": (
        [Odd("POST", response(500, b"[" * 30_000 + b"]" * 30_000))],
        "retry:server_error+lookup",
        "delivered",
        "created",
    ),
    "retry-after-absurd-429": (
        [Odd("POST", response(429, b"{}", headers={"Retry-After": "9" * 40}))],
        "retry:rate_limited",
        "delivered",
        "created",
    ),
    "retry-after-year-9999-503": (
        [
            Odd(
                "POST",
                response(503, b"{}", headers={"Retry-After": "Fri, 31 Dec 9999 23:59:59 GMT"}),
            )
        ],
        "retry:server_error+lookup",
        "delivered",
        "created",
    ),
    "huge-header": (
        [Odd("POST", response(201, b"{}", headers={"X-Filler": "f" * 200_000}), applied=True)],
        "retry:timeout+lookup",
        "delivered",
        "created",
    ),
    # Odd answers to the lookup that follows an unknown outcome.
    "lookup-html-200": (
        [
            Odd("POST", b"", applied=True),
            Odd("GET", response(200, b"<html>hi</html>", content_type="text/html")),
        ],
        "retry:timeout+lookup",
        "delivered",
        "created",
    ),
    "lookup-json-array": (
        [Odd("POST", b"", applied=True), Odd("GET", response(200, b"[1, 2, 3]"))],
        "retry:timeout+lookup",
        "delivered",
        "created",
    ),
}
# Refunds: the sale goes through normally, the DELETE gets the odd answer.
REFUND_CASES: dict[str, tuple[list[Odd], str, str, str]] = {
    "refund-huge-html-500": (
        [Odd("DELETE", response(500, b"<html>" + b"e" * HUGE, content_type="text/html"))],
        "retry:server_error+lookup",
        "delivered",
        "deleted",
    ),
    # A 404 without Partnero's "Transaction not found" did not come from Partnero's route.
    "refund-empty-404": (
        [Odd("DELETE", response(404))],
        "retry:bad_response+lookup",
        "delivered",
        "deleted",
    ),
    "refund-route-404": (
        [
            Odd(
                "DELETE",
                response(404, b'{"message": "The route v1/transactions/x could not be found."}'),
            )
        ],
        "retry:bad_response+lookup",
        "delivered",
        "deleted",
    ),
}


async def read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    """A request body: Content-Length or chunked (what any HTTP client may send)."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = b""
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            body += await reader.readexactly(size)
            await reader.readexactly(2)
        await reader.readuntil(b"\r\n")
        return body
    return await reader.readexactly(int(headers.get("content-length", "0")))


class OddServer(LoopbackServer):
    """Plays Partnero on loopback: the scripted odd answers first, then plain good ones (a
    ledger of applied creates answers lookups and deletes). One request per connection."""

    def __init__(self, scripts: dict[str, list[Odd]]) -> None:
        super().__init__()
        self._scripts = {key: list(answers) for key, answers in scripts.items()}
        self.creates: Counter[str] = Counter()
        self.deleted: set[str] = set()
        self.requests: Counter[tuple[str, str]] = Counter()  # (key, method) -> requests read

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            request_line, *header_lines = head.decode("latin-1").split("\r\n")
            method, path, _ = request_line.split(" ")
            headers = {
                name.strip().lower(): value.strip()
                for name, _, value in (line.partition(":") for line in header_lines if line)
            }
            body = await read_body(reader, headers)
            target = urlsplit(path)
            if target.path == "/v1/test":
                writer.write(response(200, b'{"status": 1}'))
                await writer.drain()
                return
            # A lookup names the key in the list filter's query, the others in the JSON body.
            get = method == "GET"
            key = parse_qs(target.query)["key"][0] if get else json.loads(body)["key"]
            self.requests[(key, method)] += 1
            script = self._scripts.get(key, [])
            odd = script.pop(0) if script and script[0].method == method else None
            if odd is None:
                raw = self._good(method, key)
            else:
                if odd.applied and method == "POST":
                    self.creates[key] += 1
                if odd.applied and method == "DELETE":
                    self.deleted.add(key)
                raw = odd.raw
            if odd is not None and odd.trickle:
                for n in range(len(raw)):
                    writer.write(raw[n : n + 1])
                    await writer.drain()
                    # Wait a little for the client to leave (b"" at EOF), then the next byte.
                    try:
                        if await asyncio.wait_for(reader.read(1), timeout=0.05) == b"":
                            break
                    except TimeoutError:
                        continue
            elif raw:
                writer.write(raw)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            self.untrack(writer)

    def _good(self, method: str, key: str) -> bytes:
        if method == "POST":
            self.creates[key] += 1
            return response(201, json.dumps({"data": {"key": key}, "status": 1}).encode())
        if method == "GET":
            found = [{"key": key}] if self.creates[key] else []
            page = {"data": found, "links": {"next": None}, "status": 1}
            return response(200, json.dumps(page).encode())
        if not self.creates[key] or key in self.deleted:
            return response(404, b'{"message": "Transaction not found", "status": 0}')
        self.deleted.add(key)
        return response(200, b'{"status": 1}')


@pytest.fixture
def server() -> Iterator[OddServer]:
    scripts = {key: case[0] for key, case in {**CASES, **REFUND_CASES}.items()}
    with OddServer(scripts) as running:
        yield running


def test_every_odd_answer_is_classified_bounded_and_never_doubles_a_sale(
    engine: sa.Engine, database_url: str, server: OddServer
) -> None:
    with engine.begin() as conn:
        for key in [*CASES, *REFUND_CASES]:
            conn.execute(sa.text("SELECT outbox.record_sale(:k, 'cust_1', 10, 'EUR')"), {"k": key})
        for key in REFUND_CASES:
            conn.execute(sa.text("SELECT outbox.record_refund(:k)"), {"k": key})
    total = len(CASES) + 2 * len(REFUND_CASES)
    settings = make_settings(database_url, server.url, request_timeout_seconds=1, lease_seconds=3)
    with DaemonThread(settings) as daemon:
        wait_until(
            lambda: (
                rows(engine, "SELECT count(*) FROM outbox.events WHERE status <> 'pending'")[0][0]
                == total
            ),
            timeout=60,
            what="every row to settle",
        )
        assert daemon.daemon is not None
        health = daemon.daemon.health
    assert not (health.last_error or "").startswith("internal error"), health.last_error

    found = {}
    for key, event_type, status, outcome, last_error, first in rows(
        engine,
        """
        SELECT e.transaction_key, e.event_type, e.status, e.outcome, e.last_error,
               (SELECT a.decision FROM outbox.attempts a WHERE a.event_id = e.id ORDER BY a.id
                LIMIT 1)
        FROM outbox.events e
        """,
    ):
        if (key in REFUND_CASES) == (event_type == "refund"):
            found[key] = (first, status, outcome)
        if status == "failed":
            assert last_error and len(last_error) <= DETAIL_MAX_CHARS, (key, last_error)
    expected = {key: tuple(case[1:]) for key, case in {**CASES, **REFUND_CASES}.items()}
    assert found == expected

    # An odd answer to a lookup leaves the question open: asked again, then answered.
    for key in ("lookup-html-200", "lookup-json-array"):
        decisions = [
            r[0]
            for r in rows(
                engine,
                "SELECT a.decision FROM outbox.attempts a JOIN outbox.events e "
                "ON e.id = a.event_id WHERE e.transaction_key = :k ORDER BY a.id",
                k=key,
            )
        ]
        assert decisions == ["retry:timeout+lookup", "retry:bad_response+lookup", "lookup:found"]

    # Nothing unbounded was stored, whatever came back.
    ((excerpt, error, total_chars),) = rows(
        engine,
        "SELECT max(length(response_excerpt)), max(length(error)), "
        "sum(coalesce(length(response_excerpt), 0) + coalesce(length(error), 0)) "
        "FROM outbox.attempts",
    )
    assert excerpt <= BODY_EXCERPT_CHARS and error <= ERROR_MAX_CHARS
    attempts = rows(engine, "SELECT count(*) FROM outbox.attempts")[0][0]
    assert total_chars <= attempts * (BODY_EXCERPT_CHARS + ERROR_MAX_CHARS)

    # The failures say why, from what Partnero sent.
    reasons = dict(
        rows(
            engine, "SELECT transaction_key, last_error FROM outbox.events WHERE status = 'failed'"
        )
    )
    assert reasons["invalid-json-400"].startswith("HTTP 400 Bad Request: {{{ not json")
    assert reasons["huge-422"].startswith('HTTP 422 Unprocessable Entity: {"message": "mmm')
    assert reasons["other-wording-400"] == "HTTP 400: Duplicate customer key"

    # Every sale is one transaction at Partnero, whatever happened to the answers.
    doubled = {key: n for key, n in server.creates.items() if n > 1}
    assert doubled == {}

    # Every request that reached Partnero is an attempt row: nothing was re-sent behind the
    # daemon's back (a transport's own retry would hide a call that may have been applied).
    recorded = Counter(
        {
            (key, method): n
            for key, method, n in rows(
                engine,
                "SELECT e.transaction_key, a.method, count(*) FROM outbox.attempts a "
                "JOIN outbox.events e ON e.id = a.event_id GROUP BY 1, 2",
            )
        }
    )
    assert dict(server.requests) == dict(recorded)


def pending(engine: sa.Engine) -> int:
    return int(rows(engine, "SELECT count(*) FROM outbox.events WHERE status = 'pending'")[0][0])


def test_a_delete_whose_answer_was_lost_is_sent_again_by_the_daemon_not_the_transport(
    engine: sa.Engine, database_url: str
) -> None:
    """The DELETE is applied and the connection closes without an answer. The daemon must see
    that (an unknown outcome), send the DELETE again itself and read the 404 that follows as
    `deleted` (its first DELETE reversed the sale). A transport that quietly re-sends the
    DELETE hands the daemon a bare 404, recorded as `not_found`: "nothing to reverse", about a
    sale that was reversed, and an HTTP call missing from outbox.attempts."""
    with OddServer({"refund-lost": [Odd("DELETE", b"", applied=True)]}) as server:
        with engine.begin() as conn:
            conn.execute(sa.text("SELECT outbox.record_sale('refund-lost', 'cust_1', 10)"))
            conn.execute(sa.text("SELECT outbox.record_refund('refund-lost')"))
        settings = make_settings(database_url, server.url, request_timeout_seconds=1)
        with DaemonThread(settings):
            wait_until(lambda: pending(engine) == 0, what="the refund to settle")
        sent = server.requests[("refund-lost", "DELETE")]
    decisions = [
        r[0]
        for r in rows(
            engine,
            "SELECT decision FROM outbox.attempts WHERE method = 'DELETE' ORDER BY id",
        )
    ]
    assert decisions == ["retry:timeout+lookup", "delivered:deleted"]
    assert sent == len(decisions)
