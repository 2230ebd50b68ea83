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
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
import sqlalchemy as sa
from click.testing import CliRunner, Result

from outbox import db
from outbox.dev import demo

PLAN = demo.make_plan()
SIGNUPS = Counter(c.referral for c in PLAN.signups)  # round 1: referred, not_referred, ...
REFERRED_SALES = len(PLAN.referred_sales)  # distinct keys; delivered as created
UNREFERRED_SALES = len(PLAN.unreferred_sales)  # their customer's signup was skipped: skipped
REFERRED_KEYS = {s.key for s in PLAN.referred_sales}
REFUNDS_DELIVERED = sum(1 for key in PLAN.refunds if key in REFERRED_KEYS)
REFUNDS_SKIPPED = len(PLAN.refunds) - REFUNDS_DELIVERED
TOTAL = PLAN.signup_rows + PLAN.sale_rows + PLAN.refund_rows

# Where every row ends, in the report's order. Round 2 adds: a sale of a customer with no signup
# (skipped after the grace) and its refund (sale_skipped), a sale Partnero refuses (failed) and
# its refund (waiting), a signup Partnero refuses (failed) and its customer's sale (waiting).
BY_OUTCOME: list[tuple[str, str, str | None, int]] = [
    ("signup", "delivered", "created", SIGNUPS["referred"]),
    ("signup", "skipped", "not_referred", SIGNUPS["not_referred"]),
    ("signup", "skipped", "invalid_partner", SIGNUPS["invalid_partner"]),
    ("signup", "failed", "validation_error", 1),
    ("sale", "delivered", "created", REFERRED_SALES),
    ("sale", "delivered", "duplicate", 1),
    ("sale", "skipped", "customer_not_found", UNREFERRED_SALES + 1),
    ("sale", "failed", "validation_error", 1),
    ("sale", "pending", None, 1),
    ("refund", "delivered", "deleted", REFUNDS_DELIVERED),
    ("refund", "skipped", "sale_skipped", REFUNDS_SKIPPED + 1),
    ("refund", "pending", None, 1),
]
SKIPPED = sum(n for _, status, _, n in BY_OUTCOME if status == "skipped")
DELIVERED = sum(n for _, status, _, n in BY_OUTCOME if status == "delivered")


