"""The supervisor, with services that are plain coroutines and a restart delay of milliseconds:
a crash is logged, counted, shown in Health while the service is down, and then either the
service restarts or the daemon is told to stop."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
import structlog

from outbox.delivery import supervisor as supervisor_module
from outbox.delivery.health import Health
from outbox.delivery.supervisor import (
    OnCrash,
    Service,
    ServiceCrashed,
    Supervisor,
    restart_delay,
)

RESTART = 0.02  # the back-off in these tests, seconds


@pytest.fixture(autouse=True)
def quick_restarts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(supervisor_module, "RESTART_BASE_SECONDS", RESTART)
    monkeypatch.setattr(supervisor_module, "RESTART_MAX_SECONDS", RESTART)


@pytest.fixture
def logs() -> Iterator[list[dict[str, Any]]]:
    with structlog.testing.capture_logs() as captured:
        yield captured


class Rig:
    def __init__(self) -> None:
        self.health = Health()
        self.stopping = asyncio.Event()
        self.crashes: list[str] = []
        self.crashed = asyncio.Event()
        self.fatal: list[ServiceCrashed] = []
        self.supervisor = Supervisor(
            health=self.health,
            stopping=self.stopping,
            on_crash=self._on_crash,
            on_fatal=self.fatal.append,
        )

    def _on_crash(self, name: str) -> None:
        self.crashes.append(name)
        self.crashed.set()


class Scripted:
    """A service whose runs follow a script: each entry is what run number n does."""

    def __init__(self, *runs: Callable[[], Awaitable[None]]) -> None:
        self.runs = list(runs)
        self.started = 0
        self.running = asyncio.Event()

    async def __call__(self) -> None:
        step = self.runs[min(self.started, len(self.runs) - 1)]
        self.started += 1
        self.running.set()
        await step()


def raises(error: Exception) -> Callable[[], Awaitable[None]]:
    async def run() -> None:
        await asyncio.sleep(0)
        raise error

    return run


async def forever() -> None:
    await asyncio.Event().wait()


async def returns() -> None:
    await asyncio.sleep(0)


async def until(condition: Callable[[], bool], timeout: float = 2.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.001)


def events(logs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == name]


async def test_a_crashed_service_is_shown_down_then_restarted(
    logs: list[dict[str, Any]],
) -> None:
    rig = Rig()
    service = Scripted(raises(ValueError("boom")), forever)
    rig.supervisor.start(Service("writer", service, OnCrash.RESTART, "keeps its batch"))

    await rig.crashed.wait()
    await asyncio.sleep(0)
    # Down: shown in Health, so the watchdog stops and /healthz turns red.
    assert rig.crashes == ["writer"]
    assert rig.health.services_down == {"writer": "ValueError: boom"}
    assert "writer crashed: ValueError: boom" in rig.health.problems()
    assert rig.health.last_error == "writer crashed: boom"
    assert service.started == 1

    await until(lambda: service.started == 2)
    assert rig.health.services_down == {}
    assert not any("crashed" in p for p in rig.health.problems())
    assert rig.fatal == []
    (crash,) = events(logs, "outbox.service.crashed")
    assert crash["service"] == "writer"
    assert crash["log_level"] == "error"
    assert isinstance(crash["exc_info"], ValueError)  # logged with its traceback
    assert crash["why"] == "keeps its batch"
    assert crash["action"].startswith("restarting in")
    assert events(logs, "outbox.service.restarted")[0]["service"] == "writer"

    rig.stopping.set()
    await rig.supervisor.stop()


async def test_the_restart_waits_for_the_back_off() -> None:
    rig = Rig()
    service = Scripted(raises(ValueError("boom")), forever)
    rig.supervisor.start(Service("rescuer", service, OnCrash.RESTART, "holds no state"))
    loop = asyncio.get_running_loop()

    await rig.crashed.wait()
    crashed_at = loop.time()
    await until(lambda: service.started == 2)

    assert loop.time() - crashed_at >= RESTART * 0.9
    rig.stopping.set()
    await rig.supervisor.stop()


async def test_every_crash_is_counted_and_each_restart_follows() -> None:
    rig = Rig()
    service = Scripted(raises(OSError("1")), raises(KeyError("2")), forever)
    rig.supervisor.start(Service("listener", service, OnCrash.RESTART, "polling covers it"))

    await until(lambda: service.started == 3)

    assert rig.crashes == ["listener", "listener"]
    assert rig.health.services_down == {}
    rig.stopping.set()
    await rig.supervisor.stop()


async def test_an_exit_service_stops_the_daemon_and_is_not_restarted(
    logs: list[dict[str, Any]],
) -> None:
    rig = Rig()
    error = RuntimeError("claim loop broke")
    service = Scripted(raises(error), forever)
    rig.supervisor.start(Service("claimer", service, OnCrash.EXIT, "owns the calls"))

    await until(lambda: bool(rig.fatal))
    await asyncio.sleep(RESTART * 3)

    (fatal,) = rig.fatal
    assert isinstance(fatal, ServiceCrashed)
    assert fatal.service == "claimer"
    assert fatal.cause is error
    assert "claim loop broke" in str(fatal)
    assert rig.supervisor.fatal is fatal
    assert service.started == 1
    assert rig.crashes == ["claimer"]
    assert "claimer" in rig.health.services_down
    (crash,) = events(logs, "outbox.service.crashed")
    assert "exit 1" in crash["action"]
    rig.stopping.set()
    await rig.supervisor.stop()


async def test_a_service_that_returns_while_the_daemon_runs_has_crashed() -> None:
    rig = Rig()
    service = Scripted(returns, forever)
    rig.supervisor.start(Service("monitor", service, OnCrash.RESTART, "only figures"))

    await rig.crashed.wait()
    await asyncio.sleep(0)
    assert rig.health.services_down["monitor"].startswith("RuntimeError: ")
    assert "returned while the daemon runs" in rig.health.services_down["monitor"]

    await until(lambda: service.started == 2)
    rig.stopping.set()
    await rig.supervisor.stop()


async def test_a_service_that_returns_once_stopping_has_not_crashed() -> None:
    rig = Rig()

    async def loop_until_stopping() -> None:
        await rig.stopping.wait()

    service = Scripted(loop_until_stopping)
    rig.supervisor.start(Service("claimer", service, OnCrash.EXIT, "owns the calls"))
    await service.running.wait()

    rig.stopping.set()
    await asyncio.sleep(RESTART * 2)  # it returns on its own, before stop() cancels anything
    await rig.supervisor.stop()

    assert service.started == 1
    assert rig.crashes == []
    assert rig.fatal == []
    assert rig.health.services_down == {}


async def test_cancellation_by_stop_is_not_a_crash(logs: list[dict[str, Any]]) -> None:
    rig = Rig()
    services = [Scripted(forever) for _ in range(2)]
    rig.supervisor.start(Service("writer", services[0], OnCrash.RESTART, "x"))
    rig.supervisor.start(Service("claimer", services[1], OnCrash.EXIT, "y"))
    await until(lambda: all(s.running.is_set() for s in services))

    rig.stopping.set()
    await rig.supervisor.stop()

    assert rig.crashes == []
    assert rig.fatal == []
    assert rig.supervisor.fatal is None
    assert rig.health.services_down == {}
    assert events(logs, "outbox.service.crashed") == []
    assert events(logs, "outbox.service.stop_failed") == []


async def test_an_error_raised_while_stopping_is_logged(logs: list[dict[str, Any]]) -> None:
    rig = Rig()

    async def fails_to_stop() -> None:
        try:
            await forever()
        except asyncio.CancelledError:
            raise OSError("could not close the connection") from None

    service = Scripted(fails_to_stop)
    rig.supervisor.start(Service("listener", service, OnCrash.RESTART, "x"))
    await service.running.wait()

    rig.stopping.set()
    await rig.supervisor.stop()

    (line,) = events(logs, "outbox.service.failed_while_stopping")
    assert line["service"] == "listener"
    assert line["error"] == "could not close the connection"
    assert service.started == 1  # not restarted
    assert rig.crashes == []


async def test_an_error_from_a_guard_during_stop_is_logged(logs: list[dict[str, Any]]) -> None:
    rig = Rig()

    def broken_counter(name: str) -> None:
        raise ValueError("metrics broke")

    rig.supervisor = Supervisor(
        health=rig.health,
        stopping=rig.stopping,
        on_crash=broken_counter,
        on_fatal=rig.fatal.append,
    )
    rig.supervisor.start(Service("rescuer", Scripted(raises(KeyError("k"))), OnCrash.RESTART, "x"))
    await until(lambda: bool(events(logs, "outbox.service.crashed")))

    rig.stopping.set()
    await rig.supervisor.stop()

    (line,) = events(logs, "outbox.service.stop_failed")
    assert line["service"] == "rescuer"
    assert isinstance(line["exc_info"], ValueError)


@pytest.mark.parametrize(
    ("failures", "seconds"),
    [(0, 0.5), (1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (5, 8.0), (6, 16.0), (7, 30.0), (99, 30.0)],
)
def test_restart_delay(monkeypatch: pytest.MonkeyPatch, failures: int, seconds: float) -> None:
    monkeypatch.undo()  # the real back-off, not the tests' quick one
    assert restart_delay(failures) == seconds
