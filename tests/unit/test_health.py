"""`Health.problems()`, which the watchdog and /healthz obey, and the STATUS= line."""

from __future__ import annotations

import time

import pytest

from outbox.delivery.health import Health


def healthy(**fields: object) -> Health:
    return Health(database_ok=True, listening=True, stall_seconds=60.0, **fields)  # type: ignore[arg-type]


def test_a_healthy_daemon_has_no_problems() -> None:
    assert healthy().problems() == []


def test_a_fresh_daemon_is_not_healthy_yet() -> None:
    assert Health().problems() == ["not listening for new rows", "database not answering"]


def test_a_wedged_loop() -> None:
    health = healthy()
    health.next_tick_due = time.monotonic() - 0.001

    assert health.problems() == ["delivery loop wedged"]

    health.tick()
    assert health.problems() == []
    assert health.next_tick_due > time.monotonic() + 59


def test_a_tick_allows_for_the_wait_it_announces() -> None:
    health = healthy()
    health.tick(waiting=300.0)
    assert health.next_tick_due > time.monotonic() + 359


@pytest.mark.parametrize(
    ("field", "problem"),
    [("listening", "not listening for new rows"), ("database_ok", "database not answering")],
)
def test_not_listening_or_no_database(field: str, problem: str) -> None:
    health = healthy()
    setattr(health, field, False)
    assert health.problems() == [problem]


def test_crashed_services_each_a_problem() -> None:
    health = healthy()
    health.services_down["writer"] = "ValueError: boom"
    health.services_down["listener"] = "OSError: gone"

    assert health.problems() == [
        "listener crashed: OSError: gone",
        "writer crashed: ValueError: boom",
    ]


def test_results_unwritten_longer_than_the_stall_limit() -> None:
    health = healthy()
    health.unwritten_since = time.monotonic() - 59
    assert health.problems() == []  # written within the limit: fine

    health.unwritten_since = time.monotonic() - 125
    (problem,) = health.problems()
    assert problem == ("results unwritten for 2m05s (the writer cannot record deliveries)")


def test_the_stall_limit_is_the_settings() -> None:
    health = healthy()
    health.stall_seconds = 5.0
    health.unwritten_since = time.monotonic() - 6
    assert len(health.problems()) == 1


# ---- the STATUS= line ----------------------------------------------------------------------


def test_status_line_while_starting() -> None:
    assert healthy().status_line() == "starting"


def test_status_line_with_figures() -> None:
    health = healthy(backlog=12, oldest_pending_seconds=45.0, failed_rows=1, delivered=7)

    assert (
        health.status_line()
        == "backlog 12 (oldest 45s); failed 1; delivered 7, skipped 0 since start"
    )


def test_status_line_with_no_pending_row() -> None:
    health = healthy(backlog=0, failed_rows=0)
    assert health.status_line() == "backlog 0; failed 0; delivered 0, skipped 0 since start"


def test_status_line_paused() -> None:
    health = healthy(backlog=3, failed_rows=0, paused=True)
    assert health.status_line().startswith("PAUSED (Partnero refused the API key); backlog 3")


def test_status_line_waiting_for_partnero() -> None:
    health = healthy(waiting_for_partnero="GET https://x/v1/test: HTTP 503 " + "x" * 300)
    line = health.status_line()
    assert line.startswith("WAITING FOR PARTNERO (GET https://x/v1/test: HTTP 503 x")
    assert len(line) < 200  # the reason is cut short


def test_status_line_paused_wins_over_waiting() -> None:
    health = healthy(paused=True, waiting_for_partnero="no answer")
    assert health.status_line().startswith("PAUSED")
    assert "WAITING" not in health.status_line()


def test_status_line_crashed_comes_first() -> None:
    health = healthy(paused=True)
    health.services_down.update(writer="ValueError: x", listener="OSError: y")

    assert health.status_line().startswith("CRASHED: listener, writer; PAUSED")


def test_status_line_ends_with_the_last_error() -> None:
    health = healthy(last_error="database: connection refused")
    assert health.status_line() == "starting; last error: database: connection refused"
