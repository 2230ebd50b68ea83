"""The operator commands and the `skipped` status (customers no partner referred) and signup rows:
status stays healthy, failed does not list them, show explains them, retry takes them back (a
skipped sale with its skipped refunds), discard refuses them, prune deletes them through one
query over events_settled_idx; a sale blocked behind its customer's failed signup is named as
such everywhere."""

from __future__ import annotations

from typing import Any

import psycopg
import sqlalchemy as sa

from outbox import db
from outbox.db import queries
from tests.daemon_helpers import rows, scalar
from tests.test_ops_seed import cli, cli_json, recorded_changes, seed, snapshot


def event(engine: sa.Engine, event_id: int) -> sa.Row[Any]:
    (row,) = rows(engine, "SELECT * FROM outbox.events WHERE id = :i", i=event_id)
    return row


def act(database_url: str, *args: str) -> Any:
    return cli_json(*args, "--actor", "alice@desk", database_url=database_url)


def flat(text: str) -> str:
    """Output with its wrapping undone: words separated by single spaces."""
    return " ".join(text.split())


def blocked_signup(engine: sa.Engine) -> dict[str, int]:
    """cus_zoe: a signup Partnero refused (failed), the sale of the same checkout parked behind
    it, and a refund of that sale (waiting for the sale, not blocked)."""
    with engine.begin() as conn:

        def one(sql: str) -> int:
            value: int = conn.execute(sa.text(sql)).scalar_one()
            return value

        ids = {
            "signup": one(
                """SELECT outbox.record_signup('cus_zoe', '{"partner": {"key": "partner_1"}}')"""
            ),
            "sale": one("SELECT outbox.record_sale('inv_zoe', 'cus_zoe', 20, 'EUR')"),
            "refund": one("SELECT outbox.record_refund('inv_zoe')"),
        }
        conn.execute(
            sa.text(
                "UPDATE outbox.events SET status = 'failed', outcome = 'rejected', attempts = 1, "
                "last_status_code = 400, last_error = 'HTTP 400: Duplicate customer key' "
                "WHERE id = :i"
            ),
            {"i": ids["signup"]},
        )
        conn.execute(
            sa.text(
                "UPDATE outbox.events SET parked = true, "
                "next_attempt_at = now() + interval '1 hour' WHERE id IN (:s, :r)"
            ),
            {"s": ids["sale"], "r": ids["refund"]},
        )
    return ids


# ---- outbox status -------------------------------------------------------------------------


def test_status_stays_ok_with_thousands_of_skipped_rows(
    engine: sa.Engine, database_url: str
) -> None:
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "SELECT outbox.record_signup('cus_' || g), "
                "outbox.record_sale('inv_' || g, 'cus_' || g, 10, 'EUR'), "
                "outbox.record_refund('inv_' || g) FROM generate_series(1, 2000) g"
            )
        )
        conn.execute(
            sa.text(
                "UPDATE outbox.events SET status = 'skipped', outcome = CASE event_type "
                "WHEN 'signup' THEN 'not_referred' WHEN 'sale' THEN 'customer_not_found' "
                "ELSE 'sale_skipped' END, created_at = now() - interval '2 days'"
            )
        )
    result = cli("status", database_url=database_url)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("outbox status: OK\n")
    lines = [line.split() for line in result.stdout.splitlines()]
    assert ["signup", "skipped", "not_referred", "2000", "2d"] in lines
    assert ["sale", "skipped", "customer_not_found", "2000", "2d"] in lines
    assert ["refund", "skipped", "sale_skipped", "2000", "2d"] in lines
    data = cli_json("status", database_url=database_url)
    assert (data["ok"], data["problems"]) == (True, [])
    assert data["totals"] == {
        "pending": 0,
        "delivered": 0,
        "failed": 0,
        "discarded": 0,
        "skipped": 6000,
    }
    assert data["last_delivered_at"] is None  # skipping is not delivering


# ---- outbox failed -------------------------------------------------------------------------


