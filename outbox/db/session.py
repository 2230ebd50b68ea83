"""Does a database URL give outbox a session of its own?

The daemon needs one: LISTEN/NOTIFY wakes it, the doorbell is a session advisory lock, and its
statements are prepared once per connection. A pooler that hands each transaction (PgBouncer's
`pool_mode = transaction`) or each statement (`statement`) to whichever server connection is
free breaks all three: prepared statements collide (`prepared statement "_pg3_0" already
exists`), a NOTIFY reaches a server connection no client listens on, a lock is taken on one
connection and released on another. `outbox migrate` needs its transactions and its advisory
lock whole too. So both check at start-up, by doing what they need: a transaction block, and a
NOTIFY that must come back to the connection that LISTENs for it. Applications may insert
through any pooler (docs/operations.md, "PgBouncer and other poolers").
"""

from __future__ import annotations

import secrets

import psycopg
from psycopg import sql

from outbox.db import libpq_url
from outbox.text import first_line

# How long a NOTIFY may take to come back on a direct or session-pooled connection: it takes
# milliseconds; a transaction pool never delivers it.
NOTIFY_ROUND_TRIP_SECONDS = 2.0

_ADVICE = (
    "use a direct connection or a session-mode pool for outbox run and outbox migrate "
    '(PgBouncer pool_mode = session); see docs/operations.md, "PgBouncer and other poolers"'
)


class PooledConnectionError(Exception):
    """The URL leads to a connection pooled per transaction or statement."""


def check_session(
    url: str,
    *,
    connect_timeout: float = 10.0,
    notify_timeout: float = NOTIFY_ROUND_TRIP_SECONDS,
) -> None:
    """Raise PooledConnectionError, with one line saying what to use instead, unless `url`
    gives a session of its own. Connection errors propagate as psycopg.OperationalError."""
    channel = f"outbox_session_check_{secrets.token_hex(6)}"
    with _connect(url, connect_timeout) as listener:
        listener.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        with _connect(url, connect_timeout) as sender:
            try:
                with sender.transaction():
                    sender.execute("SELECT 1")
                    sender.execute("SELECT pg_notify(%s, '')", (channel,))
            except psycopg.Error as exc:
                why = first_line(exc)
                raise PooledConnectionError(
                    f"the database connection refused a transaction block ({why}): a pooler in "
                    f"statement mode? {_ADVICE}"
                ) from None
        for _ in listener.notifies(timeout=notify_timeout, stop_after=1):
            return
    raise PooledConnectionError(
        f"a NOTIFY did not come back to the connection that LISTENs for it within "
        f"{notify_timeout:g} s: a pooler in transaction mode? {_ADVICE}"
    )


def _connect(url: str, connect_timeout: float) -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(
        libpq_url(url),
        autocommit=True,
        connect_timeout=max(1, int(connect_timeout)),
        prepare_threshold=None,  # the check itself must work through any pooler
        application_name="outbox-session-check",
    )
