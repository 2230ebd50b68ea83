"""A database seeded with every status and outcome, for the operator command tests.

Rows are inserted through the insert contract (outbox.record_signup / record_sale /
record_refund) and then UPDATEd into their states, since an INSERT may not set the daemon's
columns. Also the helpers the `test_ops_*` modules share: running the CLI, and a snapshot of every
outbox table.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner, Result

from outbox.cli import main
from outbox.domain import EventType, Outcome, Status

# name: (type, key, customer, status, outcome, attempts, last status code, created ago, extra)
# `extra` is SQL assignments applied after the state (leases, parking, delivered_at, ...). A
# signup has no key: its customer names it.
ROWS: list[tuple[str, str, str, str | None, str, str | None, int, int | None, str, str]] = [
    ("created", "sale", "inv_created", "cus_anna", "delivered", "created", 1, 201, "40 days",
     "delivered_at = now() - interval '40 days'"),
    ("duplicate", "sale", "inv_dup", "cus_anna", "delivered", "duplicate", 1, 400, "40 days",
     "delivered_at = now() - interval '40 days'"),
    ("refunded_sale", "sale", "inv_refunded", "cus_bram", "delivered", "created", 1, 201,
     "35 days", "delivered_at = now() - interval '35 days'"),
    ("deleted", "refund", "inv_refunded", None, "delivered", "deleted", 1, 200, "34 days",
     "delivered_at = now() - interval '34 days'"),
    ("not_found", "refund", "inv_gone", None, "delivered", "not_found", 1, 404, "2 days",
     "delivered_at = now() - interval '2 days'"),
    ("ghost", "sale", "inv_ghost", "cus_ghost", "failed", "customer_not_found", 2, 400, "1 hour",
     "last_error = 'customer_not_found: 400 Customer not found (gave up after 2 attempts)'"),
    ("ghost_refund", "refund", "inv_ghost", None, "pending", None, 0, None, "50 minutes",
     "parked = true, next_attempt_at = now() + interval '30 seconds'"),
    ("invalid", "sale", "inv_422", "cus_chloe", "failed", "validation_error", 1, 422, "3 hours",
     "last_error = 'validation_error: 422 The created at field must be a valid date.'"),
    ("rejected", "sale", "inv_rej", "cus_dev", "failed", "rejected", 1, 400, "2 days",
     "last_error = 'rejected: 400 Amount is too large'"),
    ("network", "sale", "inv_net", "cus_emil", "failed", "network_error", 3, None, "5 hours",
     "last_error = 'network_error: connection refused (gave up after 3 attempts)'"),
    ("timeout", "sale", "inv_slow", "cus_emil", "failed", "timeout", 3, None, "6 hours",
     "last_error = 'timeout: no answer in 15 s (gave up after 3 attempts)', "
     "lookup_required = true"),
    ("server", "sale", "inv_503", "cus_fatima", "failed", "server_error", 3, 503, "7 hours",
     "last_error = 'server_error: 503 Service Unavailable (gave up after 3 attempts)'"),
    ("rate", "sale", "inv_429", "cus_goran", "failed", "rate_limited", 3, 429, "8 hours",
     "last_error = 'rate_limited: 429 Too Many Requests (gave up after 3 attempts)'"),
    ("bad", "sale", "inv_bad", "cus_hana", "failed", "bad_response", 3, 200, "9 hours",
     "last_error = 'bad_response: 200 with a body that is not JSON (gave up after 3 attempts)'"),
    ("forbidden", "sale", "inv_403", "cus_ivan", "failed", "forbidden", 1, 403, "10 hours",
     "last_error = 'forbidden: HTTP 403: This action is unauthorized. [GET /v1/test: OK]'"),
    ("signed_up", "signup", None, "cus_anna", "delivered", "created", 1, 201, "41 days",
     "delivered_at = now() - interval '41 days', "
     "payload = '{\"partner\": {\"key\": \"partner_1\"}}'"),
    ("unreferred", "signup", None, "cus_jana", "skipped", "not_referred", 0, None, "2 hours",
     "last_error = 'no partner reference (payload.partner.key, .id or .email): not sent'"),
    ("bad_partner", "signup", None, "cus_karl", "skipped", "invalid_partner", 1, 400, "3 days",
     "last_error = 'HTTP 400: Invalid partner key', "
     "payload = '{\"partner\": {\"key\": \"partner_typo\"}}'"),
    ("unknown", "sale", "inv_unknown", "cus_jana", "skipped", "customer_not_found", 1, 400,
     "2 hours", "last_error = 'HTTP 400: Customer not found [the customer''s signup was "
     "skipped: never referred]'"),
    ("unknown_refund", "refund", "inv_unknown", None, "skipped", "sale_skipped", 0, None,
     "1 hour", "last_error = 'its sale was skipped: nothing to reverse; not sent'"),
    ("fresh", "sale", "inv_new", "cus_anna", "pending", None, 0, None, "10 seconds", ""),
    ("retrying", "sale", "inv_retrying", "cus_bram", "pending", None, 2, 503, "20 minutes",
     "next_attempt_at = now() + interval '5 minutes', "
     "last_error = 'server_error: 503 Service Unavailable'"),
    ("in_flight", "sale", "inv_flight", "cus_chloe", "pending", None, 0, None, "5 seconds",
     "lease_owner = 'host-a:101', lease_token = gen_random_uuid(), "
     "lease_expires_at = now() + interval '50 seconds', "
     "next_attempt_at = now() + interval '50 seconds'"),
    ("dropped", "sale", "inv_dropped", "cus_dev", "discarded", "customer_not_found", 2, 400,
     "4 days", "last_error = 'customer_not_found: 400 Customer not found'"),
    ("dropped_refund", "refund", "inv_dropped", None, "pending", None, 0, None, "3 days",
     "parked = true"),
]  # fmt: skip

NAMES = [r[0] for r in ROWS]
# The call each type makes: (method, path) as the attempts record them.
PATHS = {
    "signup": ("POST", "/v1/customers"),
    "sale": ("POST", "/v1/transactions"),
    "refund": ("DELETE", "/v1/transactions"),
}


def seed(engine: sa.Engine) -> dict[str, int]:
    """Insert ROWS and bring each into its state; returns name -> event id."""
    ids: dict[str, int] = {}
    with engine.begin() as conn:
        for name, type_, key, customer, *_ in ROWS:
            if type_ == "signup":
                ids[name] = conn.execute(
                    sa.text("SELECT outbox.record_signup(:c)"), {"c": customer}
                ).scalar_one()
            elif type_ == "sale":
                ids[name] = conn.execute(
                    sa.text("SELECT outbox.record_sale(:k, :c, 49.90, 'EUR')"),
                    {"k": key, "c": customer},
                ).scalar_one()
            else:
                ids[name] = conn.execute(
                    sa.text("SELECT outbox.record_refund(:k)"), {"k": key}
                ).scalar_one()
    with engine.begin() as conn:
        for name, type_, key, _c, status, outcome, attempts, code, ago, extra in ROWS:
            conn.execute(
                sa.text(
                    "UPDATE outbox.events SET status = :s, outcome = :o, attempts = :a, "
                    "last_status_code = :code, created_at = now() - CAST(:ago AS interval), "
                    "updated_at = now() - CAST(:ago AS interval) + interval '1 minute'"
                    + (f", {extra}" if extra else "")
                    + " WHERE id = :id"
                ),
                {
                    "s": status,
                    "o": outcome,
                    "a": attempts,
                    "code": code,
                    "ago": ago,
                    "id": ids[name],
                },
            )
            method, path = PATHS[type_]
            for n in range(1, attempts + 1):
                last = n == attempts
                decision = (
                    f"delivered:{outcome}" if status == "delivered" and last
                    else f"failed:{outcome}" if status in ("failed", "discarded") and last
                    else f"skipped:{outcome}" if status == "skipped" and last
                    else "retry:server_error"
                )  # fmt: skip
                conn.execute(
                    sa.text(
                        "INSERT INTO outbox.attempts (event_id, attempt, started_at, "
                        "finished_at, method, path, status_code, response_excerpt, error, "
                        "decision, daemon) VALUES (:e, :n, "
                        "now() - CAST(:ago AS interval) + make_interval(secs => :n), "
                        "now() - CAST(:ago AS interval) + make_interval(secs => :n + 0.25), "
                        ":m, :p, :code, :body, :err, :d, 'host-a:101')"
                    ),
                    {
                        "e": ids[name],
                        "n": n,
                        "ago": ago,
                        "m": method,
                        "p": path,
                        "code": code if last else 503,
                        "body": json.dumps({"message": f"answer {n} for {key}"}),
                        "err": None,
                        "d": decision,
                    },
                )
    return ids


@pytest.fixture
def seeded(engine: sa.Engine) -> dict[str, int]:
    return seed(engine)


def snapshot(engine: sa.Engine) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every outbox table (the dry-run check compares two of these)."""
    tables = ["events", "attempts", "operator_actions", "operator_action_events"]
    with engine.connect() as conn:
        return {
            t: [tuple(r) for r in conn.execute(sa.text(f"SELECT * FROM outbox.{t} ORDER BY 1, 2"))]
            for t in tables
        }


