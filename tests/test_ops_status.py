"""`outbox status`: the backlog, what needs a person, the daemons' leases, and its exit codes."""

from __future__ import annotations

import subprocess
import sys
from datetime import datetime

import sqlalchemy as sa

from outbox.decisions import DecisionKind, DecisionLabel, decision_label, parse_decision_label
from tests.daemon_helpers import insert_sales
from tests.test_ops_seed import cli, cli_json, run_outbox, seed


def test_status_json_field_by_field(engine: sa.Engine, database_url: str) -> None:
    ids = seed(engine)
    data = cli_json("status", database_url=database_url)
    assert list(data) == [
        "ok",
        "problems",
        "checked_at",
        "max_pending_age_seconds",
        "totals",
        "counts",
        "pending",
        "last_delivered_at",
        "last_delivery_age_seconds",
        "leases",
        "last_attempt",
    ]
    assert data["ok"] is False
    assert data["problems"] == [
        "9 failed rows",
        "2 rows blocked behind a failed or discarded row",
        "the oldest pending row has waited 20m (more than 15m)",
    ]
    datetime.fromisoformat(data["checked_at"])
    assert data["max_pending_age_seconds"] == 900.0
    assert data["totals"] == {
        "pending": 5,
        "delivered": 6,
        "failed": 9,
        "discarded": 1,
        "skipped": 4,  # last: added with the status; skipped rows need no one
    }

    counts = {(c["event_type"], c["status"], c["outcome"]): c for c in data["counts"]}
    assert {k: c["events"] for k, c in counts.items()} == {
        ("signup", "delivered", "created"): 1,
        ("signup", "skipped", "not_referred"): 1,
        ("signup", "skipped", "invalid_partner"): 1,
        ("sale", "pending", None): 3,
        ("sale", "failed", "customer_not_found"): 1,
        ("sale", "failed", "validation_error"): 1,
        ("sale", "failed", "rejected"): 1,
        ("sale", "failed", "network_error"): 1,
        ("sale", "failed", "timeout"): 1,
        ("sale", "failed", "server_error"): 1,
        ("sale", "failed", "rate_limited"): 1,
        ("sale", "failed", "bad_response"): 1,
        ("sale", "failed", "forbidden"): 1,
        ("sale", "discarded", "customer_not_found"): 1,
        ("sale", "delivered", "created"): 2,
        ("sale", "delivered", "duplicate"): 1,
        ("sale", "skipped", "customer_not_found"): 1,
        ("refund", "pending", None): 2,
        ("refund", "delivered", "deleted"): 1,
        ("refund", "delivered", "not_found"): 1,
        ("refund", "skipped", "sale_skipped"): 1,
    }
    # In delivery order of the types (signups, sales, refunds); within a type pending, failed,
    # discarded, delivered, skipped.
    order = [(c["event_type"], c["status"]) for c in data["counts"]]
    assert order == sorted(
        order,
        key=lambda t: (
            ["signup", "sale", "refund"].index(t[0]),
            ["pending", "failed", "discarded", "delivered", "skipped"].index(t[1]),
        ),
    )
    assert order[:3] == [("signup", "delivered"), ("signup", "skipped"), ("signup", "skipped")]
    created = counts[("sale", "delivered", "created")]
    assert list(created) == [
        "event_type",
        "status",
        "outcome",
        "events",
        "oldest_created_at",
        "oldest_age_seconds",
        "last_delivered_at",
    ]
    assert 40 * 86400 - 5 < created["oldest_age_seconds"] < 40 * 86400 + 60
    assert counts[("sale", "pending", None)]["last_delivered_at"] is None

    pending = data["pending"]
    assert list(pending) == [
        "events",
        "in_flight",
        "blocked",
        "oldest_created_at",
        "oldest_age_seconds",
        "oldest_waiting_created_at",
        "oldest_waiting_age_seconds",
    ]
    assert (pending["events"], pending["in_flight"], pending["blocked"]) == (5, 1, 2)
    # The oldest pending row is the refund behind the discarded sale (3 days); the oldest one
    # the daemon could send is the retrying sale (20 minutes).
    assert 3 * 86400 - 5 < pending["oldest_age_seconds"] < 3 * 86400 + 60
    assert 20 * 60 - 5 < pending["oldest_waiting_age_seconds"] < 20 * 60 + 60

    # The last delivery: the orphan refund delivered (not_found) 2 days ago.
    assert 2 * 86400 - 5 < data["last_delivery_age_seconds"] < 2 * 86400 + 60
    datetime.fromisoformat(data["last_delivered_at"])

    (lease,) = data["leases"]
    assert list(lease) == ["owner", "events", "expired", "expires_at", "expires_in_seconds"]
    assert (lease["owner"], lease["events"], lease["expired"]) == ("host-a:101", 1, 0)
    assert 0 < lease["expires_in_seconds"] <= 50

    last = data["last_attempt"]
    assert list(last) == [
        "event_id",
        "started_at",
        "age_seconds",
        "method",
        "path",
        "status_code",
        "decision",
        "error",
        "daemon",
    ]
    # The seed's last attempt row belongs to the discarded sale.
    assert (last["event_id"], last["method"], last["status_code"], last["decision"]) == (
        ids["dropped"],
        "POST",
        400,
        "failed:customer_not_found",
    )


