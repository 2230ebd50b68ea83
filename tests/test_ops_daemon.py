"""The operator commands against a running daemon: a retry or a release is picked up at once,
without restarting the daemon (the issue's Done-when)."""

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
    wait_until,
)
from tests.test_ops_seed import cli, cli_json

# Polling and rechecks an hour apart: only the command's NOTIFY and wake-ups can get the rows
# sent within the tests' deadlines. Two attempts, then a sale for an unknown customer fails. (A
# retry due before the lease of its attempt ends is claimed when that lease would have ended,
# since the claimer sleeps until the earliest next_attempt_at it saw: the short lease keeps the
# failing part quick.)
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


def failed_with_refund_parked(engine: sa.Engine, key: str) -> bool:
    return states(engine, key) == [
        ("sale", "failed", "customer_not_found", False),
        ("refund", "pending", None, True),
    ]


def test_retrying_a_failed_sale_while_the_daemon_runs_delivers_it_and_its_refund(
    engine: sa.Engine, database_url: str, fake: FakePartneroThread
) -> None:
    fake.set_customers(unknown=["cus_ghost"])
    insert_sales(engine, ["inv_ghost"], customer="cus_ghost")
    insert_refunds(engine, ["inv_ghost"])
    with DaemonThread(make_settings(database_url, fake.url, **SLOW_POLLING)) as running:
        wait_until(lambda: failed_with_refund_parked(engine, "inv_ghost"), what="sale failed")
        listed = cli_json("failed", database_url=database_url)["rows"]
        assert [(r["state"], r["event_type"]) for r in listed] == [
            ("blocked", "refund"),
            ("failed", "sale"),
        ]
        sale_id = listed[1]["id"]

        fake.set_customers(known=["cus_ghost"])  # support created the customer in Partnero
        result = cli(
            "retry", str(sale_id), "--reason", "customer created", database_url=database_url
        )
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
    sale = cli_json("show", str(sale_id), database_url=database_url)["event"]
    assert [a["decision"] for a in sale["attempt_history"]] == [
        "retry:customer_not_found",
        "failed:customer_not_found",
        "delivered:created",
    ]
    assert sale["attempts"] == 1  # the retry gave it a fresh budget
    assert [a["action"] for a in sale["operator_actions"]] == ["retry"]


def test_releasing_the_refund_of_a_discarded_sale_sends_it_while_the_daemon_runs(
    engine: sa.Engine, database_url: str, fake: FakePartneroThread
) -> None:
    fake.set_customers(unknown=["cus_ghost"])
    insert_sales(engine, ["inv_never"], customer="cus_ghost")
    insert_refunds(engine, ["inv_never"])
    settings = make_settings(database_url, fake.url, **{**SLOW_POLLING, "max_attempts": 1})
    with DaemonThread(settings):
        wait_until(lambda: failed_with_refund_parked(engine, "inv_never"), what="sale failed")
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
                    ("sale", "discarded", "customer_not_found", False),
                    ("refund", "delivered", "not_found", False),
                ]
            ),
            timeout=20,
            what="the released refund sent",
        )
    assert fake.ledger() == []  # the sale never reached Partnero; the refund found nothing
    assert [r["method"] for r in api_calls(fake)] == ["POST", "DELETE"]
