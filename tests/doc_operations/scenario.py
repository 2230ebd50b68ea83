"""The scenario docs/operations.md's transcripts were made from, as code.

Three sessions, each on a fresh migrated database with the fake Partnero and a daemon with short
timings (docs/operations.md, "How these transcripts were made", says the same in words):

- `session_a`: customers nobody referred, and a sale behind its customer's failed signup (events
  1-10); the prune examples; the `status --json` and signup `failed --json` examples.
- `session_b`: cases 1-4 (events 50-58): a sale failed `customer_not_found` as migration 0005
  left it, a sale Partnero refused with 422, an outage, a bad API key; the record of operator
  actions, the doorbell, the views. Its daemon is a real `outbox run` process: case 4 greps its
  log and reloads it with SIGHUP.
- `session_r`: `outbox reconcile` on a clean ledger, then on one tampered with.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from outbox import db
from outbox.dev.fake_partnero import FakeConfig, FakePartneroThread
from tests.daemon_helpers import (
    API_KEY,
    DaemonThread,
    env_for,
    make_settings,
    rows,
    scalar,
    wait_until,
)
from tests.doc_operations.runner import Runner
from tests.helpers import psql_binary

NEW_KEY = "rotated-key-9876543210"
NOT_FOUND = '{"message":"Customer not found","status":0}'


def operator_env(database_url: str, partnero_url: str) -> dict[str, str | None]:
    """What the operator's shell holds: the transcripts ran as alice, 100 columns wide."""
    return {
        "OUTBOX_DATABASE_URL": database_url,
        "PARTNERO_API_URL": partnero_url,
        "PARTNERO_API_KEY": API_KEY,
        "OUTBOX_RETRY_BASE_DELAY_SECONDS": "0.01",  # reconcile's retries, when it cannot ask
        "OUTBOX_RETRY_MAX_DELAY_SECONDS": "0.05",
        "COLUMNS": "100",
        "USER": "alice",
        "SUDO_USER": None,
        "OUTBOX_API_KEY_FILE": None,
        "OUTBOX_ENV_FILE": None,
        "OUTBOX_MAX_PENDING_AGE": None,
        "OUTBOX_DATABASE_TIMEOUT_SECONDS": None,
        "PSQLRC": "/dev/null",
    }