def recorded_changes(engine: sa.Engine) -> list[tuple[Any, ...]]:
    """Every row operator actions changed, as recorded, by event id."""
    with engine.connect() as conn:
        found = conn.execute(
            sa.text(
                "SELECT event_id, event_type, transaction_key, change, previous_status, "
                "previous_outcome, previous_attempts FROM outbox.operator_action_events "
                "ORDER BY event_id, action_id"
            )
        )
        return [tuple(r) for r in found]


def cli(*args: str, database_url: str | None = None) -> Result:
    """`outbox ARGS` in this process (click's runner), with --database-url when given."""
    full = list(args) + (["--database-url", database_url] if database_url else [])
    return CliRunner().invoke(main, full, catch_exceptions=False, env={"COLUMNS": "100"})


def cli_json(*args: str, database_url: str) -> Any:
    result = cli(*args, "--json", database_url=database_url)
    assert result.stderr == "", result.stderr
    return json.loads(result.stdout)


def run_outbox(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m outbox.cli ARGS` as a real process."""
    return subprocess.run(
        [sys.executable, "-m", "outbox.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "COLUMNS": "80", **(env or {})},
    )


def test_the_seed_holds_every_type_status_and_outcome(
    engine: sa.Engine, seeded: dict[str, int]
) -> None:
    with engine.connect() as conn:
        found = set(
            conn.execute(sa.text("SELECT DISTINCT event_type, status, outcome FROM outbox.events"))
        )
    assert {t for t, _, _ in found} == {t.value for t in EventType}
    assert {s for _, s, _ in found} == {s.value for s in Status}
    assert {o for _, _, o in found if o} == {o.value for o in Outcome}
    assert len(seeded) == len(ROWS)
