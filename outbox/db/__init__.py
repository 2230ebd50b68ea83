"""Database URLs and engines. The one place that knows how outbox talks to Postgres."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported where used: the CLI's help must not pay for SQLAlchemy
    import sqlalchemy as sa

_SCHEMES = ("postgresql+psycopg://", "postgresql://", "postgres://")


class DatabaseUrlError(ValueError):
    """The database URL is not one outbox can use."""


def _split(url: str) -> str:
    for scheme in _SCHEMES:
        if url.startswith(scheme):
            return url[len(scheme) :]
    raise DatabaseUrlError("must start with postgresql:// (or postgres://, postgresql+psycopg://)")


def sqlalchemy_url(url: str) -> str:
    """The URL with SQLAlchemy's psycopg 3 driver named."""
    return "postgresql+psycopg://" + _split(url)


def libpq_url(url: str) -> str:
    """The URL as libpq (psql, psycopg.connect) understands it."""
    return "postgresql://" + _split(url)


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(sqlalchemy_url(url)).render_as_string(hide_password=True)
    except Exception:  # a URL we cannot even parse is shown only by its scheme
        return url.split("://", 1)[0] + "://..."


def create_engine(url: str, **kwargs: Any) -> sa.Engine:
    kwargs.setdefault("pool_pre_ping", True)
    import sqlalchemy

    return sqlalchemy.create_engine(sqlalchemy_url(url), **kwargs)
