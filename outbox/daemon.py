"""`outbox run`: the delivery daemon, wired together from the services in `outbox.delivery`.

This module owns start-up (the schema check, READY=1 once the database answers, LISTEN is active
and the key check has passed or is under way), the supervisor the services run under, SIGHUP
reloads and the shutdown: SIGTERM stops claiming, lets in-flight calls finish for
`shutdown_grace_seconds`, gives the rest back, writes every result, and exits. A service whose
crash stops the daemon (see `outbox.delivery.supervisor`) makes `run()` raise ServiceCrashed
after that same shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import fields, replace
from datetime import datetime
from typing import Any

import psycopg
import sqlalchemy as sa
import structlog
from aiolimiter import AsyncLimiter

from outbox import db
from outbox.db import migrate, session
from outbox.db.session import PooledConnectionError
from outbox.delivery.claimer import Claimer
from outbox.delivery.clock import DatabaseClock
from outbox.delivery.context import Context
from outbox.delivery.executor import Executor
from outbox.delivery.gate import Gate
from outbox.delivery.health import Health
from outbox.delivery.keycheck import KeyCheck, NotPartneroError
from outbox.delivery.listener import Listener
from outbox.delivery.monitor import Monitor, Watchdog
from outbox.delivery.rescuer import Rescuer
from outbox.delivery.retrying import DB_ERRORS, retrying
from outbox.delivery.store import Store
from outbox.delivery.supervisor import OnCrash, Service, ServiceCrashed, Supervisor
from outbox.delivery.waits import wait_any
from outbox.delivery.writer import Writer
from outbox.partnero import ApiKey, PartneroClient
from outbox.service import logs
from outbox.service.metrics import Metrics, MetricsServer
from outbox.service.sdnotify import Notifier
from outbox.service.settings import LIVE, SettingError, Settings, resolve
from outbox.text import first_line, utcnow

__all__ = ["Daemon", "NotPartneroError", "PooledConnectionError", "ServiceCrashed"]

log = structlog.get_logger("outbox.daemon")


class Daemon:
    def __init__(
        self,
        settings: Settings,
        *,
        flags: Mapping[str, Any] | None = None,
        client: PartneroClient | None = None,
        clock: Callable[[], datetime] = utcnow,
        notifier: Notifier | None = None,
    ) -> None:
        self.settings = settings
        self._flags = dict(flags or {})
        self.health = Health(stall_seconds=settings.stall_seconds)
        self.notifier = notifier or Notifier()
        self.metrics = Metrics()
        self._metrics_server: MetricsServer | None = None
        self.stopping = asyncio.Event()
        self._wake = asyncio.Event()
        self._ready_sent = False
        # Every time the daemon reads is the database's (outbox/delivery/clock.py).
        self.clock = clock = DatabaseClock(clock)
        self.client = client or PartneroClient(
            settings.partnero_api_url,
            ApiKey(settings.api_key),
            timeout_seconds=settings.request_timeout_seconds,
            max_connections=settings.concurrency,
            verify_tls=not settings.insecure_skip_tls_verify,
            clock=clock,
            send_created_at=settings.send_created_at,
        )
        self.gate = Gate(clock, verified=False)  # closed until GET /v1/test answers 2xx
        self.executor = Executor(
            self.client,
            owner=settings.owner,
            retry_policy=settings.retry_policy(),
            request_timeout_seconds=settings.request_timeout_seconds,
            gate=self.gate,
            limiter=_limiter(settings.rate_limit_per_second),
            clock=clock,
            observe=self.metrics.observe_exchange,
        )
        bound = settings.database_timeout_seconds
        stores = {"connect_timeout": min(10.0, bound), "statement_timeout": bound}
        self.claim_store = Store(settings.database_url, **stores)
        self.write_store = Store(settings.database_url, **stores)
        self.monitor_store = Store(settings.database_url, **stores)
        self._wire(clock)

    def _wire(self, clock: Callable[[], datetime]) -> None:
        current = self._current_settings
        self.writer = Writer(self.write_store, self.health, self._on_woken, self.metrics)
        self.listener = Listener(
            self.settings.database_url,
            self._wake,
            self.health,
            self.settings.poll_interval_seconds,
        )
        self.rescuer = Rescuer(self.claim_store, self._wake.set)
        ctx = Context(self.health, self.metrics, self.notifier, current, clock, self.stopping)
        self.key_check = KeyCheck(ctx, client=self.client, gate=self.gate)
        self.claimer = Claimer(
            ctx,
            store=self.claim_store,
            executor=self.executor,
            writer=self.writer,
            gate=self.gate,
            key_check=self.key_check,
            wake=self._wake,
        )
        self.monitor = Monitor(
            ctx,
            store=self.monitor_store,
            leases_held=lambda: len(self.claimer.tasks),
            database_clock=self.clock,
        )
        self.watchdog = Watchdog(ctx)
        self.supervisor = Supervisor(
            health=self.health,
            stopping=self.stopping,
            on_crash=lambda name: self.metrics.service_crashes.labels(name).inc(),
            on_fatal=lambda _crash: self.request_stop(),
        )

    def _current_settings(self) -> Settings:
        return self.settings

    def _on_woken(self, count: int) -> None:
        self._wake.set()

    # ---- start-up ---------------------------------------------------------------------------

    async def check_schema(self) -> None:
        """Refuse to run against a database that is not at this build's schema version, or
        through a connection that is not a session of its own (a transaction pool)."""

        def check() -> None:
            session.check_session(self.settings.database_url)
            engine = db.create_engine(self.settings.database_url, poolclass=sa.NullPool)
            try:
                migrate.check_current(engine)
            finally:
                engine.dispose()

        async for attempt in retrying(self.stopping, "connect"):
            with attempt:
                try:
                    await asyncio.to_thread(check)
                except sa.exc.OperationalError as exc:
                    raise psycopg.OperationalError(first_line(exc.orig)) from None
        self.health.database_ok = True

    async def _start_up(self) -> bool:
        """Everything before READY=1. False when stopped meanwhile."""
        try:
            await self.check_schema()
        except DB_ERRORS:
            if self.stopping.is_set():  # stopped while still waiting for the database
                return False
            raise
        if self.stopping.is_set():
            return False
        with contextlib.suppress(*DB_ERRORS):  # measured again at every monitor round
            await self.monitor.measure_clock(first=True)
        for service in _before_ready(self):
            self.supervisor.start(service)
        # READY=1 only with the database reachable, the schema current and LISTEN active.
        await wait_any(self.listener.ready, self.stopping, timeout=math.inf)
        if self.stopping.is_set():
            return False
        # A wrong PARTNERO_API_URL stops start-up here, before READY; a Partnero that does not
        # answer yet leaves the gate closed, and the claimer keeps asking.
        await self.key_check.check()
        if self.stopping.is_set():
            return False
        self.health.tick()
        await self.monitor.run_once()
        self.notifier.ready(self.health.status_line())
        self._ready_sent = True
        return True

    def _start_running(self) -> None:
        for service in _after_ready(self):
            self.supervisor.start(service)

    # ---- the whole ------------------------------------------------------------------------

    async def run(self, *, install_signal_handlers: bool = True) -> None:
        _log_start(self.settings)
        loop = asyncio.get_running_loop()
        if install_signal_handlers:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.request_stop)
            loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(self.reload()))
        self.notifier.status("connecting to the database")
        s = self.settings
        if s.metrics_port:
            self._metrics_server = MetricsServer(
                self.metrics, self.healthz, s.metrics_host, s.metrics_port
            )
            self._metrics_server.start()
            log.info(
                "outbox.service.metrics.serving",
                host=s.metrics_host,
                port=self._metrics_server.port,
            )
        try:
            if await self._start_up():
                self._start_running()
                log.info("outbox.daemon.running")
                await self.stopping.wait()
        finally:
            await self._shutdown()
            if self._metrics_server is not None:
                self._metrics_server.stop()
            if install_signal_handlers:
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                    loop.remove_signal_handler(sig)
            self.notifier.close()
        if self.supervisor.fatal is not None:
            raise self.supervisor.fatal

    def request_stop(self) -> None:
        if not self.stopping.is_set():
            log.info("outbox.daemon.stopping")
            self.notifier.stopping(f"stopping: {self.claimer.slots.used} call(s) in flight")
            self.stopping.set()

    async def _shutdown(self) -> None:
        self.stopping.set()
        grace = self.settings.shutdown_grace_seconds
        await self.supervisor.finish("claimer", timeout=max(grace, 5.0))
        await self.claimer.drain(grace)
        await self.supervisor.stop()
        await self.writer.flush(time.monotonic() + max(grace, 5.0))
        await self.client.aclose()
        for store in (self.claim_store, self.write_store, self.monitor_store):
            await store.close()
        log.info(
            "outbox.daemon.stopped",
            delivered=self.health.delivered,
            skipped=self.health.skipped,
            failed=self.health.failed,
            retried=self.health.retried,
        )

    def healthz(self) -> tuple[bool, dict[str, Any]]:
        problems = self.health.problems()
        return (
            not problems,
            {
                "problems": problems,
                "backlog": self.health.backlog,
                "oldest_pending_seconds": self.health.oldest_pending_seconds,
                "failed": self.health.failed_rows,
                "paused": self.health.paused,
                "in_flight": len(self.claimer.tasks),
                "last_delivery_at": self.health.last_delivery_at,
            },
        )

    # ---- reload -------------------------------------------------------------------------------

    async def reload(self) -> None:
        """SIGHUP: read the settings again and apply those that can change live."""
        if self._ready_sent:  # during start-up systemd is still waiting for READY=1
            self.notifier.reloading()
        try:
            fresh = await asyncio.to_thread(resolve, self._flags)
        except SettingError as exc:
            log.error(
                "outbox.daemon.reload_refused", error=str(exc), note="the running settings are kept"
            )
        else:
            _apply_live(self, fresh)
        if self._ready_sent:
            self.notifier.ready(self.health.status_line())
        else:  # reloaded during start-up: READY=1 still waits for start-up to finish
            self.notifier.status(self.health.status_line())


def _log_start(s: Settings) -> None:
    log.info(
        "outbox.daemon.starting",
        owner=s.owner,
        partnero=s.partnero_api_url,
        database=db.redact(s.database_url),
        concurrency=s.concurrency,
    )
    if s.insecure_skip_tls_verify:
        log.warning(
            "outbox.daemon.tls_verification_off",
            note="OUTBOX_INSECURE_SKIP_TLS_VERIFY is set: Partnero's certificate is "
            "NOT checked; never run like this in production",
        )


def _apply_live(d: Daemon, fresh: Settings) -> None:
    """Apply what a reload may change while the daemon runs; name what needs a restart."""
    old = d.settings
    changed = sorted(
        f.name
        for f in fields(Settings)
        if f.name != "api_key" and getattr(old, f.name) != getattr(fresh, f.name)
    )
    live = {name: getattr(fresh, name) for name in changed if name in LIVE}
    needs_restart = [name for name in changed if name not in LIVE]
    key_changed = fresh.api_key != old.api_key
    d.settings = replace(old, **live, api_key=fresh.api_key)
    d.health.stall_seconds = d.settings.stall_seconds
    d.claimer.slots.resize(d.settings.concurrency)
    d.executor.reconfigure(
        retry_policy=d.settings.retry_policy(),
        limiter=_limiter(d.settings.rate_limit_per_second),
    )
    if key_changed:
        d.client.set_api_key(ApiKey(fresh.api_key))
        d.key_check.key_version += 1
        d.gate.check_now()  # paused on the old key: try the new one at once
    if "log_level" in live:
        logs.set_level(d.settings.log_level)
    log.info("outbox.daemon.reloaded", changed=sorted(live), api_key_changed=key_changed)
    if needs_restart:
        log.warning(
            "outbox.daemon.reload_needs_restart",
            settings=needs_restart,
            note="these settings take effect only after a restart",
        )


# ---- the services and what a crash of each does (see outbox.delivery.supervisor) -------------


def _before_ready(d: Daemon) -> list[Service]:
    """Started once the schema is current, before READY=1."""
    s = d._current_settings
    return [
        Service(
            "listener",
            lambda: d.listener.run(d.stopping),
            OnCrash.RESTART,
            "holds no state; polling covers the gap",
        ),
        Service(
            "writer",
            lambda: d.writer.run(d.stopping),
            OnCrash.RESTART,
            "its unwritten results wait in memory and are written once it runs again",
        ),
        Service(
            "rescuer",
            lambda: d.rescuer.run(d.stopping, lambda: max(0.5, min(s().lease_seconds / 2, 30.0))),
            OnCrash.RESTART,
            "holds no state",
        ),
    ]


def _after_ready(d: Daemon) -> list[Service]:
    """Started after READY=1: the figures, the watchdog (under systemd), the claimer."""
    services = [
        Service(
            "monitor", lambda: d.monitor.run(d.stopping), OnCrash.RESTART, "only refreshes figures"
        )
    ]
    if d.notifier.watchdog_seconds:
        interval = d.notifier.watchdog_seconds / 2
        services.append(
            Service(
                "watchdog",
                lambda: d.watchdog.run(d.stopping, interval),
                OnCrash.EXIT,
                "without it systemd would kill the daemon anyway; exiting says why at once",
            )
        )
    services.append(
        Service(
            "claimer",
            d.claimer.run,
            OnCrash.EXIT,
            "it owns the calls in flight; a fresh process starts from the table, and the "
            "shutdown gives every claimed row back",
        )
    )
    return services


def _limiter(rate: float) -> Callable[[], asyncio.Future[None] | None] | None:
    if rate <= 0:
        return None
    # Below one call a second the bucket holds one call; above, a second's worth (the burst).
    limiter = AsyncLimiter(1, 1.0 / rate) if rate < 1 else AsyncLimiter(rate, 1.0)

    def acquire() -> asyncio.Future[None]:
        return asyncio.ensure_future(limiter.acquire())

    return acquire
