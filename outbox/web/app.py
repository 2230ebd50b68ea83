"""The aiohttp application: its settings, the middlewares every request goes through (security
headers, the log line, authentication, CSRF), template rendering and the route table."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import jinja2
import structlog
from aiohttp import web

from outbox.web import auth
from outbox.web.store import Store

log = structlog.get_logger("outbox.web")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; img-src 'self' data:; "
    "form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}
COOKIE = "outbox_session"


@dataclass(frozen=True, slots=True)
class ProxyAuth:
    """Mode B: a reverse proxy authenticated the person and names them in `header`; only
    requests from `trusted` peer addresses may carry it."""

    header: str
    trusted: frozenset[str]
    operators: frozenset[str]


@dataclass(frozen=True, slots=True)
class WebConfig:
    accounts: Mapping[str, auth.Account]  # mode A; empty behind a proxy
    signer: auth.Signer
    cookie_secure: bool
    proxy: ProxyAuth | None
    max_pending_age: timedelta


CONFIG = web.AppKey("config", WebConfig)
STORE = web.AppKey("store", Store)
TEMPLATES = web.AppKey("templates", jinja2.Environment)
BASIC_CACHE = web.AppKey("basic_cache", dict)
# Who is asking (None: nobody signed in), what its CSRF token signs, its session cookie's.
USER: web.RequestKey[auth.User | None] = web.RequestKey("user")
CSRF_BINDING: web.RequestKey[str | None] = web.RequestKey("csrf_binding")
SESSION: web.RequestKey[auth.Session | None] = web.RequestKey("session")


def signed_in(request: web.Request) -> auth.User:
    """The user of a request past the authentication middleware (every non-public route)."""
    user: auth.User | None = request.get(USER)
    if user is None:
        raise web.HTTPUnauthorized(text="sign in first")
    return user


def templates() -> jinja2.Environment:
    """Autoescape on for every template (HTML and the SVG inside it): a value from the
    database is always text, never markup."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("outbox.web", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    from outbox.web import present

    env.filters.update(present.FILTERS)
    env.globals.update(present.GLOBALS)
    return env


def render(request: web.Request, name: str, *, status: int = 200, **context: Any) -> web.Response:
    user: auth.User | None = request.get(USER)
    binding: str | None = request.get(CSRF_BINDING)
    config = request.app[CONFIG]
    html = (
        request.app[TEMPLATES]
        .get_template(name)
        .render(
            user=user,
            csrf=config.signer.csrf(binding) if binding else "",
            path=request.path,
            proxy_mode=config.proxy is not None,
            **context,
        )
    )
    return web.Response(text=html, status=status, content_type="text/html", charset="utf-8")


def error_page(request: web.Request, status: int, message: str) -> web.Response:
    """One line saying what went wrong: a page, or `{"error": ...}` under /api/."""
    if request.path.startswith("/api/"):
        return web.json_response({"error": message}, status=status)
    return render(request, "error.html", status=status, message=message)


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    response.headers["Server"] = "outbox"  # not aiohttp's and Python's versions


@web.middleware
async def log_requests(request: web.Request, handler: Handler) -> web.StreamResponse:
    """One line a request: method, path (never the query, a cookie or a form), status, who."""
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        user: auth.User | None = request.get(USER)
        log.info(
            "outbox.web.request",
            method=request.method,
            path=request.path,
            status=status,
            user=user.name if user else None,
            ms=round((time.perf_counter() - started) * 1000, 1),
        )


def create_app(config: WebConfig, store: Store) -> web.Application:
    from outbox.web import actions, pages, session

    app = web.Application(
        middlewares=[log_requests, session.authenticate, pages.errors],
        client_max_size=256 * 1024,
    )
    app[CONFIG] = config
    app[STORE] = store
    app[TEMPLATES] = templates()
    app[BASIC_CACHE] = {}
    app.on_response_prepare.append(_security_headers)
    for table in (session.routes, pages.routes, actions.routes):
        app.router.add_routes(table)
    app.router.add_get("/static/app.css", pages.stylesheet)
    return app
