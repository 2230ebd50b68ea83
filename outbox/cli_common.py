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
    """--database-url, else OUTBOX_DATABASE_URL; a missing or malformed one is exit 2."""
    url = value or os.environ.get("OUTBOX_DATABASE_URL")
    if not url:
        fail("invalid setting OUTBOX_DATABASE_URL (--database-url): is required", EXIT_USAGE)
    try:
        db.sqlalchemy_url(url)
    except db.DatabaseUrlError as exc:
        fail(f"invalid setting OUTBOX_DATABASE_URL (--database-url): {exc}", EXIT_USAGE)
    return url
