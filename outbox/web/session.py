"""Who is asking, for every request: a signed session cookie (after /login), HTTP Basic for the
JSON API's GET requests, or a trusted reverse proxy's header; and the CSRF check of every POST.

Without a credential a page (GET) redirects to /login; anything else (the API, a POST) is
refused with 401. A POST whose CSRF token is missing or wrong is refused with 403 before its
handler runs, so it changes nothing."""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import secrets

import structlog
from aiohttp import web
from yarl import URL

from outbox.web import auth
from outbox.web.app import (
    BASIC_CACHE,
    CONFIG,
    COOKIE,
    CSRF_BINDING,
    SESSION,
    USER,
    Handler,
    WebConfig,
    error_page,
    render,
    signed_in,
)

log = structlog.get_logger("outbox.web")
routes = web.RouteTableDef()

PUBLIC = frozenset({"/login", "/healthz", "/static/app.css"})


class Refused(Exception):
    """A request whose credential is not one to accept: 401."""


def _refuse(request: web.Request, message: str) -> web.Response:
    config = request.app[CONFIG]
    response = error_page(request, 401, message)
    if request.path.startswith("/api/") and config.proxy is None:
        response.headers["WWW-Authenticate"] = 'Basic realm="outbox", charset="UTF-8"'
    return response


def _proxy_user(request: web.Request, config: WebConfig) -> auth.User | None:
    """The user a trusted proxy names; a request naming one from any other peer is refused."""
    assert config.proxy is not None
    named = request.headers.get(config.proxy.header)
    if named is None:
        return None
    name = named.strip()
    if request.remote not in config.proxy.trusted:
        log.warning("outbox.web.untrusted_proxy_header", peer=request.remote)
        raise Refused("the proxy header came from an untrusted address")
    if not name:
        return None
    role = auth.Role.OPERATOR if name in config.proxy.operators else auth.Role.VIEWER
    return auth.User(name, role)


async def _basic_user(request: web.Request, config: WebConfig) -> auth.User | None:
    """HTTP Basic, for scripts reading the JSON API; a checked password is remembered (by an
    HMAC of it) so scrypt runs once per user and password, not once per request."""
    header = request.headers.get("Authorization", "")
    if not header.startswith("Basic "):
        return None
    try:
        name, _, password = base64.b64decode(header[6:], validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    account = config.accounts.get(name)
    cache = request.app[BASIC_CACHE]
    key = config.signer.password_key(name, password)
    if account is not None and key in cache:
        return account.user
    user = await _checked(account, password)
    if user is None:
        log.info("outbox.web.login_refused", user=name[:64], via="basic")
        return None
    if len(cache) > 1000:
        cache.clear()
    cache[key] = True
    return user


async def _identify(request: web.Request, config: WebConfig) -> None:
    """request[USER] (or None) and request[CSRF_BINDING], what its CSRF token signs."""
    request[USER] = None
    request[CSRF_BINDING] = None
    if config.proxy is not None:
        user = _proxy_user(request, config)
        request[USER] = user
        request[CSRF_BINDING] = f"user:{user.name}" if user else None
        return
    session = config.signer.read(request.cookies.get(COOKIE))
    request[SESSION] = session
    if session is not None:
        request[CSRF_BINDING] = f"sid:{session.sid}"
        account = config.accounts.get(session.user)
        request[USER] = account.user if account else None
    if request[USER] is None and request.path.startswith("/api/") and request.method == "GET":
        request[USER] = await _basic_user(request, config)


@web.middleware
async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
    config = request.app[CONFIG]
    try:
        await _identify(request, config)
    except Refused as exc:
        return _refuse(request, str(exc))
    if request.path not in PUBLIC and request[USER] is None:
        if request.method == "GET" and not request.path.startswith("/api/"):
            if config.proxy is not None:
                return _refuse(request, "the proxy named nobody: sign in through it")
            raise web.HTTPSeeOther(URL("/login").with_query(next=request.path_qs))
        return _refuse(request, "sign in first")
    if request.method == "POST":
        form = await request.post()
        token = form.get("csrf")
        binding = request[CSRF_BINDING]
        if not binding or not config.signer.csrf_ok(
            binding, token if isinstance(token, str) else None
        ):
            log.warning("outbox.web.csrf_refused", path=request.path)
            return error_page(
                request,
                403,
                "the form has expired or did not come from this site: reload the page, try again",
            )
    return await handler(request)


def _set_cookie(response: web.StreamResponse, config: WebConfig, session: auth.Session) -> None:
    response.set_cookie(
        COOKIE,
        config.signer.cookie(session),
        max_age=auth.SESSION_SECONDS,
        path="/",
        httponly=True,
        samesite="Strict",
        secure=config.cookie_secure,
    )


def _next(target: str | None) -> str:
    """Where to go after login: a path on this site only (no `//host`, no backslash, nothing
    a browser would strip or reinterpret: printable ASCII without spaces)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    if not all(33 <= ord(c) < 127 for c in target):
        return "/"
    return target


@functools.cache
def _unknown_user_hash() -> str:
    return auth.hash_password(secrets.token_urlsafe(16))


async def _checked(account: auth.Account | None, password: str) -> auth.User | None:
    """The account's user if the password is its (checked off the event loop: scrypt is slow
    on purpose). An unknown name is hashed all the same, so the answer's time does not say
    which names exist."""
    stored = account.password_hash if account else _unknown_user_hash()
    ok = await asyncio.to_thread(auth.verify_password, password, stored)
    return account.user if account is not None and ok else None


@routes.get("/login")
async def login_form(request: web.Request) -> web.StreamResponse:
    config = request.app[CONFIG]
    if config.proxy is not None or request[USER] is not None:
        raise web.HTTPSeeOther("/")
    session: auth.Session | None = request.get(SESSION)
    fresh = None
    if session is None:
        session = fresh = config.signer.new_session("")
        request[CSRF_BINDING] = f"sid:{session.sid}"
    response = render(request, "login.html", next=_next(request.query.get("next")), failed=False)
    if fresh is not None:
        _set_cookie(response, config, fresh)
    return response


@routes.post("/login")
async def login(request: web.Request) -> web.StreamResponse:
    config = request.app[CONFIG]
    if config.proxy is not None:
        raise web.HTTPSeeOther("/")
    form = await request.post()
    name, password = str(form.get("username", "")), str(form.get("password", ""))
    user = await _checked(config.accounts.get(name), password)
    if user is None:
        log.info("outbox.web.login_refused", user=name[:64], via="form")
        return render(
            request, "login.html", status=401, next=_next(str(form.get("next", ""))), failed=True
        )
    old = request.get(SESSION)
    if old is not None:
        config.signer.revoke(old)
    session = config.signer.new_session(user.name)
    log.info("outbox.web.login", user=user.name, role=user.role.value)
    response = web.HTTPSeeOther(_next(str(form.get("next", ""))))
    _set_cookie(response, config, session)
    raise response


@routes.post("/logout")
async def logout(request: web.Request) -> web.StreamResponse:
    config = request.app[CONFIG]
    session = request.get(SESSION)
    if session is not None:
        config.signer.revoke(session)
    log.info("outbox.web.logout", user=signed_in(request).name)
    response = web.HTTPSeeOther("/login" if config.proxy is None else "/")
    response.del_cookie(COOKIE, path="/")
    raise response
