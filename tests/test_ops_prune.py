"""`outbox prune`: old delivered rows and their attempts go, in short batches; failed and
pending rows stay, and so does any row whose key still has one."""

from __future__ import annotations

import sqlalchemy as sa

from tests.daemon_helpers import rows, scalar
from tests.test_ops_seed import cli, cli_json, snapshot

PRUNE_FIELDS = [
    "dry_run",
    "cutoff",
    "older_than_seconds",
    "include_discarded",
    "batch_size",
    "batches",
    "pruned",
    "kept_open_key",
    "action_id",
]


def make_rows(engine: sa.Engine) -> None:
    """Five delivered sales 40 days old (two attempts each), and old rows that must stay."""
    with engine.begin() as conn:

        def sale(key: str, status: str, outcome: str | None, age: str) -> int:
            event_id: int = conn.execute(
                sa.text("SELECT outbox.record_sale(:k, 'cus_1', 10, 'EUR')"), {"k": key}
            ).scalar_one()
            conn.execute(
                sa.text(
                    "UPDATE outbox.events SET status = :s, outcome = :o, "
                    "created_at = now() - CAST(:age AS interval), "
                    "updated_at = now() - CAST(:age AS interval), "
                    "delivered_at = CASE WHEN :s = 'delivered' "
                    "THEN now() - CAST(:age AS interval) END WHERE id = :i"
                ),
                {"s": status, "o": outcome, "age": age, "i": event_id},
            )
            for n in (1, 2):
                conn.execute(
                    sa.text(
                        "INSERT INTO outbox.attempts (event_id, attempt, started_at, "
                        "finished_at, method, path, decision) "
                        "VALUES (:i, :n, now(), now(), 'POST', '/v1/transactions', 'x')"
                    ),
                    {"i": event_id, "n": n},
                )
            return event_id

        for n in range(5):
            sale(f"inv_old{n}", "delivered", "created", "40 days")
        sale("inv_recent", "delivered", "created", "10 days")
        sale("inv_failed", "failed", "rejected", "90 days")
        sale("inv_pending", "pending", None, "90 days")
        sale("inv_discarded", "discarded", "rejected", "90 days")
        # Delivered long ago, but its refund is still pending: the sale stays.
        sale("inv_open", "delivered", "created", "60 days")
        conn.execute(sa.text("SELECT outbox.record_refund('inv_open')"))
        # A discarded sale with a refund kept blocked behind it stays too.
        sale("inv_kept", "discarded", "customer_not_found", "60 days")
        conn.execute(sa.text("SELECT outbox.record_refund('inv_kept')"))


def keys(engine: sa.Engine) -> list[str]:
    return [
        r.transaction_key
        for r in rows(engine, "SELECT DISTINCT transaction_key FROM outbox.events ORDER BY 1")
    ]


def test_prune_in_batches_keeps_failed_pending_and_open_keys(
    engine: sa.Engine, database_url: str
) -> None:
    make_rows(engine)
    before = snapshot(engine)
    dry = cli_json(
        "prune", "--older-than", "30d", "--batch-size", "2", "--dry-run", database_url=database_url
    )
    assert snapshot(engine) == before
    assert list(dry) == PRUNE_FIELDS
    assert dry["dry_run"] is True and dry["action_id"] is None
    assert (dry["older_than_seconds"], dry["include_discarded"], dry["batch_size"]) == (
        30 * 86400.0,
        False,
        2,
    )
    assert dry["pruned"] == {"delivered": 5, "discarded": 0, "attempts": 10, "skipped": 0}
    assert (dry["batches"], dry["kept_open_key"]) == (3, 1)

    done = cli_json(
        "prune", "--older-than", "30d", "--batch-size", "2", "--actor", "cron@db",
        database_url=database_url,
    )  # fmt: skip
    assert list(done) == PRUNE_FIELDS
    assert done["dry_run"] is False
    assert done["pruned"] == dry["pruned"]
    assert (done["batches"], done["kept_open_key"]) == (3, 1)  # 2 + 2 + 1 rows
    assert keys(engine) == [
        "inv_discarded",
        "inv_failed",
        "inv_kept",
        "inv_open",
        "inv_pending",
        "inv_recent",
    ]
    assert scalar(engine, "SELECT count(*) FROM outbox.attempts") == 2 * 6
    (action,) = rows(engine, "SELECT * FROM outbox.operator_actions")
    assert (action.id, action.action, action.actor, action.reason, action.event_count) == (
        done["action_id"],
        "prune",
        "cron@db",
        "retention",
        5,
    )
    assert action.selection == {
        "older_than": "30d",
        "cutoff": done["cutoff"],
        "include_discarded": False,
        "batch_size": 2,
        "delivered": 5,
        "discarded": 0,
        "attempts": 10,
        "skipped": 0,
    }
    again = cli_json("prune", "--older-than", "30d", database_url=database_url)
    assert (again["pruned"]["delivered"], again["batches"], again["action_id"]) == (0, 0, None)
    assert scalar(engine, "SELECT count(*) FROM outbox.operator_actions") == 1  # nothing, no record


def test_prune_discarded_rows_only_when_asked(engine: sa.Engine, database_url: str) -> None:
    make_rows(engine)
    data = cli_json(
        "prune", "--older-than", "30d", "--include-discarded", database_url=database_url
    )
    assert data["pruned"] == {"delivered": 5, "discarded": 1, "attempts": 12, "skipped": 0}
    assert data["kept_open_key"] == 2  # inv_open's sale and inv_kept's discarded sale
    assert "inv_discarded" not in keys(engine)
    assert {"inv_failed", "inv_pending", "inv_kept", "inv_open"} <= set(keys(engine))


def test_prune_human_output_and_errors(engine: sa.Engine, database_url: str) -> None:
    make_rows(engine)
    out = cli(
        "prune", "--older-than", "30d", "--batch-size", "2", "--dry-run", database_url=database_url
    ).stdout
    assert out.startswith(
        "would prune 5 delivered rows, 0 skipped rows and 10 attempts in 3 batches of at most 2"
    )
    assert "kept 1 old row whose transaction key still has a pending or failed row" in out
    for args, message in [
        ([], "outbox: --older-than is required, e.g. --older-than 30d"),
        (["--older-than", "30"], "outbox: --older-than: '30' is not a duration like 30m, 2h, 7d"),
        (
            ["--older-than", "1d", "--batch-size", "0"],
            "outbox: --batch-size: '0' is not a whole number of at least 1",
        ),
    ]:
        result = cli("prune", *args, database_url=database_url)
        assert (result.exit_code, result.stderr) == (2, message + "\n")


def test_older_than_zero_prunes_every_settled_row(engine: sa.Engine, database_url: str) -> None:
    make_rows(engine)
    out = cli("prune", "--older-than", "0s", "--dry-run", database_url=database_url).stdout
    # The 10-day-old delivered row too; still nothing failed, pending or of an open key.
    assert out.startswith("would prune 6 delivered rows, 0 skipped rows and 12 attempts"), out
