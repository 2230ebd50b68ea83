"""Running under systemd: sd_notify (READY, WATCHDOG, STATUS, STOPPING, RELOADING), the unit
files, metrics and /healthz. The daemon runs as a real `outbox run` process talking to a
NOTIFY_SOCKET that the test owns."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from outbox.dev.fake_partnero import FakePartneroThread
from tests.daemon_helpers import (
    API_KEY,
    DaemonThread,
    env_for,
    insert_sales,
    make_settings,
    settled,
    start_cli_daemon,
    stop_cli_daemon,
    wait_until,
)
from tests.helpers import NotifySocket

ROOT = Path(__file__).resolve().parent.parent
# Every unit file the wheel ships (share/partnero-outbox/systemd/).
UNITS = sorted(path.name for path in (ROOT / "systemd").glob("*.service"))


def test_ready_status_watchdog_stopping_and_a_wedged_loop(
    engine: sa.Engine, database_url: str, fake: FakePartneroThread, notify_socket: NotifySocket
) -> None:
    env = env_for(
        database_url,
        fake.url,
        poll_interval_seconds=0.3,
        stall_seconds=1,
        status_interval_seconds=0.2,
    )
    env.update(NOTIFY_SOCKET=notify_socket.path, WATCHDOG_USEC="600000")  # ping every 0.3 s
    proc = start_cli_daemon(env)
    try:
        ready = notify_socket.wait_for("READY", "1")
        assert ready["STATUS"].startswith("backlog 0")
        notify_socket.wait_for("WATCHDOG", "1")
        insert_sales(engine, ["inv_sd1", "inv_sd2"])
        wait_until(lambda: settled(engine, 2))
        status = notify_socket.wait_for("STATUS")
        while "delivered 2" not in status["STATUS"]:
            status = notify_socket.wait_for("STATUS")
        assert re.match(
            r"backlog 0; failed 0; delivered 2, skipped 0 since start", status["STATUS"]
        )

        # Wedge the delivery loop: the claim query waits on a lock that is never released.
        with engine.connect() as locker:
            locker.execute(sa.text("LOCK TABLE outbox.events IN ACCESS EXCLUSIVE MODE"))
            locked_at = last_ping = time.monotonic()
            # Pings stop (STATUS lines go on): after the stall allowance, 2 s without a ping.
            while time.monotonic() - last_ping < 2.0:
                assert time.monotonic() - locked_at < 15, "watchdog pings never stopped"
                fields = notify_socket.receive(timeout=0.2)
                if fields is not None and fields.get("WATCHDOG") == "1":
                    last_ping = time.monotonic()
            locker.rollback()
        # Released: the loop turns again and so do the pings.
        notify_socket.wait_for("WATCHDOG", "1", timeout=15)
    finally:
        proc.send_signal(signal.SIGTERM)
        stopping = notify_socket.wait_for("STOPPING", "1")
        code, stderr = stop_cli_daemon(proc)
    assert stopping["STATUS"].startswith("stopping")
    assert code == 0, stderr
    assert "outbox.watchdog.unhealthy" in stderr and "delivery loop wedged" in stderr


def test_no_ready_until_the_schema_is_current(
    empty_database_url: str, notify_socket: NotifySocket
) -> None:
    env = env_for(empty_database_url, "http://127.0.0.1:9")
    env["NOTIFY_SOCKET"] = notify_socket.path
    proc = start_cli_daemon(env)
    _, stderr = proc.communicate(timeout=60)  # it exits by itself
    assert proc.returncode == 1
    assert "run `outbox migrate` first" in stderr
    said = []
    while (fields := notify_socket.receive(timeout=0.2)) is not None:
        said.append(fields)
    assert said and all("READY" not in f for f in said)


def test_sighup_reloads_live_settings_and_a_rotated_key(
    engine: sa.Engine,
    database_url: str,
    fake: FakePartneroThread,
    notify_socket: NotifySocket,
    tmp_path: Path,
) -> None:
    key_file = tmp_path / "partnero_api_key"
    key_file.write_text(API_KEY)
    env_file = tmp_path / "outbox.env"
    env_file.write_text("OUTBOX_RATE_LIMIT_PER_SECOND=0\n")
    env = env_for(database_url, fake.url, log_level="info", auth_pause_seconds=600)
    env.update(
        NOTIFY_SOCKET=notify_socket.path,
        OUTBOX_API_KEY_FILE=str(key_file),
        OUTBOX_ENV_FILE=str(env_file),
    )
    del env["PARTNERO_API_KEY"]
    proc = start_cli_daemon(env)
    try:
        notify_socket.wait_for("READY", "1")
        # Partnero's key is rotated: the daemon gets 401s and pauses.
        fake.configure(api_key="rotated-key-9876543210")
        insert_sales(engine, ["inv_rot"])
        wait_until(lambda: [r for r in fake.requests() if r["status"] == 401])
        # The operator writes the new key and a new setting, then `systemctl reload outbox`.
        key_file.write_text("rotated-key-9876543210\n")
        env_file.write_text("OUTBOX_RATE_LIMIT_PER_SECOND=50\nOUTBOX_LEASE_SECONDS=90\n")
        proc.send_signal(signal.SIGHUP)
        reloading = notify_socket.wait_for("RELOADING", "1")
        assert int(reloading["MONOTONIC_USEC"]) > 0
        notify_socket.wait_for("READY", "1")
        wait_until(lambda: settled(engine, 1), timeout=30)
        # A broken file is refused and the running settings kept.
        env_file.write_text("OUTBOX_CONCURRENCY=lots\n")
        proc.send_signal(signal.SIGHUP)
        notify_socket.wait_for("RELOADING", "1")
        notify_socket.wait_for("READY", "1")
    finally:
        code, stderr = stop_cli_daemon(proc)
    assert code == 0, stderr
    assert '"changed": ["rate_limit_per_second"]' in stderr
    assert '"api_key_changed": true' in stderr
    assert '"settings": ["lease_seconds"]' in stderr  # needs a restart, and says so
    assert "outbox.daemon.reload_refused" in stderr and "'lots' is not a whole number" in stderr
    assert "rotated-key-9876543210" not in stderr
    assert [t["key"] for t in fake.ledger()] == ["inv_rot"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in a Prometheus exposition (labels in any order)."""
    for line in text.splitlines():
        found = re.fullmatch(r"(\w+)(?:\{(.*)\})? (\S+)", line)
        if found is None or found.group(1) != name:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', found.group(2) or ""))
        if have == labels:
            return float(found.group(3))
    raise AssertionError(f"{name}{labels} not in the scrape")


