"""The operator commands against a running daemon: a retry or a release is picked up at once,
without restarting the daemon (the issue's Done-when); a skipped sale retried for a customer a
person added at Partnero is delivered, its skipped refund after it; a sale waits visibly behind
its customer's failed signup until the signup is retried."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from outbox.dev.fake_partnero import FakeConfig, FakePartneroThread
from tests.daemon_helpers import (
    API_KEY,
    DaemonThread,
    api_calls,
    insert_refunds,
    insert_sales,
    make_settings,
    rows,
    scalar,
    wait_until,
)
from tests.test_ops_seed import cli, cli_json

# Polling and rechecks an hour apart: only the command's NOTIFY and wake-ups can get the rows
# sent within the tests' deadlines. Two attempts, then a sale for an unknown customer is skipped
# (the attempts limit ends the unknown-customer grace early). (A retry due before the lease of
# its attempt ends is claimed when that lease would have ended, since the claimer sleeps until
# the earliest next_attempt_at it saw: the short lease keeps the first part quick.)
SLOW_POLLING = {
    "poll_interval_seconds": 3600,
    "blocked_recheck_seconds": 3600,
    "max_attempts": 2,
    "request_timeout_seconds": 1.0,
    "lease_seconds": 2.1,
}


@pytest.fixture
def fake() -> Iterator[FakePartneroThread]:
    with FakePartneroThread(FakeConfig(api_key=API_KEY, dedupe=False, seed=11)) as server:
        fake_server: FakePartneroThread = server
        yield fake_server


def states(engine: sa.Engine, key: str) -> list[tuple[str, str, str | None, bool]]:
    return [
        (r.event_type, r.status, r.outcome, r.parked)
        for r in rows(
            engine,
            "SELECT event_type, status, outcome, parked FROM outbox.events "
            "WHERE transaction_key = :k ORDER BY id",
            k=key,
        )
    ]


def refund_parked_behind(engine: sa.Engine, key: str, status: str, outcome: str) -> bool:
    return states(engine, key) == [
        ("sale", status, outcome, False),
        ("refund", "pending", None, True),
    ]


def test_retrying_a_skipped_sale_while_the_daemon_runs_delivers_it_and_its_refund(
    engine: sa.Engine, database_url: str, fake: FakePartneroThread
) -> None:
    fake.set_customers(unknown=["cus_ghost"])
    insert_sales(engine, ["inv_ghost"], customer="cus_ghost")
    insert_refunds(engine, ["inv_ghost"])
    skipped = [
        ("sale", "skipped", "customer_not_found", False),
        ("refund", "skipped", "sale_skipped", False),
    ]
    with DaemonThread(make_settings(database_url, fake.url, **SLOW_POLLING)) as running:
        wait_until(lambda: states(engine, "inv_ghost") == skipped, what="sale and refund skipped")
        assert cli_json("failed", database_url=database_url)["total"] == 0  # nobody's problem
        assert cli("status", database_url=database_url).exit_code == 0
        sale_id = scalar(engine, "SELECT id FROM outbox.events WHERE event_type = 'sale'")

        fake.set_customers(known=["cus_ghost"])  # support added the customer in Partnero
        dry = cli_json("retry", str(sale_id), "--dry-run", database_url=database_url)
        assert [(c["event_type"], c["change"], c["previous_status"]) for c in dry["changes"]] == [
            ("sale", "retry", "skipped"),
            ("refund", "retry", "skipped"),  # back to pending behind its sale, recorded
        ]
        # Plain output: the daemon, woken at once, logs to the same stdout as the command.
        result = cli("retry", str(sale_id), "--reason", "customer added", database_url=database_url)
        assert result.exit_code == 0, result.output

        wait_until(
            lambda: (
                states(engine, "inv_ghost")
                == [
                    ("sale", "delivered", "created", False),
                    ("refund", "delivered", "deleted", False),
                ]
            ),
            timeout=20,
            what="the retried sale and then its refund delivered",
        )
        assert running.daemon is not None and running.daemon.health.delivered == 2
    (entry,) = fake.ledger()
    assert entry["key"] == "inv_ghost"
    assert entry["created_seq"] < entry["deleted_seq"]
    shown = cli_json("show", "--key", "inv_ghost", database_url=database_url)["events"]
    sale, refund = shown
    assert [a["decision"] for a in sale["attempt_history"]] == [
        "retry:customer_not_found",
        "skipped:customer_not_found",
        "delivered:created",
    ]
    assert sale["attempts"] == 1  # the retry gave it a fresh budget
    assert [a["decision"] for a in refund["attempt_history"]] == ["delivered:deleted"]
    for event in shown:
        assert [(a["action"], a["previous_status"]) for a in event["operator_actions"]] == [
            ("retry", "skipped")
        ]


def test_releasing_the_refund_of_a_discarded_sale_sends_it_while_the_daemon_runs(
    engine: sa.Engine, database_url: str, fake: FakePartneroThread
) -> None:
    # Partnero refuses the sale once (a 400 it does not document: failed, rejected).
    fake.configure(odd_answers={"inv_never": {"answer": "bad_request", "times": 1}})
    insert_sales(engine, ["inv_never"], customer="cus_ghost")
    insert_refunds(engine, ["inv_never"])
    with DaemonThread(make_settings(database_url, fake.url, **SLOW_POLLING)):
        wait_until(
            lambda: refund_parked_behind(engine, "inv_never", "failed", "rejected"),
            what="sale failed",
        )
        (sale_id,) = [
            r["id"]
            for r in cli_json("failed", "--state", "failed", database_url=database_url)["rows"]
        ]
        kept = cli(
            "discard", str(sale_id), "--reason", "order cancelled", database_url=database_url
        )
        assert kept.exit_code == 0, kept.output
        assert states(engine, "inv_never")[1] == ("refund", "pending", None, True)  # still waits

        released = cli(
            "discard", str(sale_id), "--refunds", "release", "--reason", "let the refund go",
            database_url=database_url,
        )  # fmt: skip
        assert released.exit_code == 0, released.output
        wait_until(
            lambda: (
                states(engine, "inv_never")
                == [
                    ("sale", "discarded", "rejected", False),
                    ("refund", "delivered", "not_found", False),
                ]
            ),
            timeout=20,
            what="the released refund sent",
        )
    assert fake.ledger() == []  # the sale never reached Partnero; the refund found nothing
    assert [r["method"] for r in api_calls(fake)] == ["POST", "DELETE"]


def test_a_sale_waits_behind_its_customers_failed_signup_until_it_is_retried(
    engine: sa.Engine, database_url: str, fake: FakePartneroThread
) -> None:
    # Partnero refuses the signup once (a 400 it does not document: failed, rejected).
    fake.configure(odd_answers={"cus_new": {"answer": "bad_request", "times": 1}})
    with engine.begin() as conn:  # the account and its first purchase, in one transaction
        signup_id = conn.execute(
            sa.text(
                """SELECT outbox.record_signup('cus_new', '{"partner": {"key": "partner_1"}}')"""
            )
        ).scalar_one()
        sale_id = conn.execute(
            sa.text("SELECT outbox.record_sale('inv_first', 'cus_new', 30, 'EUR')")
        ).scalar_one()
    with DaemonThread(make_settings(database_url, fake.url, **SLOW_POLLING)):
        # Failed, the signup wakes its customer's sale, which parks again behind it; then the
        # daemon is idle (its log lines would mix with the commands' output).
        wait_until(
            lambda: scalar(
                engine,
                "SELECT bool_and(status = 'failed') FILTER (WHERE event_type = 'signup') "
                "AND bool_and(parked) FILTER (WHERE event_type = 'sale') FROM outbox.events",
            ),
            what="the sale blocked behind the failed signup",
        )
        (blocked,) = cli_json("failed", "--state", "blocked", database_url=database_url)["rows"]
        assert (blocked["id"], blocked["transaction_key"]) == (sale_id, "inv_first")
        assert blocked["blocked_by"] == {
            "id": signup_id,
            "event_type": "signup",
            "status": "failed",
            "outcome": "rejected",
        }
        (failed_signup,) = cli_json("failed", "--type", "signup", database_url=database_url)["rows"]
        assert (failed_signup["transaction_key"], failed_signup["rows_waiting"]) == (None, 1)

        dry = cli_json("retry", str(signup_id), "--dry-run", database_url=database_url)
        assert [(c["event_id"], c["change"]) for c in dry["changes"]] == [
            (signup_id, "retry"),
            (sale_id, "wake"),  # the parked sale of its customer
        ]
        retried = cli("retry", str(signup_id), "--reason", "fixed", database_url=database_url)
        assert retried.exit_code == 0, retried.output
        wait_until(
            lambda: (
                scalar(
                    engine,
                    "SELECT count(*) FROM outbox.events WHERE status = 'delivered' "
                    "AND outcome = 'created'",
                )
                == 2
            ),
            timeout=20,
            what="the signup and then its sale delivered",
        )
    assert [(r["method"], r["path"]) for r in api_calls(fake)] == [
        ("POST", "/v1/customers"),
        ("POST", "/v1/customers"),
        ("POST", "/v1/transactions"),
    ]
