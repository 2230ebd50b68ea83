"""`outbox roles-sql`: print the SQL that creates the three least-privilege roles.

The SQL is outbox/sql/roles.sql (shipped in the package, so it works from an installed wheel):
`outbox_app` may only INSERT events, `outbox_daemon` has exactly what `outbox run` needs,
`outbox_operator` what the operator commands (but prune) and `outbox web` need. Pipe
it into psql as the schema owner, after every `outbox migrate`:

    outbox roles-sql | psql "$OWNER_URL" -v ON_ERROR_STOP=1
    outbox roles-sql --app-role shop_writer --daemon-role partnero_sync | psql ...
"""

from __future__ import annotations

import re
from importlib import resources

import click

DEFAULT_APP_ROLE = "outbox_app"
DEFAULT_DAEMON_ROLE = "outbox_daemon"
DEFAULT_OPERATOR_ROLE = "outbox_operator"

# A plain lower-case identifier: never needs quoting, cannot smuggle SQL in.
_ROLE_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")


def roles_sql(
    app_role: str = DEFAULT_APP_ROLE,
    daemon_role: str = DEFAULT_DAEMON_ROLE,
    operator_role: str = DEFAULT_OPERATOR_ROLE,
) -> str:
    """The text of outbox/sql/roles.sql with the three role names replaced.

    Raises ValueError for a name that is not a plain lower-case identifier, or for two equal
    names (one role with two roles' grants would not be least privilege).
    """
    names = (app_role, daemon_role, operator_role)
    for name in names:
        if not _ROLE_NAME.fullmatch(name):
            raise ValueError(
                f"{name!r} is not a plain role name (lower-case letters, digits and _, "
                "at most 63, not starting with a digit)"
            )
    if len(set(names)) < len(names):
        raise ValueError("the application, daemon and operator roles must differ")
    text = resources.files("outbox").joinpath("sql", "roles.sql").read_text(encoding="utf-8")
    # One pass, whole words only: `outbox_app` must not touch `outbox_apps` or `x_outbox_app`,
    # and a new name that happens to be another default is not replaced again.
    defaults = (DEFAULT_APP_ROLE, DEFAULT_DAEMON_ROLE, DEFAULT_OPERATOR_ROLE)
    chosen = dict(zip(defaults, names, strict=True))
    return re.sub(rf"\b({'|'.join(defaults)})\b", lambda m: chosen[m.group(1)], text)


@click.command("roles-sql")
@click.option(
    "--app-role",
    default=DEFAULT_APP_ROLE,
    show_default=True,
    help="Name of the role that may only INSERT events (for applications).",
)
@click.option(
    "--daemon-role",
    default=DEFAULT_DAEMON_ROLE,
    show_default=True,
    help="Name of the role with exactly what `outbox run` needs.",
)
@click.option(
    "--operator-role",
    default=DEFAULT_OPERATOR_ROLE,
    show_default=True,
    help="Name of the role for status, failed, show, retry, discard, reconcile and outbox web.",
)
def roles_sql_command(app_role: str, daemon_role: str, operator_role: str) -> None:
    """Print the SQL creating the least-privilege roles for applications and the daemon.

    Run it with psql as the owner of the outbox schema, after every `outbox migrate`; it is
    idempotent. Then create a login role per program and make it a member, e.g.
    CREATE ROLE shop_app LOGIN PASSWORD '...' IN ROLE outbox_app;
    """
    try:
        click.echo(roles_sql(app_role, daemon_role, operator_role), nl=False)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
