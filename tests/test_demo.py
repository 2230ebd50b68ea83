"""`outbox demo`: run it for real (embedded Postgres, fake Partnero, daemon) and read the report.

`demo` is registered on the `outbox` group elsewhere; these tests call
`outbox.dev.demo.demo_command` directly (and `python -m outbox.dev.demo` for --keep, which
needs a real process to interrupt).
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
import sqlalchemy as sa
from click.testing import CliRunner, Result

from outbox import db
from outbox.dev import demo

PLAN = demo.make_plan()
SALES = len(PLAN.sales)  # 40 distinct sales in round 1
REFUNDS = len(PLAN.refunds)  # 8 refunds of delivered sales


def invoke(*args: str) -> Result:
    return CliRunner().invoke(demo.demo_command, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def text_run() -> Result:
    return invoke()


@pytest.fixture(scope="module")
def json_run() -> Result:
    return invoke("--json")


# ---- the plain-text report ---------------------------------------------------------------------


def test_text_report_exits_zero_and_matches_the_ledger(text_run: Result) -> None:
    assert text_run.exit_code == 0, text_run.output
    assert (
        f"Partnero ledger: {SALES - REFUNDS} live transactions, {REFUNDS} deleted; "
        "matches the outbox table: yes"
    ) in text_run.stdout


def test_text_report_counts(text_run: Result) -> None:
    out = text_run.stdout
    total = PLAN.sale_rows + PLAN.refund_rows
    assert (
        f"{SALES + 3} sales (one key recorded twice: {PLAN.duplicate.key}) and "
        f"{REFUNDS + 1} refunds, {total} rows in outbox.events"
    ) in out
    expected = {
        ("sale", "delivered", "created"): SALES,
        ("sale", "delivered", "duplicate"): 1,
        ("sale", "failed", "customer_not_found"): 1,
        ("sale", "failed", "validation_error"): 1,
        ("refund", "delivered", "deleted"): REFUNDS,
        ("refund", "pending", "-"): 1,
    }
    for (kind, status, outcome), count in expected.items():
        assert re.search(rf"^  {kind}\s+{status}\s+{re.escape(outcome)}\s+{count}$", out, re.M), (
            kind,
            status,
            outcome,
            count,
        )


def test_text_report_failed_and_blocked_rows(text_run: Result) -> None:
    out = text_run.stdout
    ghost, invalid = PLAN.unknown_customer_sale, PLAN.invalid_sale
    assert "Failed: 2 rows need a person" in out
    assert re.search(
        rf"^\s+\d+\s+{ghost.key}\s+{ghost.customer}\s+customer_not_found\s+6\s+HTTP 400: "
        "Customer not found",
        out,
        re.M,
    )
    assert re.search(
        rf"^\s+\d+\s+{invalid.key}\s+{invalid.customer}\s+validation_error\s+1\s+HTTP 422",
        out,
        re.M,
    )
    assert "Blocked: 1 refund behind a sale" in out
    assert re.search(
        rf"refund #\d+ {ghost.key} waits for sale #\d+ \(failed: customer_not_found\)", out
    )


def test_text_report_attempts_and_how_to_inspect(text_run: Result) -> None:
    out = text_run.stdout
    assert re.search(r"HTTP attempts by decision \(\d+ in outbox.attempts\)", out)
    for decision in (
        "delivered:created",
        "delivered:deleted",
        "retry:server_error+lookup",
        "lookup:absent",
        "failed:customer_not_found",
        "failed:validation_error",
    ):
        assert re.search(rf"^  {re.escape(decision)}\s+\d+$", out, re.M), decision
    assert "FROM outbox.events WHERE status = 'failed'" in out
    assert "FROM outbox.attempts WHERE event_id = " in out


def test_text_report_has_no_colour_codes_off_a_terminal(text_run: Result) -> None:
    assert "\x1b[" not in text_run.output


def test_daemon_logs_stay_out_of_the_output(text_run: Result) -> None:
    assert "outbox.delivery" not in text_run.output
    assert "outbox.daemon" not in text_run.output


# ---- --json ------------------------------------------------------------------------------------


def test_json_report_shape(json_run: Result) -> None:
    assert json_run.exit_code == 0, json_run.output
    report: dict[str, Any] = json.loads(json_run.stdout)  # stdout is the JSON object alone
    assert set(report) == {
        "ok",
        "seconds",
        "settings",
        "inserted",
        "rounds",
        "events",
        "failed",
        "blocked",
        "attempts",
        "partnero_calls",
        "ledger",
        "database_url",
    }
    assert report["ok"] is True
    assert isinstance(report["seconds"], float) and 0 < report["seconds"] < 60
    assert report["database_url"] is None

    assert report["settings"] == {
        "max_attempts": 6,
        "concurrency": 8,
        "lease_seconds": 5.0,
        "request_timeout_seconds": 2.0,
        "retry_base_delay_seconds": 0.1,
        "retry_max_delay_seconds": 0.5,
    }
    assert report["inserted"] == {
        "sales": SALES + 3,
        "refunds": REFUNDS + 1,
        "duplicate_keys": [PLAN.duplicate.key],
    }
    assert set(report["rounds"]) == {"round_1_seconds", "round_2_seconds"}

    events = report["events"]
    assert events["total"] == SALES + 3 + REFUNDS + 1
    assert events["by_status"] == {"delivered": SALES + 1 + REFUNDS, "failed": 2, "pending": 1}
    assert events["by_outcome"] == [
        {"event_type": "sale", "status": "delivered", "outcome": "created", "count": SALES},
        {"event_type": "sale", "status": "delivered", "outcome": "duplicate", "count": 1},
        {"event_type": "sale", "status": "failed", "outcome": "customer_not_found", "count": 1},
        {"event_type": "sale", "status": "failed", "outcome": "validation_error", "count": 1},
        {"event_type": "refund", "status": "delivered", "outcome": "deleted", "count": REFUNDS},
        {"event_type": "refund", "status": "pending", "outcome": None, "count": 1},
    ]


def test_json_failed_and_blocked(json_run: Result) -> None:
    report = json.loads(json_run.stdout)
    ghost, invalid = PLAN.unknown_customer_sale, PLAN.invalid_sale
    failed = {f["transaction_key"]: f for f in report["failed"]}
    assert set(failed) == {ghost.key, invalid.key}
    for row in failed.values():
        assert set(row) == {
            "id",
            "event_type",
            "transaction_key",
            "customer_key",
            "outcome",
            "attempts",
            "last_status_code",
            "last_error",
        }
        assert row["event_type"] == "sale"
        assert isinstance(row["id"], int)
    assert failed[ghost.key]["customer_key"] == ghost.customer
    assert failed[ghost.key]["outcome"] == "customer_not_found"
    assert failed[ghost.key]["attempts"] == 6
    assert failed[ghost.key]["last_status_code"] == 400
    assert "Customer not found" in failed[ghost.key]["last_error"]
    assert failed[invalid.key]["outcome"] == "validation_error"
    assert failed[invalid.key]["attempts"] == 1
    assert failed[invalid.key]["last_status_code"] == 422
    assert "created_at" in failed[invalid.key]["last_error"]

    assert report["blocked"] == [
        {
            "id": report["blocked"][0]["id"],
            "transaction_key": ghost.key,
            "waiting_for": {
                "id": failed[ghost.key]["id"],
                "status": "failed",
                "outcome": "customer_not_found",
            },
        }
    ]


def test_json_attempts_calls_and_ledger(json_run: Result) -> None:
    report = json.loads(json_run.stdout)
    attempts = report["attempts"]
    by_decision: dict[str, int] = attempts["by_decision"]
    assert attempts["total"] == sum(by_decision.values())
    # Every sale delivered as created was either created outright or found by a lookup after a
    # create whose answer was lost; nothing was created twice.
    assert by_decision["delivered:created"] + by_decision.get("lookup:found", 0) == SALES
    assert by_decision["delivered:deleted"] == REFUNDS
    assert by_decision["failed:customer_not_found"] == 1
    assert by_decision["retry:customer_not_found"] == 5
    assert by_decision["failed:validation_error"] == 1
    assert by_decision["retry:server_error+lookup"] >= demo.OUTAGE_CALLS
    assert by_decision["lookup:absent"] >= 1

    calls = report["partnero_calls"]
    assert calls["total"] == sum(calls["by_status"].values())
    assert calls["by_status"]["503"] >= demo.OUTAGE_CALLS
    assert calls["by_status"]["201"] == by_decision["delivered:created"]
    assert calls["by_status"]["422"] == 1
    assert calls["by_status"].get("dropped_after", 0) >= 1

    assert report["ledger"] == {
        "live": SALES - REFUNDS,
        "deleted": REFUNDS,
        "matches": True,
        "problems": [],
    }


def test_json_mode_prints_no_progress(json_run: Result) -> None:
    assert json_run.stderr == ""


# ---- exit status when the table and the ledger disagree ----------------------------------------


def test_exit_one_when_the_ledger_does_not_match(monkeypatch: pytest.MonkeyPatch) -> None:
    real = demo.check_ledger

    def tampered(events: Any, ledger: list[dict[str, Any]]) -> dict[str, Any]:
        doubled = [*ledger, dict(ledger[0])]  # as if Partnero had been sent a create twice
        return real(events, doubled)

    monkeypatch.setattr(demo, "check_ledger", tampered)
    result = invoke()
    assert result.exit_code == 1
    assert "matches the outbox table: no" in result.stdout
    assert "created twice" in result.stdout


def test_check_ledger_finds_each_kind_of_disagreement() -> None:
    events = [
        {"event_type": "sale", "status": "delivered", "outcome": "created", "transaction_key": "a"},
        {"event_type": "sale", "status": "delivered", "outcome": "created", "transaction_key": "b"},
        {"event_type": "sale", "status": "failed", "outcome": "rejected", "transaction_key": "c"},
        {
            "event_type": "refund",
            "status": "delivered",
            "outcome": "deleted",
            "transaction_key": "b",
        },
    ]

    def entry(key: str, deleted: bool = False) -> dict[str, Any]:
        return {"key": key, "deleted_seq": 9 if deleted else None}

    good = demo.check_ledger(events, [entry("a"), entry("b", deleted=True)])
    assert good == {"live": 1, "deleted": 1, "matches": True, "problems": []}

    bad = demo.check_ledger(
        events,
        [entry("a"), entry("a"), entry("b"), entry("c"), entry("z", deleted=True)],
    )
    assert bad["matches"] is False
    text = "\n".join(bad["problems"])
    assert "a: 2 transactions in Partnero (created twice)" in text
    assert "b: refund delivered as deleted, but Partnero still counts it" in text
    assert "c: the sale failed, yet it reached Partnero" in text
    assert "z: in Partnero, but no sale with this key was delivered" in text
    assert "z: deleted in Partnero, but no refund was delivered" in text

    missing = demo.check_ledger(events, [entry("b", deleted=True)])
    assert missing["problems"] == ["a: delivered as created, but Partnero has no such transaction"]


# ---- --keep ------------------------------------------------------------------------------------


class LineReader:
    """Reads a process's stdout in a thread, so that waiting for a line can have a deadline."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        self._stdout = proc.stdout
        self._lines: queue.Queue[str] = queue.Queue()
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        for line in self._stdout:
            self._lines.put(line)
        self._lines.put("")

    def line_with(self, marker: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        seen: list[str] = []
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if not line:
                break
            seen.append(line)
            if marker in line:
                return line
        raise AssertionError(f"no line with {marker!r} in:\n{''.join(seen)}")

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


def test_keep_leaves_the_database_until_interrupted() -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with subprocess.Popen(
        [sys.executable, "-m", "outbox.dev.demo", "--keep"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    ) as proc:
        reader = LineReader(proc)
        try:
            url = reader.line_with('psql "postgresql://', timeout=90).split('"')[1]
            engine = db.create_engine(url, poolclass=sa.NullPool)
            try:
                with engine.connect() as conn:
                    total = conn.execute(sa.text("SELECT count(*) FROM outbox.events")).scalar()
                    failed = conn.execute(
                        sa.text("SELECT count(*) FROM outbox.events WHERE status = 'failed'")
                    ).scalar()
            finally:
                engine.dispose()
            assert total == PLAN.sale_rows + PLAN.refund_rows
            assert failed == 2
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=60)  # stderr holds a few progress lines: no pipe fills up
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            reader.join(10)
        err = proc.stderr.read() if proc.stderr is not None else ""
    assert proc.returncode == 0, err
    assert "removing the demo database" in err
    socket_dir = Path(unquote(parse_qs(urlsplit(url).query)["host"][0]))
    assert not socket_dir.exists(), "the embedded server was not removed"
