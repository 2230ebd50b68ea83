"""The API key (and the database password) leak nowhere: one thorough run of `outbox run` that
goes through every path that talks about Partnero's answers (retries, lookups, a validation
failure, an unknown customer, 401 pauses, a key rotated by SIGHUP), then a search for both keys
and the password in everything the daemon and the CLI produce: logs at debug level, the systemd
STATUS= lines, /metrics and /healthz, /proc/<pid>/cmdline and environ, every row of every outbox
table, the operator commands' text and JSON output, and the exceptions of a bad setting."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from outbox import db
from outbox.cli import main
from outbox.dev.fake_partnero import FakeConfig, FakePartneroThread
from outbox.service.settings import SettingError, resolve
from tests.daemon_helpers import (
    env_for,
    insert_sales,
    rows,
    scalar,
    settled,
    wait_until,
)

KEY = f"pk_live_{uuid.uuid4().hex}"
ROTATED = f"pk_live_{uuid.uuid4().hex}"
DB_PASSWORD = f"dbpw_{uuid.uuid4().hex[:16]}"
SECRETS = (KEY, ROTATED, DB_PASSWORD)


def leaks(text: str) -> list[str]:
    return [s for s in SECRETS if s in text]


def with_password(url: str) -> str:
    """The same URL with a password (ignored by the test server's trust auth, but carried
    through every setting, connection string and log line that could show it)."""
    parsed = sa.engine.make_url(db.sqlalchemy_url(url)).set(password=DB_PASSWORD)
    return db.libpq_url(parsed.render_as_string(hide_password=False))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class NotifyCollector:
    """The systemd side of sd_notify, read all along (an unread socket's queue fills up)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.said: list[str] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(self.path)
        self._sock.settimeout(0.1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                self.said.append(self._sock.recv(4096).decode())
            except TimeoutError:
                continue

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifyCollector]:
    collector = NotifyCollector(tmp_path / "notify.sock")
    yield collector
    collector.close()


def dump_outbox_tables(engine: sa.Engine) -> str:
    """Every row of every table in the outbox schema, as text."""
    with engine.connect() as conn:
        tables = conn.execute(
            sa.text("SELECT tablename FROM pg_tables WHERE schemaname = 'outbox'")
        ).scalars()
        parts = []
        for table in list(tables):
            parts += conn.execute(sa.text(f"SELECT t::text FROM outbox.{table} t")).scalars()
    return "\n".join(parts)


def test_no_secret_reaches_logs_rows_metrics_status_cli_or_the_process_table(
    engine: sa.Engine, database_url: str, tmp_path: Path, notify: NotifyCollector
) -> None:
    url = with_password(database_url)
    key_file = tmp_path / "partnero_api_key"
    key_file.write_text(KEY + "\n")
    port = free_port()
    fake_config = FakeConfig(api_key=KEY, dedupe=False, seed=5)
    with FakePartneroThread(fake_config) as fake:
        fake.set_customers(unknown=["ghost"])
        env = env_for(
            url,
            fake.url,
            log_level="debug",
            max_attempts=8,
            metrics_port=port,
            status_interval_seconds=0.2,
        )
        del env["PARTNERO_API_KEY"]  # from a file: then not even the environment holds it
        env.update(OUTBOX_API_KEY_FILE=str(key_file), NOTIFY_SOCKET=notify.path)
        log_path = tmp_path / "daemon.log"
        with open(log_path, "wb") as log_file:  # a file: debug logs would fill a pipe
            proc = subprocess.Popen(
                [sys.executable, "-m", "outbox.cli", "run"],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        try:
            insert_sales(engine, ["inv_ghost"], customer="ghost")  # 400, retried, then skipped
            with engine.begin() as conn:  # 422, failed at once with Partnero's reason
                conn.execute(
                    sa.text(
                        "SELECT outbox.record_sale('inv_422', 'c', 5, 'EUR', "
                        '\'{"customer": {"email": 42}}\')'
                    )
                )
            wait_until(lambda: settled(engine, 2), what="the refused rows to fail")
            # 5xx and answers lost after the create was applied: retries and lookups.
            fake.configure(fail_5xx_rate=0.3, drop_after_rate=0.5)
            insert_sales(engine, [f"inv_s{i}" for i in range(6)])
            wait_until(lambda: settled(engine, 8), what="the first rows to settle")
            # The key is rotated at Partnero: 401s pause the daemon until SIGHUP brings the
            # new key from the file.
            fake.configure(api_key=ROTATED, fail_5xx_rate=0.0, drop_after_rate=0.0)
            insert_sales(engine, ["inv_rot"])
            wait_until(lambda: [r for r in fake.requests() if r["status"] == 401])
            key_file.write_text(ROTATED + "\n")
            proc.send_signal(signal.SIGHUP)
            wait_until(lambda: settled(engine, 9), what="the row sent with the rotated key")
            with open(f"/proc/{proc.pid}/cmdline", "rb") as f:
                cmdline = f.read().decode(errors="replace")
            with open(f"/proc/{proc.pid}/environ", "rb") as f:
                environ = f.read().decode(errors="replace")
            base = f"http://127.0.0.1:{port}"
            scraped = httpx.get(f"{base}/metrics").text + httpx.get(f"{base}/healthz").text
            fake_config_text = httpx.get(f"{fake.url}/_fake/config").text
        finally:
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(60)
            stderr = log_path.read_text()
    assert code == 0, stderr[-3000:]
    status_lines = list(notify.said)

    # The run went through the paths that describe Partnero's answers.
    for event in (
        "outbox.delivery.retry",
        "outbox.delivery.lookup",
        "outbox.delivery.failed",
        "outbox.partnero.auth_failed",
        "outbox.daemon.reloaded",
    ):
        assert event in stderr, event
    failed = dict(
        rows(engine, "SELECT transaction_key, outcome FROM outbox.events WHERE status = 'failed'")
    )
    assert failed == {"inv_422": "validation_error", **failed}, failed
    ghost = scalar(
        engine,
        "SELECT status || '/' || outcome FROM outbox.events WHERE transaction_key = 'inv_ghost'",
    )
    assert ghost == "skipped/customer_not_found"
    assert "Customer not found" in stderr
    assert any("Unauthenticated" in line for line in status_lines)
    # The key file path may show; the key itself nowhere. The environment holds the database
    # URL (that is how it is given) but not the API key.
    assert leaks(cmdline) == []
    assert [s for s in (KEY, ROTATED) if s in environ] == []
    assert leaks(stderr) == []
    assert leaks("\n".join(status_lines)) == []
    assert leaks(scraped) == []
    assert leaks(dump_outbox_tables(engine)) == []
    assert leaks(fake_config_text) == []  # the fake's own config endpoint shows ***

    # The CLI, with the key and the password in its environment, in text and JSON.
    failed_id = scalar(engine, "SELECT id FROM outbox.events WHERE transaction_key = 'inv_422'")
    cli_env = {
        "OUTBOX_DATABASE_URL": url,
        "PARTNERO_API_KEY": ROTATED,
        "PARTNERO_API_URL": "http://127.0.0.1:9",
    }
    invocations = [["run", "--help"], ["migrate", "--status"]]
    for name, args in [
        ("status", []),
        ("failed", []),
        ("show", [str(failed_id)]),
        ("retry", [str(failed_id), "--dry-run"]),
        ("discard", [str(failed_id), "--dry-run"]),
        ("prune", ["--dry-run", "--older-than", "30d"]),
    ]:
        if name in main.commands:  # the operator commands, where this build has them
            invocations += [[name, *args], [name, *args, "--json"]]
    if "retry" in main.commands:  # and one that writes: the operator tables are checked too
        invocations.append(["retry", str(failed_id), "--reason", "secrets test"])
    outputs = []
    runner = CliRunner()
    for args in invocations:
        result = runner.invoke(main, args, env=cli_env)
        assert result.exception is None or isinstance(result.exception, SystemExit), (
            args,
            result.exception,
        )
        assert result.output.strip(), args
        assert result.exit_code in (0, 1), (args, result.output)
        if "--json" in args and result.exit_code in (0, 1):
            assert isinstance(json.loads(result.stdout), dict), (args, result.output)
        outputs.append(result.output)
    assert leaks("\n".join(outputs)) == []
    assert leaks(dump_outbox_tables(engine)) == []
    assert rows(engine, "SELECT 1 FROM outbox.attempts LIMIT 1")


def test_a_bad_or_broken_key_is_refused_without_quoting_it(tmp_path: Path) -> None:
    base = {"OUTBOX_DATABASE_URL": f"postgresql://u:{DB_PASSWORD}@h/d"}
    broken = f"{KEY[:10]} {KEY[10:]}"  # whitespace inside: refused, and never repeated
    for environ in (
        {**base, "PARTNERO_API_KEY": broken},
        {**base, "PARTNERO_API_KEY": KEY, "OUTBOX_LEASE_SECONDS": "abc"},
        {**base, "OUTBOX_API_KEY_FILE": str(tmp_path / "missing")},
    ):
        with pytest.raises(SettingError) as info:
            resolve({}, environ)
        text = f"{info.value} {info.value!r} {info.value.args}"
        assert leaks(text) == [] and broken not in text
    settings = resolve({}, {**base, "PARTNERO_API_KEY": KEY})
    assert leaks(repr(settings)) == [] and leaks(str(settings)) == []
    assert os.environ.get("PARTNERO_API_KEY") != KEY
