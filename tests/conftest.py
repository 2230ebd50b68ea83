"""Shared fixtures: a real PostgreSQL for every test, and the fake Partnero.

OUTBOX_TEST_DATABASE_URL (a server where we may create databases) when set; otherwise a
throwaway embedded server started once per run. The schema is migrated once into a template
database and each test that asks for `database_url` gets a fresh clone.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from outbox import db
from outbox.dev import pgtemp
from outbox.dev.fake_partnero import FakeConfig, FakePartneroThread
from tests.daemon_helpers import API_KEY
from tests.helpers import NotifySocket


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


@pytest.fixture
def fake() -> Iterator[FakePartneroThread]:
    """The fake Partnero on loopback, taking the tests' API key, every create a new transaction
    (no dedupe). A module that needs another configuration defines its own `fake`."""
    with FakePartneroThread(FakeConfig(api_key=API_KEY, dedupe=False)) as server:
        yield server


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    """The systemd side of sd_notify, for a daemon started with NOTIFY_SOCKET set to its path."""
    sock = NotifySocket(tmp_path)
    yield sock
    sock.close()