def psql_file(url: str, sql: str) -> str:
    """Run a SQL block as written, statement by statement, stopping at the first error."""
    done = subprocess.run(
        [psql_binary(), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", url, "-f", "-"],
        input=sql,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def status_of(engine: sa.Engine, *ids: int) -> list[str]:
    found = rows(
        engine, "SELECT status FROM outbox.events WHERE id = ANY(:i) ORDER BY id", i=list(ids)
    )
    return [r.status for r in found]


def settled(engine: sa.Engine, *ids: int, status: str | None = None) -> Callable[[], None]:
    """A step that waits until these rows are no longer pending (or have this status)."""

    def wait() -> None:
        def done() -> bool:
            found = status_of(engine, *ids)
            return all(s == status if status else s != "pending" for s in found)

        wait_until(done, what=f"events {ids} {status or 'settled'}")

    return wait


def parked(engine: sa.Engine, event_id: int) -> Callable[[], None]:
    sql = "SELECT parked FROM outbox.events WHERE id = :i"
    return lambda: wait_until(lambda: scalar(engine, sql, i=event_id), what=f"{event_id} parked")


def all_older_than(engine: sa.Engine, seconds: float) -> None:
    sql = (
        "SELECT max(coalesce(delivered_at, updated_at)) < now() - make_interval(secs => :s) "
        "FROM outbox.events"
    )
    wait_until(lambda: scalar(engine, sql, s=seconds), what="every row settled a while ago")


@contextmanager
def database(runner_databases: Any) -> Iterator[tuple[str, sa.Engine]]:
    url = runner_databases.create_migrated()
    engine = db.create_engine(url, poolclass=sa.NullPool)
    try:
        yield url, engine
    finally:
        engine.dispose()
        runner_databases.drop(url)


# ---- session A: customers nobody referred ------------------------------------------------------


def session_a(runner: Runner, databases: Any) -> None:
    config = FakeConfig(
        api_key=API_KEY,
        customers_must_exist=True,
        odd_answers={"cus_pia": {"answer": "bad_request", "times": 1}},
    )
    with database(databases) as (url, engine), FakePartneroThread(config) as fake:
        runner.env = operator_env(url, fake.url)
        runner.transcript("errors")
        settings = make_settings(
            url,
            fake.url,
            unknown_customer_grace_seconds=3,
            retry_base_delay_seconds=0.3,
            retry_max_delay_seconds=1,
        )
        with DaemonThread(settings) as daemon:
            daemon.wait_verified()
            _customers(runner, url, engine, fake)
            _pia(runner, url, engine)
        all_older_than(engine, 1)
        runner.transcript("a-prune")
        with engine.connect() as conn, conn.begin():
            conn.execute(sa.text("LOCK TABLE outbox.events"))
            runner.transcript("a-timeout")
        psql_file(url, runner.mark_run("indexes-sql").text)


def _customers(runner: Runner, url: str, engine: sa.Engine, fake: FakePartneroThread) -> None:
    psql_file(url, runner.mark_run("a-signups-sql").text)
    settled(engine, 1, 2, 3, 4, 5, 6)()
    # the sale of cus_nina retried once: the last call, after every other row's
    retried = "SELECT count(*) >= 2 FROM outbox.attempts WHERE event_id = 7"
    wait_until(lambda: scalar(engine, retried), what="cus_nina's sale retried")
    runner.transcript("a-settled")
    settled(engine, 7)()
    runner.transcript("a-grace")
    with engine.begin() as conn:
        conn.execute(sa.text("SELECT outbox.record_refund('INV-5002')"))
    settled(engine, 8)()
    runner.transcript("a-customer")
    runner.transcript(
        "a-retry-skipped",
        before={
            "--reason": lambda: fake.set_customers(known=["cus_mo"]),
            "show --key": settled(engine, 4, 8, status="delivered"),
        },
    )
    runner.transcript("a-discard-skipped")


def _pia(runner: Runner, url: str, engine: sa.Engine) -> None:
    psql_file(url, runner.mark_run("a-pia-sql").text)
    settled(engine, 9, status="failed")()
    parked(engine, 10)()
    for block_id in ("a-pia", "a-status-json", "a-failed-json", "a-views"):
        runner.transcript(block_id)
    runner.transcript("a-pia-retry", before={"status": settled(engine, 9, 10)})


# ---- session B: cases 1-4 ----------------------------------------------------------------------

GHOST_ATTEMPTS = [
    ("retry:customer_not_found", 0.0),
    ("retry:customer_not_found", 0.4),
    ("retry:customer_not_found", 1.1),
    ("retry:customer_not_found", 1.6),
    ("retry:customer_not_found", 2.2),
    ("failed:customer_not_found", 2.7),
]


def _background(engine: sa.Engine) -> None:
    """Sales delivered before the cases (one repeated key: a duplicate), two refunded; then the
    ids jump to 50, so the cases' rows stand out."""
    with engine.begin() as conn:
        for n, customer in enumerate(["cus_anna", "cus_bram", "cus_chloe", "cus_dev", "cus_emil"]):
            conn.execute(
                sa.text("SELECT outbox.record_sale(:k, :c, 30.00, 'EUR')"),
                {"k": f"INV-100{n + 1}", "c": customer},
            )
        conn.execute(sa.text("SELECT outbox.record_sale('INV-1005', 'cus_emil', 30.00, 'EUR')"))
        conn.execute(sa.text("SELECT outbox.record_refund('INV-1001')"))
        conn.execute(sa.text("SELECT outbox.record_refund('INV-1002')"))
        conn.execute(sa.text("SELECT setval(pg_get_serial_sequence('outbox.events', 'id'), 49)"))


def _ghost(engine: sa.Engine) -> None:
    """Event 50 as migration 0005's daemon left a sale for a customer Partnero did not know:
    failed `customer_not_found` after 6 attempts, each recorded; its refund 51 behind it. The
    daemon of today would skip it instead, so the test writes the state (no daemon is running)."""
    payload = {"product_id": "plan_pro", "product_type": "subscription"}
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "SELECT outbox.record_sale('INV-1041', 'cus_ghost', 49.00, 'EUR', "
                "CAST(:p AS jsonb))"
            ),
            {"p": json.dumps(payload)},
        )
        conn.execute(sa.text("SELECT outbox.record_refund('INV-1041')"))
        conn.execute(
            sa.text(
                "UPDATE outbox.events SET status = 'failed', outcome = 'customer_not_found', "
                "attempts = 6, last_status_code = 400, "
                "last_error = 'HTTP 400: Customer not found [gave up after 6 attempts]', "
                "created_at = now() - interval '10 s', updated_at = now() - interval '7 s' "
                "WHERE id = 50"
            )
        )
        conn.execute(
            sa.text(
                "UPDATE outbox.events SET created_at = now() - interval '10 s', "
                "updated_at = now() - interval '10 s' WHERE id = 51"
            )
        )
        for n, (decision, after) in enumerate(GHOST_ATTEMPTS, 1):
            conn.execute(
                sa.text(
                    "INSERT INTO outbox.attempts (event_id, attempt, started_at, finished_at, "
                    "method, path, status_code, response_excerpt, decision, daemon) VALUES "
                    "(50, :n, now() - make_interval(secs => 10 - :a), "
                    "now() - make_interval(secs => 10 - :a - 0.002), 'POST', '/v1/transactions', "
                    "400, :body, :d, 'vm:4242')"
                ),
                {"n": n, "a": after, "d": decision, "body": NOT_FOUND},
            )


