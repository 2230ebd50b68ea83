"""A connection that is not a session of its own (a pooler in transaction or statement mode)
makes `outbox run` and `outbox migrate` refuse at start-up with one line (docs/operations.md,
"PgBouncer and other poolers").

The pooler here is a small proxy in front of the test server that does what a transaction pool
does to the daemon: a NOTIFY never comes back to the client that LISTENed (PgBouncer in
transaction mode gives the LISTEN's server connection to whoever comes next). It forwards the
wire protocol as it is and drops the server's NotificationResponse messages. PgBouncer itself
was checked by hand the same way (docs/operations.md).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from collections.abc import Iterator

import psycopg
import pytest
import sqlalchemy as sa
from psycopg.conninfo import conninfo_to_dict

from outbox import db
from outbox.db.session import PooledConnectionError, check_session


class NotifyDroppingProxy:
    """Forwards TCP to the server; server-to-client messages of type 'A' (NotificationResponse)
    are dropped. Clients must not ask for TLS or GSS encryption (sslmode, gssencmode=disable),
    so that every server message is a typed one."""

    def __init__(self, server_url: str) -> None:
        info = conninfo_to_dict(db.libpq_url(server_url))
        self._host = str(info.get("host") or "127.0.0.1")
        self._port = int(info.get("port") or 5432)
        self._server_url = server_url
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self.port = 0
        self._thread = threading.Thread(target=self._main, daemon=True)

    def url(self) -> str:
        """The server's URL, through the proxy."""
        url = sa.engine.make_url(db.sqlalchemy_url(self._server_url)).set(
            host="127.0.0.1",
            port=self.port,
            query={"sslmode": "disable", "gssencmode": "disable"},
        )
        return db.libpq_url(url.render_as_string(hide_password=False))

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)
        start = asyncio.start_server(self._client, "127.0.0.1", 0)
        self._server = self._loop.run_until_complete(start)
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()
        self._loop.close()

    async def _shutdown(self) -> None:
        self._server.close()
        current = asyncio.current_task()
        tasks = [t for t in asyncio.all_tasks() if t is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _open_server(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._host.startswith("/"):
            return await asyncio.open_unix_connection(f"{self._host}/.s.PGSQL.{self._port}")
        return await asyncio.open_connection(self._host, self._port)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        server_reader, server_writer = await self._open_server()

        async def upstream() -> None:
            while data := await reader.read(65536):
                server_writer.write(data)
                await server_writer.drain()
            server_writer.close()

        async def downstream() -> None:
            while True:
                header = await server_reader.readexactly(5)
                body = await server_reader.readexactly(int.from_bytes(header[1:], "big") - 4)
                if header[:1] != b"A":
                    writer.write(header + body)
                    await writer.drain()

        tasks = [asyncio.ensure_future(upstream()), asyncio.ensure_future(downstream())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            writer.close()
            server_writer.close()

    def __enter__(self) -> NotifyDroppingProxy:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


@pytest.fixture
def pooled_url(database_url: str) -> Iterator[str]:
    with NotifyDroppingProxy(database_url) as proxy:
        yield proxy.url()


def test_the_proxy_passes_queries_but_not_notifications(pooled_url: str) -> None:
    with psycopg.connect(db.libpq_url(pooled_url), autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM outbox.events").fetchone() == (0,)


def test_a_direct_connection_is_a_session(database_url: str) -> None:
    check_session(database_url)  # raises if not


def test_a_transaction_pool_is_refused_with_what_to_use_instead(pooled_url: str) -> None:
    with pytest.raises(PooledConnectionError) as refused:
        check_session(pooled_url, notify_timeout=0.5)
    message = str(refused.value)
    assert "a NOTIFY did not come back" in message
    assert "pool_mode = session" in message and "PgBouncer and other poolers" in message


def cli(*args: str, url: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OUTBOX_DATABASE_URL": url, "PARTNERO_API_KEY": "k" * 20}
    return subprocess.run(
        [sys.executable, "-m", "outbox.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )


@pytest.mark.parametrize("command", [["run"], ["migrate"]])
def test_run_and_migrate_refuse_a_transaction_pool_with_one_line(
    pooled_url: str, command: list[str]
) -> None:
    done = cli(*command, url=pooled_url)
    assert done.returncode == 2, done.stderr
    # The refusal is the last line, and the only one that says "outbox:" (run logs its start).
    lines = done.stderr.strip().splitlines()
    assert [line for line in lines if line.startswith("outbox: ")] == lines[-1:]
    assert lines[-1].startswith("outbox: a NOTIFY did not come back"), lines
    assert "Traceback" not in done.stderr
