"""Every service runs under the supervisor: a fault injected into each one is logged with its
traceback, counted, visible in /healthz and to the watchdog while it lasts, and recovered from:
by a restart (listener, writer, rescuer, monitor) or by stopping the daemon non-zero (claimer,
watchdog), with nothing lost."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
import structlog

from outbox.daemon import Daemon, ServiceCrashed
from outbox.delivery.claimer import Claimer
from outbox.delivery.listener import Listener
from outbox.delivery.monitor import Monitor, Watchdog
from outbox.delivery.rescuer import Rescuer
from outbox.delivery.store import Store
from outbox.delivery.supervisor import restart_delay
from outbox.dev.fake_partnero import FakePartneroThread
from tests.daemon_helpers import (
    DaemonThread,
    insert_sales,
    make_settings,
    settled,
    statuses,
    wait_until,
)


@pytest.fixture
def logs() -> Iterator[list[dict[str, Any]]]:
    with structlog.testing.capture_logs() as captured:
        yield captured


class Fault:
    """Makes a method raise while `on` is set (from the calls numbered `after` on)."""

    def __init__(self, error: Exception, *, after: int = 0) -> None:
        self.error = error
        self.after = after
        self.calls = 0
        self.raised = 0
        self.on = threading.Event()
        self.on.set()

    def wrap(self, method: Callable[..., Any]) -> Callable[..., Any]:
        fault = self

        async def faulty(*args: Any, **kwargs: Any) -> Any:
            fault.calls += 1
            if fault.on.is_set() and fault.calls > fault.after:
                fault.raised += 1
                raise fault.error
            return await method(*args, **kwargs)

        return faulty


def crashes(daemon: Daemon, service: str) -> float:
    value = daemon.metrics.registry.get_sample_value(
        "outbox_service_crashes_total", {"service": service}
    )
    return value or 0.0


def crashed_lines(logs: list[dict[str, Any]], service: str) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == "outbox.service.crashed" and e["service"] == service]


def running_daemon(thread: DaemonThread) -> Daemon:
    wait_until(lambda: thread.daemon is not None and thread.daemon.gate.verified, what="the daemon")
    assert thread.daemon is not None
    return thread.daemon


@pytest.mark.parametrize(
    ("service", "cls", "method", "after"),
    [
        ("listener", Listener, "run_once", 0),
        ("writer", Store, "complete", 0),
        ("rescuer", Rescuer, "run_once", 0),
        ("monitor", Monitor, "run_once", 1),  # the first call is start-up's, before READY
    ],
)
def test_a_crashed_service_is_logged_shown_and_restarted(
    monkeypatch: pytest.MonkeyPatch,
    logs: list[dict[str, Any]],
    engine: sa.Engine,
    database_url: str,
    fake: FakePartneroThread,
    service: str,
    cls: type,
    method: str,
    after: int,
) -> None:
    fault = Fault(ValueError(f"injected into the {service}"), after=after)
    monkeypatch.setattr(cls, method, fault.wrap(getattr(cls, method)))
    settings = make_settings(database_url, fake.url, stall_seconds=1)
    with DaemonThread(settings) as thread:
        if service == "writer":
            insert_sales(engine, ["inv_during_fault"])  # a result the writer must not lose
        daemon = thread.daemon
        wait_until(lambda: daemon is not None and crashes(daemon, service) >= 1, what="a crash")
        assert daemon is not None
        # While it is down (or crashing again at each restart): unhealthy, for /healthz and
        # for the watchdog, with the reason.
        healthy, body = daemon.healthz()
        assert not healthy
        assert any(
            p.startswith(f"{service} crashed: ValueError: injected") for p in body["problems"]
        ) or any(p.startswith("results unwritten") for p in body["problems"]), body["problems"]
        assert daemon.watchdog.run_once() is False
        fault.on.clear()
        wait_until(lambda: daemon.healthz()[0], what="healthy again after the restart")
        if service == "writer":
            wait_until(lambda: settled(engine, 1), what="the result written after the fault")
        insert_sales(engine, ["inv_after_fault"])
        wait_until(lambda: statuses(engine).get("delivered") == (2 if service == "writer" else 1))
    (line, *_) = crashed_lines(logs, service)
    assert line["log_level"] == "error"
    assert isinstance(line["exc_info"], ValueError)  # the traceback goes to the log
    assert line["action"] == f"restarting in {restart_delay(1):g} s"
    assert [e for e in logs if e["event"] == "outbox.service.restarted"]
    assert len(fake.ledger()) == (2 if service == "writer" else 1)


def refuse_deliveries(engine: sa.Engine) -> None:
    """A DBA's audit trigger that refuses every UPDATE recording a delivery."""
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "CREATE FUNCTION outbox.audit_refuses() RETURNS trigger LANGUAGE plpgsql AS $$ "
                "BEGIN RAISE EXCEPTION 'audit log is full'; END $$"
            )
        )
        conn.execute(
            sa.text(
                "CREATE TRIGGER audit BEFORE UPDATE OF status ON outbox.events FOR EACH ROW "
                "WHEN (NEW.status = 'delivered') EXECUTE FUNCTION outbox.audit_refuses()"
            )
        )


