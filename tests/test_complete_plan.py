"""The `complete` statement's plan must not depend on autoanalyze having run: on a freshly
loaded backlog (no statistics yet) the steps that wake parked rows read the small parked-row
indexes, never the whole pending index once per settled key (migration 0006)."""

from __future__ import annotations

import re
from datetime import UTC, datetime

import psycopg
import sqlalchemy as sa

from outbox.db import libpq_url, queries

ROWS = 20_000
BATCH = 500


def test_waking_parked_rows_never_scans_the_pending_index(
    engine: sa.Engine, database_url: str
) -> None:
    with psycopg.connect(libpq_url(database_url), autocommit=True) as conn:
        conn.execute("ALTER TABLE outbox.events SET (autovacuum_enabled = false)")
        conn.execute(
            "INSERT INTO outbox.events (event_type, transaction_key, customer_key, amount) "
            "SELECT 'sale', 'k' || g, 'c' || g, 10 FROM generate_series(1, %s) g",
            (ROWS,),
        )
        assert conn.execute(
            "SELECT coalesce(last_analyze, last_autoanalyze) FROM pg_stat_user_tables "
            "WHERE relid = 'outbox.events'::regclass"
        ).fetchone() == (None,)
        leased = conn.execute(
            "UPDATE outbox.events SET lease_token = gen_random_uuid(), "
            "lease_expires_at = now() + interval '1 minute' WHERE id <= %s "
            "RETURNING id, lease_token",
            (BATCH,),
        ).fetchall()
        n, now = len(leased), datetime.now(UTC)
        params = {
            "ids": [r[0] for r in leased],
            "tokens": [r[1] for r in leased],
            "statuses": ["delivered"] * n,
            "outcomes": ["created"] * n,
            "attempts": [1] * n,
            "next_attempt_at": [now] * n,
            "lookup_required": [False] * n,
            "last_error": [None] * n,
            "last_status_code": [201] * n,
            **{f"a_{name}": [] for name in _ATTEMPT_COLUMNS},
        }
        conn.execute("BEGIN")
        plan = "\n".join(
            row[0] for row in conn.execute("EXPLAIN (COSTS OFF) " + queries.get("complete"), params)
        )
        conn.execute("ROLLBACK")
    for step in ("woken", "woken_by_signup"):
        subtree = _cte(plan, step)
        assert "events_pending_due_idx" not in subtree, subtree
        assert "Seq Scan on events" not in subtree, subtree
    assert "events_parked_key_idx" in _cte(plan, "woken")
    assert "events_parked_customer_idx" in _cte(plan, "woken_by_signup")


_ATTEMPT_COLUMNS = (
    "event_id",
    "attempt",
    "started_at",
    "finished_at",
    "method",
    "path",
    "status_code",
    "response_excerpt",
    "error",
    "decision",
    "daemon",
)


def _cte(plan: str, name: str) -> str:
    """The lines of one CTE's subtree in a text plan."""
    match = re.search(rf"^  CTE {name}\n(.*?)(?=^  \S)", plan, re.S | re.M)
    assert match is not None, plan
    return match.group(1)
