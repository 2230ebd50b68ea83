"""Partnero read as Partnero means it, against the Partnero-shaped fake and a real Postgres.

Every key a shop uses reaches Partnero (a refund is a body-form DELETE, a lookup the `?key=`
list filter, nothing in a path segment); only Partnero's own answers are recorded as outcomes;
a 403 on one row fails that row alone; a wrong PARTNERO_API_URL stops start-up with one line.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from outbox import db
from outbox.db import migrate
from outbox.dev.fake_partnero import FakeConfig, FakePartneroThread
from tests.daemon_helpers import (
    API_KEY,
    DaemonThread,
    env_for,
    insert_refunds,
    insert_sales,
    make_settings,
    rows,
    scalar,
    settled,
    statuses,
    wait_until,
)
from tests.test_run_process import run_cli

# Keys shops use that do not survive a URL path: invoice numbers with "/", query and fragment
# characters, a literal percent escape, spaces, "+" (a space in a query string) and non-ASCII.
ODD_KEYS = [
    "FV/2026/11/7",
    "a?b=c&d",
    "frag#1",
    "100%",
    "%2F",
    "two words",
    "INV+1",
    "zażółć/€/1",
    "../../v1/test",
    "x/y?z#w%20v",
]


@pytest.fixture
def fake() -> Iterator[FakePartneroThread]:
    with FakePartneroThread(FakeConfig(api_key=API_KEY, dedupe=False, seed=11)) as server:
        yield server


def attempts_of(engine: sa.Engine, key: str, type_: str = "sale") -> list[tuple[Any, ...]]:
    return [
        (r.method, r.path.partition("?")[0], r.decision, r.status_code)
        for r in rows(
            engine,
            "SELECT a.method, a.path, a.decision, a.status_code FROM outbox.attempts a"
            " JOIN outbox.events e ON e.id = a.event_id"
            " WHERE e.transaction_key = :k AND e.event_type = :t ORDER BY a.id",
            k=key,
            t=type_,
        )
    ]


def event(engine: sa.Engine, key: str, type_: str = "sale") -> sa.Row[Any]:
    (row,) = rows(
        engine,
        "SELECT * FROM outbox.events WHERE transaction_key = :k AND event_type = :t",
        k=key,
        t=type_,
    )
    return row


def entries(fake: FakePartneroThread, key: str) -> list[dict[str, Any]]:
    return [t for t in fake.ledger() if t["key"] == key]


def create_directly(fake: FakePartneroThread, key: str) -> None:
    """A transaction made at Partnero by someone else (or by a call whose answer was lost)."""
    httpx.post(
        f"{fake.url}/v1/transactions",
        headers={"Authorization": f"Bearer {API_KEY}", "Accept": "application/json"},
        json={"key": key, "amount": 10, "customer": {"key": "cust_1"}},
    ).raise_for_status()


# ---- every key a shop uses ---------------------------------------------------------------------


def test_keys_of_any_characters_are_created_once_and_reversed_by_their_refund(
    engine: sa.Engine, database_url: str, fake: FakePartneroThread
) -> None:
    """Half of the keys have their first create applied with the answer lost: each is looked up
    through the list filter, found, and not sent again; every refund reaches its transaction."""
    lost, answered = ODD_KEYS[::2], ODD_KEYS[1::2]
    fake.configure(drop_after_rate=1.0)  # applied, then the connection drops: no answer
    insert_sales(engine, lost)
    with DaemonThread(make_settings(database_url, fake.url)):
        wait_until(lambda: all(attempts_of(engine, k) for k in lost), what="each first create")
        fake.configure(drop_after_rate=0.0)
        insert_sales(engine, answered)
        wait_until(lambda: settled(engine, len(ODD_KEYS)), what="the sales")
        insert_refunds(engine, ODD_KEYS)
        wait_until(lambda: settled(engine, 2 * len(ODD_KEYS)), what="the refunds")
    for key in ODD_KEYS:
        ledger = entries(fake, key)
        assert len(ledger) == 1, f"{key!r}: {len(ledger)} Partnero transactions"
        assert ledger[0]["deleted_seq"] is not None, f"{key!r}: the refund did not reverse it"
        assert (event(engine, key).status, event(engine, key).outcome) == ("delivered", "created")
        refund = event(engine, key, "refund")
        assert (refund.status, refund.outcome) == ("delivered", "deleted"), key
        assert attempts_of(engine, key, "refund") == [
            ("DELETE", "/v1/transactions", "delivered:deleted", 200)
        ]
    for key in lost:
        history = attempts_of(engine, key)
        # A lookup made before the drops were switched off is dropped too (and asked again).
        dropped_lookup = ("GET", "/v1/transactions", "retry:timeout+lookup", None)
        assert history[0] == ("POST", "/v1/transactions", "retry:timeout+lookup", None), key
        assert set(history[1:-1]) <= {dropped_lookup}, (key, history)
        assert history[-1] == ("GET", "/v1/transactions", "lookup:found", 200), key
    # No key ever went into a path segment.
    assert {r["path"] for r in fake.requests()} <= {"/v1/transactions", "/v1/test"}


def test_a_key_that_is_only_a_substring_of_another_is_not_found(
    engine: sa.Engine, database_url: str, fake: FakePartneroThread
) -> None:
    """The list filter may match substrings: FV/2026/11/70 is not FV/2026/11/7."""
    create_directly(fake, "FV/2026/11/70")
    create_directly(fake, "fv/2026/11/7")  # another case: not ours either
    fake.configure(drop_before_rate=1.0)  # the first create never reaches Partnero
    insert_sales(engine, ["FV/2026/11/7"])
    with DaemonThread(make_settings(database_url, fake.url)):
        wait_until(lambda: attempts_of(engine, "FV/2026/11/7"), what="the first create")
        fake.configure(drop_before_rate=0.0)
        wait_until(lambda: settled(engine, 1))
    history = attempts_of(engine, "FV/2026/11/7")
    assert history[0] == ("POST", "/v1/transactions", "retry:timeout+lookup", None)
    # A lookup made before the drops were switched off is dropped too (and asked again).
    dropped_lookup = ("GET", "/v1/transactions", "retry:timeout+lookup", None)
    assert set(history[1:-2]) <= {dropped_lookup}, history
    assert history[-2:] == [
        ("GET", "/v1/transactions", "lookup:absent", 200),
        ("POST", "/v1/transactions", "delivered:created", 201),
    ]
    assert len(entries(fake, "FV/2026/11/7")) == 1


def test_the_lookup_follows_the_next_page_until_the_key_is_settled(
    engine: sa.Engine, database_url: str, fake: FakePartneroThread
) -> None:
    for i in range(260):  # more than a page (250) of keys that contain ours
        create_directly(fake, f"PAGE-1-{i}")
    fake.configure(drop_after_rate=1.0)
    insert_sales(engine, ["PAGE-1"])
    with DaemonThread(make_settings(database_url, fake.url)):
        wait_until(lambda: attempts_of(engine, "PAGE-1"), what="the first create")
        fake.configure(drop_after_rate=0.0)
        wait_until(lambda: settled(engine, 1))
    assert attempts_of(engine, "PAGE-1") == [
        ("POST", "/v1/transactions", "retry:timeout+lookup", None),
        ("GET", "/v1/transactions", "lookup:next_page:2", 200),
        ("GET", "/v1/transactions", "lookup:found", 200),
    ]
    # Only the first page counts as an attempt.
    assert event(engine, "PAGE-1").attempts == 2
    assert len(entries(fake, "PAGE-1")) == 1


# ---- only Partnero's own answers are outcomes --------------------------------------------------

# (odd answer, HTTP status, the decision of that attempt)
NOT_PARTNEROS = [
    ("status_0", 200, "retry:bad_response+lookup"),
    ("html_200", 200, "retry:bad_response+lookup"),
    ("empty_200", 200, "retry:bad_response+lookup"),
    ("route_404", 404, "retry:bad_response+lookup"),
    ("html_404", 404, "retry:bad_response+lookup"),
    ("html_502", 502, "retry:server_error+lookup"),
]


@pytest.mark.parametrize("applied", [False, True], ids=["not-applied", "applied"])
@pytest.mark.parametrize(("answer", "code", "decision"), NOT_PARTNEROS)
def test_a_create_answered_by_something_else_is_looked_up_never_delivered(
    engine: sa.Engine,
    database_url: str,
    fake: FakePartneroThread,
    answer: str,
    code: int,
    decision: str,
    applied: bool,
) -> None:
    key = f"FV/odd/{answer}"
    fake.configure(odd_answers={key: {"answer": answer, "applied": applied, "times": 1}})
    insert_sales(engine, [key])
    with DaemonThread(make_settings(database_url, fake.url)):
        wait_until(lambda: settled(engine, 1))
    calls = attempts_of(engine, key)
    assert calls[0] == ("POST", "/v1/transactions", decision, code)
    expected_lookup = "lookup:found" if applied else "lookup:absent"
    assert calls[1] == ("GET", "/v1/transactions", expected_lookup, 200)
    assert (event(engine, key).status, event(engine, key).outcome) == ("delivered", "created")
    assert len(entries(fake, key)) == 1


def test_a_create_refused_in_other_words_fails_and_is_never_a_duplicate(
    engine: sa.Engine, database_url: str, fake: FakePartneroThread
) -> None:
    """400 "Duplicate customer key" is not Partnero's "Duplicate key": nothing was created."""
    fake.configure(odd_answers={"inv_400": {"answer": "bad_request"}})
    insert_sales(engine, ["inv_400"])
    with DaemonThread(make_settings(database_url, fake.url)):
        wait_until(lambda: settled(engine, 1))
    row = event(engine, "inv_400")
    assert (row.status, row.outcome) == ("failed", "rejected")
    assert row.last_error == "HTTP 400: Duplicate customer key"
    # Its effect is unknown: a person's retry looks the key up before creating it again.
    assert row.lookup_required is True
    assert entries(fake, "inv_400") == []


