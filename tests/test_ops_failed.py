"""`outbox failed` and `outbox show`: filters, paging, JSON shapes, clear errors."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from outbox import db
from outbox.cli import main
from outbox.dev import pgtemp
from tests.test_ops_seed import cli, cli_json, seed

PROBLEM_FIELDS = [
    "id",
    "state",
    "event_type",
    "transaction_key",
    "customer_key",
    "amount",
    "currency",
    "outcome",
    "last_status_code",
    "last_error",
    "attempts",
    "created_at",
    "updated_at",
    "age_seconds",
    "rows_waiting",
    "blocked_by",
]


@pytest.fixture(scope="module")
def shared(databases: pgtemp.DatabaseFactory) -> Iterator[tuple[str, sa.Engine, dict[str, int]]]:
    """One seeded database for this module: these commands only read (one test adds rows of
    its own key, which no other test looks at)."""
    url = databases.create_migrated()
    eng = db.create_engine(url, poolclass=sa.NullPool)
    yield url, eng, seed(eng)
    eng.dispose()
    databases.drop(url)


@pytest.fixture
def database_url(shared: tuple[str, sa.Engine, dict[str, int]]) -> str:
    return shared[0]


@pytest.fixture
def engine(shared: tuple[str, sa.Engine, dict[str, int]]) -> sa.Engine:
    return shared[1]


@pytest.fixture
def ids(shared: tuple[str, sa.Engine, dict[str, int]]) -> dict[str, int]:
    return shared[2]


def listed(database_url: str, *args: str) -> list[int]:
    data = cli_json("failed", *args, database_url=database_url)
    return [row["id"] for row in data["rows"]]


def test_failed_lists_failed_and_blocked_rows_newest_first(
    ids: dict[str, int], database_url: str
) -> None:
    data = cli_json("failed", database_url=database_url)
    assert list(data) == ["filters", "total", "page", "limit", "pages", "rows"]
    assert (data["filters"], data["total"], data["page"], data["limit"], data["pages"]) == (
        {},
        11,
        1,
        50,
        1,
    )
    # Newest first by created_at; the seed's ages are 50m, 1h, 3h, 5h, ... 2d, 3d.
    assert [r["id"] for r in data["rows"]] == [
        ids[n]
        for n in (
            "ghost_refund",
            "ghost",
            "invalid",
            "network",
            "timeout",
            "server",
            "rate",
            "bad",
            "forbidden",
            "rejected",
            "dropped_refund",
        )
    ]
    by_id = {r["id"]: r for r in data["rows"]}
    ghost = by_id[ids["ghost"]]
    assert list(ghost) == PROBLEM_FIELDS
    expected: dict[str, Any] = {
        "id": ids["ghost"],
        "state": "failed",
        "event_type": "sale",
        "transaction_key": "inv_ghost",
        "customer_key": "cus_ghost",
        "amount": "49.90",
        "currency": "EUR",
        "outcome": "customer_not_found",
        "last_status_code": 400,
        "last_error": "customer_not_found: 400 Customer not found (gave up after 2 attempts)",
        "attempts": 2,
        "rows_waiting": 1,  # its refund
        "blocked_by": None,
    }
    assert {k: ghost[k] for k in expected} == expected
    assert 3600 - 5 < ghost["age_seconds"] < 3600 + 60
    created = datetime.fromisoformat(ghost["created_at"])
    updated = datetime.fromisoformat(ghost["updated_at"])
    assert created.tzinfo is not None and updated - created == timedelta(minutes=1)

    refund = by_id[ids["ghost_refund"]]
    assert list(refund) == PROBLEM_FIELDS
    expected = {
        "id": ids["ghost_refund"],
        "state": "blocked",
        "event_type": "refund",
        "transaction_key": "inv_ghost",
        "customer_key": None,
        "amount": None,
        "currency": None,
        "outcome": None,
        "last_status_code": None,
        "last_error": None,
        "attempts": 0,
        "rows_waiting": 0,
        "blocked_by": {
            "id": ids["ghost"],
            "event_type": "sale",
            "status": "failed",
            "outcome": "customer_not_found",
        },
    }
    assert {k: refund[k] for k in expected} == expected
    assert by_id[ids["dropped_refund"]]["blocked_by"] == {
        "id": ids["dropped"],
        "event_type": "sale",
        "status": "discarded",
        "outcome": "customer_not_found",
    }


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (["--outcome", "server_error"], ["server"]),
        (["--status-code", "400"], ["ghost", "rejected"]),
        (["--since", "2h"], ["ghost_refund", "ghost"]),
        (["--since", "4h", "--until", "1h30m"], ["invalid"]),
        (["--until", "1d"], ["rejected", "dropped_refund"]),
        (["--key", "inv_ghost"], ["ghost_refund", "ghost"]),
        (["--customer", "cus_emil"], ["network", "timeout"]),
        (["--type", "refund"], ["ghost_refund", "dropped_refund"]),
        (["--state", "blocked"], ["ghost_refund", "dropped_refund"]),
        (["--state", "failed", "--type", "refund"], []),
        (["--key", "inv_ghost", "--state", "failed"], ["ghost"]),
    ],
)
def test_failed_filters(
    ids: dict[str, int], database_url: str, args: list[str], names: list[str]
) -> None:
    assert listed(database_url, *args) == [ids[n] for n in names]


def test_failed_since_accepts_a_time(ids: dict[str, int], database_url: str) -> None:
    since = (datetime.now(UTC) - timedelta(minutes=90)).strftime("%Y-%m-%dT%H:%M:%S")
    assert listed(database_url, "--since", since) == [ids["ghost_refund"], ids["ghost"]]
    data = cli_json("failed", "--since", "2h", "--outcome", "timeout", database_url=database_url)
    assert data["filters"] == {"outcome": "timeout", "since": "2h ago"}


def test_failed_pages(ids: dict[str, int], database_url: str) -> None:
    everything = listed(database_url)
    pages = [
        cli_json("failed", "--limit", "4", "--page", str(n), database_url=database_url)
        for n in (1, 2, 3, 4)
    ]
    assert [p["pages"] for p in pages] == [3, 3, 3, 3]
    assert [len(p["rows"]) for p in pages] == [4, 4, 3, 0]
    assert [r["id"] for p in pages for r in p["rows"]] == everything
    human = cli("failed", "--limit", "4", database_url=database_url).stdout
    assert "rows 1-4 of 11, newest first; next: --page 2" in human


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--since", "2x"], "--since: '2x' is not a duration like 30m, 2h, 7d or a time like "),
        (["--until", "yesterday"], "--until: 'yesterday' is not a duration like 30m, 2h, 7d"),
        (["--outcome", "created"], "--outcome: 'created' is not one of customer_not_found, "),
        (["--status-code", "4xx"], "--status-code: '4xx' is not an HTTP status code (100-599)"),
        (["--status-code", "99"], "--status-code: '99' is not an HTTP status code (100-599)"),
        (["--type", "sales"], "--type: 'sales' is not one of signup, sale, refund"),
        (["--state", "stuck"], "--state: 'stuck' is not one of failed, blocked"),
        (["--limit", "0"], "--limit: '0' is not a whole number of at least 1"),
        (["--page", "x"], "--page: 'x' is not a whole number of at least 1"),
    ],
)
def test_failed_bad_filters_are_one_clear_line(
    database_url: str, args: list[str], message: str
) -> None:
    result = cli("failed", *args, database_url=database_url)
    assert result.exit_code == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith("outbox: " + message)
    assert result.stdout == ""


def test_failed_human_table_fits_the_terminal(ids: dict[str, int], database_url: str) -> None:
    narrow = CliRunner().invoke(
        main, ["failed"], env={"OUTBOX_DATABASE_URL": database_url, "COLUMNS": "80"}
    )
    assert narrow.exit_code == 0, narrow.stderr
    lines = narrow.stdout.splitlines()
    assert max(map(len, lines)) <= 80
    assert lines[0].split() == ["id", "type", "key", "customer", "problem", "http", "tries", "age"]
    row = next(line for line in lines if line.split()[:1] == [str(ids["ghost_refund"])])
    assert row.split()[:5] == [str(ids["ghost_refund"]), "refund", "inv_ghost", "-", "behind"]
    assert f"#{ids['ghost']} (failed)" in row
    wide = cli("failed", database_url=database_url).stdout.splitlines()  # COLUMNS=100
    assert max(map(len, wide)) <= 100
    assert wide[0].split()[-1] == "reason"  # room for the reason column
    assert (
        "no failed or blocked rows match"
        in cli("failed", "--key", "nope", database_url=database_url).stdout
    )


# ---- outbox show ---------------------------------------------------------------------------


def test_show_json_has_the_row_its_attempts_and_actions(
    ids: dict[str, int], database_url: str
) -> None:
    data = cli_json("show", str(ids["ghost"]), database_url=database_url)
    assert list(data) == ["event"]
    event = data["event"]
    assert list(event) == [
        "id",
        "event_type",
        "transaction_key",
        "customer_key",
        "amount",
        "currency",
        "payload",
        "status",
        "outcome",
        "attempts",
        "next_attempt_at",
        "lookup_required",
        "parked",
        "order_released",
        "lease_owner",
        "lease_expires_at",
        "last_error",
        "last_status_code",
        "created_at",
        "updated_at",
        "delivered_at",
        "age_seconds",
        "blocked_by",
        "attempt_history",
        "operator_actions",
    ]
    expected: dict[str, Any] = {
        "id": ids["ghost"],
        "event_type": "sale",
        "transaction_key": "inv_ghost",
        "customer_key": "cus_ghost",
        "amount": "49.90",
        "currency": "EUR",
        "payload": None,
        "status": "failed",
        "outcome": "customer_not_found",
        "attempts": 2,
        "lookup_required": False,
        "parked": False,
        "order_released": False,
        "lease_owner": None,
        "lease_expires_at": None,
        "last_status_code": 400,
        "delivered_at": None,
        "blocked_by": None,
        "operator_actions": [],
    }
    assert {k: event[k] for k in expected} == expected
    first, second = event["attempt_history"]
    assert list(first) == [
        "attempt",
        "started_at",
        "finished_at",
        "duration_ms",
        "method",
        "path",
        "status_code",
        "response_excerpt",
        "error",
        "decision",
        "daemon",
    ]
    assert (first["attempt"], first["method"], first["path"], first["status_code"]) == (
        1,
        "POST",
        "/v1/transactions",
        503,
    )
    assert (second["status_code"], second["decision"], second["daemon"]) == (
        400,
        "failed:customer_not_found",
        "host-a:101",
    )
    assert second["duration_ms"] == 250.0
    assert second["response_excerpt"] == '{"message": "answer 2 for inv_ghost"}'


def test_show_key_lists_every_event_of_the_key_in_delivery_order(
    engine: sa.Engine, ids: dict[str, int], database_url: str
) -> None:
    with engine.begin() as conn:  # a refund recorded before its sale still comes after it
        refund = conn.execute(sa.text("SELECT outbox.record_refund('inv_order')")).scalar_one()
        sale = conn.execute(
            sa.text("SELECT outbox.record_sale('inv_order', 'cus_x', 5)")
        ).scalar_one()
    data = cli_json("show", "--key", "inv_order", database_url=database_url)
    assert data["transaction_key"] == "inv_order"
    assert [e["id"] for e in data["events"]] == [sale, refund]
    ghost = cli_json("show", "--key", "inv_ghost", database_url=database_url)
    sale_row, refund_row = ghost["events"]
    assert refund_row["blocked_by"]["id"] == sale_row["id"] == ids["ghost"]
    assert refund_row["attempt_history"] == [] and len(sale_row["attempt_history"]) == 2


def test_show_human_output(ids: dict[str, int], database_url: str) -> None:
    out = cli("show", str(ids["dropped_refund"]), database_url=database_url).stdout
    lines = out.splitlines()
    assert lines[0] == f"event {ids['dropped_refund']}: refund inv_dropped"
    assert "status        pending (parked)" in lines
    assert f"waits for     #{ids['dropped']} (sale, discarded: customer_not_found)" in lines
    assert any(f"outbox discard {ids['dropped']} --refunds release" in line for line in lines)
    sale = cli("show", str(ids["ghost"]), database_url=database_url).stdout
    assert "HTTP calls (2)" in sale
    assert "      HTTP 400, failed:customer_not_found" in sale.splitlines()


def test_show_cuts_a_large_payload_unless_asked(engine: sa.Engine, database_url: str) -> None:
    big = {"note": "x" * 1_000_000}
    with engine.begin() as conn:
        event_id = conn.execute(
            sa.text("SELECT outbox.record_sale('inv_big', 'cus_1', 10, 'EUR', CAST(:p AS jsonb))"),
            {"p": json.dumps(big)},
        ).scalar_one()
    out = cli("show", str(event_id), database_url=database_url).stdout
    assert len(out) < 10_000
    assert "more characters: --full-payload)" in out
    # The time the sale carries to Partnero, which dates it by that.
    assert any(line.startswith("dated         created_at ") for line in out.splitlines())
    whole = cli("show", str(event_id), "--full-payload", database_url=database_url).stdout
    assert whole.count("x") >= 1_000_000
    shown = cli_json("show", str(event_id), database_url=database_url)
    assert shown["event"]["payload"] == big  # --json is for scripts: always whole


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["42000"], 1, "outbox: no event with id 42000"),
        (["--key", "inv_nope"], 1, "outbox: no event with transaction key 'inv_nope'"),
        (["abc"], 2, "outbox: ID: 'abc' is not an event id"),
        ([], 2, "outbox: give an event ID, --key KEY or --customer KEY (one of them)"),
        (
            ["1", "--key", "x"],
            2,
            "outbox: give an event ID, --key KEY or --customer KEY (one of them)",
        ),
        (
            ["--key", "x", "--customer", "y"],
            2,
            "outbox: give an event ID, --key KEY or --customer KEY (one of them)",
        ),
        (["--customer", "cus_nope"], 1, "outbox: no event with customer key 'cus_nope'"),
    ],
)
def test_show_errors_are_one_clear_line(
    database_url: str, args: list[str], code: int, message: str
) -> None:
    result = cli("show", *args, database_url=database_url)
    assert (result.exit_code, result.stderr) == (code, message + "\n")