def _bad_payload(engine: sa.Engine) -> None:
    """Event 52: a sale whose payload Partnero refuses (422), recorded once the rows before it
    are settled, so that its call is the last one."""
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "SELECT outbox.record_sale('INV-1042', 'cus_anna', 19.00, 'EUR', CAST(:p AS jsonb))"
            ),
            {"p": json.dumps({"product_id": "plan_basic", "reward": "20%"})},
        )
    settled(engine, 52, status="failed")()


@contextmanager
def daemon_process(url: str, fake_url: str, workdir: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`outbox run` with its JSON log in daemon.log and its key in a file."""
    key_file = workdir / "partnero_api_key"
    key_file.write_text(API_KEY + "\n")
    env = env_for(
        url,
        fake_url,
        max_attempts=4,
        retry_base_delay_seconds=0.5,
        retry_max_delay_seconds=2,
        auth_pause_seconds=60,
        log_level="info",
    )
    del env["PARTNERO_API_KEY"]
    env["OUTBOX_API_KEY_FILE"] = str(key_file)
    with (workdir / "daemon.log").open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "outbox.cli", "run"], env=env, stdout=log, stderr=log
        )
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def session_b(runner: Runner, databases: Any) -> None:
    with (
        database(databases) as (url, engine),
        FakePartneroThread(FakeConfig(api_key=API_KEY)) as fake,
    ):
        runner.env = operator_env(url, fake.url)
        _background(engine)
        _ghost(engine)
        with daemon_process(url, fake.url, runner.workdir) as proc:
            settled(engine, *range(1, 9))()
            parked(engine, 51)()
            _bad_payload(engine)
            _cases_1_2(runner, engine)
            _case_3(runner, engine, fake)
            _case_4(runner, engine, fake, proc)
            wait_until(_doorbell_held(engine), what="the idle daemon holding the doorbell")
            for block_id in ("b-actions", "b-summary", "b-doorbell"):
                runner.transcript(block_id)


def _cases_1_2(runner: Runner, engine: sa.Engine) -> None:
    runner.transcript("b-case1")
    runner.transcript("b-case1-retry")
    runner.transcript("b-case1-show", before={"show": settled(engine, 50, 51)})
    runner.transcript("b-show-json")
    runner.transcript("b-case2", before={"failed": parked(engine, 53)})
    for block_id in ("b-views", "b-failed-json", "b-case2-discard", "b-discard-json"):
        runner.transcript(block_id)


def _case_3(runner: Runner, engine: sa.Engine, fake: FakePartneroThread) -> None:
    fake.configure(outage="503")
    with engine.begin() as conn:
        for key, customer, amount, currency in [
            ("INV-2001", "cus_bram", "25.00", "EUR"),
            ("INV-2002", "cus_chloe", "149.00", "GBP"),
            ("INV-2003", "cus_dev", "60.00", "EUR"),
        ]:
            conn.execute(
                sa.text("SELECT outbox.record_sale(:k, :c, CAST(:a AS numeric), :cur)"),
                {"k": key, "c": customer, "a": amount, "cur": currency},
            )
    # A quiet moment: the rows have waited over 1 s, none is in flight, and none is due for
    # half a second yet, so the transcript's leases line ("none") holds on a busy machine too.
    quiet = (
        "SELECT min(created_at) < now() - interval '1.2 s' "
        "AND bool_and(lease_token IS NULL AND next_attempt_at > now() + interval '0.5 s') "
        "FROM outbox.events WHERE id >= 54"
    )
    wait_until(lambda: scalar(engine, quiet), what="the outage's rows waiting, none in flight")
    runner.transcript("b-outage")
    settled(engine, 54, 55, 56, status="failed")()
    runner.transcript("b-outage-failed")
    fake.configure(outage=None)
    runner.transcript("b-outage-retry")
    runner.transcript("b-outage-over", before={"status": settled(engine, 54, 55, 56)})


def _log_has(workdir: Path, event: str) -> Callable[[], bool]:
    return lambda: event in (workdir / "daemon.log").read_text()


def _case_4(
    runner: Runner, engine: sa.Engine, fake: FakePartneroThread, proc: subprocess.Popen[bytes]
) -> None:
    fake.configure(api_key=NEW_KEY)
    with engine.begin() as conn:
        conn.execute(sa.text("SELECT outbox.record_sale('INV-3001', 'cus_emil', 89.90, 'EUR')"))
        conn.execute(sa.text("SELECT outbox.record_sale('INV-3002', 'cus_fay', 12.00, 'EUR')"))
    wait_until(_log_has(runner.workdir, "outbox.partnero.auth_failed"), what="the 401 logged")

    def fix() -> None:
        (runner.workdir / "partnero_api_key").write_text(NEW_KEY + "\n")
        proc.send_signal(signal.SIGHUP)
        settled(engine, 57, 58)()
        wait_until(_log_has(runner.workdir, "outbox.partnero.auth_restored"))

    runner.transcript("b-badkey")
    runner.transcript("b-badkey-fixed", before={"grep": fix})


def _doorbell_held(engine: sa.Engine) -> Callable[[], bool]:
    sql = (
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
        "AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
        "AND (classid::bigint << 32 | objid::bigint) = -778825528700430751"
    )
    return lambda: bool(scalar(engine, sql))


# ---- session R: reconcile ----------------------------------------------------------------------

LEDGER = [
    ("INV-1001", "cus_ann", "10.00"),
    ("INV-1002", "cus_bob", "20.00"),
    ("INV-1003", "cus_cem", "15.00"),
    ("INV-1004", "cus_dana", "80.00"),
    ("INV-1005", "cus_eli", "30.00"),
    ("INV-1006", "cus_fay", "9.90"),
    ("INV-1007", "cus_gus", "25.00"),
    ("INV-1008", "cus_hal", "12.00"),
]


def _create_elsewhere(fake: FakePartneroThread, key: str, customer: str, amount: int) -> None:
    """Another integration (a plugin, a script, the dashboard) creates the key at Partnero."""
    fake.set_customers(known=[customer])
    body = {"key": key, "customer": {"key": customer}, "amount": amount, "amount_units": "EUR"}
    auth = {"Authorization": f"Bearer {API_KEY}"}
    assert httpx.post(f"{fake.url}/v1/transactions", json=body, headers=auth).status_code == 201


def _tamper(engine: sa.Engine, fake: FakePartneroThread) -> None:
    fake.tamper("purge", "INV-1002")
    fake.tamper("duplicate", "INV-1003")
    fake.tamper("amend", "INV-1004", amount=8)
    fake.tamper("delete", "INV-1005")
    fake.tamper("revive", "INV-1006")
    _create_elsewhere(fake, "INV-1007", "cus_gus", 25)
    _create_elsewhere(fake, "WC-5001", "cus_wc", 40)
    with engine.begin() as conn:
        conn.execute(sa.text("SELECT outbox.record_sale('INV-1009', 'cus_ivy', 5.00, 'EUR')"))


def session_r(runner: Runner, databases: Any) -> None:
    config = FakeConfig(api_key=API_KEY, unknown_customers={"cus_gus"})
    with database(databases) as (url, engine), FakePartneroThread(config) as fake:
        runner.env = operator_env(url, fake.url)
        with engine.begin() as conn:
            for key, customer, amount in LEDGER:
                conn.execute(
                    sa.text("SELECT outbox.record_sale(:k, :c, CAST(:a AS numeric), 'EUR')"),
                    {"k": key, "c": customer, "a": amount},
                )
            conn.execute(sa.text("SELECT outbox.record_refund('INV-1006')"))
        settings = make_settings(url, fake.url, unknown_customer_grace_seconds=0)
        with DaemonThread(settings):
            settled(engine, *range(1, 10))()
        runner.transcript("r-reconcile", before={1: lambda: _tamper(engine, fake)})
        runner.transcript("r-json")
        runner.transcript("r-requeue")
        with DaemonThread(settings):
            settled(engine, 2, 9, 10)()
            runner.transcript("r-repaired")


# ---- README.md ---------------------------------------------------------------------------------


def readme(runner: Runner, databases: Any) -> None:
    """The insert contract's SQL, as written but for the shop's own write (`orders (...)`), and
    the Python example with the names it takes from its surroundings."""
    with database(databases) as (url, engine):
        block = runner.mark_run("readme-insert")
        sql = "\n".join(line for line in block.text.splitlines() if "(...)" not in line)
        done = subprocess.run(
            [psql_binary(), "-X", "-q", "-d", url, "-f", "-"],
            input=sql,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        errors = [line.removeprefix("-- ") for line in sql.splitlines() if "-- ERROR:" in line]
        for error in errors:
            assert error in done.stderr, f"{block.where}: {error!r} not in {done.stderr!r}"
        assert done.stderr.count("ERROR:") == len(errors), done.stderr
        found = rows(engine, "SELECT event_type, transaction_key FROM outbox.events ORDER BY id")
        assert [tuple(r) for r in found] == [
            ("signup", None),
            ("sale", "inv_1001"),
            ("refund", "inv_1001"),
        ]
        _readme_python(runner.mark_run("readme-python").text, engine)


def _readme_python(code: str, engine: sa.Engine) -> None:
    class Base(DeclarativeBase):
        pass

    class Order(Base):
        __tablename__ = "orders"
        id: Mapped[int] = mapped_column(primary_key=True)
        invoice_id: Mapped[str]
        customer_id: Mapped[str]
        total: Mapped[Decimal] = mapped_column(sa.Numeric(10, 2))

    Base.metadata.create_all(engine)
    order = Order(invoice_id="inv_2001", customer_id="cust_43", total=Decimal("99.90"))
    names = {"Session": Session, "engine": engine, "order": order}
    exec(code, {**names, "new_customer": True, "cookie": "partner_7"})
    found = rows(
        engine,
        "SELECT event_type, transaction_key, customer_key, payload FROM outbox.events "
        "WHERE customer_key = 'cust_43' ORDER BY id",
    )
    assert [tuple(r) for r in found] == [
        ("signup", None, "cust_43", {"partner": {"key": "partner_7"}}),
        ("sale", "inv_2001", "cust_43", {"product_id": "plan_pro"}),
    ]
