"""Least privilege (outbox/sql/roles.sql): an application role that may only INSERT events and a
daemon role with exactly what `outbox run` needs. The daemon runs and the application inserts
under login roles that are members of them; what each must not do is refused by PostgreSQL.

Roles belong to the whole cluster (OUTBOX_TEST_DATABASE_URL may be shared), so the test renders
the SQL with names of its own and drops them afterwards."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import httpx
import psycopg
import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from psycopg import errors
from sqlalchemy.orm import Session

import outbox
from outbox import db
from outbox.db import queries
from outbox.dev.fake_partnero import FakeConfig, FakePartneroThread
from outbox.ops.roles import roles_sql
from tests.daemon_helpers import API_KEY, DaemonThread, make_settings, settled, wait_until
from tests.helpers import psql
from tests.test_key_order import CLAIM_PARAMS

APP_COLUMNS = ("event_type", "transaction_key", "customer_key", "amount", "currency", "payload")


@dataclass(frozen=True)
class Roles:
    app_group: str
    daemon_group: str
    app_url: str
    daemon_url: str
    owner_url: str
    operator_url: str


def login_url(url: str, user: str, password: str) -> str:
    parsed = sa.engine.make_url(db.sqlalchemy_url(url)).set(username=user, password=password)
    return db.libpq_url(parsed.render_as_string(hide_password=False))


@pytest.fixture
def roles(database_url: str, tmp_path: Path) -> Iterator[Roles]:
    suffix = uuid.uuid4().hex[:8]
    app_group, daemon_group = f"outbox_app_{suffix}", f"outbox_daemon_{suffix}"
    operator_group = f"outbox_operator_{suffix}"
    app_login, daemon_login = f"shop_app_{suffix}", f"outbox_run_{suffix}"
    operator_login = f"outbox_web_{suffix}"
    script = tmp_path / "roles.sql"
    script.write_text(roles_sql(app_group, daemon_group, operator_group))
    created = [app_login, daemon_login, operator_login, app_group, daemon_group, operator_group]
    try:
        for _ in range(2):  # idempotent: a second run changes nothing and fails nothing
            result = psql(database_url, f"\\i {script}")
            assert result.returncode == 0, result.stderr
        with psycopg.connect(database_url, autocommit=True) as conn:
            for login, group, password in (
                (app_login, app_group, f"app-pw-{suffix}"),
                (daemon_login, daemon_group, f"run-pw-{suffix}"),
                (operator_login, operator_group, f"web-pw-{suffix}"),
            ):
                conn.execute(f"CREATE ROLE {login} LOGIN PASSWORD '{password}' IN ROLE {group}")
        yield Roles(
            app_group,
            daemon_group,
            login_url(database_url, app_login, f"app-pw-{suffix}"),
            login_url(database_url, daemon_login, f"run-pw-{suffix}"),
            database_url,
            login_url(database_url, operator_login, f"web-pw-{suffix}"),
        )
    finally:
        with psycopg.connect(database_url, autocommit=True) as conn:
            for role in created:
                exists = conn.execute(
                    "SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)
                ).fetchone()
                if exists:
                    conn.execute(f"DROP OWNED BY {role}")
                    conn.execute(f"DROP ROLE {role}")


def refused(url: str, sql: str) -> bool:
    """True when PostgreSQL refuses the statement for lack of privilege."""
    with psycopg.connect(url) as conn:
        try:
            conn.execute(sql)
        except errors.InsufficientPrivilege:
            return True
        finally:
            conn.rollback()
    return False


def test_the_daemon_and_an_application_work_under_the_least_privilege_roles(
    roles: Roles,
) -> None:
    # The application, in every way the README shows: the SQL functions (SECURITY INVOKER, so
    # they run with the caller's rights), a plain INSERT ... RETURNING id, the Python helper.
    # Each customer signs up with the first purchase: cust_1 came through no partner.
    with psycopg.connect(roles.app_url) as conn:
        signup_id = conn.execute("SELECT outbox.record_signup('cust_1')").fetchone()
        sale_id = conn.execute(
            "SELECT outbox.record_sale('inv_r1', 'cust_1', 10.50, 'EUR', '{\"product_id\": \"p\"}')"
        ).fetchone()
        plain_signup_id = conn.execute(
            "INSERT INTO outbox.events (event_type, customer_key, payload) "
            "VALUES ('signup', 'cust_2', '{\"partner\": {\"id\": 1}}') RETURNING id"
        ).fetchone()
        plain_id = conn.execute(
            "INSERT INTO outbox.events (event_type, transaction_key, customer_key, amount) "
            "VALUES ('sale', 'inv_r2', 'cust_2', 20) RETURNING id"
        ).fetchone()
        conn.execute("SELECT outbox.record_refund('inv_r1')")
    assert None not in (signup_id, sale_id, plain_signup_id, plain_id)
    app_engine = db.create_engine(roles.app_url, poolclass=sa.NullPool)
    try:
        with Session(app_engine) as session, session.begin():
            outbox.record_signup(session, customer_key="cust_3", partner_key="partner_1")
            helper_id = outbox.record_sale(
                session, transaction_key="inv_r3", customer_key="cust_3", amount=Decimal("3.30")
            )
            outbox.record_refund(session, transaction_key="inv_r3")
        assert helper_id > 0
        # A broken row still names its rule for this role (the CHECKs need no privilege).
        with (
            pytest.raises(sa.exc.IntegrityError, match="sale_requires_positive_amount"),
            Session(app_engine) as session,
            session.begin(),
        ):
            outbox.record_sale(session, transaction_key="inv_r4", customer_key="c", amount=0)
    finally:
        app_engine.dispose()

    # The daemon, delivering (claim, complete, attempts, rescue, status line, LISTEN).
    owner = db.create_engine(roles.owner_url, poolclass=sa.NullPool)
    try:
        with FakePartneroThread(FakeConfig(api_key=API_KEY, dedupe=False)) as fake:
            fake.configure(fail_5xx_rate=0.5, seed=3)  # some retries: more write paths
            settings = make_settings(roles.daemon_url, fake.url, status_interval_seconds=0.2)
            with DaemonThread(settings) as daemon:
                wait_until(lambda: settled(owner, 8), what="every row settled")
                assert daemon.daemon is not None
                wait_until(lambda: daemon.daemon.health.backlog == 0, what="the status line")
            ledger, customers = fake.ledger(), fake.customers()
        with owner.connect() as conn:
            outcomes = sorted(
                conn.execute(
                    sa.text(
                        "SELECT coalesce(transaction_key, customer_key), event_type, status, "
                        "outcome FROM outbox.events"
                    )
                ).all()
            )
            attempts = conn.execute(sa.text("SELECT count(*) FROM outbox.attempts")).scalar_one()
    finally:
        owner.dispose()
    assert outcomes == [
        ("cust_1", "signup", "skipped", "not_referred"),
        ("cust_2", "signup", "delivered", "created"),
        ("cust_3", "signup", "delivered", "created"),
        ("inv_r1", "refund", "delivered", "deleted"),
        ("inv_r1", "sale", "delivered", "created"),
        ("inv_r2", "sale", "delivered", "created"),
        ("inv_r3", "refund", "delivered", "deleted"),
        ("inv_r3", "sale", "delivered", "created"),
    ]
    assert attempts >= 7
    assert sorted(t["key"] for t in ledger) == ["inv_r1", "inv_r2", "inv_r3"]
    assert sorted(c["key"] for c in customers) == ["cust_2", "cust_3"]


APP_REFUSED = [
    "UPDATE outbox.events SET status = 'delivered'",
    "UPDATE outbox.events SET amount = 1",
    "DELETE FROM outbox.events",
    "TRUNCATE outbox.events",
    "SELECT status, last_error FROM outbox.events",
    "SELECT * FROM outbox.events",
    "SELECT * FROM outbox.attempts",
    "INSERT INTO outbox.attempts (event_id, attempt, started_at, finished_at, method, path, "
    "decision) VALUES (1, 1, now(), now(), 'POST', '/', 'x')",
    "INSERT INTO outbox.events (event_type, transaction_key, customer_key, amount, status) "
    "VALUES ('sale', 'k', 'c', 1, 'delivered')",
    "INSERT INTO outbox.events (event_type, customer_key, status, outcome) "
    "VALUES ('signup', 'c', 'skipped', 'not_referred')",
    "SELECT * FROM outbox.schema_migrations",
    "CREATE TABLE outbox.mine (x int)",
]

DAEMON_REFUSED = [
    "INSERT INTO outbox.events (event_type, transaction_key, customer_key, amount) "
    "VALUES ('sale', 'k', 'c', 1)",
    "DELETE FROM outbox.events",
    "TRUNCATE outbox.events",
    "SELECT * FROM outbox.attempts",
    "UPDATE outbox.attempts SET error = NULL",
    "DELETE FROM outbox.attempts",
    "INSERT INTO outbox.schema_migrations (version, name, checksum) VALUES ('9', 'x', 'x')",
    "CREATE TABLE outbox.mine (x int)",
]


def test_what_each_role_may_not_do_is_refused(roles: Roles) -> None:
    with psycopg.connect(roles.app_url, autocommit=True) as conn:  # a row to aim at
        conn.execute("SELECT outbox.record_sale('inv_x', 'c', 1)")
    allowed_app = [sql for sql in APP_REFUSED if not refused(roles.app_url, sql)]
    allowed_daemon = [sql for sql in DAEMON_REFUSED if not refused(roles.daemon_url, sql)]
    assert (allowed_app, allowed_daemon) == ([], [])


def test_the_grants_are_exactly_these(roles: Roles) -> None:
    """Every privilege either role holds in the database, table by table and column by column:
    nothing more than the daemon and the insert contract need."""
    with psycopg.connect(roles.owner_url) as conn:
        tables = conn.execute(
            """
            SELECT a.grantee::regrole::text, c.relname, a.privilege_type
            FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace,
                 aclexplode(c.relacl) a
            WHERE n.nspname = 'outbox' AND a.grantee::regrole::text = ANY(%s)
            """,
            ([roles.app_group, roles.daemon_group],),
        ).fetchall()
        columns = conn.execute(
            """
            SELECT a.grantee::regrole::text, att.attname, a.privilege_type
            FROM pg_attribute att JOIN pg_class c ON c.oid = att.attrelid
                 JOIN pg_namespace n ON n.oid = c.relnamespace, aclexplode(att.attacl) a
            WHERE n.nspname = 'outbox' AND c.relname = 'events'
              AND a.grantee::regrole::text = ANY(%s)
            """,
            ([roles.app_group, roles.daemon_group],),
        ).fetchall()
        functions = conn.execute(
            """
            SELECT a.grantee::regrole::text, p.proname, a.privilege_type
            FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace, aclexplode(p.proacl) a
            WHERE n.nspname = 'outbox' AND a.grantee::regrole::text = ANY(%s)
            """,
            ([roles.app_group, roles.daemon_group],),
        ).fetchall()
        schema = conn.execute(
            """
            SELECT a.grantee::regrole::text, a.privilege_type
            FROM pg_namespace n, aclexplode(n.nspacl) a
            WHERE n.nspname = 'outbox' AND a.grantee::regrole::text = ANY(%s)
            """,
            ([roles.app_group, roles.daemon_group],),
        ).fetchall()
    app, daemon = roles.app_group, roles.daemon_group
    assert sorted(tables) == sorted(
        [
            (daemon, "attempts", "INSERT"),
            (daemon, "events", "SELECT"),
            (daemon, "events", "UPDATE"),
            (daemon, "schema_migrations", "SELECT"),
        ]
    )
    assert sorted(columns) == sorted(
        [(app, name, "INSERT") for name in APP_COLUMNS] + [(app, "id", "SELECT")]
    )
    assert sorted(functions) == sorted(
        [
            (app, "record_refund", "EXECUTE"),
            (app, "record_sale", "EXECUTE"),
            (app, "record_signup", "EXECUTE"),
            (daemon, "arm_doorbell", "EXECUTE"),
            (daemon, "disarm_doorbell", "EXECUTE"),
            (daemon, "goes_before", "EXECUTE"),
        ]
    )
    assert sorted(schema) == [(app, "USAGE"), (daemon, "USAGE")]


def test_the_daemon_claims_when_functions_are_not_executable_by_public(roles: Roles) -> None:
    """The claim calls outbox.goes_before (migration 0005). The planner inlines it, yet checks
    EXECUTE first: where a DBA took EXECUTE away from PUBLIC, the daemon's role claims with the
    grant roles.sql gives it, and without that grant it could not claim at all."""
    claim = queries.get("claim")
    goes_before = "outbox.goes_before(text, bigint, text, bigint)"
    with psycopg.connect(roles.owner_url, autocommit=True) as conn:
        conn.execute("SELECT outbox.record_sale('inv_p', 'c', 1)")
        conn.execute(f"REVOKE EXECUTE ON FUNCTION {goes_before} FROM PUBLIC")
    with psycopg.connect(roles.daemon_url) as conn:
        claimed = conn.execute(claim, CLAIM_PARAMS).fetchall()
        conn.rollback()
    assert len(claimed) == 1
    with psycopg.connect(roles.owner_url, autocommit=True) as conn:
        conn.execute(f"REVOKE EXECUTE ON FUNCTION {goes_before} FROM {roles.daemon_group}")
    with psycopg.connect(roles.daemon_url) as conn, pytest.raises(errors.InsufficientPrivilege):
        conn.execute(claim, CLAIM_PARAMS)


def test_roles_sql_command_prints_the_sql_with_chosen_names() -> None:
    from outbox.cli import main

    runner = CliRunner()
    chosen = ["--app-role", "shop", "--daemon-role", "sync", "--operator-role", "support"]
    result = runner.invoke(main, ["roles-sql", *chosen])
    assert result.exit_code == 0, result.output
    assert "GRANT INSERT (event_type" in result.output and "TO shop;" in result.output
    assert "TO support;" in result.output
    statements = [line for line in result.output.splitlines() if not line.startswith("--")]
    defaults = ("outbox_app", "outbox_daemon", "outbox_operator")
    assert not [line for line in statements if any(name in line for name in defaults)]
    assert result.output == roles_sql("shop", "sync", "support")
    # A chosen name that is another role's default is not renamed twice.
    swapped = roles_sql("outbox_daemon", "outbox_app", "outbox_operator")
    assert "GRANT INSERT ON outbox.attempts TO outbox_app;" in swapped
    bad = runner.invoke(main, ["roles-sql", "--app-role", "x; DROP TABLE y"])
    assert bad.exit_code == 2 and "not a plain role name" in bad.output
    same = runner.invoke(main, ["roles-sql", "--app-role", "a", "--daemon-role", "a"])
    assert same.exit_code == 2 and "must differ" in same.output


def test_operators_and_the_web_page_work_under_the_operator_role(
    roles: Roles, database_url: str
) -> None:
    """outbox_operator has what `outbox status | failed | show | retry | discard` and `outbox
    web` need, so that the page (the most exposed piece) never holds the schema owner's
    password; it may not insert or delete events, prune, or change the schema."""
    from tests.test_ops_seed import cli, seed
    from tests.web.server import PASSWORDS, WebServer, config

    owner = db.create_engine(database_url, poolclass=sa.NullPool)
    try:
        ids = seed(owner)
    finally:
        owner.dispose()
    url = roles.operator_url
    assert cli("status", database_url=url).exit_code == 1  # failed rows: attention needed
    assert cli("failed", "--json", database_url=url).exit_code == 0
    assert cli("show", str(ids["rejected"]), database_url=url).exit_code == 0
    retried = cli("retry", str(ids["rejected"]), "--reason", "fixed", database_url=url)
    assert retried.exit_code == 0, retried.output
    discarded = cli("discard", str(ids["invalid"]), "--reason", "test", database_url=url)
    assert discarded.exit_code == 0, discarded.output
    pruned = cli("prune", "--older-than", "1d", "--reason", "r", database_url=url)
    assert pruned.exit_code == 1
    assert pruned.stderr.startswith("outbox: database error: permission denied for table")

    with WebServer(url, [config()]) as web:
        assert httpx.get(web.url() + "/healthz").status_code == 200
        api = httpx.get(web.url() + "/api/status", auth=("alice", PASSWORDS["alice"]))
        assert api.status_code == 200, api.text

    for sql in (
        "INSERT INTO outbox.events (event_type, transaction_key, customer_key, amount) "
        "VALUES ('sale', 'x', 'c', 1)",
        "DELETE FROM outbox.events",
        "DELETE FROM outbox.attempts",
        "INSERT INTO outbox.attempts (event_id, attempt, started_at, finished_at, method, path, "
        "decision, daemon) VALUES (1, 1, now(), now(), 'POST', '/', 'x', 'x')",
        "UPDATE outbox.operator_actions SET reason = 'x'",
        "ALTER TABLE outbox.events ADD COLUMN x int",
        "CREATE TABLE outbox.x (id int)",
    ):
        assert refused(url, sql), sql