def test_status_exit_codes(engine: sa.Engine, database_url: str) -> None:
    empty = cli("status", database_url=database_url)
    assert empty.exit_code == 0, empty.output
    assert empty.stdout.startswith("outbox status: OK")
    assert "no events yet" in empty.stdout

    insert_sales(engine, ["inv_1"])
    fresh = cli("status", database_url=database_url)
    assert fresh.exit_code == 0  # a new row is not late yet

    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE outbox.events SET created_at = now() - interval '20 minutes'"))
    late = cli("status", database_url=database_url)
    assert late.exit_code == 1
    assert "the oldest pending row has waited 20m (more than 15m)" in late.stdout
    assert cli("status", "--max-pending-age", "1h", database_url=database_url).exit_code == 0

    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE outbox.events SET status = 'failed', outcome = 'rejected'"))
    failed = cli("status", "--max-pending-age", "1h", database_url=database_url)
    assert failed.exit_code == 1
    assert "  - 1 failed row" in failed.stdout.splitlines()

    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE outbox.events SET status = 'discarded'"))
    assert cli("status", database_url=database_url).exit_code == 0

    # A 401/403 pauses the daemons: the rows wait, and status says why.
    insert_sales(engine, ["inv_2"])
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO outbox.attempts (event_id, attempt, started_at, finished_at, method, "
                "path, status_code, decision) SELECT max(id), 1, now(), now(), 'POST', "
                "'/v1/transactions', 401, 'pause:auth' FROM outbox.events"
            )
        )
    paused = cli_json("status", database_url=database_url)
    assert paused["ok"] is False
    (problem,) = paused["problems"]
    assert problem.startswith("the last call to Partnero was refused (HTTP 401, ")
    assert problem.endswith(" ago): sending is paused; check the API key")


def test_status_blocked_behind_a_discarded_sale_needs_attention(
    engine: sa.Engine, database_url: str
) -> None:
    insert_sales(engine, ["inv_1"])
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE outbox.events SET status = 'discarded'"))
        conn.execute(sa.text("SELECT outbox.record_refund('inv_1')"))
    data = cli_json("status", database_url=database_url)
    assert data["ok"] is False
    assert data["problems"] == ["1 row blocked behind a failed or discarded row"]
    assert data["pending"]["oldest_waiting_age_seconds"] is None


def test_status_bad_threshold_unreachable_database_and_help(database_url: str) -> None:
    bad = cli("status", "--max-pending-age", "soon", database_url=database_url)
    assert bad.exit_code == 2
    assert bad.stderr == "outbox: --max-pending-age: 'soon' is not a duration like 30m, 2h, 7d\n"

    gone = cli(
        "status", database_url="postgresql://nobody:secret@127.0.0.1:1/none?connect_timeout=2"
    )
    assert gone.exit_code == 3
    (line,) = gone.stderr.splitlines()
    assert line.startswith("outbox: cannot reach the database at postgresql+psycopg://nobody:***@")
    assert "secret" not in gone.stderr

    help_text = cli("status", "--help").stdout
    for code in ("0  all is well", "1  attention needed", "2  bad option", "3  the database"):
        assert code in help_text


def test_status_on_an_unmigrated_database_says_so(empty_database_url: str) -> None:
    result = cli("status", database_url=empty_database_url)
    assert result.exit_code == 3
    assert result.stderr.strip().startswith("outbox: the database lacks migration(s) 0001_")


def test_status_human_output_fits_80_columns(engine: sa.Engine, database_url: str) -> None:
    seed(engine)
    result = run_outbox("status", env={"OUTBOX_DATABASE_URL": database_url, "COLUMNS": "80"})
    assert result.returncode == 1, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "outbox status: attention needed"
    assert max(len(line) for line in lines) <= 80
    assert any(line.split()[:4] == ["sale", "failed", "customer_not_found", "1"] for line in lines)
    assert any(line.startswith("leases") and "host-a:101: 1 row" in line for line in lines)
    assert "\x1b[" not in result.stdout  # no colour codes when piped


