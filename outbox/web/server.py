"""Starting and stopping `outbox web`: the settings read into a WebConfig (the users file or
the proxy, the session secret), the database checked, the application served until SIGINT or
SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import sqlalchemy as sa
import structlog
from aiohttp import web

from outbox import db
from outbox.cli_common import EXIT_ERROR, EXIT_USAGE, fail
from outbox.db import deadline, migrate
from outbox.service.settings import systemd_credential
from outbox.text import first_line
from outbox.web import auth
from outbox.web.app import ProxyAuth, WebConfig, create_app
from outbox.web.store import Store, create_engine

log = structlog.get_logger("outbox.web")
THREADS = 4
SHUTDOWN_SECONDS = 10.0


@dataclass(frozen=True, slots=True)
class Settings:
    host: str
    port: int
    database_url: str
    users_file: str | None
    secret_file: str | None
    cookie_secure: bool
    proxy_header: str | None
    trusted_proxies: frozenset[str]
    proxy_operators: frozenset[str]
    max_pending_age: timedelta


def _file(explicit: str | None, env: str, credential: str) -> Path | None:
    """A file named by an option or environment variable, else the systemd credential."""
    named = explicit or os.environ.get(env)
    return Path(named) if named else systemd_credential(credential, os.environ)


def config_from(settings: Settings) -> tuple[WebConfig, bool]:
    """The application's settings, and whether the session secret was generated; AuthError
    says what is wrong with a file."""
    secret, generated = auth.load_secret(
        _file(settings.secret_file, "OUTBOX_WEB_SECRET_FILE", "web_secret")
    )
    proxy = None
    accounts: dict[str, auth.Account] = {}
    if settings.proxy_header:
        if not settings.trusted_proxies:
            raise auth.AuthError("--trust-proxy-header needs --trusted-proxy (the proxy's address)")
        proxy = ProxyAuth(settings.proxy_header, settings.trusted_proxies, settings.proxy_operators)
    else:
        path = _file(settings.users_file, "OUTBOX_WEB_USERS_FILE", "web_users")
        if path is None:
            raise auth.AuthError(
                "no users: set OUTBOX_WEB_USERS_FILE (or --users-file, or the systemd credential "
                "web_users), or --trust-proxy-header behind a proxy that authenticates"
            )
        accounts = auth.parse_users(auth.read_file(path, "users file"), str(path))
    config = WebConfig(
        accounts=accounts,
        signer=auth.Signer(secret),
        cookie_secure=settings.cookie_secure,
        proxy=proxy,
        max_pending_age=settings.max_pending_age,
    )
    return config, generated


def open_store(url: str) -> Store:
    """The engine, checked: the database answers and has this build's schema."""
    seconds = deadline.command_seconds()
    engine = create_engine(url, seconds, THREADS)
    try:
        migrate.check_current(engine)
    except migrate.MigrationError:
        engine.dispose()
        raise
    except sa.exc.DBAPIError as exc:
        engine.dispose()
        raise ConnectionError(
            f"cannot reach the database at {db.redact(url)}: {first_line(exc.orig)}"
        ) from None
    return Store(engine, THREADS)


@contextlib.asynccontextmanager
async def serving(config: WebConfig, store: Store, host: str, port: int) -> AsyncIterator[int]:
    """The application listening on host:port (0: any free port); yields the port."""
    # On SIGTERM, requests under way get SHUTDOWN_SECONDS to finish (the unit allows 30 s).
    runner = web.AppRunner(
        create_app(config, store),
        access_log=None,
        handle_signals=False,
        shutdown_timeout=SHUTDOWN_SECONDS,
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    await site.start()
    bound = int(runner.addresses[0][1])
    try:
        yield bound
    finally:
        await runner.cleanup()


async def _serve(settings: Settings, config: WebConfig, store: Store) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with serving(config, store, settings.host, settings.port) as port:
        log.info(
            "outbox.web.listening",
            url=f"http://{settings.host}:{port}/",
            auth="proxy header" if config.proxy else "users file",
            users=len(config.accounts),
        )
        await stop.wait()
    log.info("outbox.web.stopped")


def main(settings: Settings) -> None:
    from outbox.service import logs

    try:
        config, generated = config_from(settings)
    except auth.AuthError as exc:
        fail(str(exc), EXIT_USAGE)
    password = sa.engine.make_url(db.sqlalchemy_url(settings.database_url)).password
    logs.configure(
        os.environ.get("OUTBOX_LOG_FORMAT", "auto"),
        "info",
        secrets=[str(password or ""), config.signer.secret.decode("utf-8", "replace")],
    )
    if generated:
        log.warning(
            "outbox.web.random_secret",
            message="no session secret file: a random one signs the cookies, so a restart "
            "signs everyone out (OUTBOX_WEB_SECRET_FILE or the credential web_secret)",
        )
    try:
        store = open_store(settings.database_url)
    except (migrate.MigrationError, ConnectionError) as exc:
        fail(str(exc), EXIT_ERROR)
    try:
        asyncio.run(_serve(settings, config, store))
    except OSError as exc:
        fail(f"cannot listen on {settings.host}:{settings.port}: {exc.strerror}", EXIT_ERROR)
    finally:
        store.close()
