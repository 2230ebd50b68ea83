"""httpx's transport interface over an aiohttp connection pool: the one place aiohttp is used.

httpx's default async transport cost about five times the CPU per call and got slower as
concurrency grew (docs/benchmarks.md); the client keeps httpx's request/response types and
error classes, and this transport maps aiohttp's errors onto them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import httpx
import yarl

MAX_CHUNK_BYTES = 64 * 1024


class AiohttpTransport(httpx.AsyncBaseTransport):
    """httpx's transport interface over an aiohttp connection pool (HTTP/1.1, keep-alive).

    aiohttp's errors become the httpx errors that say the same thing about whether the request
    went out, which is what `PartneroClient` classifies by: only a connection that could not be
    made (refused, DNS, TLS handshake, no pool slot or no connect within the timeout) is
    `httpx.ConnectError`/`ConnectTimeout` (NOT_SENT); a dropped connection, a read timeout or
    any other failure is a read/protocol error (UNKNOWN_OUTCOME). (httpx-aiohttp 0.2 maps a
    server disconnect to ConnectTimeout, which would resend a create that may have landed.)
    """

    def __init__(
        self, *, max_connections: int, verify_tls: bool = True, keepalive_seconds: float = 5.0
    ) -> None:
        self._limit = max_connections
        self._ssl = httpx.create_ssl_context(verify=verify_tls)
        self._keepalive = keepalive_seconds
        self._session: aiohttp.ClientSession | None = None

    def _get_session(self) -> aiohttp.ClientSession:
        # Created on first use: aiohttp wants a running event loop.
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=self._limit, keepalive_timeout=self._keepalive, ssl=self._ssl
                ),
                cookie_jar=aiohttp.DummyCookieJar(),  # httpx keeps the cookies, if any
                timeout=aiohttp.ClientTimeout(total=None),
                auto_decompress=False,  # httpx decodes Content-Encoding
                trust_env=False,  # httpx decides about proxies
            )
            # aiohttp re-sends an idempotent request (our DELETE and GET) once by itself when a
            # kept-alive connection drops. The daemon must see that drop as an unknown outcome
            # and decide itself: a DELETE applied before the drop, re-sent behind its back,
            # would come back 404 and be recorded as not_found, with the first call missing
            # from outbox.attempts. There is no public switch; tests/test_odd_answers.py pins it.
            self._session._retry_connection = False
        return self._session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeouts = request.extensions.get("timeout", {})
        connect = timeouts.get("connect")
        pool = timeouts.get("pool")
        try:
            response = await self._get_session().request(
                request.method,
                yarl.URL(str(request.url), encoded=True),
                headers=request.headers.multi_items(),
                data=request.content or None,
                allow_redirects=False,
                compress=False,
                timeout=aiohttp.ClientTimeout(
                    total=None,
                    connect=None if connect is None or pool is None else connect + pool,
                    sock_connect=connect,
                    sock_read=timeouts.get("read"),
                ),
            )
        except aiohttp.ClientConnectorError as exc:
            raise httpx.ConnectError(_aiohttp_error(exc), request=request) from exc
        except aiohttp.ConnectionTimeoutError as exc:
            raise httpx.ConnectTimeout(_aiohttp_error(exc), request=request) from exc
        except aiohttp.SocketTimeoutError as exc:
            raise httpx.ReadTimeout(_aiohttp_error(exc), request=request) from exc
        except aiohttp.ClientError as exc:
            raise httpx.RemoteProtocolError(_aiohttp_error(exc), request=request) from exc
        return httpx.Response(
            status_code=response.status,
            headers=response.raw_headers,
            stream=_AiohttpBody(response, request),
            request=request,
            extensions={
                "http_version": b"HTTP/1.1",
                "reason_phrase": (response.reason or "").encode("ascii", "replace"),
            },
        )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class _AiohttpBody(httpx.AsyncByteStream):
    def __init__(self, response: aiohttp.ClientResponse, request: httpx.Request) -> None:
        self._response = response
        self._request = request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.content.iter_chunked(MAX_CHUNK_BYTES):
                yield chunk
        except aiohttp.SocketTimeoutError as exc:
            raise httpx.ReadTimeout(_aiohttp_error(exc), request=self._request) from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise httpx.ReadError(_aiohttp_error(exc), request=self._request) from exc

    async def aclose(self) -> None:
        # A body read to the end gives the connection back to the pool; a cut one closes it.
        if self._response.content.is_eof():
            self._response.release()
        else:
            self._response.close()


def _aiohttp_error(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
