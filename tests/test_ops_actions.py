"""`outbox retry` and `outbox discard`: dry runs change nothing, real runs change exactly what
the dry run showed, every action is recorded, and running daemons are notified."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa

from outbox import db
from tests.daemon_helpers import rows, scalar
from tests.helpers import notifications
from tests.test_ops_seed import cli, cli_json, recorded_changes, seed, snapshot

CHANGE_FIELDS = [
    "event_id",
    "event_type",
    "transaction_key",
    "customer_key",
    "change",
    "previous_status",
    "previous_outcome",
    "previous_attempts",
    "new_status",
]
RESULT_FIELDS = [
    "action",
    "dry_run",
    "action_id",
    "at",
    "actor",
    "reason",
    "selection",
    "count",
    "changes",
    "notified",
]


@pytest.fixture
def ids(engine: sa.Engine) -> dict[str, int]:
    return seed(engine)


@pytest.fixture
def listener(database_url: str) -> Iterator[psycopg.Connection[Any]]:
    conn = psycopg.connect(db.libpq_url(database_url), autocommit=True)
    conn.execute("LISTEN outbox_events")
    yield conn
    conn.close()


def event(engine: sa.Engine, event_id: int) -> sa.Row[Any]:
    (row,) = rows(engine, "SELECT * FROM outbox.events WHERE id = :i", i=event_id)
    return row


def act(database_url: str, *args: str) -> Any:
    return cli_json(*args, "--actor", "alice@desk", database_url=database_url)


# ---- retry ---------------------------------------------------------------------------------


def test_retry_dry_run_changes_nothing_and_shows_the_changes(
    engine: sa.Engine, database_url: str, ids: dict[str, int], listener: psycopg.Connection[Any]
) -> None:
    before = snapshot(engine)
    data = act(database_url, "retry", str(ids["ghost"]), "--dry-run")
    assert snapshot(engine) == before
    assert notifications(listener) == []
    assert list(data) == RESULT_FIELDS
    assert {k: data[k] for k in RESULT_FIELDS if k != "changes"} == {
        "action": "retry",
        "dry_run": True,
        "action_id": None,
        "at": None,
        "actor": "alice@desk",
        "reason": None,
        "selection": {"ids": [ids["ghost"]]},
        "count": 1,
        "notified": False,
    }
    sale, refund = data["changes"]
    assert list(sale) == CHANGE_FIELDS
    assert sale == {
        "event_id": ids["ghost"],
        "event_type": "sale",
        "transaction_key": "inv_ghost",
        "customer_key": "cus_ghost",
        "change": "retry",
        "previous_status": "failed",
        "previous_outcome": "customer_not_found",
        "previous_attempts": 2,
        "new_status": "pending",
    }
    assert refund == {
        "event_id": ids["ghost_refund"],
        "event_type": "refund",
        "transaction_key": "inv_ghost",
        "customer_key": None,
        "change": "wake",
        "previous_status": "pending",
        "previous_outcome": None,
        "previous_attempts": 0,
        "new_status": "pending",
    }


def test_retry_resets_the_row_wakes_its_refund_records_and_notifies(
    engine: sa.Engine, database_url: str, ids: dict[str, int], listener: psycopg.Connection[Any]
) -> None:
    dry = act(database_url, "retry", str(ids["ghost"]), str(ids["timeout"]), "--dry-run")
    untouched = {ids["ghost"], ids["timeout"], ids["ghost_refund"]}
    before = {r.id: r for r in rows(engine, "SELECT * FROM outbox.events")}
    data = act(
        database_url, "retry", f"{ids['ghost']},{ids['timeout']}", "--reason", "customer created"
    )
    assert data["changes"] == dry["changes"]
    assert (data["dry_run"], data["count"], data["reason"], data["notified"]) == (
        False,
        2,
        "customer created",
        True,
    )
    assert notifications(listener) == [""]

    db_now = scalar(engine, "SELECT now()")
    for name in ("ghost", "timeout"):
        row = event(engine, ids[name])
        assert (row.status, row.outcome, row.attempts, row.parked) == ("pending", None, 0, False)
        assert row.next_attempt_at <= db_now
        assert row.last_error == before[ids[name]].last_error  # kept for the record
    # lookup_required is kept: an earlier create of that sale may have reached Partnero.
    assert event(engine, ids["timeout"]).lookup_required is True
    assert event(engine, ids["ghost"]).lookup_required is False
    refund = event(engine, ids["ghost_refund"])
    assert (refund.status, refund.parked) == ("pending", False)
    assert refund.next_attempt_at <= db_now
    # Nothing else changed.
    after = {r.id: r for r in rows(engine, "SELECT * FROM outbox.events")}
    assert {i: r for i, r in after.items() if i not in untouched} == {
        i: r for i, r in before.items() if i not in untouched
    }

    (action,) = rows(engine, "SELECT * FROM outbox.operator_actions")
    assert (action.id, action.actor, action.action, action.reason, action.event_count) == (
        data["action_id"],
        "alice@desk",
        "retry",
        "customer created",
        2,
    )
    assert action.selection == {"ids": sorted([ids["ghost"], ids["timeout"]])}
    assert recorded_changes(engine) == [
        (ids["ghost"], "sale", "inv_ghost", "retry", "failed", "customer_not_found", 2),
        (ids["timeout"], "sale", "inv_slow", "retry", "failed", "timeout", 3),
    ]
    shown = cli_json("show", str(ids["ghost"]), database_url=database_url)
    (entry,) = shown["event"]["operator_actions"]
    assert entry == {
        "action_id": data["action_id"],
        "at": data["at"],
        "actor": "alice@desk",
        "action": "retry",
        "change": "retry",
        "reason": "customer created",
        "previous_status": "failed",
        "previous_outcome": "customer_not_found",
        "previous_attempts": 2,
    }


def test_retry_by_filter_takes_failed_rows_only(
    engine: sa.Engine, database_url: str, ids: dict[str, int]
) -> None:
    data = act(database_url, "retry", "--key", "inv_ghost", "--reason", "r")
    assert [(c["event_id"], c["change"]) for c in data["changes"]] == [
        (ids["ghost"], "retry"),
        (ids["ghost_refund"], "wake"),
    ]
    assert data["selection"] == {"filters": {"key": "inv_ghost"}, "all": False}
    many = act(database_url, "retry", "--status-code", "429", "--since", "1d", "--dry-run")
    assert [c["event_id"] for c in many["changes"]] == [ids["rate"]]
    everything = act(database_url, "retry", "--all", "--dry-run")
    assert everything["count"] == 8  # the nine failed rows, less the one retried above
    nothing = cli("retry", "--type", "refund", "--reason", "r", database_url=database_url)
    assert (nothing.exit_code, nothing.stdout) == (0, "nothing to retry: no row matches\n")
    assert scalar(engine, "SELECT count(*) FROM outbox.operator_actions") == 1


def test_retry_a_discarded_sale_unless_its_refund_was_delivered(
    engine: sa.Engine, database_url: str, ids: dict[str, int]
) -> None:
    data = act(database_url, "retry", str(ids["dropped"]), "--dry-run")
    assert [(c["event_id"], c["previous_status"]) for c in data["changes"]] == [
        (ids["dropped"], "discarded"),
        (ids["dropped_refund"], "pending"),
    ]
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "UPDATE outbox.events SET status = 'delivered', outcome = 'not_found' WHERE id = :i"
            ),
            {"i": ids["dropped_refund"]},
        )
    refused = cli("retry", str(ids["dropped"]), "--reason", "r", database_url=database_url)
    assert refused.exit_code == 1
    assert refused.stderr == (
        f"outbox: event {ids['dropped']}: its refund (event {ids['dropped_refund']}) was "
        "delivered after the sale was discarded; sending the sale now would create a commission "
        "that stays\n"
    )


RETRY_REFUSALS: list[tuple[list[str], int, str]] = [
    (["999999"], 1, "no event with id 999999"),
    (["999998", "999999"], 1, "no events with ids 999998, 999999"),
    (["{created}"], 1, "event {created} is delivered (created): nothing to retry"),
    (["{fresh}"], 1, "event {fresh} is pending already: nothing to retry"),
    (
        ["{ghost_refund}"],
        1,
        "event {ghost_refund} is pending, blocked behind event {ghost} (sale, failed): "
        "retry or discard that one",
    ),
    (["x1"], 2, "ID: 'x1' is not an event id"),
    (["{ghost}", "--key", "inv_ghost"], 2, "give event ids or filters (or --all), not both"),
    ([], 2, "say which rows: event ids, filters (--outcome, --status-code, --since, --until"),
    (["--state", "blocked"], 2, "--state blocked: retry takes failed rows; the rows blocked"),
    (["--since", "2x"], 2, "--since: '2x' is not a duration like 30m, 2h, 7d"),
    # skipped rows (customers no partner referred)
    (
        ["{unknown_refund}"],
        1,
        "event {unknown_refund} is a refund skipped because its sale was: retry the sale "
        "(event {unknown}), and its skipped refunds go back to pending with it",
    ),
    (
        ["--status", "skipped", "--type", "refund"],
        1,
        "event {unknown_refund} is a refund skipped because its sale was: retry the sale",
    ),
    (["--status", "skipped"], 2, "say which rows: event ids, filters"),
    (["--status", "maybe", "--all"], 2, "--status: 'maybe' is not one of failed, skipped"),
    (
        ["--status", "skipped", "--state", "failed"],
        2,
        "--state is for failed and blocked rows, not with --status skipped",
    ),
    (
        ["--status", "skipped", "--outcome", "timeout"],
        2,
        "--outcome: 'timeout' is not one of not_referred, invalid_partner, sale_skipped, "
        "customer_not_found",
    ),
]


def test_retry_refuses_clearly_and_changes_nothing(
    engine: sa.Engine, database_url: str, ids: dict[str, int]
) -> None:
    before = snapshot(engine)
    for args, code, message in RETRY_REFUSALS:
        argv = [a.format(**ids) for a in args]
        result = cli("retry", *argv, "--reason", "r", database_url=database_url)
        assert result.exit_code == code, args
        (line,) = result.stderr.splitlines()
        assert line.startswith("outbox: " + message.format(**ids)), line
    assert snapshot(engine) == before


def test_a_real_run_needs_a_reason(
    engine: sa.Engine, database_url: str, ids: dict[str, int]
) -> None:
    before = snapshot(engine)
    for command in ("retry", "discard"):
        for reason in ([], ["--reason", "  "]):
            result = cli(command, str(ids["ghost"]), *reason, database_url=database_url)
            assert result.exit_code == 2
            assert result.stderr == (
                "outbox: --reason is required: say why (it is recorded with the action)\n"
            )
    assert snapshot(engine) == before


def test_the_actor_defaults_to_the_person_behind_sudo(
    database_url: str, ids: dict[str, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket

    monkeypatch.setenv("SUDO_USER", "carol")
    monkeypatch.setenv("USER", "root")
    data = cli_json("retry", str(ids["ghost"]), "--dry-run", database_url=database_url)
    assert data["actor"] == f"carol@{socket.gethostname()}"
    monkeypatch.delenv("SUDO_USER")
    data = cli_json("retry", str(ids["ghost"]), "--dry-run", database_url=database_url)
    assert data["actor"] == f"root@{socket.gethostname()}"


# ---- discard -------------------------------------------------------------------------------


def test_discard_dry_run_changes_nothing_for_any_refunds_choice(
    engine: sa.Engine, database_url: str, ids: dict[str, int], listener: psycopg.Connection[Any]
) -> None:
    before = snapshot(engine)
    for choice in ("keep", "discard", "release"):
        data = act(database_url, "discard", str(ids["ghost"]), "--refunds", choice, "--dry-run")
        assert data["dry_run"] is True and data["action_id"] is None
    assert snapshot(engine) == before
    assert notifications(listener) == []


def test_discard_keeps_the_refund_blocked_visibly_by_default(
    engine: sa.Engine, database_url: str, ids: dict[str, int], listener: psycopg.Connection[Any]
) -> None:
    data = act(database_url, "discard", str(ids["ghost"]), "--reason", "test order")
    assert list(data) == [*RESULT_FIELDS, "left_blocked"]
    assert data["selection"] == {"ids": [ids["ghost"]], "refunds": "keep"}
    assert [(c["event_id"], c["change"], c["new_status"]) for c in data["changes"]] == [
        (ids["ghost"], "discard", "discarded")
    ]
    assert data["left_blocked"] == [
        {
            "event_id": ids["ghost_refund"],
            "event_type": "refund",
            "transaction_key": "inv_ghost",
            "sale_id": ids["ghost"],
        }
    ]
    assert notifications(listener) == [""]
    assert (event(engine, ids["ghost"]).status, event(engine, ids["ghost"]).outcome) == (
        "discarded",
        "customer_not_found",  # the reason it failed stays on the row
    )
    blocked = rows(
        engine, "SELECT * FROM outbox.blocked_deliveries WHERE id = :i", i=ids["ghost_refund"]
    )
    assert [(b.blocked_by_id, b.blocked_by_status) for b in blocked] == [
        (ids["ghost"], "discarded")
    ]
    human = cli("discard", str(ids["invalid"]), "--reason", "r", database_url=database_url)
    assert human.stdout.splitlines()[-1].startswith("discarded 1 row: action ")


def test_discard_refunds_discard_discards_them_too_and_records_each(
    engine: sa.Engine, database_url: str, ids: dict[str, int]
) -> None:
    data = act(
        database_url, "discard", str(ids["ghost"]), "--refunds", "discard", "--reason", "fraud"
    )
    assert [(c["event_id"], c["change"]) for c in data["changes"]] == [
        (ids["ghost"], "discard"),
        (ids["ghost_refund"], "discard"),
    ]
    assert data["left_blocked"] == [] and data["count"] == 2
    assert event(engine, ids["ghost_refund"]).status == "discarded"
    recorded = rows(
        engine,
        "SELECT event_id, change, previous_status, previous_outcome "
        "FROM outbox.operator_action_events ORDER BY event_id",
    )
    assert [tuple(r) for r in recorded] == [
        (ids["ghost"], "discard", "failed", "customer_not_found"),
        (ids["ghost_refund"], "discard", "pending", None),
    ]
    assert scalar(engine, "SELECT event_count FROM outbox.operator_actions") == 2


def test_discard_refunds_release_lets_the_refund_go(
    engine: sa.Engine, database_url: str, ids: dict[str, int]
) -> None:
    data = act(database_url, "discard", str(ids["ghost"]), "--refunds", "release", "--reason", "r")
    assert [(c["event_id"], c["change"], c["new_status"]) for c in data["changes"]] == [
        (ids["ghost"], "discard", "discarded"),
        (ids["ghost_refund"], "release", "pending"),
    ]
    refund = event(engine, ids["ghost_refund"])
    assert (refund.status, refund.order_released, refund.parked) == ("pending", True, False)
    assert refund.next_attempt_at <= scalar(engine, "SELECT now()")
    assert rows(engine, "SELECT id FROM outbox.blocked_deliveries WHERE id = :i", i=refund.id) == []


def test_an_earlier_discarded_sale_can_release_its_refunds_later(
    engine: sa.Engine, database_url: str, ids: dict[str, int]
) -> None:
    kept = cli("discard", str(ids["dropped"]), "--reason", "r", database_url=database_url)
    assert kept.exit_code == 1
    assert kept.stderr.startswith(f"outbox: event {ids['dropped']} is discarded already")
    data = act(
        database_url,
        "discard",
        str(ids["dropped"]),
        "--refunds",
        "release",
        "--reason",
        "paid back",
    )
    assert [(c["event_id"], c["change"]) for c in data["changes"]] == [
        (ids["dropped_refund"], "release")
    ]
    assert event(engine, ids["dropped_refund"]).order_released is True
    assert event(engine, ids["dropped"]).status == "discarded"


def test_discard_by_filter_takes_failed_and_blocked_rows(
    engine: sa.Engine, database_url: str, ids: dict[str, int]
) -> None:
    data = act(database_url, "discard", "--key", "inv_ghost", "--dry-run")
    assert [(c["event_id"], c["change"]) for c in data["changes"]] == [
        (ids["ghost"], "discard"),
        (ids["ghost_refund"], "discard"),
    ]
    assert data["left_blocked"] == []
    blocked_only = act(database_url, "discard", "--state", "blocked", "--dry-run")
    assert sorted(c["event_id"] for c in blocked_only["changes"]) == [
        ids["ghost_refund"],
        ids["dropped_refund"],
    ]


DISCARD_REFUSALS: list[tuple[list[str], str]] = [
    (["{created}"], "event {created} is delivered (created): it cannot be discarded"),
    (["{in_flight}"], "event {in_flight} is in flight (leased by host-a:101): try again"),
    (["424242"], "no event with id 424242"),
    (
        ["{unknown}"],
        "event {unknown} is skipped (customer_not_found): settled, it is never sent; there is "
        "nothing to discard (outbox prune deletes it in time)",
    ),
    (["{ghost}", "--refunds", "later"], "--refunds: 'later' is not one of keep, discard, "),
]


def test_discard_refuses_clearly_and_changes_nothing(
    engine: sa.Engine, database_url: str, ids: dict[str, int]
) -> None:
    before = snapshot(engine)
    for args, message in DISCARD_REFUSALS:
        argv = [a.format(**ids) for a in args]
        result = cli("discard", *argv, "--reason", "r", database_url=database_url)
        assert result.exit_code in (1, 2), args
        (line,) = result.stderr.splitlines()
        assert line.startswith("outbox: " + message.format(**ids)), line
    assert snapshot(engine) == before


def test_discard_a_pending_row_whose_daemon_died_flags_a_lookup(
    engine: sa.Engine, database_url: str, ids: dict[str, int]
) -> None:
    with engine.begin() as conn:  # the daemon holding inv_flight died: its lease ran out
        conn.execute(
            sa.text(
                "UPDATE outbox.events SET lease_expires_at = now() - interval '1 s' WHERE id = :i"
            ),
            {"i": ids["in_flight"]},
        )
    act(database_url, "discard", str(ids["in_flight"]), "--reason", "r")
    row = event(engine, ids["in_flight"])
    assert (row.status, row.lookup_required, row.lease_token, row.lease_owner) == (
        "discarded",
        True,
        None,
        None,
    )


def test_order_released_cannot_be_set_by_an_insert(engine: sa.Engine) -> None:
    refused = pytest.raises(sa.exc.IntegrityError, match="daemon_owned_columns_not_insertable")
    with refused, engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO outbox.events (event_type, transaction_key, order_released) "
                "VALUES ('refund', 'inv_1', true)"
            )
        )