def test_metrics_and_healthz_are_scraped_for_real(
    engine: sa.Engine, database_url: str, fake: FakePartneroThread
) -> None:
    port = free_port()
    fake.set_customers(unknown=["ghost"])
    insert_sales(engine, ["inv_m1", "inv_m2", "inv_m3"])
    insert_sales(engine, ["inv_m4"], customer="ghost")
    settings = make_settings(
        database_url,
        fake.url,
        metrics_port=port,
        max_attempts=2,
        status_interval_seconds=0.1,
        poll_interval_seconds=0.3,
        stall_seconds=1,
    )
    with DaemonThread(settings):
        wait_until(lambda: settled(engine, 4))
        base = f"http://127.0.0.1:{port}"

        def scraped() -> str | None:
            text = httpx.get(f"{base}/metrics").text
            done = "outbox_backlog_rows 0.0" in text and 'outcome="customer_not_found"' in text
            return text if done and 'outcome="created"' in text else None

        text = wait_until(scraped, what="the counters and gauges to show every row")
        assert metric(text, "outbox_rows_settled_total", status="delivered", outcome="created") == 3
        assert (
            metric(
                text, "outbox_rows_settled_total", status="skipped", outcome="customer_not_found"
            )
            == 1
        )
        assert metric(text, "outbox_http_attempts_total", kind="create", status="201") == 3
        assert metric(text, "outbox_http_attempts_total", kind="create", status="400") == 2
        assert metric(text, "outbox_retries_total", reason="customer_not_found") == 1
        assert metric(text, "outbox_http_request_duration_seconds_count", kind="create") == 5
        assert metric(text, "outbox_backlog_rows") == 0
        assert metric(text, "outbox_leases_held") == 0
        assert metric(text, "outbox_loop_lag_seconds") >= 0
        assert API_KEY not in text
        healthy = httpx.get(f"{base}/healthz")
        assert healthy.status_code == 200
        assert healthy.json()["healthy"] is True and healthy.json()["failed"] == 0
        with engine.connect() as locker:  # wedge the loop: /healthz must say so
            locker.execute(sa.text("LOCK TABLE outbox.events IN ACCESS EXCLUSIVE MODE"))

            def wedged() -> bool:
                answer = httpx.get(f"{base}/healthz")
                return answer.status_code == 503 and (
                    "delivery loop wedged" in answer.json()["problems"]
                )

            wait_until(wedged, timeout=15, what="/healthz to report the wedged loop")
            locker.rollback()
        wait_until(lambda: httpx.get(f"{base}/healthz").status_code == 200, timeout=15)