@pytest.mark.parametrize(
    ("answer", "code"),
    [("route_404", 404), ("html_404", 404), ("status_0", 200), ("html_200", 200)],
)
def test_a_refund_answered_by_something_else_is_never_recorded_as_settled(
    engine: sa.Engine, database_url: str, fake: FakePartneroThread, answer: str, code: int
) -> None:
    """A route-level 404 is not Partnero's "Transaction not found": the refund is sent again
    and reaches its transaction."""
    key = f"FV/refund/{answer}"
    insert_sales(engine, [key])
    with DaemonThread(make_settings(database_url, fake.url)):
        wait_until(lambda: settled(engine, 1))
        fake.configure(odd_answers={key: {"answer": answer, "times": 1}})
        insert_refunds(engine, [key])
        wait_until(lambda: settled(engine, 2))
    calls = attempts_of(engine, key, "refund")
    assert calls[0][3] == code and calls[0][2].startswith("retry:bad_response")
    assert calls[-1] == ("DELETE", "/v1/transactions", "delivered:deleted", 200)
    assert event(engine, key, "refund").outcome == "deleted"
    assert entries(fake, key)[0]["deleted_seq"] is not None


def test_a_refund_of_a_key_partnero_does_not_have_is_not_found(
    engine: sa.Engine, database_url: str, fake: FakePartneroThread
) -> None:
    """Partnero's own "Transaction not found" is the one 404 that means nothing to reverse."""
    with DaemonThread(make_settings(database_url, fake.url, orphan_refund_grace_seconds=0)):
        insert_refunds(engine, ["FV/never/sold"])
        wait_until(lambda: settled(engine, 1))
    assert attempts_of(engine, "FV/never/sold", "refund") == [
        ("DELETE", "/v1/transactions", "delivered:not_found", 404)
    ]


