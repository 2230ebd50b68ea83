"""`outbox run`: the delivery daemon.

Four services, each a loop around a `run_once()` that returns a small result (the River way):

- Claimer: claims due rows in batches under leases and hands each to the executor, keeping at
  most `concurrency` calls in flight and, while they are all busy, up to `prefetch` more rows
  claimed ahead so that a freed slot never waits for a claim; sleeps until a NOTIFY, the next
  due row, or the poll interval.
- Writer: writes results in batches, each guarded by its lease token; keeps them in memory and
  retries while the database is away, so a result is never dropped.
- Listener: LISTEN outbox_events on its own connection; reconnects with back-off (tenacity).
- Rescuer: clears expired leases (a daemon that died) so their rows are picked up again, with a
  lookup first for sales.

SIGTERM stops claiming, lets in-flight calls finish for `shutdown_grace_seconds`, gives the rest
back, writes every result, and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import signal
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import sqlalchemy as sa
import structlog
from aiolimiter import AsyncLimiter
from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential_jitter

from outbox import db, logs, migrate
from outbox.db import first_line, libpq_url
from outbox.domain import PingVerdict
from outbox.executor import Executor, Gate
from outbox.metrics import Metrics, MetricsServer
from outbox.partnero import ApiKey, PartneroClient, api_root
from outbox.policy import backoff_delay, describe, ping_verdict
from outbox.sdnotify import Notifier
from outbox.settings import LIVE, SettingError, Settings, resolve
from outbox.store import Backlog, Claimed, CompleteResult, Completion, Rescued, Store

log = structlog.get_logger("outbox.daemon")

DB_ERRORS = (psycopg.OperationalError, psycopg.InterfaceError, OSError)

# Full claims in a row after which this daemon stops asking INSERTs to NOTIFY (a backlog).
DISARM_AFTER_FULL_CLAIMS = 3


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(slots=True)
class Health:
    """What the daemon knows about itself; read by the status line, metrics and the watchdog."""

    database_ok: bool = False
    listening: bool = False
    last_delivery_at: datetime | None = None
    last_error: str | None = None
    delivered: int = 0
    failed: int = 0
    retried: int = 0
    stall_seconds: float = 60.0
    # The claimer promises to turn again by this monotonic time; past it, the loop is wedged.
    next_tick_due: float = field(default_factory=lambda: time.monotonic() + 3600)
    backlog: int | None = None
    oldest_pending_seconds: float | None = None
    failed_rows: int | None = None
    paused: bool = False  # Partnero refused the API key: nothing is sent
    waiting_for_partnero: str | None = None  # GET /v1/test has not answered 2xx yet: why

    def tick(self, waiting: float = 0.0) -> None:
        """The claimer turned; it may now wait up to `waiting` seconds before turning again."""
        self.next_tick_due = time.monotonic() + waiting + self.stall_seconds

    def problems(self) -> list[str]:
        """Why the daemon is not healthy (empty when it is)."""
        found = []
        if time.monotonic() > self.next_tick_due:
            found.append("delivery loop wedged")
        if not self.listening:
            found.append("not listening for new rows")
        if not self.database_ok:
            found.append("database not answering")
        return found

    def status_line(self) -> str:
        """The systemd STATUS= line."""
        if self.backlog is None:
            parts = ["starting"]
        else:
            oldest = _age(self.oldest_pending_seconds)
            parts = [
                f"backlog {self.backlog}" + (f" (oldest {oldest})" if oldest else ""),
                f"failed {self.failed_rows}",
                f"delivered {self.delivered} since start",
            ]
        if self.paused:
            parts.insert(0, "PAUSED (Partnero refused the API key)")
        elif self.waiting_for_partnero:
            parts.insert(0, f"WAITING FOR PARTNERO ({self.waiting_for_partnero[:120]})")
        if self.last_error:
            parts.append(f"last error: {self.last_error[:120]}")
        return "; ".join(parts)


def _age(seconds: float | None) -> str:
    if seconds is None:
        return ""
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


class NotPartneroError(Exception):
    """PARTNERO_API_URL does not lead to Partnero's API (GET /v1/test: 404, or a web page)."""


@dataclass(frozen=True, slots=True)
class ClaimRound:
    asked: int
    claimed: int
    parked: int