def test_a_database_trigger_that_refuses_the_results_stops_the_watchdog_until_it_is_gone(
    logs: list[dict[str, Any]], engine: sa.Engine, database_url: str, fake: FakePartneroThread
) -> None:
    """A DBA's audit trigger (or a full tablespace) makes recording a delivery fail: the sales
    reached Partnero, their rows stay pending. The daemon says so and stops pinging the
    watchdog; once the trigger is gone the results are written, nothing sent twice."""
    refuse_deliveries(engine)
    with DaemonThread(make_settings(database_url, fake.url, stall_seconds=1)) as thread:
        daemon = running_daemon(thread)
        insert_sales(engine, [f"inv_audit{i}" for i in range(20)])
        wait_until(lambda: len(fake.ledger()) == 20, what="the sales sent")
        wait_until(
            lambda: any(p.startswith("results unwritten") for p in daemon.health.problems()),
            what="the unwritten results to show",
        )
        assert statuses(engine) == {"pending": 20}
        assert daemon.watchdog.run_once() is False
        assert not daemon.healthz()[0]
        with engine.begin() as conn:
            conn.execute(sa.text("DROP TRIGGER audit ON outbox.events"))
        wait_until(lambda: settled(engine, 20), timeout=45, what="the results written")
        wait_until(lambda: daemon.healthz()[0], what="healthy again")
    assert statuses(engine) == {"delivered": 20}
    assert len(fake.ledger()) == 20
    line = crashed_lines(logs, "writer")[0]
    assert "audit log is full" in line["error"]


def test_the_claimer_stops_claiming_while_the_writer_cannot_keep_up(
    logs: list[dict[str, Any]], engine: sa.Engine, database_url: str, fake: FakePartneroThread
) -> None:
    """Back-pressure: with results piling up unwritten, claiming on would only send calls whose
    results wait past their leases (and then be looked up again). The claimer waits for the
    writer instead, and goes on once it writes."""
    refuse_deliveries(engine)
    settings = make_settings(database_url, fake.url, batch_size=5, concurrency=2)
    limit = 4 * 5  # WRITER_MAX_BATCHES * max(batch_size, concurrency)
    with DaemonThread(settings) as thread:
        daemon = running_daemon(thread)
        insert_sales(engine, [f"inv_bp{i}" for i in range(60)])
        wait_until(
            lambda: any(e["event"] == "outbox.claimer.held_back" for e in logs),
            what="the claimer to hold back",
        )
        wait_until(lambda: not daemon.claimer.tasks, what="the calls in flight to end")
        sent = len(fake.ledger())
        # At most the limit, plus what was claimed when it was reached (slots and prefetch).
        assert limit <= sent <= limit + 2 * 2, sent
        assert statuses(engine) == {"pending": 60}
        with engine.begin() as conn:
            conn.execute(sa.text("DROP TRIGGER audit ON outbox.events"))
        wait_until(lambda: settled(engine, 60), timeout=45, what="every row delivered")
    assert len(fake.ledger()) == 60


@pytest.mark.parametrize(
    ("service", "cls", "method"),
    [("claimer", Claimer, "run_once"), ("watchdog", Watchdog, "run_once")],
)
def test_a_crash_of_the_claimer_or_the_watchdog_stops_the_daemon_non_zero(
    monkeypatch: pytest.MonkeyPatch,
    logs: list[dict[str, Any]],
    engine: sa.Engine,
    database_url: str,
    fake: FakePartneroThread,
    service: str,
    cls: type,
    method: str,
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")  # the watchdog runs every second
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    fault = Fault(RuntimeError(f"injected into the {service}"))
    if service == "watchdog":
        monkeypatch.setattr(cls, method, lambda self: (_ for _ in ()).throw(fault.error))
    else:
        monkeypatch.setattr(cls, method, fault.wrap(getattr(cls, method)))
    insert_sales(engine, ["inv_left"])
    thread = DaemonThread(make_settings(database_url, fake.url))
    thread.start()
    wait_until(lambda: not thread.alive, what="the daemon to stop by itself")
    with pytest.raises(ServiceCrashed, match=f"the {service} crashed: RuntimeError: injected"):
        thread.stop()
    line = crashed_lines(logs, service)[0]
    assert line["action"] == "the daemon stops (exit 1) and systemd starts it again"
    assert isinstance(line["exc_info"], RuntimeError)
    # The shutdown ran: nothing is left leased, nothing half-written.
    assert statuses(engine) in ({"pending": 1}, {"delivered": 1})
    with engine.connect() as conn:
        leased = conn.execute(
            sa.text("SELECT count(*) FROM outbox.events WHERE lease_token IS NOT NULL")
        ).scalar()
    assert leased == 0


def test_a_stop_during_a_claim_gives_the_claimed_rows_back(
    monkeypatch: pytest.MonkeyPatch, engine: sa.Engine, database_url: str, fake: FakePartneroThread
) -> None:
    """SIGTERM while a claim is on its way back: the claimer is let finish that claim (not
    cancelled), so the rows it took are given back at once instead of waiting out their lease."""
    claimed = threading.Event()
    real_claim = Store.claim

    async def slow_claim(self: Store, **kwargs: Any) -> Any:
        result = await real_claim(self, **kwargs)  # committed: the rows are leased now
        if result.claimed:
            claimed.set()
            await asyncio.sleep(0.5)  # the answer is slow to come back
        return result

    monkeypatch.setattr(Store, "claim", slow_claim)
    with DaemonThread(make_settings(database_url, fake.url, lease_seconds=60)) as thread:
        running_daemon(thread)
        insert_sales(engine, ["inv_claimed_at_stop"])
        assert claimed.wait(10)
        thread.stop()
    with engine.connect() as conn:
        row = conn.execute(sa.text("SELECT status, lease_token FROM outbox.events")).one()
    assert row.lease_token is None, "the claimed row was left leased"
    assert fake.ledger() == [] or row.status == "delivered"