# ---- 403: the row's problem while the key works ------------------------------------------------


def test_a_403_on_one_row_fails_it_alone_and_the_rest_go_on(
    engine: sa.Engine, database_url: str, fake: FakePartneroThread
) -> None:
    fake.configure(odd_answers={"inv_forbidden": {"answer": "forbidden"}})
    others = [f"inv_ok{i}" for i in range(20)]
    insert_sales(engine, ["inv_forbidden"])
    insert_sales(engine, others)
    with DaemonThread(make_settings(database_url, fake.url)) as running:
        wait_until(lambda: settled(engine, 21))
        assert running.daemon is not None
        assert not running.daemon.health.paused
    row = event(engine, "inv_forbidden")
    assert (row.status, row.outcome, row.attempts) == ("failed", "forbidden", 1)
    assert attempts_of(engine, "inv_forbidden") == [
        ("POST", "/v1/transactions", "forbidden:check_key", 403),
        ("GET", "/v1/test", "failed:forbidden", 200),
    ]
    assert statuses(engine) == {"delivered": 20, "failed": 1}
    # One key check at start-up and one for the 403: the daemon never paused.
    assert [r["path"] for r in fake.requests()].count("/v1/test") == 2


def test_a_403_everywhere_pauses_the_daemon_without_counting_attempts(
    engine: sa.Engine, database_url: str, fake: FakePartneroThread
) -> None:
    insert_sales(engine, ["inv_a"])
    with DaemonThread(make_settings(database_url, fake.url)) as running:
        wait_until(lambda: settled(engine, 1))
        fake.configure(forbidden=True)  # the key lost its permissions
        insert_sales(engine, ["inv_b", "inv_c"])
        wait_until(lambda: running.daemon is not None and running.daemon.health.paused)
        assert statuses(engine) == {"delivered": 1, "pending": 2}
        assert (
            scalar(engine, "SELECT max(attempts) FROM outbox.events WHERE status = 'pending'") == 0
        )
        fake.configure(forbidden=False)
        wait_until(lambda: settled(engine, 3))
    assert statuses(engine) == {"delivered": 3}


# ---- the base URL and the key check before the first delivery ----------------------------------


