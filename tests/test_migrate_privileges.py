"""`outbox migrate` under least privilege: it touches nothing when nothing is pending, so the
daemon's role may run it (outbox-migrate.service before every start); with something pending
it needs the schema owner and says so in one line; the owner needs no CREATE on the database
once the schema exists; `outbox roles-sql` run by an owner who may not create roles names the
statements an administrator must run.

Roles belong to the whole cluster (the test database server may be shared), so each test makes
roles with names of its own and drops them."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from outbox import db
from outbox.cli import main
from outbox.db import migrate
from outbox.ops.roles import roles_sql
from tests.helpers import psql
from tests.test_roles import login_url

MakeRole = Callable[..., str]


@pytest.fixture
def make_role(admin_url: str) -> Iterator[MakeRole]:
    """make_role(database_url, *options) -> that database's URL as a new login role."""
    made: list[tuple[str, str]] = []

    def make(database_url: str, *options: str) -> str:
        name = f"mig_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(f"CREATE ROLE {name} LOGIN PASSWORD 'pw' {' '.join(options)}")
        made.append((name, database_url))
        return login_url(database_url, name, "pw")

    yield make
    for name, database_url in made:
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(f"REASSIGN OWNED BY {name} TO CURRENT_USER")
            conn.execute(f"DROP OWNED BY {name}")
            conn.execute(f"DROP ROLE {name}")


def cli_migrate(url: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["migrate", "--database-url", url])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.output


def may_create_in_database(url: str) -> bool:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT has_database_privilege(current_database(), 'CREATE')").fetchone()
    assert row is not None
    return bool(row[0])


def test_nothing_pending_needs_only_the_daemons_rights(
    database_url: str, make_role: MakeRole, tmp_path: Path
) -> None:
    suffix = uuid.uuid4().hex[:8]
    app_group, daemon_group = f"outbox_app_{suffix}", f"outbox_daemon_{suffix}"
    operator_group = f"outbox_operator_{suffix}"
    script = tmp_path / "roles.sql"
    script.write_text(roles_sql(app_group, daemon_group, operator_group))
    try:
        assert psql(database_url, f"\\i {script}").returncode == 0
        daemon_url = make_role(database_url, "IN ROLE", daemon_group)
        assert not may_create_in_database(daemon_url)

        code, output = cli_migrate(daemon_url)
        assert (code, output) == (0, "nothing to apply: the schema is up to date\n")
    finally:
        with psycopg.connect(database_url, autocommit=True) as conn:
            for group in (app_group, daemon_group, operator_group):
                conn.execute(f"DROP OWNED BY {group}")
                conn.execute(f"DROP ROLE {group}")


def test_a_pending_migration_run_by_another_role_names_the_owner(
    database_url: str, make_role: MakeRole, tmp_path: Path
) -> None:
    other_url = make_role(database_url)
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f"GRANT USAGE ON SCHEMA outbox TO {sa.make_url(other_url).username}")
        conn.execute(
            f"GRANT SELECT ON outbox.schema_migrations TO {sa.make_url(other_url).username}"
        )
        owner = conn.execute("SELECT current_user").fetchone()
    assert owner is not None
    directory = tmp_path / "migrations"
    shutil.copytree(migrate.migrations_dir(), directory)
    (directory / "9999_later.sql").write_text("CREATE TABLE outbox.later (id int);\n")

    engine = db.create_engine(other_url, poolclass=sa.NullPool)
    try:
        with pytest.raises(migrate.MigrationPrivilegeError) as raised:
            migrate.migrate(engine, directory)
    finally:
        engine.dispose()
    role = sa.make_url(other_url).username
    assert str(raised.value) == (
        f"role {role} may not apply migrations (permission denied for schema outbox); "
        f"run it as {owner[0]}, the owner of schema outbox"
    )


def test_a_role_that_may_not_read_the_schema_gets_one_line(
    database_url: str, make_role: MakeRole
) -> None:
    stranger_url = make_role(database_url)
    code, output = cli_migrate(stranger_url)
    role = sa.make_url(stranger_url).username
    assert code == 1
    assert output.startswith(f"outbox: role {role} may not read outbox.schema_migrations (")
    assert output.count("\n") == 1 and "Traceback" not in output


def test_an_empty_database_needs_create_on_it(empty_database_url: str, make_role: MakeRole) -> None:
    plain_url = make_role(empty_database_url)
    code, output = cli_migrate(plain_url)
    role = sa.make_url(plain_url).username
    database = sa.make_url(db.sqlalchemy_url(plain_url)).database
    assert code == 1
    assert output == (
        f"outbox: role {role} may not apply migrations (permission denied for database "
        f"{database}); run it as a role with CREATE on database {database} (it will own "
        "schema outbox)\n"
    )


def test_the_owner_needs_create_on_the_database_only_for_the_first_migrate(
    empty_database_url: str, make_role: MakeRole, tmp_path: Path
) -> None:
    """The first migrate creates schema outbox (0001), so it needs CREATE on the database; the
    later ones only touch the schema its role owns, and need no more than that."""
    owner_url = make_role(empty_database_url)
    owner = sa.make_url(owner_url).username
    database = sa.make_url(db.sqlalchemy_url(owner_url)).database
    with psycopg.connect(empty_database_url, autocommit=True) as conn:
        conn.execute(f'GRANT CREATE ON DATABASE "{database}" TO {owner}')
    code, output = cli_migrate(owner_url)
    assert code == 0, output
    names = [m.filename for m in migrate.available()]
    assert output.splitlines() == [f"applied {name}" for name in names]

    with psycopg.connect(empty_database_url, autocommit=True) as conn:
        conn.execute(f'REVOKE CREATE ON DATABASE "{database}" FROM {owner}')
    assert not may_create_in_database(owner_url)
    directory = tmp_path / "migrations"
    shutil.copytree(migrate.migrations_dir(), directory)
    (directory / "9999_later.sql").write_text("CREATE TABLE outbox.later (id int);\n")
    engine = db.create_engine(owner_url, poolclass=sa.NullPool)
    try:
        assert [m.filename for m in migrate.migrate(engine, directory)] == ["9999_later.sql"]
    finally:
        engine.dispose()


def test_roles_sql_by_an_owner_who_may_not_create_roles_names_the_statements(
    database_url: str, make_role: MakeRole
) -> None:
    owner_url = make_role(database_url)
    suffix = uuid.uuid4().hex[:8]
    app_group, daemon_group = f"outbox_app_{suffix}", f"outbox_daemon_{suffix}"
    operator_group = f"outbox_operator_{suffix}"
    result = psql(owner_url, roles_sql(app_group, daemon_group, operator_group))
    assert result.returncode != 0
    owner = sa.make_url(owner_url).username
    assert (
        f"ERROR:  role(s) {app_group}, {daemon_group}, {operator_group} do not exist and role "
        f"{owner} may not create roles"
    ) in result.stderr
    assert (
        f"HINT:  Have an administrator (a superuser or a role with CREATEROLE) run: "
        f"CREATE ROLE {app_group} NOLOGIN; CREATE ROLE {daemon_group} NOLOGIN; "
        f"CREATE ROLE {operator_group} NOLOGIN; "
        "Then run this file again as the owner of schema outbox."
    ) in result.stderr