def test_failed_lists_no_skipped_row_and_takes_only_failed_outcomes(
    engine: sa.Engine, database_url: str
) -> None:
    ids = seed(engine)
    skipped = {ids[n] for n in ("unreferred", "bad_partner", "unknown", "unknown_refund")}
    listed = {
        r["id"] for r in cli_json("failed", "--limit", "100", database_url=database_url)["rows"]
    }
    assert len(listed) == 11 and not listed & skipped
    assert cli_json("failed", "--type", "signup", database_url=database_url)["total"] == 0
    assert cli_json("failed", "--customer", "cus_jana", database_url=database_url)["total"] == 0
    wrong = cli("failed", "--outcome", "not_referred", database_url=database_url)
    assert wrong.exit_code == 2
    assert wrong.stderr.startswith(
        "outbox: --outcome: 'not_referred' is not one of customer_not_found, validation_error, "
    )
    state = cli("failed", "--state", "skipped", database_url=database_url)
    assert state.stderr == "outbox: --state: 'skipped' is not one of failed, blocked\n"


def test_a_sale_behind_a_failed_signup_is_blocked_and_names_it(
    engine: sa.Engine, database_url: str
) -> None:
    ids = blocked_signup(engine)
    data = cli_json("failed", database_url=database_url)
    by_id = {r["id"]: r for r in data["rows"]}
    assert set(by_id) == {ids["signup"], ids["sale"]}  # the refund only waits for its sale
    signup, sale = by_id[ids["signup"]], by_id[ids["sale"]]
    assert (signup["state"], signup["event_type"], signup["transaction_key"]) == (
        "failed",
        "signup",
        None,
    )
    assert (signup["customer_key"], signup["rows_waiting"]) == ("cus_zoe", 1)
    assert (sale["state"], sale["blocked_by"]) == (
        "blocked",
        {"id": ids["signup"], "event_type": "signup", "status": "failed", "outcome": "rejected"},
    )
    blocked = cli_json("failed", "--state", "blocked", database_url=database_url)["rows"]
    assert [r["id"] for r in blocked] == [ids["sale"]]
    assert [
        r["id"] for r in cli_json("failed", "--type", "signup", database_url=database_url)["rows"]
    ] == [ids["signup"]]
    # --key never matches a signup (it has no key), and never fails on one.
    by_key = cli_json("failed", "--key", "inv_zoe", database_url=database_url)["rows"]
    assert [r["id"] for r in by_key] == [ids["sale"]]
    by_customer = cli_json("failed", "--customer", "cus_zoe", database_url=database_url)["rows"]
    assert {r["id"] for r in by_customer} == {ids["signup"], ids["sale"]}

    table = cli("failed", database_url=database_url).stdout.splitlines()
    signup_line = next(line for line in table if line.split()[:1] == [str(ids["signup"])])
    assert signup_line.split()[:5] == [str(ids["signup"]), "signup", "-", "cus_zoe", "rejected"]
    sale_line = next(line for line in table if line.split()[:1] == [str(ids["sale"])])
    assert f"behind #{ids['signup']} (failed)" in sale_line
    assert f"waits for signup #{ids['signup']}: failed: r" in sale_line

    status = cli_json("status", database_url=database_url)
    assert status["problems"] == [
        "1 failed row",
        "1 row blocked behind a failed or discarded row",
    ]


# ---- outbox show ---------------------------------------------------------------------------


SKIPPED_SENTENCES = {
    "unreferred": "why no partner referred this customer (no partner reference in the payload): "
    "Partnero would ignore the signup, so it was not sent; nothing to do",
    "bad_partner": "why Partnero refused the partner reference (400 Invalid partner key), so it "
    "has no such customer",
    "unknown": "why Partnero does not know this customer (never referred): nothing to pay; "
    "`outbox retry` sends it again if a person added the customer at Partnero",
    "unknown_refund": "why its sale was skipped (Partnero does not know the customer): nothing "
    "to reverse, so it was not sent; it goes back to pending when its sale is retried",
}


def test_show_explains_every_skipped_outcome_in_one_sentence(
    engine: sa.Engine, database_url: str
) -> None:
    ids = seed(engine)
    for name, sentence in SKIPPED_SENTENCES.items():
        out = cli("show", str(ids[name]), database_url=database_url).stdout
        assert sentence in flat(out), name
    signup = cli("show", str(ids["unreferred"]), database_url=database_url).stdout.splitlines()
    assert signup[0] == f"event {ids['unreferred']}: signup cus_jana"
    assert "status    skipped: not_referred" in signup
    assert "no HTTP calls" in signup
    assert not any(line.startswith("answer") for line in signup)  # skipped without a call
    sale = cli("show", str(ids["unknown"]), database_url=database_url).stdout
    assert "answer    HTTP 400: Customer not found" in sale  # the answer, not an error
    assert "      HTTP 400, skipped:customer_not_found" in sale.splitlines()
    shown = cli_json("show", str(ids["bad_partner"]), database_url=database_url)["event"]
    assert (shown["event_type"], shown["transaction_key"], shown["customer_key"]) == (
        "signup",
        None,
        "cus_karl",
    )
    assert [(a["method"], a["path"], a["decision"]) for a in shown["attempt_history"]] == [
        ("POST", "/v1/customers", "skipped:invalid_partner")
    ]


