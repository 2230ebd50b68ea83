"""`outbox migrate`: apply migrations/NNNN_*.sql in order, once each, under an advisory lock.

Each file runs in its own transaction and is recorded in outbox.schema_migrations with its
checksum. Several hosts may run this at once: the advisory lock lets one apply, the others wait
and then find nothing left to do. A database that holds a migration this build does not know (a
newer build ran) or one whose file changed since it was applied is refused, not guessed at.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from pathlib import Path

import psycopg
import sqlalchemy as sa

_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
# A fixed 64-bit key for pg_advisory_lock: "outbox.db.migrate" folded into a bigint.
LOCK_KEY = int.from_bytes(hashlib.sha256(b"outbox.db.migrate").digest()[:8], "big", signed=True)

# The schema itself is created only when it is missing (CREATE SCHEMA IF NOT EXISTS still needs
# CREATE on the database), so that an owner without that right can migrate an existing schema.
_BOOTSTRAP = """
CREATE TABLE IF NOT EXISTS outbox.schema_migrations (
    version    text        PRIMARY KEY,
    name       text        NOT NULL,
    checksum   text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
"""


class MigrationError(RuntimeError):
    """The database's migrations and this build's do not fit together."""


@dataclass(frozen=True, slots=True)
class Migration:
    version: str
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()

    @property
    def filename(self) -> str:
        return f"{self.version}_{self.name}.sql"


@dataclass(frozen=True, slots=True)
class MigrationState:
    version: str
    name: str
    state: str  # applied | pending | unknown (in the database, not in this build) | changed
    applied_at: datetime | None


def migrations_dir() -> Path:
    """Where the SQL files are: inside the installed package, or beside it in a source tree."""
    packaged = Path(str(resources.files("outbox"))) / "migrations"
    if packaged.is_dir():
        return packaged
    source = Path(__file__).resolve().parents[2] / "migrations"  # beside outbox/, in a checkout
    if source.is_dir():
        return source
    raise MigrationError("no migrations directory found beside the outbox package")


def available(directory: Path | None = None) -> list[Migration]:
    directory = directory or migrations_dir()
    found = []
    for path in sorted(directory.iterdir()):
        match = _FILE.match(path.name)
        if match:
            found.append(Migration(match[1], match[2], path.read_text(encoding="utf-8")))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"two migration files share a version in {directory}")
    return found


def _applied(conn: sa.Connection) -> dict[str, tuple[str, str, datetime]]:
    exists = conn.execute(sa.text("SELECT to_regclass('outbox.schema_migrations')")).scalar()
    if exists is None:
        return {}
    rows = conn.execute(
        sa.text("SELECT version, name, checksum, applied_at FROM outbox.schema_migrations")
    )
    return {r.version: (r.name, r.checksum, r.applied_at) for r in rows}


def status(engine: sa.Engine, directory: Path | None = None) -> list[MigrationState]:
    known = {m.version: m for m in available(directory)}
    try:
        with engine.connect() as conn:
            applied = _applied(conn)
    except sa.exc.ProgrammingError as exc:
        raise _privilege_error(engine, exc, "read outbox.schema_migrations") from None
    states = []
    for version in sorted(set(known) | set(applied)):
        migration = known.get(version)
        if version not in applied:
            assert migration is not None
            states.append(MigrationState(version, migration.name, "pending", None))
            continue
        name, checksum, applied_at = applied[version]
        if migration is None:
            state = "unknown"
        elif migration.checksum != checksum:
            state = "changed"
        else:
            state = "applied"
        states.append(MigrationState(version, name, state, applied_at))
    return states


_MISMATCH = (
    (
        "unknown",
        "the database has migration(s) this build does not know: {names}; run a newer "
        "outbox, or restore the matching build",
    ),
    (
        "changed",
        "migration file(s) changed after they were applied: {names}; an applied "
        "migration must never be edited, add a new one instead",
    ),
)


def _refuse_mismatch(states: list[MigrationState]) -> None:
    for state, message in _MISMATCH:
        names = ", ".join(f"{s.version}_{s.name}" for s in states if s.state == state)
        if names:
            raise MigrationError(message.format(names=names))


class MigrationPrivilegeError(MigrationError):
    """The connected role may not do what the pending migrations need."""


def migrate(engine: sa.Engine, directory: Path | None = None) -> list[Migration]:
    """Apply every pending migration; return those this call applied.

    With nothing pending it only reads outbox.schema_migrations: no lock, no CREATE, so any role
    that may read that table (the daemon's included) can run it. Otherwise it needs the schema
    owner (or, on a database without the schema, a role with CREATE on the database); another
    role gets MigrationPrivilegeError naming the one it needs, not a traceback.
    """
    states = status(engine, directory)
    _refuse_mismatch(states)
    if not any(s.state == "pending" for s in states):
        return []
    try:
        return _apply_pending(engine, available(directory), directory)
    except sa.exc.ProgrammingError as exc:
        raise _privilege_error(engine, exc, "apply migrations") from None


def _apply_pending(
    engine: sa.Engine, migrations: list[Migration], directory: Path | None
) -> list[Migration]:
    done: list[Migration] = []
    with engine.connect() as conn:
        conn.execute(sa.text("SELECT pg_advisory_lock(:key)"), {"key": LOCK_KEY})
        conn.commit()
        try:
            with conn.begin():
                if conn.execute(sa.text("SELECT to_regnamespace('outbox')")).scalar() is None:
                    conn.exec_driver_sql("CREATE SCHEMA outbox")
                conn.exec_driver_sql(_BOOTSTRAP)
            _refuse_mismatch(status(engine, directory))
            with conn.begin():
                applied = _applied(conn)
            for migration in migrations:
                if migration.version in applied:
                    continue
                with conn.begin():
                    conn.exec_driver_sql(migration.sql)
                    conn.execute(
                        sa.text(
                            "INSERT INTO outbox.schema_migrations (version, name, checksum) "
                            "VALUES (:v, :n, :c)"
                        ),
                        {"v": migration.version, "n": migration.name, "c": migration.checksum},
                    )
                done.append(migration)
        finally:
            conn.rollback()
            conn.execute(sa.text("SELECT pg_advisory_unlock(:key)"), {"key": LOCK_KEY})
            conn.commit()
    return done


_WHO = """
SELECT current_user AS role,
       current_database() AS database,
       (SELECT nspowner::regrole::text FROM pg_catalog.pg_namespace
         WHERE nspname = 'outbox') AS owner
"""


def _privilege_error(engine: sa.Engine, exc: sa.exc.ProgrammingError, doing: str) -> MigrationError:
    """42501 (insufficient_privilege) as one line naming the role that is needed; any other
    programming error is not ours to explain and goes up as it is."""
    orig = exc.orig
    if not isinstance(orig, psycopg.errors.InsufficientPrivilege):
        raise exc
    with engine.connect() as conn:
        who = conn.execute(sa.text(_WHO)).one()
    needed = (
        f"run it as {who.owner}, the owner of schema outbox"
        if who.owner
        else f"run it as a role with CREATE on database {who.database} (it will own schema outbox)"
    )
    reason = orig.diag.message_primary or str(orig)
    return MigrationPrivilegeError(f"role {who.role} may not {doing} ({reason}); {needed}")


def check_current(engine: sa.Engine, directory: Path | None = None) -> None:
    """Raise MigrationError unless the database is exactly at this build's schema version."""
    states = status(engine, directory)
    _refuse_mismatch(states)
    pending = [s for s in states if s.state == "pending"]
    if pending:
        names = ", ".join(f"{s.version}_{s.name}" for s in pending)
        raise MigrationError(f"the database lacks migration(s) {names}; run `outbox migrate` first")
