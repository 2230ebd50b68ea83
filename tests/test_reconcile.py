"""`outbox reconcile`: rows delivered by the real daemon to the fake over loopback, the fake's
ledger tampered with, and every drift class reported for exactly the keys affected."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from click.testing import CliRunner, Result

from outbox.dev.fake_partnero import FakeConfig, FakePartneroThread
from outbox.domain import Exchange, RequestKind
from outbox.ops.reconcile_cli import reconcile_command
from outbox.policy import listing_page
from tests.daemon_helpers import (
    API_KEY,
    DaemonThread,
    insert_refunds,
    insert_sales,
    make_settings,
    rows,
    scalar,
    settled,
    wait_until,
)

DRIFT = [
    "missing",
    "not_reversed",
    "doubled",
    "amount_differs",
    "present_but_skipped",
    "unknown_here",
]


@pytest.fixture
def fake() -> Iterator[FakePartneroThread]:
    with FakePartneroThread(FakeConfig(api_key=API_KEY, seed=7)) as server:
        yield server


def reconcile(database_url: str, url: str, *args: str, **env: str) -> Result:
    environ = {
        "OUTBOX_DATABASE_URL": database_url,
        "PARTNERO_API_URL": url,
        "PARTNERO_API_KEY": API_KEY,
        "OUTBOX_RETRY_BASE_DELAY_SECONDS": "0.01",
        "OUTBOX_RETRY_MAX_DELAY_SECONDS": "0.05",
        "OUTBOX_API_KEY_FILE": "",
        "OUTBOX_ENV_FILE": "",
        **env,
    }
    environ = {k: v for k, v in environ.items() if v}
    result = CliRunner().invoke(reconcile_command, list(args), env=environ, catch_exceptions=False)
    assert API_KEY not in result.stdout + result.stderr
    return result


def reconcile_json(database_url: str, url: str, *args: str, code: int = 0) -> Any:
    result = reconcile(database_url, url, "--json", *args)
    assert result.exit_code == code, result.stdout + result.stderr
    return json.loads(result.stdout)


def found(data: Any) -> dict[str, list[str]]:
    """Each finding class with its keys."""
    out: dict[str, list[str]] = {}
    for f in data["findings"]:
        out.setdefault(f["finding"], []).append(f["key"])
    return out


def deliver(engine: sa.Engine, database_url: str, fake: FakePartneroThread, total: int) -> None:
    settings = make_settings(database_url, fake.url, unknown_customer_grace_seconds=0)
    with DaemonThread(settings):
        wait_until(lambda: settled(engine, total), what="every row settled")


def create_elsewhere(fake: FakePartneroThread, key: str, customer: str) -> None:
    """Another integration (a plugin, a script) creates the key at Partnero."""
    fake.set_customers(known=[customer])
    body = {"key": key, "customer": {"key": customer}, "amount": 5, "amount_units": "EUR"}
    auth = {"Authorization": f"Bearer {API_KEY}"}
    assert httpx.post(f"{fake.url}/v1/transactions", json=body, headers=auth).status_code == 201


def test_each_drift_class_is_found_for_exactly_its_keys_and_requeue_repairs(
    engine: sa.Engine, database_url: str, fake: FakePartneroThread
) -> None:
    sales = ["s_clean", "s_deleted", "s_purged", "s_doubled", "s_amount", "s_currency"]
    insert_sales(engine, [*sales, "r_revived", "r_clean"])
    insert_refunds(engine, ["r_revived", "r_clean"])
    fake.set_customers(unknown=["cust_unknown"])
    insert_sales(engine, ["s_skipped"], customer="cust_unknown")
    deliver(engine, database_url, fake, 11)
    skipped = "SELECT status FROM outbox.events WHERE transaction_key = 's_skipped'"
    assert scalar(engine, skipped) == "skipped"

    clean = reconcile_json(database_url, fake.url)
    assert (clean["ok"], clean["keys"], clean["compared"], clean["findings"]) == (True, 9, 9, [])
    assert clean["counts"] == dict.fromkeys([*DRIFT, "in_flight", "unsettled"], 0)

    fake.tamper("delete", "s_deleted")
    fake.tamper("purge", "s_purged")
    fake.tamper("duplicate", "s_doubled")
    fake.tamper("amend", "s_amount", amount=10.5)
    fake.tamper("amend", "s_currency", amount=10, amount_units="USD")
    fake.tamper("revive", "r_revived")
    create_elsewhere(fake, "s_skipped", "cust_unknown")
    drift = reconcile_json(database_url, fake.url, code=1)
    assert drift["ok"] is False
    # auto: the ledger is one page of the listing, fewer calls than 9 keys
    assert (drift["strategy"], drift["calls"], drift["estimate"]) == (
        "listing",
        1,
        {"key_filter": 9, "listing": 1},
    )
    by_key = reconcile_json(database_url, fake.url, "--strategy", "key", code=1)
    assert (by_key["strategy"], by_key["calls"]) == ("key_filter", 9)
    assert by_key["findings"] == drift["findings"]
    assert by_key["counts"] == drift["counts"]
    assert found(drift) == {
        "missing": ["s_deleted", "s_purged"],
        "not_reversed": ["r_revived"],
        "doubled": ["s_doubled"],
        "amount_differs": ["s_amount", "s_currency"],
        "present_but_skipped": ["s_skipped"],
    }
    doubled = next(f for f in drift["findings"] if f["finding"] == "doubled")
    assert [(r["event_type"], r["status"], r["outcome"]) for r in doubled["rows"]] == [
        ("sale", "delivered", "created")
    ]
    assert [(t["amount"], t["currency"], t["deleted_at"]) for t in doubled["transactions"]] == [
        ("10.0", "EUR", None),
        ("10.0", "EUR", None),
    ]

    human = reconcile(database_url, fake.url)
    assert human.exit_code == 1
    assert "s_purged" in human.stdout and "drift: 7 findings" in human.stdout
    said = " ".join(human.stdout.split())
    assert (
        "in 1 call strategy: listing, 1 page of GET /v1/transactions?limit=250 (key by key: 9"
        in said
    )

    _requeue_then_repair(engine, database_url, fake)


def _requeue_then_repair(engine: sa.Engine, database_url: str, fake: FakePartneroThread) -> None:
    before = rows(engine, "SELECT id, status, outcome FROM outbox.events ORDER BY id")
    dry = reconcile_json(database_url, fake.url, "--requeue-missing", "--dry-run", code=1)
    assert rows(engine, "SELECT id, status, outcome FROM outbox.events ORDER BY id") == before
    changes = dry["requeue"]["action"]["changes"]
    assert sorted((c["transaction_key"], c["event_type"]) for c in changes) == [
        ("r_revived", "refund"),
        ("s_purged", "sale"),
    ]
    assert dry["requeue"]["left_alone"] == ["s_deleted"]

    done = reconcile_json(
        database_url, fake.url, "--requeue-missing", "--reason", "close november", code=1
    )
    action = done["requeue"]["action"]
    assert (action["action"], action["count"], action["notified"]) == ("retry", 2, True)
    (recorded,) = rows(engine, "SELECT action, reason, selection FROM outbox.operator_actions")
    assert (recorded.action, recorded.reason) == ("retry", "close november")
    assert recorded.selection["reconcile"]["findings"] == ["missing", "not_reversed"]
    requeued = rows(
        engine,
        "SELECT transaction_key, event_type, status, lookup_required, delivered_at, attempts "
        "FROM outbox.events WHERE status = 'pending' ORDER BY transaction_key",
    )
    assert [tuple(r) for r in requeued] == [
        ("r_revived", "refund", "pending", True, None, 0),
        ("s_purged", "sale", "pending", True, None, 0),
    ]
    in_flight = reconcile_json(database_url, fake.url, "--key", "s_purged")
    assert found(in_flight) == {"in_flight": ["s_purged"]}

    deliver(engine, database_url, fake, 11)
    repaired = reconcile_json(database_url, fake.url, "--key", "s_purged", "--key", "r_revived")
    assert (repaired["ok"], repaired["findings"]) == (True, [])
    after = reconcile_json(database_url, fake.url, code=1)
    assert set(found(after)) == {"missing", "doubled", "amount_differs", "present_but_skipped"}
    assert found(after)["missing"] == ["s_deleted"]


def settle_by_hand(engine: sa.Engine, keys: list[str], amount: str = "10.00") -> None:
    """Sales marked delivered without a daemon (for tests that need no delivery)."""
    insert_sales(engine, keys, amount=amount)
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "UPDATE outbox.events SET status = 'delivered', outcome = 'created', "
                "delivered_at = now() WHERE transaction_key = ANY(:keys)"
            ),
            {"keys": keys},
        )


def test_pending_and_failed_rows_are_listed_not_drift(engine: sa.Engine, database_url: str) -> None:
    insert_sales(engine, ["p1", "f1"])
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "UPDATE outbox.events SET status = 'failed', outcome = 'rejected' "
                "WHERE transaction_key = 'f1'"
            )
        )
    data = reconcile_json(database_url, "http://127.0.0.1:9")  # never asked: nothing settled
    assert (data["ok"], data["calls"], data["compared"]) == (True, 0, 0)
    assert found(data) == {"unsettled": ["f1"], "in_flight": ["p1"]}
    p1 = next(f for f in data["findings"] if f["key"] == "p1")
    assert p1["rows"][0]["status"] == "pending" and p1["transactions"] == []


def test_the_rate_limit_setting_is_kept(
    engine: sa.Engine, database_url: str, fake: FakePartneroThread
) -> None:
    settle_by_hand(engine, ["k1", "k2", "k3", "k4"])
    started = time.monotonic()
    result = reconcile(
        database_url, fake.url, "--strategy", "key", OUTBOX_RATE_LIMIT_PER_SECOND="2"
    )
    # 2 calls a second, one every half second, no burst: the fourth 1.5 s after the first.
    assert time.monotonic() - started >= 1.4
    assert result.exit_code == 1  # settled by hand: Partnero has none of them
    assert len([r for r in fake.requests() if r["method"] == "GET"]) == 4


def test_every_page_is_read_and_only_the_exact_key_counts(
    engine: sa.Engine, database_url: str, fake: FakePartneroThread
) -> None:
    settle_by_hand(engine, ["pg", "pg_other"])
    body = {"key": "pg", "customer": {"key": "c"}, "amount": 10, "amount_units": "EUR"}
    auth = {"Authorization": f"Bearer {API_KEY}"}
    for key in ("pg", "pg_other", "PG"):
        httpx.post(f"{fake.url}/v1/transactions", json=body | {"key": key}, headers=auth)
    for _ in range(260):
        fake.tamper("duplicate", "PG")  # matched by the substring filter, not the same key
    data = reconcile_json(
        database_url, fake.url, "--key", "pg", "--key", "pg_other", "--strategy", "key"
    )
    # pg: 263 rows match the substring filter, 2 pages; pg_other: 1 page
    assert (data["ok"], data["calls"], data["compared"]) == (True, 3, 2)
    assert len([r for r in fake.requests() if r["method"] == "GET"]) == 3


def test_partnero_unreachable_or_refusing_is_exit_3_in_one_line(
    engine: sa.Engine, database_url: str, fake: FakePartneroThread
) -> None:
    settle_by_hand(engine, ["u1"])
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}"
    result = reconcile(database_url, closed)
    assert result.exit_code == 3
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("outbox: Partnero cannot be asked (5 attempts): Not sent")

    refused = reconcile(database_url, fake.url, PARTNERO_API_KEY="another-key")
    assert refused.exit_code == 3
    assert refused.stderr.startswith("outbox: Partnero cannot be asked: HTTP 401")

    fake.configure(rate_429=1.0)
    limited = reconcile(database_url, fake.url)
    assert (limited.exit_code, limited.stderr.count("\n")) == (3, 1)
    assert "(5 attempts): HTTP 429" in limited.stderr


def test_database_unreachable_is_exit_3_and_bad_options_exit_2(database_url: str) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    down = reconcile(f"postgresql://u@127.0.0.1:{port}/db", "http://127.0.0.1:9")
    assert (down.exit_code, down.stderr.count("\n")) == (3, 1)
    assert "cannot reach the database" in down.stderr
    for args in (["--since", "30d", "--from", "2026-01-01"], ["--to", "2026-01-01"], ["--dry-run"]):
        assert reconcile(database_url, "http://127.0.0.1:9", *args).exit_code == 2, args
    no_reason = reconcile(database_url, "http://127.0.0.1:9", "--requeue-missing")
    assert no_reason.exit_code == 2 and "--reason is required" in no_reason.stderr


def test_the_listing_finds_keys_created_elsewhere_in_the_range(
    engine: sa.Engine, database_url: str, fake: FakePartneroThread
) -> None:
    settle_by_hand(engine, ["ours"], amount="5")
    create_elsewhere(fake, "ours", "c")
    create_elsewhere(fake, "plugin_1", "c")  # created now: in the range
    create_elsewhere(fake, "7", "c")
    auth = {"Authorization": f"Bearer {API_KEY}"}
    old = {"key": "old_1", "customer": {"key": "c"}, "amount": 5, "created_at": 1_000_000_000}
    httpx.post(f"{fake.url}/v1/transactions", json=old, headers=auth)  # 2001: out of range
    create_elsewhere(fake, "gone", "c")
    fake.tamper("delete", "gone")  # not live: not counted
    insert_sales(engine, ["7"])  # a key with a row here recorded long ago: not unknown
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "UPDATE outbox.events SET created_at = '2001-01-01', status = 'delivered', "
                "outcome = 'created' WHERE transaction_key = '7'"
            )
        )
    listing = reconcile_json(database_url, fake.url, "--strategy", "listing", code=1)
    assert found(listing) == {"unknown_here": ["plugin_1"]}
    assert (listing["strategy"], listing["calls"], listing["counts"]["unknown_here"]) == (
        "listing",
        1,
        1,
    )
    (plugin,) = listing["findings"]
    assert plugin["rows"] == [] and plugin["transactions"][0]["amount"] == "5"
    assert reconcile_json(database_url, fake.url, "--strategy", "key")["findings"] == []
    narrowed = reconcile_json(database_url, fake.url, "--strategy", "listing", "--key", "ours")
    assert (narrowed["ok"], narrowed["findings"]) == (True, [])


def test_auto_takes_the_fewer_calls_and_the_listing_reads_every_page(
    engine: sa.Engine, database_url: str, fake: FakePartneroThread
) -> None:
    settle_by_hand(engine, ["a1", "a2"], amount="5")
    for key in ("a1", "a2"):
        create_elsewhere(fake, key, "c")
    auth = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=fake.url, headers=auth) as client:
        for n in range(500):
            body = {"key": f"zz_{n}", "customer": {"key": "c"}, "amount": 1, "created_at": 10**6}
            assert client.post("/v1/transactions", json=body).status_code == 201
    fake.tamper("duplicate", "a2")  # the copy is on page 3
    auto = reconcile_json(database_url, fake.url, code=1)
    # 502 entries + 1 copy: 3 pages of the listing, more than 2 keys: by key, after the probe
    assert (auto["strategy"], auto["calls"], auto["estimate"]) == (
        "key_filter",
        3,
        {"key_filter": 2, "listing": 3},
    )
    listing = reconcile_json(database_url, fake.url, "--strategy", "listing", code=1)
    assert (listing["strategy"], listing["calls"]) == ("listing", 3)
    assert found(listing) == found(auto) == {"doubled": ["a2"]}
    gets = [r for r in fake.requests() if r["method"] == "GET"]
    # auto: the probe and a1, a2 by key; then the listing, 3 pages without a key filter
    keys = [r["key"] for r in gets]
    assert keys[0] is None and sorted(keys[1:3]) == ["a1", "a2"] and keys[3:] == [None] * 3


def test_a_listing_page_is_read_by_exact_key_and_its_meta() -> None:
    def page(body: Any) -> Exchange:
        return Exchange(
            kind=RequestKind.LOOKUP, method="GET", path="/", status_code=200, json_body=body
        )

    rows = [{"key": "a"}, {"key": 7}, {"key": True}, {"key": None}, {"amount": 1}]
    links = {"next": "https://p.test/v1/transactions?limit=250&page=2"}
    read = listing_page(page({"data": rows, "links": links, "meta": {"last_page": 4}}))
    assert read == ([("a", rows[0]), ("7", rows[1])], 2, 4)
    last = listing_page(page({"data": [], "links": {"next": None}, "meta": {"last_page": "4"}}))
    assert last == ([], None, None)
    assert listing_page(page({"data": [], "status": 1})) is None
