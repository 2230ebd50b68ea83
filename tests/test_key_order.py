"""The per-key order (migration 0005): one SQL function, outbox.goes_before, that the claim query
and the views failed_deliveries and blocked_deliveries call, and that the planner inlines, so
the claim plans exactly as it did with the rule written out."""

from __future__ import annotations

import json
from typing import Any

import psycopg
import pytest

from outbox.db import queries

# The claim's parameters, as outbox/store.py binds them.
CLAIM_PARAMS: dict[str, Any] = {
    "owner": "test",
    "limit": 10,
    "lease_seconds": 30.0,
    "recheck_seconds": 5.0,
    "orphan_grace_seconds": 60.0,
    "in_flight_recheck_seconds": 1.0,
}

CALL = "outbox.goes_before(o.event_type, o.id, c.event_type, c.id)"
# The rule as the claim query wrote it out before migration 0005.
WRITTEN_OUT = (
    "CASE WHEN c.event_type = 'sale' THEN o.event_type = 'sale' AND o.id < c.id "
    "ELSE o.event_type = 'sale' OR o.id < c.id END"
)


def explain(conn: psycopg.Connection[Any], sql: str, params: dict[str, Any] | None = None) -> Any:
    row = conn.execute(f"EXPLAIN (VERBOSE, FORMAT JSON) {sql}", params).fetchone()
    assert row is not None
    return row[0]


def text_of(plan: Any) -> str:
    return json.dumps(plan)


@pytest.mark.parametrize(
    ("earlier", "later", "expected"),
    [
        # Every sale goes before every refund of its key, whatever the ids.
        (("sale", 1), ("refund", 2), True),
        (("sale", 9), ("refund", 2), True),
        # Sales among themselves, and refunds among themselves, go by id.
        (("sale", 1), ("sale", 2), True),
        (("sale", 2), ("sale", 1), False),
        (("refund", 3), ("refund", 4), True),
        (("refund", 4), ("refund", 3), False),
        # A refund never goes before a sale, whatever the ids.
        (("refund", 1), ("sale", 2), False),
        (("refund", 5), ("sale", 2), False),
        # No row goes before itself.
        (("sale", 7), ("sale", 7), False),
        (("refund", 7), ("refund", 7), False),
    ],
)
def test_goes_before(
    database_url: str, earlier: tuple[str, int], later: tuple[str, int], expected: bool
) -> None:
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT outbox.goes_before(%s, %s, %s, %s)", (*earlier, *later)
        ).fetchone()
    assert row == (expected,)


def test_goes_before_is_every_sale_then_every_refund_then_by_id(database_url: str) -> None:
    rows = [(kind, i) for kind in ("sale", "refund") for i in range(1, 5)]

    def position(row: tuple[str, int]) -> tuple[bool, int]:
        return (row[0] != "sale", row[1])

    pairs = [(a, b) for a in rows for b in rows]
    with psycopg.connect(database_url) as conn:
        got = [
            conn.execute("SELECT outbox.goes_before(%s, %s, %s, %s)", (*a, *b)).fetchone()
            for a, b in pairs
        ]
    assert got == [(position(a) < position(b),) for a, b in pairs]


def test_the_claim_inlines_goes_before_and_plans_as_with_the_rule_written_out(
    database_url: str,
) -> None:
    claim = queries.get("claim")
    assert claim.count(CALL) == 1 and "o.id < c.id END" not in claim
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "INSERT INTO outbox.events (event_type, transaction_key, customer_key, amount) "
            "SELECT 'sale', 'k' || i % 50, 'c', 1 FROM generate_series(1, 500) i"
        )
        conn.execute(
            "INSERT INTO outbox.events (event_type, transaction_key) "
            "SELECT 'refund', 'k' || i FROM generate_series(1, 20) i"
        )
        conn.execute("ANALYZE outbox.events")
        plan = explain(conn, claim, CLAIM_PARAMS)
        written_out = explain(conn, claim.replace(CALL, WRITTEN_OUT), CLAIM_PARAMS)
        assert "goes_before" not in text_of(plan)
        assert plan == written_out  # the same plan, node for node, cost for cost

        # The check can fail: a function the planner may not inline (SET makes it so) shows up
        # in the plan by name.
        conn.execute(
            "ALTER FUNCTION outbox.goes_before(text, bigint, text, bigint) "
            "SET search_path = pg_catalog"
        )
        assert "outbox.goes_before(" in text_of(explain(conn, claim, CLAIM_PARAMS))
        conn.rollback()


@pytest.mark.parametrize("view", ["outbox.failed_deliveries", "outbox.blocked_deliveries"])
def test_the_views_call_goes_before_and_it_is_inlined(database_url: str, view: str) -> None:
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT pg_get_viewdef(%s::regclass)", (view,)).fetchone()
        assert row is not None and "outbox.goes_before(" in row[0]
        assert "goes_before" not in text_of(explain(conn, f"SELECT * FROM {view}"))