def invoke(*args: str) -> Result:
    return CliRunner().invoke(demo.demo_command, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def text_run() -> Result:
    return invoke()


@pytest.fixture(scope="module")
def json_run() -> Result:
    return invoke("--json")


def test_the_plan_is_a_shop_where_most_customers_came_by_themselves() -> None:
    assert SIGNUPS["not_referred"] > SIGNUPS["referred"] >= 3
    assert SIGNUPS["invalid_partner"] == 1
    assert PLAN.duplicate.key in REFERRED_KEYS  # a duplicate only a delivered sale can show
    assert REFUNDS_DELIVERED >= 3 and REFUNDS_SKIPPED >= 2  # both kinds are refunded
    assert UNREFERRED_SALES > REFERRED_SALES
    assert PLAN.unknown_customer_sale.customer not in {c.key for c in PLAN.signups}
    assert PLAN.mistyped.referral == "referred"


# ---- the plain-text report ---------------------------------------------------------------------


def test_text_report_exits_zero_and_matches_the_ledger(text_run: Result) -> None:
    assert text_run.exit_code == 0, text_run.output
    live = REFERRED_SALES - REFUNDS_DELIVERED
    assert (
        f"Partnero ledger: {live} live transactions, {REFUNDS_DELIVERED} deleted, "
        f"{SIGNUPS['referred']} customers; matches the outbox table: yes"
    ) in text_run.stdout


def test_text_report_counts(text_run: Result) -> None:
    out = text_run.stdout
    assert (
        f"{PLAN.signup_rows} signups: {SIGNUPS['referred'] + 1} referred by a partner, "
        f"{SIGNUPS['not_referred']} not referred, 1 with a partner key Partnero does not know"
    ) in out
    assert (
        f"{PLAN.sale_rows} sales (one key recorded twice: {PLAN.duplicate.key}; 1 customer "
        f"without a signup), {PLAN.refund_rows} refunds"
    ) in out
    assert f"{TOTAL} rows in outbox.events" in out
    assert (
        f"{DELIVERED} delivered, {SKIPPED} skipped, 2 failed, 2 pending "
        "(waiting behind a failed row)"
    ) in out
    for kind, status, outcome, count in BY_OUTCOME:
        shown = re.escape(outcome or "-")
        assert re.search(rf"^  {kind}\s+{status}\s+{shown}\s+{count}$", out, re.M), (
            kind,
            status,
            outcome,
            count,
        )


def test_text_report_shows_skipped_rows_as_the_normal_case(text_run: Result) -> None:
    out = text_run.stdout
    assert f"Skipped: {SKIPPED} rows settled with nothing to send" in out
    assert "The normal case, nobody needs to act" in out
    for kind, outcome, count, meaning in (
        ("signup", "not_referred", SIGNUPS["not_referred"], "no partner reference: not sent"),
        ("signup", "invalid_partner", 1, "a partner key Partnero does not know"),
        ("sale", "customer_not_found", UNREFERRED_SALES + 1, "a customer Partnero does not know"),
        ("refund", "sale_skipped", REFUNDS_SKIPPED + 1, "its sale was skipped"),
    ):
        assert re.search(rf"^  {kind}\s+{outcome}\s+{count}\s+{re.escape(meaning)}", out, re.M)
    # Skipped rows are not failures: nothing of them is listed under Failed or Blocked.
    failed_section = out.split("Failed:")[1].split("HTTP attempts")[0]
    assert "customer_not_found" not in failed_section
    assert PLAN.unknown_customer_sale.key not in failed_section


def test_text_report_failed_and_blocked_rows(text_run: Result) -> None:
    out = text_run.stdout
    invalid, waiting, lena = PLAN.invalid_sale, PLAN.waiting_sale, PLAN.mistyped.key
    assert "Failed: 2 rows need a person" in out
    assert re.search(
        rf"^\s+\d+\s+sale\s+{invalid.key}\s+{invalid.customer}\s+validation_error\s+1\s+HTTP 422",
        out,
        re.M,
    )
    assert re.search(rf"^\s+\d+\s+signup\s+-\s+{lena}\s+validation_error\s+1\s+HTTP 422", out, re.M)
    assert "Blocked: 2 rows waiting behind a failed row" in out
    assert re.search(
        rf"refund #\d+ {invalid.key} waits for sale #\d+ \(failed: validation_error\)", out
    )
    assert re.search(
        rf"sale #\d+ {waiting.key} {lena} waits for signup #\d+ \(failed: validation_error\)", out
    )


def test_text_report_attempts_and_how_to_inspect(text_run: Result) -> None:
    out = text_run.stdout
    assert re.search(r"HTTP attempts by decision \(\d+ in outbox.attempts\)", out)
    for decision in (
        "delivered:created",
        "delivered:deleted",
        "retry:server_error+lookup",
        "lookup:absent",
        "skipped:customer_not_found",
        "skipped:invalid_partner",
        "retry:customer_not_found",
        "failed:validation_error",
    ):
        assert re.search(rf"^  {re.escape(decision)}\s+\d+$", out, re.M), decision
    assert "FROM outbox.events WHERE status = 'failed'" in out
    assert "WHERE status = 'skipped'" in out
    assert "FROM outbox.blocked_deliveries" in out
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
        "skipped",
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
        "unknown_customer_grace_seconds": 2.0,
    }
    assert report["inserted"] == {
        "signups": PLAN.signup_rows,
        "sales": PLAN.sale_rows,
        "refunds": PLAN.refund_rows,
        "duplicate_keys": [PLAN.duplicate.key],
        "customers": {
            "referred": SIGNUPS["referred"] + 1,
            "not_referred": SIGNUPS["not_referred"],
            "invalid_partner": 1,
            "no_signup": 1,
        },
    }
    assert set(report["rounds"]) == {"round_1_seconds", "round_2_seconds"}

    events = report["events"]
    assert events["total"] == TOTAL
    assert events["by_status"] == {
        "delivered": DELIVERED,
        "failed": 2,
        "pending": 2,
        "skipped": SKIPPED,
    }
    assert events["by_outcome"] == [
        {"event_type": kind, "status": status, "outcome": outcome, "count": count}
        for kind, status, outcome, count in BY_OUTCOME
    ]


def test_json_skipped(json_run: Result) -> None:
    skipped = json.loads(json_run.stdout)["skipped"]
    assert skipped["total"] == SKIPPED
    assert [(r["event_type"], r["outcome"], r["count"]) for r in skipped["by_outcome"]] == [
        (kind, outcome, count) for kind, status, outcome, count in BY_OUTCOME if status == "skipped"
    ]
    assert all(r["meaning"] for r in skipped["by_outcome"])
    # One answer settled each skipped sale and the invalid partner's signup; nothing was sent
    # for a not-referred signup or a refund of a skipped sale.
    assert skipped["calls"]["settling"] == UNREFERRED_SALES + 1 + 1
    assert skipped["calls"]["total"] >= skipped["calls"]["settling"]


