"""Run the daemon in the test process (a thread with its own event loop) or as `outbox run`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa

from outbox.dev import demo
from outbox.service.settings import Settings, load

API_KEY = "test-key-0123456789"

FAST = {
    "lease_seconds": "4",
    "request_timeout_seconds": "1.5",
    "retry_base_delay_seconds": "0.05",
    "retry_max_delay_seconds": "0.3",
    "max_attempts": "20",
    "concurrency": "8",
    "poll_interval_seconds": "1",
    "blocked_recheck_seconds": "0.3",
    "orphan_refund_grace_seconds": "1",
    "auth_pause_seconds": "0.5",
    "shutdown_grace_seconds": "3",
    "log_format": "json",
    "log_level": "warning",
}


def make_settings(database_url: str, partnero_url: str, **overrides: Any) -> Settings:
    raw = {**FAST, "database_url": database_url, "partnero_api_url": partnero_url}
    raw.update({k: str(v) for k, v in overrides.items()})
    return load(raw, environ={"PARTNERO_API_KEY": API_KEY})


def env_for(database_url: str, partnero_url: str, **overrides: Any) -> dict[str, str]:
    """Environment for `outbox run` in a subprocess."""
    env = {
        **os.environ,
        "OUTBOX_DATABASE_URL": database_url,
        "PARTNERO_API_URL": partnero_url,
        "PARTNERO_API_KEY": API_KEY,
    }
    for name, value in {**FAST, **{k: str(v) for k, v in overrides.items()}}.items():
        env[f"OUTBOX_{name.upper()}"] = value
    return env


class DaemonThread(demo.DaemonThread):
    """The demo's daemon thread as a context manager; stopping it raises what the daemon
    raised."""

    def __enter__(self) -> DaemonThread:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait_verified(self) -> DaemonThread:
        """Wait until the start-up key check (GET /v1/test) has passed: from then on a fault
        configured on the fake hits the rows, not the check."""
        wait_until(
            lambda: self.daemon is not None and self.daemon.gate.verified,
            what="the start-up key check",
        )
        return self

    def stop(self, timeout: float = 30) -> None:
        super().stop(timeout)
        assert not self.alive, "the daemon did not stop"
        if self.error is not None:
            raise self.error


def wait_until(condition: Callable[[], Any], timeout: float = 30, what: str = "condition") -> Any:
    """Poll a condition until it is truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def api_calls(fake: Any) -> list[dict[str, Any]]:
    """The fake's request log without the daemon's key checks (GET /v1/test)."""
    return [r for r in fake.requests() if r["path"] != "/v1/test"]


def scalar(engine: sa.Engine, sql: str, **params: Any) -> Any:
    with engine.connect() as conn:
        return conn.execute(sa.text(sql), params).scalar()


def rows(engine: sa.Engine, sql: str, **params: Any) -> list[sa.Row[Any]]:
    with engine.connect() as conn:
        return list(conn.execute(sa.text(sql), params))


def statuses(engine: sa.Engine) -> dict[str, int]:
    return {
        r[0]: r[1] for r in rows(engine, "SELECT status, count(*) FROM outbox.events GROUP BY 1")
    }


def settled(engine: sa.Engine, total: int) -> bool:
    return scalar(engine, "SELECT count(*) FROM outbox.events WHERE status <> 'pending'") == total


def insert_sales(
    engine: sa.Engine, keys: list[str], customer: str = "cust_1", amount: str = "10.00"
) -> None:
    with engine.begin() as conn:
        for key in keys:
            conn.execute(
                sa.text("SELECT outbox.record_sale(:k, :c, CAST(:a AS numeric), 'EUR')"),
                {"k": key, "c": customer, "a": amount},
            )


def insert_refunds(engine: sa.Engine, keys: list[str]) -> None:
    with engine.begin() as conn:
        for key in keys:
            conn.execute(sa.text("SELECT outbox.record_refund(:k)"), {"k": key})


def start_cli_daemon(env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "outbox.cli", "run"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def stop_cli_daemon(proc: subprocess.Popen[str], sig: int = signal.SIGTERM) -> tuple[int, str]:
    """Signal the daemon, wait for it, close its pipes; return (exit code, stderr)."""
    if proc.poll() is None:
        proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    return proc.returncode, stderr


def sigkill(proc: subprocess.Popen[str]) -> None:
    stop_cli_daemon(proc, signal.SIGKILL)