# ---- the unit files ------------------------------------------------------------------------


def systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("systemd-analyze is missing; .ci/run installs the systemd package")
        pytest.skip("systemd-analyze is not installed")
    return found


def installed_units(tmp_path: Path) -> list[Path]:
    """The units as an install would place them: ExecStart pointing at a real `outbox`."""
    outbox_bin = str(Path(sys.executable).parent / "outbox")
    assert Path(outbox_bin).exists()
    paths = []
    for name in UNITS:
        text = (ROOT / "systemd" / name).read_text()
        path = tmp_path / name
        path.write_text(text.replace("/opt/outbox/bin/outbox", outbox_bin))
        paths.append(path)
    return paths


def test_units_pass_systemd_analyze_verify_without_warnings(tmp_path: Path) -> None:
    result = subprocess.run(
        # --man=no: the units' Documentation= lines are checked otherwise by running `man`,
        # which a server (or CI) without man pages fails.
        [systemd_analyze(), "verify", "--man=no", *map(str, installed_units(tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == "", result.stderr


@pytest.mark.parametrize("unit", UNITS)
def test_units_are_rated_2_or_lower_by_systemd_analyze_security(unit: str) -> None:
    """The offline score (systemd/README.md says how it differs from a live one)."""
    result = subprocess.run(
        [systemd_analyze(), "security", "--offline=true", str(ROOT / "systemd" / unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert found, result.stdout + result.stderr
    assert float(found.group(1)) <= 2.0


def unit_lines(unit: str, key: str) -> list[str]:
    text = (ROOT / "systemd" / unit).read_text()
    return [line.split("=", 1)[1] for line in text.splitlines() if line.startswith(f"{key}=")]


def test_each_unit_has_its_own_settings_file_and_database_credential() -> None:
    """The daemon reads its env file itself (so a reload can unset a line) and never holds the
    schema owner's password, which the migrate unit loads."""
    for unit in UNITS:
        assert unit_lines(unit, "EnvironmentFile") == [], unit
    assert "OUTBOX_ENV_FILE=/etc/outbox/outbox.env" in unit_lines("outbox.service", "Environment")
    assert "OUTBOX_ENV_FILE=/etc/outbox/migrate.env" in unit_lines(
        "outbox-migrate.service", "Environment"
    )
    assert unit_lines("outbox.service", "LoadCredential") == [
        "partnero_api_key:/etc/outbox/partnero_api_key",
        "pgpass:/etc/outbox/pgpass",
    ]
    assert unit_lines("outbox-migrate.service", "LoadCredential") == [
        "pgpass:/etc/outbox/migrate.pgpass"
    ]


def test_documentation_links_point_where_the_wheel_installs_the_docs() -> None:
    """The wheel puts the docs under share/doc/partnero-outbox and the units with their README
    under share/partnero-outbox/systemd (pyproject.toml); installed into /opt/outbox, each
    Documentation= link names a file that exists."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"README.md" = "share/doc/partnero-outbox/README.md"' in pyproject
    assert '"systemd" = "share/partnero-outbox/systemd"' in pyproject
    shipped = {
        "file:///opt/outbox/share/doc/partnero-outbox/": ROOT,
        "file:///opt/outbox/share/partnero-outbox/systemd/": ROOT / "systemd",
    }
    for unit in UNITS:
        links = [url for line in unit_lines(unit, "Documentation") for url in line.split()]
        assert links, unit
        for url in links:
            found = [
                source / url.removeprefix(prefix)
                for prefix, source in shipped.items()
                if url.startswith(prefix)
            ]
            assert found and found[0].is_file(), (unit, url)


def test_every_runbook_block_is_one_the_runbook_script_checks() -> None:
    """`make runbook` runs every `sh` block of systemd/README.md in a booted container and
    checks each step; a block it does not know fails here, without a container."""
    from tests.runbook.steps import STEPS, runbook_blocks

    page = runbook_blocks()
    assert [block.id for block in page] == list(STEPS)
    assert [block.id for block in page if block.directives.get("where") == "host"] == ["build"]
    assert all(block.skip is None for block in page)