def test_json_failed_and_blocked(json_run: Result) -> None:
    report = json.loads(json_run.stdout)
    invalid, waiting, lena = PLAN.invalid_sale, PLAN.waiting_sale, PLAN.mistyped.key
    failed = {(f["event_type"], f["customer_key"]): f for f in report["failed"]}
    assert set(failed) == {("sale", invalid.customer), ("signup", lena)}
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
        assert isinstance(row["id"], int)
        assert (row["outcome"], row["attempts"], row["last_status_code"]) == (
            "validation_error",
            1,
            422,
        )
    sale, signup = failed[("sale", invalid.customer)], failed[("signup", lena)]
    assert sale["transaction_key"] == invalid.key
    assert "reward" in sale["last_error"]
    assert signup["transaction_key"] is None
    assert "email" in signup["last_error"]

    assert report["blocked"] == [
        {
            "id": report["blocked"][0]["id"],
            "event_type": "refund",
            "transaction_key": invalid.key,
            "customer_key": None,
            "waiting_for": {
                "id": sale["id"],
                "event_type": "sale",
                "status": "failed",
                "outcome": "validation_error",
            },
        },
        {
            "id": report["blocked"][1]["id"],
            "event_type": "sale",
            "transaction_key": waiting.key,
            "customer_key": lena,
            "waiting_for": {
                "id": signup["id"],
                "event_type": "signup",
                "status": "failed",
                "outcome": "validation_error",
            },
        },
    ]


def test_json_attempts_calls_and_ledger(json_run: Result) -> None:
    report = json.loads(json_run.stdout)
    attempts = report["attempts"]
    by_decision: dict[str, int] = attempts["by_decision"]
    assert attempts["total"] == sum(by_decision.values())
    # Every referred signup and every sale delivered as created was either created outright or
    # (a sale) found by a lookup after a create whose answer was lost; nothing was created twice.
    created = by_decision["delivered:created"] + by_decision.get("lookup:found", 0)
    assert created == SIGNUPS["referred"] + REFERRED_SALES
    assert by_decision["delivered:deleted"] == REFUNDS_DELIVERED
    assert by_decision["skipped:customer_not_found"] == UNREFERRED_SALES + 1
    assert by_decision["skipped:invalid_partner"] == 1
    assert by_decision["retry:customer_not_found"] >= 1  # the customer without a signup: grace
    assert by_decision["failed:validation_error"] == 2
    assert by_decision["retry:server_error+lookup"] >= demo.OUTAGE_CALLS
    assert by_decision["lookup:absent"] >= 1
    assert not any(d.startswith("failed:customer_not_found") for d in by_decision)

    calls = report["partnero_calls"]
    assert calls["total"] == sum(calls["by_status"].values())
    assert calls["by_status"]["503"] >= demo.OUTAGE_CALLS
    assert calls["by_status"]["422"] >= 2
    assert calls["by_status"].get("dropped_after", 0) >= 1

    assert report["ledger"] == {
        "live": REFERRED_SALES - REFUNDS_DELIVERED,
        "deleted": REFUNDS_DELIVERED,
        "customers": SIGNUPS["referred"],
        "matches": True,
        "problems": [],
    }


def test_json_mode_prints_no_progress(json_run: Result) -> None:
    assert json_run.stderr == ""


# ---- exit status when the table and the ledger disagree ----------------------------------------


def test_exit_one_when_the_ledger_does_not_match(monkeypatch: pytest.MonkeyPatch) -> None:
    real = demo.check_ledger

    def tampered(events: Any, ledger: list[dict[str, Any]], *rest: Any) -> dict[str, Any]:
        doubled = [*ledger, dict(ledger[0])]  # as if Partnero had been sent a create twice
        return real(events, doubled, *rest)

    monkeypatch.setattr(demo, "check_ledger", tampered)
    result = invoke()
    assert result.exit_code == 1
    assert "matches the outbox table: no" in result.stdout
    assert "created twice" in result.stdout


def _event(
    kind: str, status: str, outcome: str | None, key: str | None, customer: str | None = "c"
) -> dict[str, Any]:
    return {
        "event_type": kind,
        "status": status,
        "outcome": outcome,
        "transaction_key": key,
        "customer_key": customer,
    }