@pytest.mark.parametrize("suffix", ["/", "/v1", "/v1/"])
def test_the_base_url_works_with_or_without_v1(
    engine: sa.Engine, database_url: str, fake: FakePartneroThread, suffix: str
) -> None:
    insert_sales(engine, ["FV/base/1"])
    with DaemonThread(make_settings(database_url, fake.url + suffix)):
        wait_until(lambda: settled(engine, 1))
    insert_refunds(engine, ["FV/base/1"])
    with DaemonThread(make_settings(database_url, fake.url + suffix)):
        wait_until(lambda: settled(engine, 2))
    assert {r["path"] for r in fake.requests()} == {"/v1/test", "/v1/transactions"}
    assert event(engine, "FV/base/1", "refund").outcome == "deleted"


def test_a_wrong_partnero_url_stops_start_up_with_one_line(
    engine: sa.Engine, database_url: str, fake: FakePartneroThread
) -> None:
    insert_sales(engine, ["inv_wrong_url"])
    result = run_cli("run", env=env_for(database_url, f"{fake.url}/api"))
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith(
        f"outbox: invalid setting PARTNERO_API_URL (--partnero-api-url): {fake.url}/api is not "
        f"Partnero's API (GET {fake.url}/api/v1/test: HTTP 404"
    ), line
    assert [r["path"] for r in fake.requests()] == ["/api/v1/test"]
    assert statuses(engine) == {"pending": 1}


def test_nothing_is_sent_until_partnero_answers_the_key_check(
    engine: sa.Engine, database_url: str, fake: FakePartneroThread
) -> None:
    fake.configure(outage="503")
    insert_sales(engine, ["inv_wait"])
    with DaemonThread(make_settings(database_url, fake.url)) as running:
        wait_until(
            lambda: [r["path"] for r in fake.requests()].count("/v1/test") >= 2,
            what="the key check asked again",
        )
        assert running.daemon is not None
        assert "WAITING FOR PARTNERO" in running.daemon.health.status_line()
        assert {r["path"] for r in fake.requests()} == {"/v1/test"}
        fake.configure(outage=None)
        wait_until(lambda: settled(engine, 1))
    assert event(engine, "inv_wait").outcome == "created"


# ---- rows in flight across the upgrade ---------------------------------------------------------


def test_rows_in_flight_before_the_upgrade_keep_working_after_it(
    empty_database_url: str, fake: FakePartneroThread, tmp_path: Path
) -> None:
    """A database at 0003 with a sale flagged for a lookup (its create landed, the answer was
    lost) and one flagged whose create did not land, a refund flagged after a lost DELETE, and
    delivered rows: after the upgrade each is settled exactly once and nothing delivered moves."""
    old = tmp_path / "migrations"
    old.mkdir()
    for m in migrate.available():
        if m.version <= "0003":
            (old / m.filename).write_text(m.sql, encoding="utf-8")
    engine = db.create_engine(empty_database_url, poolclass=sa.NullPool)
    try:
        migrate.migrate(engine, old)
        insert_sales(engine, ["FV/landed", "FV/not/landed", "FV/refunded", "FV/done"])
        insert_refunds(engine, ["FV/refunded"])
        create_directly(fake, "FV/landed")
        create_directly(fake, "FV/refunded")
        create_directly(fake, "FV/done")
        with engine.begin() as conn:
            conn.execute(
                sa.text(
                    "UPDATE outbox.events SET attempts = 1, lookup_required = true"
                    " WHERE transaction_key IN ('FV/landed', 'FV/not/landed')"
                    "    OR event_type = 'refund'"
                )
            )
            conn.execute(
                sa.text(
                    "UPDATE outbox.events SET status = 'delivered', outcome = 'created',"
                    " delivered_at = now() - interval '1 hour', attempts = 1"
                    " WHERE event_type = 'sale' AND transaction_key IN ('FV/refunded', 'FV/done')"
                )
            )
        before = rows(engine, "SELECT * FROM outbox.events WHERE status = 'delivered'")
        migrate.migrate(engine)
        with DaemonThread(make_settings(empty_database_url, fake.url)):
            wait_until(lambda: settled(engine, 5))
        assert (
            rows(
                engine,
                "SELECT * FROM outbox.events WHERE id = ANY(:ids)",
                ids=[r.id for r in before],
            )
            == before
        )
        assert [t["key"] for t in fake.ledger()].count("FV/landed") == 1
        assert [t["key"] for t in fake.ledger()].count("FV/not/landed") == 1
        assert entries(fake, "FV/refunded")[0]["deleted_seq"] is not None
        assert entries(fake, "FV/done")[0]["deleted_seq"] is None
        assert attempts_of(engine, "FV/landed") == [
            ("GET", "/v1/transactions", "lookup:found", 200)
        ]
        assert attempts_of(engine, "FV/not/landed") == [
            ("GET", "/v1/transactions", "lookup:absent", 200),
            ("POST", "/v1/transactions", "delivered:created", 201),
        ]
        # The flagged refund's DELETE reached the transaction (body form), so it is deleted.
        assert event(engine, "FV/refunded", "refund").outcome == "deleted"
    finally:
        engine.dispose()
