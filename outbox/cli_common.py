"""What the `outbox` group (outbox/cli.py) and the command modules it registers share: one clear
line on failure, and the database URL every command takes. It imports none of them, so no
command module needs to import outbox.cli back."""

from __future__ import annotations

import os
import sys
from typing import NoReturn

import click

from outbox import db

EXIT_ERROR = 1
EXIT_USAGE = 2  # a bad option or setting


def fail(message: str, code: int = EXIT_ERROR) -> NoReturn:
    """One clear line on stderr, then exit."""
    click.echo(f"outbox: {message}", err=True)
    sys.exit(code)


def database_url_from(value: str | None) -> str:
    """--database-url, else OUTBOX_DATABASE_URL from the file OUTBOX_ENV_FILE names, else from
    the environment: the order `outbox run` reads its settings in, so that the migrate unit and
    an operator can share the daemon's way of configuring. A missing or malformed one, or an
    unreadable env file, is exit 2."""
    url = value or _from_env_file("OUTBOX_DATABASE_URL") or os.environ.get("OUTBOX_DATABASE_URL")
    if not url:
        fail("invalid setting OUTBOX_DATABASE_URL (--database-url): is required", EXIT_USAGE)
    try:
        db.sqlalchemy_url(url)
    except db.DatabaseUrlError as exc:
        fail(f"invalid setting OUTBOX_DATABASE_URL (--database-url): {exc}", EXIT_USAGE)
    return url


def _from_env_file(name: str) -> str | None:
    path = os.environ.get("OUTBOX_ENV_FILE")
    if not path:
        return None
    from outbox.service.settings import SettingError, read_env_file

    try:
        return read_env_file(path).get(name) or None
    except SettingError as exc:
        fail(str(exc), EXIT_USAGE)