@dataclass(frozen=True, slots=True)
class WriteRound:
    written: int
    result: CompleteResult


def _retrying(stopping: asyncio.Event, what: str) -> AsyncRetrying:
    """Retry database work with capped, jittered back-off until it works or we are stopping."""

    def stop_when_stopping(_state: object) -> bool:
        return stopping.is_set()

    def before_sleep(state: object) -> None:
        outcome = getattr(state, "outcome", None)
        error = outcome.exception() if outcome is not None else None
        log.warning("outbox.db.retrying", operation=what, error=first_line(error))

    return AsyncRetrying(
        retry=retry_if_exception_type(DB_ERRORS),
        wait=wait_exponential_jitter(multiplier=0.2, max=10.0),
        stop=stop_when_stopping,
        before_sleep=before_sleep,
        reraise=True,
    )


class Listener:
    """LISTEN outbox_events; sets `wake` on every notification and after each (re)connect."""

    def __init__(self, url: str, wake: asyncio.Event, health: Health, check_seconds: float) -> None:
        self._url = libpq_url(url)
        self._wake = wake
        self._health = health
        self._check_seconds = check_seconds
        self.ready = asyncio.Event()  # set once LISTEN is active (for READY=1)

    async def run_once(self) -> int:
        """One connection's life: listen until it breaks. Returns notifications received."""
        received = 0
        conn = await psycopg.AsyncConnection.connect(
            self._url, autocommit=True, application_name="outbox-listener", connect_timeout=10
        )
        try:
            await conn.execute("LISTEN outbox_events")
            self._health.listening = True
            self.ready.set()
            self._wake.set()  # anything committed while we were not listening
            log.info("outbox.listener.listening")
            while True:
                async for _ in conn.notifies(timeout=self._check_seconds):
                    received += 1
                    self._wake.set()
                await conn.execute("SELECT 1")  # a quiet connection is checked, not trusted
        finally:
            self._health.listening = False
            with contextlib.suppress(Exception):
                await conn.close()

    async def run(self, stopping: asyncio.Event) -> None:
        async for attempt in _retrying(stopping, "listen"):
            with attempt:
                await self.run_once()


class Writer:
    """Writes completions in batches. A batch that cannot be written is kept and retried."""

    def __init__(
        self,
        store: Store,
        health: Health,
        on_woken: Callable[[int], None],
        metrics: Metrics | None = None,
    ) -> None:
        self._store = store
        self._health = health
        self._on_woken = on_woken
        self._metrics = metrics
        self.queue: asyncio.Queue[Completion] = asyncio.Queue()
        self._batch: list[Completion] = []

    def put(self, completion: Completion) -> None:
        self.queue.put_nowait(completion)

    @property
    def backlog(self) -> int:
        return self.queue.qsize() + len(self._batch)

    async def run_once(self, max_batch: int = 1000) -> WriteRound:
        if not self._batch:
            self._batch.append(await self.queue.get())
        while len(self._batch) < max_batch and not self.queue.empty():
            self._batch.append(self.queue.get_nowait())
        result = await self._store.complete(self._batch)
        written = len(self._batch)
        lost = written - result.completed
        self._account(self._batch, lost)
        # Rows written back as pending (a retry, a row given back) may be due before the time
        # the claimer last planned to wake, and parked rows woken here are due now.
        rescheduled = sum(1 for c in self._batch if c.status == "pending")
        self._batch = []
        if result.woken or rescheduled:
            self._on_woken(result.woken + rescheduled)
        return WriteRound(written, result)

    def _account(self, batch: list[Completion], lost: int) -> None:
        m = self._metrics
        for c in batch:
            if c.status == "delivered":
                self._health.delivered += 1
                self._health.last_delivery_at = utcnow()
            elif c.status == "failed":
                self._health.failed += 1
            elif c.attempt_records:
                self._health.retried += 1
            if m is not None:
                if c.status in ("delivered", "failed"):
                    m.settled.labels(c.status, c.outcome or "").inc()
                elif c.attempt_records and c.last_error:
                    m.retries.labels(c.last_error.split(":", 1)[0]).inc()
        if lost:
            log.warning(
                "outbox.writer.lease_lost",
                results=lost,
                note="another daemon holds these rows now; their results were not applied",
            )

    async def run(self, stopping: asyncio.Event) -> None:
        while True:
            async for attempt in _retrying(stopping, "write results"):
                with attempt:
                    await self.run_once()

    async def flush(self, deadline: float) -> bool:
        """Write everything queued, retrying until `deadline` (monotonic). True when all written."""
        while self.backlog:
            try:
                await self.run_once()
            except DB_ERRORS as exc:
                if time.monotonic() >= deadline:
                    log.error(
                        "outbox.writer.unflushed",
                        results=self.backlog,
                        error=first_line(exc),
                        note="their leases will expire and the rows be picked up again",
                    )
                    return False
                await asyncio.sleep(0.2)
        return True