# Every decision label docs/operations.md lists, as the executor writes them.
DOCUMENTED_LABELS = [
    ("delivered:created", DecisionKind.DELIVERED, "created"),
    ("retry:timeout", DecisionKind.RETRY, "timeout"),
    ("retry:network_error+lookup", DecisionKind.RETRY, "network_error+lookup"),
    ("lookup:found", DecisionKind.LOOKUP, "found"),
    ("lookup:next_page:3", DecisionKind.LOOKUP, "next_page:3"),
    ("failed:customer_not_found", DecisionKind.FAILED, "customer_not_found"),
    ("forbidden:check_key", DecisionKind.FORBIDDEN, "check_key"),
    ("pause:auth", DecisionKind.PAUSE, "auth"),
]


def test_decision_labels_are_read_and_written_by_one_vocabulary() -> None:
    for text, kind, detail in DOCUMENTED_LABELS:
        assert parse_decision_label(text) == DecisionLabel(kind, detail)
        assert decision_label(kind, detail) == text
    # A label this build does not know stays text: no kind, no error.
    for text in ("", "x", "pause", "paused:auth", "PAUSE:auth", ":auth"):
        assert parse_decision_label(text) is None


def test_status_reads_the_pause_through_the_label_vocabulary(
    engine: sa.Engine, database_url: str
) -> None:
    insert_sales(engine, ["inv_1"])
    for label, paused in (("pause:auth", True), ("failed:forbidden", False), ("x", False)):
        with engine.begin() as conn:
            conn.execute(
                sa.text(
                    "INSERT INTO outbox.attempts (event_id, attempt, started_at, finished_at, "
                    "method, path, status_code, decision) SELECT max(id), 1, now(), now(), "
                    "'POST', '/v1/transactions', 403, :label FROM outbox.events"
                ),
                {"label": label},
            )
        data = cli_json("status", database_url=database_url)
        assert data["last_attempt"]["decision"] == label
        assert any("sending is paused" in p for p in data["problems"]) is paused


def test_the_operator_commands_do_not_import_the_command_line_back() -> None:
    """outbox.cli registers outbox.ops.cli; ops_cli takes what it shares from outbox.cli_common."""
    code = (
        "import sys, outbox.ops.cli, outbox.ops.roles; "
        "print('outbox.cli' in sys.modules, 'outbox.cli_common' in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.split() == ["False", "True"]


def test_attention_is_status_without_the_delivered_counts(engine: sa.Engine) -> None:
    """The overview's report (ops.attention) says what `outbox status` says about what needs a
    person, from the rows that are not delivered: same problems, same groups, same last
    delivery, same pending rows, leases and last call."""
    import dataclasses
    from datetime import timedelta
    from typing import Any

    from outbox.domain import Status
    from outbox.ops import commands

    seed(engine)
    limit = timedelta(minutes=15)
    full = commands.status(engine, limit)
    short = commands.attention(engine, limit)
    assert (short.ok, short.problems) == (full.ok, full.problems)

    # (Ages are measured from each call's own now(): equal up to the time between the calls.)
    def timeless(rows: Any) -> list[Any]:
        return [dataclasses.replace(row, oldest_age_seconds=0) for row in rows]

    assert timeless(short.undelivered) == timeless(
        c for c in full.counts if c.status is not Status.DELIVERED
    )
    assert short.total(Status.FAILED) == full.totals.failed == 9
    assert short.total(Status.SKIPPED) == full.totals.skipped
    assert short.last_delivered_at == full.last_delivered_at
    assert short.pending.events == full.pending.events
    assert short.pending.oldest_created_at == full.pending.oldest_created_at
    assert [lease.owner for lease in short.leases] == [lease.owner for lease in full.leases]
    assert (short.last_attempt is None) == (full.last_attempt is None)


def test_the_undelivered_summary_can_be_read_from_its_index(engine: sa.Engine) -> None:
    """The overview's summary is served by the partial indexes of the rows it counts (pending:
    events_pending_due_idx; failed, discarded, skipped: events_not_delivered_idx, 0008): their
    predicates fit the query, so the planner can answer it without the table's full scan (on a
    small table it prefers the scan; discouraged from it, it must be able to use these)."""
    from outbox.db import queries

    seed(engine)
    with engine.begin() as conn:
        conn.execute(sa.text("SET LOCAL enable_seqscan = off"))
        plan = "\n".join(
            row[0]
            for row in conn.execute(
                sa.text("EXPLAIN " + queries.get("undelivered_summary", "ops.sql"))
            )
        )
    assert "events_not_delivered_idx" in plan and "events_pending_due_idx" in plan, plan
    assert "Seq Scan" not in plan, plan
