"""Every long-running task of the daemon runs under one supervisor.

A service that raises anything unexpected (or returns while the daemon runs) is logged with its
traceback (`outbox.service.crashed`), counted (`outbox_service_crashes_total{service}`), shown in
`Health.problems()` (so the watchdog stops pinging and /healthz turns red), and then, by the
service's own choice:

- `OnCrash.RESTART`: started again after a back-off (0.5 s doubling to 30 s; reset once it has
  run for a minute), as River restarts its maintenance services. For services whose state
  survives in their object (the writer keeps its unwritten results) or that hold none.
- `OnCrash.EXIT`: the daemon stops and `outbox run` exits non-zero, so systemd starts a fresh
  process, as procrastinate's worker does when a side task dies. For the claimer, which owns
  the calls in flight, and the watchdog, whose silence would have the same effect later.

Cancellation (shutdown) is not a crash. Services stopped by the supervisor have their
exceptions, if any, logged: none is discarded.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog

from outbox.delivery.health import Health
from outbox.delivery.waits import wait_any
from outbox.text import first_line

log = structlog.get_logger("outbox.service")

RESTART_BASE_SECONDS = 0.5
RESTART_MAX_SECONDS = 30.0
RESET_AFTER_SECONDS = 60.0  # a service that ran this long before crashing starts the back-off anew


class OnCrash(enum.Enum):
    RESTART = "restart"
    EXIT = "exit"


@dataclass(frozen=True, slots=True)
class Service:
    name: str
    run: Callable[[], Awaitable[None]]
    on_crash: OnCrash
    why: str  # the reason for the choice, logged with a crash


class ServiceCrashed(Exception):
    """A service whose crash stops the daemon (OnCrash.EXIT)."""

    def __init__(self, service: str, cause: BaseException) -> None:
        super().__init__(f"the {service} crashed: {type(cause).__name__}: {first_line(cause)}")
        self.service = service
        self.cause = cause


def restart_delay(failures: int) -> float:
    """Seconds before restart number `failures` (1-based): 0.5, 1, 2, ... capped at 30."""
    return min(RESTART_MAX_SECONDS, RESTART_BASE_SECONDS * 2.0 ** min(max(failures, 1) - 1, 16))


class Supervisor:
    def __init__(
        self,
        *,
        health: Health,
        stopping: asyncio.Event,
        on_crash: Callable[[str], None],
        on_fatal: Callable[[ServiceCrashed], None],
    ) -> None:
        self._health = health
        self._stopping = stopping
        self._on_crash = on_crash  # counts the crash (metrics)
        self._on_fatal = on_fatal  # stops the daemon
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._closing = False
        self.fatal: ServiceCrashed | None = None

    def start(self, service: Service) -> None:
        self._tasks[service.name] = asyncio.create_task(self._guard(service), name=service.name)

    async def finish(self, name: str, timeout: float) -> None:
        """Let one service end by itself (it saw `stopping`) for up to `timeout` seconds; the
        claimer must not be cancelled in the middle of a claim, or the rows it claimed would
        wait out their lease instead of being given back."""
        task = self._tasks.get(name)
        if task is not None:
            await asyncio.wait({task}, timeout=timeout)

    async def stop(self) -> None:
        """Cancel every service and wait for them; log what any of them raised."""
        self._closing = True  # a service that turns its cancellation into an error stays down
        for task in self._tasks.values():
            task.cancel()
        results = await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        for name, result in zip(self._tasks, results, strict=True):
            if isinstance(result, Exception):
                log.error("outbox.service.stop_failed", service=name, exc_info=result)
        self._tasks.clear()

    async def _guard(self, service: Service) -> None:
        failures = 0
        while True:
            started = time.monotonic()
            try:
                await service.run()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                error: Exception = exc
            else:
                if self._stopping.is_set():
                    return
                error = RuntimeError(f"the {service.name} returned while the daemon runs")
            if self._closing or (self._stopping.is_set() and service.on_crash is OnCrash.RESTART):
                log.warning(
                    "outbox.service.failed_while_stopping",
                    service=service.name,
                    error=first_line(error),
                )
                return
            failures = 1 if time.monotonic() - started > RESET_AFTER_SECONDS else failures + 1
            self._crashed(service, error, failures)
            if service.on_crash is OnCrash.EXIT:
                self.fatal = ServiceCrashed(service.name, error)
                self._on_fatal(self.fatal)
                return
            await wait_any(self._stopping, timeout=restart_delay(failures))
            if self._stopping.is_set():
                return
            self._health.services_down.pop(service.name, None)
            log.warning("outbox.service.restarted", service=service.name, crashes=failures)

    def _crashed(self, service: Service, error: Exception, failures: int) -> None:
        action = (
            "the daemon stops (exit 1) and systemd starts it again"
            if service.on_crash is OnCrash.EXIT
            else f"restarting in {restart_delay(failures):g} s"
        )
        log.error(
            "outbox.service.crashed",
            service=service.name,
            error=f"{type(error).__name__}: {first_line(error)}",
            action=action,
            why=service.why,
            exc_info=error,
        )
        self._on_crash(service.name)
        self._health.services_down[service.name] = f"{type(error).__name__}: {first_line(error)}"
        self._health.last_error = f"{service.name} crashed: {first_line(error)}"
