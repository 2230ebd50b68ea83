"""A stand-in for a connection pooler in front of the test server, for tests of what the daemon
does behind one (tests/test_poolers.py). It forwards the wire protocol as it is, and can do two
things a pooler does to a client: drop the server's NotificationResponse messages (a transaction
pool: a NOTIFY never comes back to the client that LISTENed), and hold clients beyond a pool
size in a queue until another one leaves (a session pool that is too small)."""

from __future__ import annotations

import asyncio
import threading

import sqlalchemy as sa
from psycopg.conninfo import conninfo_to_dict

from outbox import db


class PoolerProxy:
    """Forwards TCP to the server. With `drop_notifications`, server-to-client messages of type
    'A' (NotificationResponse) are dropped; clients must then not ask for TLS or GSS encryption
    (the URL says sslmode and gssencmode=disable), so that every server message is a typed one.
    With `pool_size`, at most that many clients are connected to the server at once; the others
    wait, connected to the proxy, until one leaves."""

    def __init__(
        self, server_url: str, *, drop_notifications: bool = True, pool_size: int | None = None
    ) -> None:
        self._drop = drop_notifications
        self._pool_size = pool_size
        self._slots: asyncio.Semaphore | None = None
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
        await self._server.wait_closed()
        await asyncio.sleep(0)  # let the closed transports' callbacks close their sockets

    async def _open_server(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._host.startswith("/"):
            return await asyncio.open_unix_connection(f"{self._host}/.s.PGSQL.{self._port}")
        return await asyncio.open_connection(self._host, self._port)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if self._pool_size is None:
                await self._forward(reader, writer)
                return
            if self._slots is None:
                self._slots = asyncio.Semaphore(self._pool_size)
            async with self._slots:  # the queue of a pool with no free server connection
                await self._forward(reader, writer)
        finally:
            # Also when the proxy stops while the client still queues for a slot (or its server
            # connection fails): no client socket may outlive the proxy's loop.
            writer.close()

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
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
                if header[:1] != b"A" or not self._drop:
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

    def __enter__(self) -> PoolerProxy:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