def test_show_a_sale_behind_a_failed_signup_and_a_customer_in_order(
    engine: sa.Engine, database_url: str
) -> None:
    ids = blocked_signup(engine)
    with engine.begin() as conn:  # a second sale of the customer, recorded before the first
        conn.execute(sa.text("SELECT outbox.record_sale('inv_zoe2', 'cus_zoe', 5, 'EUR')"))
        conn.execute(sa.text("SELECT outbox.record_sale('inv_other', 'cus_other', 5, 'EUR')"))
    sale = cli("show", str(ids["sale"]), database_url=database_url).stdout.splitlines()
    assert f"waits for     #{ids['signup']} (signup, failed: rejected)" in sale
    assert (
        f"to unblock    outbox retry {ids['signup']} or outbox discard {ids['signup']} "
        "(see its history)" in sale
    )
    data = cli_json("show", "--customer", "cus_zoe", database_url=database_url)
    assert list(data) == ["customer_key", "events"]
    assert data["customer_key"] == "cus_zoe"
    order = [(e["event_type"], e["transaction_key"]) for e in data["events"]]
    assert order == [
        ("signup", None),
        ("sale", "inv_zoe"),
        ("refund", "inv_zoe"),  # refunds name no customer: found through their sale's key
        ("sale", "inv_zoe2"),
    ]
    assert data["events"][1]["blocked_by"]["id"] == ids["signup"]
    human = cli("show", "--customer", "cus_zoe", database_url=database_url).stdout
    assert human.startswith(f"event {ids['signup']}: signup cus_zoe\n")


# ---- outbox retry --------------------------------------------------------------------------


def test_retry_a_skipped_sale_takes_its_skipped_refunds_back_too(
    engine: sa.Engine, database_url: str
) -> None:
    ids = seed(engine)
    before = snapshot(engine)
    dry = act(database_url, "retry", str(ids["unknown"]), "--dry-run")
    assert snapshot(engine) == before
    assert dry["count"] == 2
    assert [
        (c["event_id"], c["change"], c["previous_status"], c["previous_outcome"], c["new_status"])
        for c in dry["changes"]
    ] == [
        (ids["unknown"], "retry", "skipped", "customer_not_found", "pending"),
        (ids["unknown_refund"], "retry", "skipped", "sale_skipped", "pending"),
    ]
    with engine.begin() as conn:  # lookup_required is kept, as for a failed row
        conn.execute(
            sa.text("UPDATE outbox.events SET lookup_required = true WHERE id = :i"),
            {"i": ids["unknown"]},
        )
    done = act(database_url, "retry", str(ids["unknown"]), "--reason", "customer added by hand")
    assert done["changes"] == dry["changes"] and done["notified"] is True
    for name in ("unknown", "unknown_refund"):
        row = event(engine, ids[name])
        assert (row.status, row.outcome, row.attempts, row.parked) == ("pending", None, 0, False)
    assert event(engine, ids["unknown"]).lookup_required is True
    assert recorded_changes(engine) == [
        (ids["unknown"], "sale", "inv_unknown", "retry", "skipped", "customer_not_found", 1),
        (ids["unknown_refund"], "refund", "inv_unknown", "retry", "skipped", "sale_skipped", 0),
    ]
    assert scalar(engine, "SELECT event_count FROM outbox.operator_actions") == 2