def _entry(key: str, deleted: bool = False, customer: str = "c", seq: int = 5) -> dict[str, Any]:
    return {
        "key": key,
        "deleted_seq": 9 if deleted else None,
        "customer_key": customer,
        "created_seq": seq,
    }


def test_check_ledger_finds_each_kind_of_disagreement() -> None:
    events = [
        _event("sale", "delivered", "created", "a"),
        _event("sale", "delivered", "created", "b"),
        _event("sale", "failed", "rejected", "c"),
        _event("refund", "delivered", "deleted", "b", customer=None),
        _event("sale", "skipped", "customer_not_found", "s"),
    ]

    good = demo.check_ledger(events, [_entry("a"), _entry("b", deleted=True)])
    assert good == {"live": 1, "deleted": 1, "customers": 0, "matches": True, "problems": []}

    bad = demo.check_ledger(
        events,
        [_entry("a"), _entry("a"), _entry("b"), _entry("c"), _entry("s"), _entry("z", True)],
    )
    assert bad["matches"] is False
    text = "\n".join(bad["problems"])
    assert "a: 2 transactions in Partnero (created twice)" in text
    assert "b: refund delivered as deleted, but Partnero still counts it" in text
    assert "c: the sale was failed, yet it reached Partnero" in text
    assert "s: the sale was skipped, yet it reached Partnero" in text
    assert "z: in Partnero, but no sale with this key was delivered" in text
    assert "z: deleted in Partnero, but no refund was delivered" in text

    missing = demo.check_ledger(events, [_entry("b", deleted=True)])
    assert missing["problems"] == ["a: delivered as created, but Partnero has no such transaction"]


def _customer(key: str, seq: int, source: str = "api") -> dict[str, Any]:
    return {"key": key, "created_seq": seq, "source": source}


def test_check_ledger_compares_signups_with_partneros_customers() -> None:
    events = [
        _event("signup", "delivered", "created", None, "ref"),
        _event("signup", "skipped", "not_referred", None, "plain"),
        _event("signup", "delivered", "created", None, "gone"),
    ]
    found = demo.check_ledger(
        events, [], [_customer("ref", 3), _customer("plain", 4), _customer("stray", 5)]
    )
    assert found["customers"] == 3
    assert found["problems"] == [
        "gone: signup delivered, but Partnero has no such customer",
        "plain: signup skipped, yet Partnero has the customer",
        "stray: a customer in Partnero, but no signup was recorded",
    ]


def test_sales_before_signup_reads_the_ledger_and_the_request_log() -> None:
    customers = [_customer("early", 10), _customer("late", 10), _customer("admin", 10, "admin")]

    def create(seq: int, customer: str, message: str | None) -> dict[str, Any]:
        return {
            "seq": seq,
            "method": "POST",
            "resource": "transaction",
            "customer_key": customer,
            "message": message,
        }

    requests = [
        create(4, "early", "Customer not found"),  # before its customer: a violation
        create(4, "late", "Customer not found"),  # the sale was recorded first: allowed
        create(4, "admin", "Customer not found"),  # not created through the API: not checked
        create(12, "early", "Customer not found"),  # after: not about the order
        create(6, "early", None),  # some other answer
        {
            "seq": 2,
            "method": "POST",
            "resource": "customer",
            "customer_key": "early",
            "message": "Customer not found",
        },
    ]
    transactions = [_entry("t1", customer="early", seq=11), _entry("t2", customer="late", seq=9)]
    found = demo.sales_before_signup(
        customers, transactions, requests, late_signups=frozenset({"late"})
    )
    assert found == [
        "early: a sale answered Customer not found (seq 4) before the customer was created "
        "(seq 10)",
        "late: transaction t2 created (seq 9) before its customer (seq 10)",
    ]
    assert len(demo.sales_before_signup(customers, transactions, requests)) == 3


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
                    ghost = conn.execute(
                        sa.text(
                            "SELECT status, outcome, attempts, last_error FROM outbox.events "
                            "WHERE event_type = 'sale' AND customer_key = :c"
                        ),
                        {"c": PLAN.unknown_customer_sale.customer},
                    ).one()
            finally:
                engine.dispose()
            assert total == TOTAL
            assert failed == 2
            # No signup was recorded for this customer: retried through the grace, then skipped.
            assert (ghost.status, ghost.outcome) == ("skipped", "customer_not_found")
            assert ghost.attempts >= 2
            assert "not known to Partnero" in ghost.last_error
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
