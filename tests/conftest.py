"""Shared fixtures: a real PostgreSQL for every test.

OUTBOX_TEST_DATABASE_URL (a server where we may create databases) when set; otherwise a
throwaway embedded server started once per run. The schema is migrated once into a template
database and each test that asks for `database_url` gets a fresh clone.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from outbox import db
from outbox.dev import pgtemp


@pytest.fixture(scope="session")
def admin_url() -> Iterator[str]:
    url = os.environ.get("OUTBOX_TEST_DATABASE_URL")
    if url:
        yield url
        return
    with pgtemp.embedded_server() as embedded:
        yield embedded


@pytest.fixture(scope="session")
def databases(admin_url: str) -> Iterator[pgtemp.DatabaseFactory]:
    factory = pgtemp.DatabaseFactory(admin_url)
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture
def database_url(databases: pgtemp.DatabaseFactory) -> Iterator[str]:
    """A fresh, migrated database."""
    url = databases.create_migrated()
    yield url
    databases.drop(url)


@pytest.fixture
def empty_database_url(databases: pgtemp.DatabaseFactory) -> Iterator[str]:
    """A fresh database with nothing in it."""
    url = databases.create_empty()
    yield url
    databases.drop(url)


@pytest.fixture
def engine(database_url: str) -> Iterator[sa.Engine]:
    eng = db.create_engine(database_url, poolclass=sa.NullPool)
    yield eng
    eng.dispose()
