"""`systemctl reload outbox` with the unit as shipped: the daemon reads OUTBOX_ENV_FILE itself,
so a line removed from the file is unset by the next reload (the setting falls back to its
default), while a variable in the process environment (what `EnvironmentFile=` would put there)
outlives any edit of the file. A real `outbox run` process, reloaded with SIGHUP."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from outbox.dev.fake_partnero import FakePartneroThread
from tests.daemon_helpers import (
    env_for,
    insert_sales,
    settled,
    start_cli_daemon,
    stop_cli_daemon,
    wait_until,
)
from tests.helpers import NotifySocket


def json_lines(stderr: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


def delivered_keys(lines: list[dict[str, Any]]) -> list[str]:
    return [line["key"] for line in lines if line["event"] == "outbox.delivery.delivered"]


def wait_ready(proc: subprocess.Popen[str], sock: NotifySocket, timeout: float = 30) -> None:
    """READY=1 from the daemon; fail at once, with its stderr, if it exits instead."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fields = sock.receive(timeout=0.2)
        if fields is not None and fields.get("READY") == "1":
            return
        if proc.poll() is not None:
            raise AssertionError(f"outbox run exited {proc.returncode}: {proc.communicate()[1]}")
    raise AssertionError(f"no READY=1 within {timeout} s")


def run_edit_and_reload(
    engine: sa.Engine,
    env: dict[str, str],
    env_file: Path,
    notify_socket: NotifySocket,
    new_text: str,
) -> list[dict[str, Any]]:
    """Start `outbox run`, deliver inv_before, write `new_text` to the env file, reload, deliver
    inv_after, stop; the daemon's JSON log lines."""
    env["NOTIFY_SOCKET"] = notify_socket.path
    proc = start_cli_daemon(env)
    try:
        wait_ready(proc, notify_socket)
        insert_sales(engine, ["inv_before"])
        wait_until(lambda: settled(engine, 1), what="inv_before to be delivered")
        env_file.write_text(new_text)
        proc.send_signal(signal.SIGHUP)
        notify_socket.wait_for("RELOADING", "1")
        wait_ready(proc, notify_socket)
        insert_sales(engine, ["inv_after"])
        wait_until(lambda: settled(engine, 2), what="inv_after to be delivered")
    finally:
        code, stderr = stop_cli_daemon(proc)
    assert code == 0, stderr
    return json_lines(stderr)


def daemon_env(database_url: str, fake: FakePartneroThread, env_file: Path) -> dict[str, str]:
    """The environment outbox.service gives the daemon: OUTBOX_ENV_FILE, and neither the log
    level nor the concurrency (the test helpers' defaults for both are removed)."""
    env = env_for(database_url, fake.url)
    del env["OUTBOX_LOG_LEVEL"], env["OUTBOX_CONCURRENCY"]
    env["OUTBOX_ENV_FILE"] = str(env_file)
    return env


def test_a_line_removed_from_the_env_file_falls_back_to_the_default_on_reload(
    engine: sa.Engine,
    database_url: str,
    fake: FakePartneroThread,
    notify_socket: NotifySocket,
    tmp_path: Path,
) -> None:
    env_file = tmp_path / "outbox.env"
    env_file.write_text("# quiet for now\nOUTBOX_LOG_LEVEL=warning\nOUTBOX_CONCURRENCY=2\n")
    env = daemon_env(database_url, fake, env_file)
    lines = run_edit_and_reload(engine, env, env_file, notify_socket, "# back to defaults\n")
    (reloaded,) = [line for line in lines if line["event"] == "outbox.daemon.reloaded"]
    assert reloaded["changed"] == ["concurrency", "log_level"]
    # At warning, the first delivery logged no line; after the reload the default (info) is in
    # force and the second one does.
    assert delivered_keys(lines) == ["inv_after"]
    assert [t["key"] for t in fake.ledger()] == ["inv_before", "inv_after"]


def test_a_variable_in_the_process_environment_outlives_the_env_file(
    engine: sa.Engine,
    database_url: str,
    fake: FakePartneroThread,
    notify_socket: NotifySocket,
    tmp_path: Path,
) -> None:
    """Why outbox.service has no EnvironmentFile=: it would put each line into the process
    environment at start, under the file the daemon reads, and removing the line from the file
    would change nothing until a restart."""
    env_file = tmp_path / "outbox.env"
    env_file.write_text("OUTBOX_LOG_LEVEL=warning\n")
    env = daemon_env(database_url, fake, env_file)
    env["OUTBOX_LOG_LEVEL"] = "warning"  # what EnvironmentFile=/etc/outbox/outbox.env would do
    lines = run_edit_and_reload(engine, env, env_file, notify_socket, "")
    assert delivered_keys(lines) == []  # still at warning: neither delivery logged a line
    assert [t["key"] for t in fake.ledger()] == ["inv_before", "inv_after"]
