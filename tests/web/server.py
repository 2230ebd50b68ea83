"""`outbox web` for the tests: the real application listening on loopback, in an event loop of
its own thread, over a real database; and httpx clients signed in through the login form."""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Iterator
from contextlib import AbstractAsyncContextManager
from datetime import timedelta
from typing import Any, Self

import httpx

from outbox.web import auth
from outbox.web.app import ProxyAuth, WebConfig
from outbox.web.server import serving
from outbox.web.store import Store, create_engine

PASSWORDS = {"alice": "alice-password-1", "victor": "victor-password-1"}
SECRET = b"s" * 40


def accounts() -> dict[str, auth.Account]:
    roles = {"alice": auth.Role.OPERATOR, "victor": auth.Role.VIEWER}
    return {
        name: auth.Account(auth.User(name, roles[name]), auth.hash_password(password))
        for name, password in PASSWORDS.items()
    }


def config(
    proxy: ProxyAuth | None = None, users: dict[str, auth.Account] | None = None
) -> WebConfig:
    return WebConfig(
        accounts={} if proxy else (users or accounts()),
        signer=auth.Signer(SECRET),
        cookie_secure=False,
        proxy=proxy,
        max_pending_age=timedelta(minutes=15),
    )


class WebServer:
    """The application on 127.0.0.1 (a free port), served from a thread until closed."""

    def __init__(self, database_url: str, configs: list[WebConfig]) -> None:
        self.store = Store(create_engine(database_url, 30, 4), 4)
        self._configs = configs
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._stack: list[AbstractAsyncContextManager[int]] = []
        self.ports: list[int] = []

    def __enter__(self) -> Self:
        self._thread.start()
        for cfg in self._configs:
            cm = serving(cfg, self.store, "127.0.0.1", 0)
            port = asyncio.run_coroutine_threadsafe(cm.__aenter__(), self._loop).result(10)
            self._stack.append(cm)
            self.ports.append(port)
        return self

    def __exit__(self, *exc: object) -> None:
        for cm in reversed(self._stack):
            asyncio.run_coroutine_threadsafe(cm.__aexit__(None, None, None), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
        self.store.close()

    def url(self, n: int = 0) -> str:
        return f"http://127.0.0.1:{self.ports[n]}"


CSRF = re.compile(r'name="csrf" value="([^"]+)"')


def csrf_of(html: str) -> str:
    found = CSRF.search(html)
    assert found, "no csrf field on the page"
    return found.group(1)


class Browser:
    """An httpx client with a cookie jar, like a browser tab; `csrf` is the token of its
    session (read from the last page that had a form)."""

    def __init__(self, base_url: str) -> None:
        self.client = httpx.Client(base_url=base_url, follow_redirects=False, timeout=30)
        self.csrf = ""

    def close(self) -> None:
        self.client.close()

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        response = self.client.get(path, **kwargs)
        found = (
            CSRF.search(response.text)
            if response.headers.get("content-type", "").startswith("text/html")
            else None
        )
        if found:
            self.csrf = found.group(1)
        return response

    def post(self, path: str, data: dict[str, Any], *, csrf: bool = True) -> httpx.Response:
        if csrf:
            data = {"csrf": self.csrf, **data}
        return self.client.post(path, data=data)

    def login(self, name: str, password: str | None = None) -> httpx.Response:
        self.get("/login")
        return self.post(
            "/login", {"username": name, "password": password or PASSWORDS[name], "next": "/"}
        )


def signed_in(base_url: str, name: str) -> Browser:
    browser = Browser(base_url)
    response = browser.login(name)
    assert response.status_code == 303, response.text
    browser.get("/")
    return browser


def iter_html(*responses: httpx.Response) -> Iterator[str]:
    for r in responses:
        yield r.text