class Rescuer:
    def __init__(self, store: Store) -> None:
        self._store = store

    async def run_once(self) -> list[Rescued]:
        rescued = await self._store.rescue()
        if rescued:
            owners = sorted({r.lease_owner or "?" for r in rescued})
            log.warning(
                "outbox.rescue.expired_leases",
                rows=len(rescued),
                owners=owners,
                event_ids=[r.event_id for r in rescued[:20]],
            )
        return rescued


class Slots:
    """At most `limit` holders at once, first come first served; the limit can change while
    rows wait (a SIGHUP reload of `concurrency`)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    async def acquire(self) -> None:
        if self.used < self.limit and not self._waiters:
            self.used += 1
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter  # resolved by _hand_out, which counts the slot as used for us
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # handed a slot, then cancelled before using it
            else:
                self._waiters.remove(waiter)
            raise

    def release(self) -> None:
        self.used -= 1
        self._hand_out()

    def resize(self, limit: int) -> None:
        self.limit = limit
        self._hand_out()

    def _hand_out(self) -> None:
        while self._waiters and self.used < self.limit:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.used += 1
                waiter.set_result(None)


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
        self._slot_free = asyncio.Event()
        self._clock = clock
        self.client = client or PartneroClient(
            settings.partnero_api_url,
            ApiKey(settings.api_key),
            timeout_seconds=settings.request_timeout_seconds,
            max_connections=settings.concurrency,
            verify_tls=not settings.insecure_skip_tls_verify,
        )
        # Closed until GET /v1/test answers 2xx (see _check_partnero).
        self.gate = Gate(clock, verified=False)
        self._unreachable = 0  # GET /v1/test calls in a row that got no usable answer
        self._key_version = 0  # bumped when a reload brings a new API key
        self._ready_sent = False
        limiter = _limiter(settings.rate_limit_per_second)
        self.executor = Executor(
            self.client,
            owner=settings.owner,
            retry_policy=settings.retry_policy(),
            request_timeout_seconds=settings.request_timeout_seconds,
            gate=self.gate,
            limiter=limiter,
            clock=clock,
            observe=self.metrics.observe_exchange,
        )
        self.claim_store = Store(settings.database_url)
        self.write_store = Store(settings.database_url)
        self.monitor_store = Store(settings.database_url)
        self.writer = Writer(self.write_store, self.health, self._on_woken, self.metrics)
        self.rescuer = Rescuer(self.claim_store)
        self.listener = Listener(
            settings.database_url, self._wake, self.health, settings.poll_interval_seconds
        )
        # Every claimed row has a task; a task holds one of the slots while its call runs.
        self._tasks: dict[asyncio.Task[None], Claimed] = {}
        self._slots = Slots(settings.concurrency)
        self._doorbell: int | None = None  # the claim connection's generation it is armed on
        self._full_claims = 0

    # ---- start-up ---------------------------------------------------------------------------

    async def check_schema(self) -> None:
        """Refuse to run against a database that is not at this build's schema version."""

        def check() -> None:
            engine = db.create_engine(self.settings.database_url, poolclass=sa.NullPool)
            try:
                migrate.check_current(engine)
            finally:
                engine.dispose()

        async for attempt in _retrying(self.stopping, "connect"):
            with attempt:
                try:
                    await asyncio.to_thread(check)
                except sa.exc.OperationalError as exc:
                    raise psycopg.OperationalError(first_line(exc.orig)) from None
        self.health.database_ok = True

    # ---- the claimer ------------------------------------------------------------------------

    def _on_woken(self, count: int) -> None:
        self._wake.set()

    def _prefetch(self) -> int:
        """Rows claimed ahead of free slots: enough that slots freed during a claim's round
        trip find work waiting, and few enough that a queued row does not wait long."""
        return min(self.settings.batch_size, self.settings.concurrency)

    def _claim_room(self) -> int:
        """How many rows the next claim may take: the free slots plus the prefetch, minus the
        rows already claimed."""
        return self.settings.concurrency + self._prefetch() - len(self._tasks)

    async def claim_once(self) -> ClaimRound:
        s = self.settings
        asked = min(self._claim_room(), s.batch_size)
        if asked <= 0:
            return ClaimRound(0, 0, 0)
        self._wake.clear()
        started = time.monotonic()
        result = await self.claim_store.claim(
            owner=s.owner,
            limit=asked,
            lease_seconds=s.lease_seconds,
            recheck_seconds=s.blocked_recheck_seconds,
            orphan_grace_seconds=s.orphan_refund_grace_seconds,
        )
        self.health.database_ok = True
        deadline = started + s.lease_seconds
        for claimed in result.claimed:
            task = asyncio.create_task(self._deliver(claimed, deadline))
            self._tasks[task] = claimed
            task.add_done_callback(self._task_done)
        return ClaimRound(asked, len(result.claimed), result.parked)

    async def _deliver(self, claimed: Claimed, deadline: float) -> None:
        try:
            await self._slots.acquire()  # a row claimed ahead waits here for a free slot
            try:
                if self.stopping.is_set():
                    # Claimed ahead and never started: give it back, do not start a call now.
                    completion = self.executor.cut_short(claimed)
                else:
                    completion = await self.executor.process(claimed, deadline)
            finally:
                self._slots.release()
        except asyncio.CancelledError:
            self.writer.put(self.executor.cut_short(claimed))
            raise
        except Exception as exc:  # a bug must not lose the row or stop the daemon
            log.exception("outbox.delivery.crashed", event_id=claimed.event.id)
            self.health.last_error = f"internal error: {type(exc).__name__}"
            completion = self.executor.cut_short(claimed)
        if completion.last_error and completion.status != "delivered":
            self.health.last_error = completion.last_error
        self.writer.put(completion)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.pop(task, None)
        self._slot_free.set()

    async def _idle_wait(self) -> None:
        """Sleep until a NOTIFY, the next due row, or the poll interval, whichever is first."""
        timeout = self.settings.poll_interval_seconds
        with contextlib.suppress(*DB_ERRORS):
            due = await self.claim_store.next_due()
            if due is not None:
                timeout = min(timeout, max(0.05, (due - self._clock()).total_seconds()))
        self.health.tick(waiting=timeout)
        await _wait_any(self._wake, self.stopping, timeout=timeout)

    async def _paused(self) -> None:
        """Send nothing until `GET /v1/test` answers 2xx: at start-up (the gate starts closed)
        and after every pause (a refused key, or a 403 the key check confirmed)."""
        until = self.gate.paused_until
        assert until is not None
        if self.gate.refused and not self.health.paused:
            # A call was refused (401, or a 403 that GET /v1/test confirmed).
            log.error(
                "outbox.partnero.auth_failed",
                paused_until=until.isoformat(),
                error=self.gate.pause_detail,
                note="sending is paused; rows stay pending and no attempts are counted",
            )
            self.health.paused = True
            self.health.last_error = self.gate.pause_detail
            self.metrics.paused.set(1)
        elif not self.gate.refused and self.health.waiting_for_partnero is None:
            # A 403 whose key check got no answer: wait for Partnero, as at start-up.
            log.warning("outbox.partnero.unreachable", error=self.gate.pause_detail)
            self.health.waiting_for_partnero = self.gate.pause_detail
            self.health.last_error = self.gate.pause_detail
        self.notifier.status(self.health.status_line())
        pause = max(0.0, (until - self._clock()).total_seconds())
        self.health.tick(waiting=pause + self.settings.request_timeout_seconds)
        self.gate.changed.clear()
        await _wait_any(self.stopping, self.gate.changed, timeout=pause)
        if not self.stopping.is_set():
            await self._check_partnero()

    async def _check_partnero(self) -> None:
        """One `GET /v1/test`, and what it means for the gate. Raises NotPartneroError when the
        URL is not Partnero's API before any call has worked (a wrong URL never fixes itself)."""
        key_version = self._key_version
        exchange = await self.client.ping()
        self.metrics.observe_exchange(exchange)
        if self.stopping.is_set():
            return
        verdict = ping_verdict(exchange)
        if verdict is not PingVerdict.OK and key_version != self._key_version:
            # A reload brought a new key while the old one was being checked: check the new
            # one at once rather than pausing on the old one's answer.
            self.gate.pause(self._clock(), self.gate.pause_detail or "checking the new API key")
            return
        root = api_root(self.client.base_url)
        if verdict is PingVerdict.OK:
            log.info(
                "outbox.partnero.auth_restored" if self.gate.verified else "outbox.partnero.ready",
                url=root,
            )
            self._unreachable = 0
            self.gate.resume()
            self.health.paused = False
            self.health.waiting_for_partnero = None
            self.metrics.paused.set(0)
            self.notifier.status(self.health.status_line())
            return
        detail = f"GET {root}/v1/test: {describe(exchange)}"
        if verdict is PingVerdict.NOT_PARTNERO and not self.gate.verified:
            raise NotPartneroError(
                f"invalid setting PARTNERO_API_URL (--partnero-api-url): {root} is not "
                f"Partnero's API ({detail})"
            )
        now = self._clock()
        if verdict is PingVerdict.UNREACHABLE:
            # Keep asking, sooner at first; nothing is sent meanwhile.
            self._unreachable += 1
            wait = min(
                backoff_delay(self._unreachable, self.settings.retry_policy(), 0.5),
                self.settings.auth_pause_seconds,
            )
            log.warning("outbox.partnero.unreachable", error=detail, retry_in=round(wait, 2))
            self.health.waiting_for_partnero = detail
            self.health.last_error = detail
            self.gate.pause(now + timedelta(seconds=wait), detail, refused=False)
        else:
            # Refused (401/403), or (after it had worked) no longer Partnero's API at this URL.
            until = now + timedelta(seconds=self.settings.auth_pause_seconds)
            log.error(
                "outbox.partnero.auth_failed",
                paused_until=until.isoformat(),
                error=detail,
                note="sending is paused; rows stay pending and no attempts are counted",
            )
            self.health.paused = True
            self.health.last_error = detail
            self.metrics.paused.set(1)
            self.gate.pause(until, detail)
        self.notifier.status(self.health.status_line())

    async def run_claimer(self) -> None:
        while not self.stopping.is_set():
            self.health.tick()
            if self.gate.paused:
                await self._paused()
                continue
            # Claim again once the room is at least half the prefetch (or a whole slot when
            # nothing is queued ahead), so that claims stay batches while rows keep flowing.
            if self._claim_room() < max(1, self._prefetch() // 2):
                self._slot_free.clear()
                self.health.tick(waiting=1.0)
                await _wait_any(self._slot_free, self.stopping, timeout=1.0)
                continue
            try:
                round_ = await self.claim_once()
                if round_.claimed < round_.asked:
                    self._full_claims = 0
                    if not self._doorbell_armed() and await self._arm_doorbell():
                        continue  # claim once more before sleeping (see _arm_doorbell)
                    await self._idle_wait()
                elif round_.asked > 0:
                    self._full_claims += 1
                    if self._full_claims >= DISARM_AFTER_FULL_CLAIMS and self._doorbell_armed():
                        await self.claim_store.disarm_doorbell()
                        self._doorbell = None
            except DB_ERRORS as exc:
                self.health.database_ok = False
                self.health.last_error = f"database: {first_line(exc)}"
                log.warning("outbox.claimer.db_error", error=first_line(exc))
                self.health.tick(waiting=1.0)
                await _wait_any(self.stopping, timeout=1.0)

    # ---- the doorbell (migration 0003) ---------------------------------------------------------
    #
    # An INSERT NOTIFYs only while some daemon "holds the doorbell" (an advisory lock held on its
    # claim connection), because a NOTIFY makes every inserting transaction commit one at a
    # time. This daemon arms it when a claim comes back short (it has caught up and is about to
    # sleep) and disarms it after a few full claims in a row (a backlog: it claims again without
    # being woken, and INSERTs go at full speed).

    def _doorbell_armed(self) -> bool:
        return self._doorbell is not None and self._doorbell == self.claim_store.generation

    async def _arm_doorbell(self) -> bool:
        """Arm the doorbell before sleeping. True: claim once more first; False: sleep now.

        'armed': every transaction that inserted without ringing has ended, so one more claim
        sees its rows; later INSERTs ring. 'busy': such a transaction was still open after the
        wait: claim what is visible and try again. 'taken': another daemon holds the doorbell,
        INSERTs ring already, and its disarming NOTIFYs too."""
        state, generation = await self.claim_store.arm_doorbell(self.settings.doorbell_wait_seconds)
        if state == "armed":
            self._doorbell = generation
        return state != "taken"

    async def run_rescuer(self) -> None:
        interval = max(0.5, min(self.settings.lease_seconds / 2, 30.0))
        while not self.stopping.is_set():
            with contextlib.suppress(*DB_ERRORS):
                if await self.rescuer.run_once():
                    self._wake.set()
            await _wait_any(self.stopping, timeout=interval)

    async def monitor_once(self) -> Backlog | None:
        """Refresh the backlog figures, the gauges and the STATUS= line."""
        backlog: Backlog | None = None
        try:
            backlog = await asyncio.wait_for(
                self.monitor_store.backlog(),
                timeout=max(1.0, self.settings.status_interval_seconds),
            )
        except (TimeoutError, *DB_ERRORS) as exc:
            self.health.database_ok = False
            self.health.last_error = f"database: {first_line(exc) or 'no answer in time'}"
            await self.monitor_store.close()
        if backlog is not None:
            self.health.database_ok = True
            self.health.backlog = backlog.pending
            self.health.oldest_pending_seconds = backlog.oldest_pending_seconds
            self.health.failed_rows = backlog.failed
            self.metrics.backlog.set(backlog.pending)
            self.metrics.oldest_pending.set(backlog.oldest_pending_seconds or 0.0)
            self.metrics.failed.set(backlog.failed)
        self.metrics.leases.set(len(self._tasks))
        self.notifier.status(self.health.status_line())
        return backlog

    async def run_monitor(self) -> None:
        while not self.stopping.is_set():
            await self.monitor_once()
            await _wait_any(self.stopping, timeout=self.settings.status_interval_seconds)

    def watchdog_once(self) -> bool:
        """Ping systemd's watchdog only while the daemon is really healthy."""
        problems = self.health.problems()
        self.metrics.healthy.set(0 if problems else 1)
        if problems:
            log.error("outbox.watchdog.unhealthy", problems=problems)
            return False
        self.notifier.watchdog()
        return True

    async def run_watchdog(self, interval: float) -> None:
        loop = asyncio.get_running_loop()
        while not self.stopping.is_set():
            self.watchdog_once()
            expected = loop.time() + interval
            await _wait_any(self.stopping, timeout=interval)
            self.metrics.loop_lag.set(max(0.0, loop.time() - expected))

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
                "in_flight": len(self._tasks),
                "last_delivery_at": self.health.last_delivery_at,
            },
        )

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
            self._apply(fresh)
        if self._ready_sent:
            self.notifier.ready(self.health.status_line())
        else:  # reloaded during start-up: READY=1 still waits for start-up to finish
            self.notifier.status(self.health.status_line())

    def _apply(self, fresh: Settings) -> None:
        old = self.settings
        changed = sorted(
            f.name
            for f in fields(Settings)
            if f.name != "api_key" and getattr(old, f.name) != getattr(fresh, f.name)
        )
        live = {name: getattr(fresh, name) for name in changed if name in LIVE}
        needs_restart = [name for name in changed if name not in LIVE]
        key_changed = fresh.api_key != old.api_key
        self.settings = replace(old, **live, api_key=fresh.api_key)
        self.health.stall_seconds = self.settings.stall_seconds
        self._slots.resize(self.settings.concurrency)
        self.executor.reconfigure(
            retry_policy=self.settings.retry_policy(),
            limiter=_limiter(self.settings.rate_limit_per_second),
        )
        if key_changed:
            self.client.set_api_key(ApiKey(fresh.api_key))
            self._key_version += 1
            self.gate.check_now()  # paused on the old key: try the new one at once
        if "log_level" in live:
            logs.set_level(self.settings.log_level)
        log.info("outbox.daemon.reloaded", changed=sorted(live), api_key_changed=key_changed)
        if needs_restart:
            log.warning(
                "outbox.daemon.reload_needs_restart",
                settings=needs_restart,
                note="these settings take effect only after a restart",
            )

    # ---- the whole ------------------------------------------------------------------------

    async def run(self, *, install_signal_handlers: bool = True) -> None:
        s = self.settings
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
        loop = asyncio.get_running_loop()
        if install_signal_handlers:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.request_stop)
            loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(self.reload()))
        self.notifier.status("connecting to the database")
        if s.metrics_port:
            self._metrics_server = MetricsServer(
                self.metrics, self.healthz, s.metrics_host, s.metrics_port
            )
            self._metrics_server.start()
            log.info("outbox.metrics.serving", host=s.metrics_host, port=self._metrics_server.port)
        services: list[asyncio.Task[None]] = []
        try:
            try:
                await self.check_schema()
            except DB_ERRORS:
                if self.stopping.is_set():  # stopped while still waiting for the database
                    return
                raise
            if self.stopping.is_set():
                return
            services = [
                asyncio.create_task(self.listener.run(self.stopping), name="listener"),
                asyncio.create_task(self.writer.run(self.stopping), name="writer"),
                asyncio.create_task(self.run_rescuer(), name="rescuer"),
            ]
            # READY=1 only with the database reachable, the schema current and LISTEN active.
            await _wait_any(self.listener.ready, self.stopping, timeout=math.inf)
            if self.stopping.is_set():
                return
            # A wrong PARTNERO_API_URL stops start-up here, before READY; a Partnero that does
            # not answer yet leaves the gate closed, and the claimer keeps asking.
            await self._check_partnero()
            if self.stopping.is_set():
                return
            self.health.tick()
            await self.monitor_once()
            self.notifier.ready(self.health.status_line())
            self._ready_sent = True
            services.append(asyncio.create_task(self.run_monitor(), name="monitor"))
            if self.notifier.watchdog_seconds:
                services.append(
                    asyncio.create_task(
                        self.run_watchdog(self.notifier.watchdog_seconds / 2), name="watchdog"
                    )
                )
            log.info("outbox.daemon.running")
            await self.run_claimer()
        finally:
            await self._shutdown(services)
            if self._metrics_server is not None:
                self._metrics_server.stop()
            if install_signal_handlers:
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                    loop.remove_signal_handler(sig)
            self.notifier.close()

    def request_stop(self) -> None:
        if not self.stopping.is_set():
            log.info("outbox.daemon.stopping")
            self.notifier.stopping(f"stopping: {self._slots.used} call(s) in flight")
            self.stopping.set()

    async def _shutdown(self, services: list[asyncio.Task[None]]) -> None:
        grace = self.settings.shutdown_grace_seconds
        if self._tasks:
            log.info("outbox.daemon.draining", in_flight=len(self._tasks), grace_seconds=grace)
            _, pending = await asyncio.wait(list(self._tasks), timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        for task in services:
            task.cancel()
        await asyncio.gather(*services, return_exceptions=True)
        await self.writer.flush(time.monotonic() + max(grace, 5.0))
        await self.client.aclose()
        await self.claim_store.close()
        await self.write_store.close()
        await self.monitor_store.close()
        log.info(
            "outbox.daemon.stopped",
            delivered=self.health.delivered,
            failed=self.health.failed,
            retried=self.health.retried,
        )


async def _wait_any(*events: asyncio.Event, timeout: float) -> None:
    """Wait until one of the events is set or the timeout passes."""
    if any(e.is_set() for e in events):
        return
    waiters = [asyncio.create_task(e.wait()) for e in events]
    try:
        await asyncio.wait(
            waiters,
            timeout=None if math.isinf(timeout) else timeout,
            return_when=asyncio.FIRST_COMPLETED,
        )
    finally:
        for w in waiters:
            w.cancel()


def _limiter(rate: float) -> Callable[[], asyncio.Future[None] | None] | None:
    if rate <= 0:
        return None
    # Below one call a second the bucket holds one call; above, a second's worth (the burst).
    limiter = AsyncLimiter(1, 1.0 / rate) if rate < 1 else AsyncLimiter(rate, 1.0)

    def acquire() -> asyncio.Future[None]:
        return asyncio.ensure_future(limiter.acquire())

    return acquire