def test_retry_skipped_rows_by_filter(engine: sa.Engine, database_url: str) -> None:
    ids = seed(engine)
    customer = act(
        database_url, "retry", "--status", "skipped", "--customer", "cus_jana", "--dry-run"
    )
    assert customer["selection"] == {
        "filters": {"customer": "cus_jana", "status": "skipped"},
        "all": False,
    }
    assert [(c["event_id"], c["change"]) for c in customer["changes"]] == [
        (ids["unreferred"], "retry"),
        (ids["unknown"], "retry"),
        (ids["unknown_refund"], "retry"),  # behind its sale, which the filter selected
    ]
    invalid = act(
        database_url, "retry", "--status", "skipped", "--outcome", "invalid_partner", "--dry-run"
    )
    assert [c["event_id"] for c in invalid["changes"]] == [ids["bad_partner"]]
    signups = act(database_url, "retry", "--status", "skipped", "--type", "signup", "--dry-run")
    assert [c["event_id"] for c in signups["changes"]] == [ids["unreferred"], ids["bad_partner"]]
    everything = act(database_url, "retry", "--status", "skipped", "--all", "--dry-run")
    assert sorted(c["event_id"] for c in everything["changes"]) == sorted(
        ids[n] for n in ("unreferred", "bad_partner", "unknown", "unknown_refund")
    )
    # Without --status the filters select failed rows, as before.
    failed = act(database_url, "retry", "--customer", "cus_jana", "--dry-run")
    assert failed["changes"] == []


def test_retry_refuses_a_skipped_sale_whose_refund_was_delivered(
    engine: sa.Engine, database_url: str
) -> None:
    with engine.begin() as conn:  # the refund went first (no sale yet: orphan), then the sale
        refund = conn.execute(sa.text("SELECT outbox.record_refund('inv_late')")).scalar_one()
        sale = conn.execute(
            sa.text("SELECT outbox.record_sale('inv_late', 'cus_late', 9, 'EUR')")
        ).scalar_one()
        conn.execute(
            sa.text(
                "UPDATE outbox.events SET status = CASE WHEN id = :r THEN 'delivered' "
                "ELSE 'skipped' END, outcome = CASE WHEN id = :r THEN 'not_found' "
                "ELSE 'customer_not_found' END"
            ),
            {"r": refund},
        )
    result = cli("retry", str(sale), "--reason", "r", database_url=database_url)
    assert (result.exit_code, result.stderr) == (
        1,
        f"outbox: event {sale}: its refund (event {refund}) was delivered already; sending the "
        "sale now would create a commission that stays\n",
    )


def test_retry_or_discard_a_failed_signup_wakes_its_customers_parked_sales(
    engine: sa.Engine, database_url: str
) -> None:
    ids = blocked_signup(engine)
    for command in ("retry", "discard"):
        data = act(database_url, command, str(ids["signup"]), "--dry-run")
        assert [(c["event_id"], c["change"]) for c in data["changes"]] == [
            (ids["signup"], command),
            (ids["sale"], "wake"),
        ]
    refused = cli("retry", str(ids["sale"]), "--reason", "r", database_url=database_url)
    assert refused.stderr == (
        f"outbox: event {ids['sale']} is pending, blocked behind event {ids['signup']} "
        "(signup, failed): retry or discard that one\n"
    )
    act(database_url, "discard", str(ids["signup"]), "--reason", "test account")
    sale = event(engine, ids["sale"])
    assert (sale.status, sale.parked) == ("pending", False)
    assert sale.next_attempt_at <= scalar(engine, "SELECT now()")
    (recorded,) = rows(
        engine, "SELECT event_type, transaction_key FROM outbox.operator_action_events"
    )
    assert tuple(recorded) == ("signup", None)


# ---- outbox prune --------------------------------------------------------------------------


def settle(engine: sa.Engine, event_id: int, status: str, outcome: str, age: str) -> None:
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "UPDATE outbox.events SET status = :s, outcome = :o, "
                "updated_at = now() - CAST(:age AS interval), "
                "delivered_at = CASE WHEN :s = 'delivered' "
                "THEN now() - CAST(:age AS interval) END WHERE id = :i"
            ),
            {"s": status, "o": outcome, "age": age, "i": event_id},
        )


