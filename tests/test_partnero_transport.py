"""The Partnero client over its default transport (aiohttp under httpx) and real loopback sockets:
what reached the server decides the classification, not how aiohttp names the failure."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal

import pytest

from outbox.dev.fake_partnero import FakeConfig, FakePartnero
from outbox.domain import Event, EventType, TransportError
from outbox.partnero import BODY_EXCERPT_CHARS, ApiKey, PartneroClient

KEY = "transport-test-key"


def sale(key: str = "inv-1") -> Event:
    return Event(
        id=1,
        event_type=EventType.SALE,
        transaction_key=key,
        customer_key="cust-1",
        amount=Decimal("10.00"),
        currency="EUR",
        payload={},
        attempts=0,
        lookup_required=False,
    )


@pytest.fixture
async def fake() -> AsyncIterator[FakePartnero]:
    server = FakePartnero(FakeConfig(api_key=KEY, seed=1))
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def client(url: str, timeout: float = 5.0) -> PartneroClient:
    return PartneroClient(url, ApiKey(KEY), timeout_seconds=timeout, max_connections=4)


async def test_answers_come_back_and_connections_are_reused(fake: FakePartnero) -> None:
    async with client(fake.url) as c:
        created = [await c.create(sale(f"inv-{i}")) for i in range(5)]
        found = await c.lookup("inv-1")
        missing = await c.delete("nope")
    assert [e.status_code for e in created] == [201] * 5
    assert created[0].json_body is not None and created[0].json_body["data"]["key"] == "inv-0"
    assert found.status_code == 200 and missing.status_code == 404
    assert missing.message == "Transaction not found"
    assert fake.stats()["connections"]["accepted"] == 1


async def test_a_refused_connection_was_not_sent() -> None:
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with client(f"http://127.0.0.1:{port}") as c:
        exchange = await c.create(sale())
    assert exchange.status_code is None
    assert exchange.transport_error is TransportError.NOT_SENT
    assert exchange.error is not None and exchange.error.startswith("ConnectError")


@pytest.mark.parametrize("fault", ["drop_after_rate", "drop_before_rate"])
async def test_a_dropped_connection_is_an_unknown_outcome(fake: FakePartnero, fault: str) -> None:
    await fake.configure(**{fault: 1.0})
    async with client(fake.url) as c:
        exchange = await c.create(sale())
    assert exchange.status_code is None
    assert exchange.transport_error is TransportError.UNKNOWN_OUTCOME
    # drop_after applied the create: exactly why this must never read as "not sent"
    assert len(fake.ledger()) == (1 if fault == "drop_after_rate" else 0)


async def test_a_hung_call_ends_at_the_deadline_as_an_unknown_outcome(
    fake: FakePartnero,
) -> None:
    await fake.configure(hang_after_rate=1.0)
    async with client(fake.url, timeout=0.3) as c:
        started = time.monotonic()
        exchange = await c.create(sale())
        took = time.monotonic() - started
    assert exchange.transport_error is TransportError.UNKNOWN_OUTCOME
    assert 0.25 < took < 2.0


@contextlib.asynccontextmanager
async def raw_server(
    handle: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> AsyncIterator[str]:
    """A bare asyncio server; every connection and handler is closed when the block ends."""
    handlers: set[asyncio.Task[None]] = set()
    writers: list[asyncio.StreamWriter] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        writers.append(writer)
        try:
            await handle(reader, writer)
        except ConnectionError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        for writer in writers:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        await server.wait_closed()


async def _read_request(reader: asyncio.StreamReader) -> None:
    head = await reader.readuntil(b"\r\n\r\n")
    for line in head.decode().split("\r\n"):
        if line.lower().startswith("content-length:"):
            await reader.readexactly(int(line.split(":", 1)[1]))


async def test_a_huge_body_is_cut_at_the_cap() -> None:
    body = b'{"message": "' + b"x" * 200_000 + b'"}'

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 500 Oops\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        await writer.drain()

    async with raw_server(handle) as url, client(url) as c:
        exchange = await c.create(sale())
    assert exchange.status_code == 500
    assert exchange.json_body is None  # cut, so not parsed
    assert len(exchange.body_excerpt) == BODY_EXCERPT_CHARS
    assert exchange.transport_error is None


async def test_a_trickling_body_cannot_outlive_the_deadline() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 201 Created\r\nContent-Length: 1000\r\n\r\n")
        for _ in range(1000):
            writer.write(b" ")
            await writer.drain()
            await asyncio.sleep(0.05)

    async with raw_server(handle) as url, client(url, timeout=0.4) as c:
        started = time.monotonic()
        exchange = await c.create(sale())
        took = time.monotonic() - started
    assert exchange.status_code == 201  # the status line came; the answer did not finish
    assert exchange.transport_error is TransportError.UNKNOWN_OUTCOME
    assert took < 2.0
