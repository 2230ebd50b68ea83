"""`outbox migrate`: in order, once each, under an advisory lock, from a wheel, no drift."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import sqlalchemy as sa

from outbox import db
from outbox.db import migrate
from tests.schema_fingerprint import fingerprint

ROOT = Path(__file__).resolve().parent.parent


def run_cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "outbox.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )


def versions(engine: sa.Engine) -> list[str]:
    with engine.connect() as conn:
        return list(
            conn.execute(
                sa.text("SELECT version FROM outbox.schema_migrations ORDER BY 1")
            ).scalars()
        )


def test_migrate_applies_once_and_is_idempotent(empty_database_url: str) -> None:
    first = run_cli("migrate", "--database-url", empty_database_url)
    assert first.returncode == 0, first.stderr
    assert "applied 0001_outbox_schema.sql" in first.stdout
    again = run_cli("migrate", env={"OUTBOX_DATABASE_URL": empty_database_url})
    assert again.returncode == 0, again.stderr
    assert "nothing to apply" in again.stdout
    status = run_cli("migrate", "--status", "--database-url", empty_database_url)
    assert status.returncode == 0
    assert status.stdout.split()[:3] == ["0001", "outbox_schema", "applied"]
    engine = db.create_engine(empty_database_url, poolclass=sa.NullPool)
    assert versions(engine) == [m.version for m in migrate.available()]
    engine.dispose()


def test_status_lists_pending_before_migrate(empty_database_url: str) -> None:
    status = run_cli("migrate", "--status", "--database-url", empty_database_url)
    assert status.returncode == 0, status.stderr
    assert status.stdout.split()[:3] == ["0001", "outbox_schema", "pending"]


def test_concurrent_migrates_both_succeed_once(empty_database_url: str) -> None:
    engine = db.create_engine(empty_database_url, poolclass=sa.NullPool)
    # Hold the migration lock so that the migrates pile up behind it and then race for it.
    with engine.connect() as holder:
        holder.execute(sa.text("SELECT pg_advisory_lock(:k)"), {"k": migrate.LOCK_KEY})
        holder.commit()
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "outbox.cli",
                    "migrate",
                    "--database-url",
                    empty_database_url,
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(3)
        ]
        deadline = time.monotonic() + 60
        while True:
            waiting = holder.execute(
                sa.text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")
            ).scalar_one()
            holder.commit()
            if waiting == 3:
                break
            assert time.monotonic() < deadline, "the migrates never queued on the lock"
        holder.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": migrate.LOCK_KEY})
        holder.commit()
    results = [(*p.communicate(timeout=120), p.returncode) for p in procs]
    assert [code for _, _, code in results] == [0, 0, 0], [err for _, err, _ in results]
    appliers = [out for out, _, _ in results if "applied 0001" in out]
    assert len(appliers) == 1
    assert versions(engine) == [m.version for m in migrate.available()]
    engine.dispose()


def test_unknown_migration_in_database_is_refused(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO outbox.schema_migrations (version, name, checksum) "
                "VALUES ('9999', 'from_the_future', 'x')"
            )
        )
    with pytest.raises(migrate.MigrationError, match="does not know: 9999_from_the_future"):
        migrate.migrate(engine)
    with pytest.raises(migrate.MigrationError, match="9999"):
        migrate.check_current(engine)


def test_edited_migration_is_refused(engine: sa.Engine, database_url: str) -> None:
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "UPDATE outbox.schema_migrations SET checksum = 'edited' WHERE version = '0001'"
            )
        )
    result = run_cli("migrate", "--database-url", database_url)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "outbox: migration file(s) changed after they were applied: 0001_outbox_schema; "
        "an applied migration must never be edited, add a new one instead"
    ]


def test_check_current_wants_migrate_first(empty_database_url: str) -> None:
    engine = db.create_engine(empty_database_url, poolclass=sa.NullPool)
    with pytest.raises(migrate.MigrationError, match="run `outbox migrate` first"):
        migrate.check_current(engine)
    migrate.migrate(engine)
    migrate.check_current(engine)
    engine.dispose()


def test_migrations_give_the_canonical_schema(engine: sa.Engine, empty_database_url: str) -> None:
    canonical = db.create_engine(empty_database_url, poolclass=sa.NullPool)
    with canonical.begin() as conn:
        conn.exec_driver_sql((ROOT / "migrations" / "schema.sql").read_text())
    try:
        from_migrations, from_schema = fingerprint(engine), fingerprint(canonical)
        for part in from_migrations:
            assert from_migrations[part] == from_schema[part], (
                f"schema.sql and migrations differ in {part}"
            )
        assert from_migrations["columns"], "the fingerprint saw no tables"
    finally:
        canonical.dispose()


def test_bad_database_url_is_one_clear_line() -> None:
    result = run_cli("migrate", "--database-url", "mysql://root@localhost/shop")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "outbox: invalid setting OUTBOX_DATABASE_URL (--database-url): "
        "must start with postgresql:// (or postgres://, postgresql+psycopg://)"
    ]


def test_unreachable_database_is_one_clear_line() -> None:
    result = run_cli(
        "migrate", "--database-url", "postgresql://nobody:secret@127.0.0.1:1/none?connect_timeout=2"
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "outbox: cannot reach the database at postgresql+psycopg://nobody:***@127.0.0.1:1/none"
    )
    assert "secret" not in result.stderr


def test_wheel_carries_the_migrations_and_migrates_without_a_checkout(
    tmp_path: Path, empty_database_url: str
) -> None:
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = tmp_path.glob("partnero_outbox-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "outbox/migrations/0001_outbox_schema.sql" in names
    unpacked = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(unpacked)
    # Run from the unpacked wheel only: no source tree on the path, cwd far from the checkout.
    env = {"PYTHONPATH": str(unpacked), "PYTHONSAFEPATH": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "import outbox.db.migrate as m, sys; print(m.migrations_dir()); "
            "from outbox.cli import main; sys.argv=['outbox','migrate']; main()",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=tmp_path,
        env={**os.environ, **env, "OUTBOX_DATABASE_URL": empty_database_url},
    )
    assert result.returncode == 0, result.stderr
    assert str(unpacked) in result.stdout.splitlines()[0]
    assert "applied 0001_outbox_schema.sql" in result.stdout