def test_prune_deletes_skipped_rows_by_default(engine: sa.Engine, database_url: str) -> None:
    with engine.begin() as conn:

        def one(sql: str) -> int:
            value: int = conn.execute(sa.text(sql)).scalar_one()
            return value

        old_signup = one("SELECT outbox.record_signup('cus_old')")
        old_sale = one("SELECT outbox.record_sale('inv_old', 'cus_old', 5, 'EUR')")
        old_refund = one("SELECT outbox.record_refund('inv_old')")
        delivered = one("SELECT outbox.record_sale('inv_paid', 'cus_paid', 5, 'EUR')")
        recent = one("SELECT outbox.record_sale('inv_recent', 'cus_new', 5, 'EUR')")
        open_sale = one("SELECT outbox.record_sale('inv_open', 'cus_open', 5, 'EUR')")
        one("SELECT outbox.record_refund('inv_open')")  # pending: its sale stays
        conn.execute(
            sa.text(
                "INSERT INTO outbox.attempts (event_id, attempt, started_at, finished_at, method, "
                "path, decision) VALUES (:i, 1, now(), now(), 'POST', '/v1/transactions', "
                "'skipped:customer_not_found')"
            ),
            {"i": old_sale},
        )
    settle(engine, old_signup, "skipped", "not_referred", "40 days")
    settle(engine, old_sale, "skipped", "customer_not_found", "40 days")
    settle(engine, old_refund, "skipped", "sale_skipped", "40 days")
    settle(engine, delivered, "delivered", "created", "40 days")
    settle(engine, recent, "skipped", "customer_not_found", "2 days")
    settle(engine, open_sale, "skipped", "customer_not_found", "40 days")

    dry = cli_json("prune", "--older-than", "30d", "--dry-run", database_url=database_url)
    assert dry["pruned"] == {"delivered": 1, "discarded": 0, "attempts": 1, "skipped": 3}
    assert (dry["batches"], dry["kept_open_key"]) == (1, 1)
    human = cli(
        "prune", "--older-than", "30d", "--batch-size", "2", "--dry-run", database_url=database_url
    ).stdout
    assert human.startswith(
        "would prune 1 delivered row, 3 skipped rows and 1 attempt in 2 batches of at most 2"
    )
    done = cli_json("prune", "--older-than", "30d", "--batch-size", "2", database_url=database_url)
    assert (done["pruned"], done["batches"]) == (dry["pruned"], 2)
    left = rows(engine, "SELECT id FROM outbox.events ORDER BY id")
    assert [r.id for r in left] == [recent, open_sale, open_sale + 1]
    assert scalar(engine, "SELECT count(*) FROM outbox.attempts") == 0
    (action,) = rows(engine, "SELECT event_count, selection FROM outbox.operator_actions")
    assert action.event_count == 4
    assert {k: action.selection[k] for k in ("delivered", "discarded", "attempts", "skipped")} == {
        "delivered": 1,
        "discarded": 0,
        "attempts": 1,
        "skipped": 3,
    }


def plan_uses_settled_index(conn: Any, sql: str, params: Any) -> bool:
    plan = "\n".join(str(r[0]) for r in conn.execute(sql, params))
    return "events_settled_idx" in plan


def test_prune_batch_reads_events_settled_idx(engine: sa.Engine, database_url: str) -> None:
    """With status = ANY(:statuses) bound as SQLAlchemy and psycopg send it (a custom plan for
    these values), and in a generic plan (a prepared statement after five runs may get one):
    the literal IN list in the query is what lets the planner prove the index's predicate."""
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "SELECT outbox.record_sale('inv_' || g, 'cus_' || g, 10, 'EUR') "
                "FROM generate_series(1, 6000) g"
            )
        )
        conn.execute(
            sa.text(
                "UPDATE outbox.events SET status = (ARRAY['delivered', 'skipped', 'discarded', "
                "'pending'])[id % 4 + 1], outcome = (ARRAY['created', 'customer_not_found', "
                "'rejected', NULL])[id % 4 + 1], "
                "updated_at = now() - make_interval(days => (id % 60)::int), "
                "delivered_at = CASE WHEN id % 4 = 0 "
                "THEN now() - make_interval(days => (id % 60)::int) END"
            )
        )
    with engine.connect() as conn:
        conn.execute(sa.text("ANALYZE outbox.events"))
        conn.commit()
        cutoff = conn.execute(sa.text("SELECT now() - interval '30 days'")).scalar_one()
        params = {"cutoff": cutoff, "statuses": ["delivered", "skipped"], "batch_size": 1000}
        query = queries.get("prune_batch", "ops.sql")
        assert plan_uses_settled_index(conn, sa.text("EXPLAIN " + query), params)
        conn.rollback()
    generic = (
        query.replace("CAST(:statuses AS text[])", "$1::text[]")
        .replace(":cutoff", "$2::timestamptz")
        .replace(":batch_size", "$3::integer")
    )
    with psycopg.connect(db.libpq_url(database_url)) as pg:
        pg.execute("PREPARE batch AS " + generic)
        pg.execute("SET plan_cache_mode = force_generic_plan")
        assert plan_uses_settled_index(
            pg,
            "EXPLAIN EXECUTE batch('{delivered,skipped}', now() - interval '30 days', 1000)",
            None,
        )
