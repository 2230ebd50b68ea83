"""`outbox roles-sql`: print the SQL that creates the two least-privilege roles.

The SQL is outbox/sql/roles.sql (shipped in the package, so it works from an installed wheel):
`outbox_app` may only INSERT events, `outbox_daemon` has exactly what `outbox run` needs. Pipe
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

# A plain lower-case identifier: never needs quoting, cannot smuggle SQL in.
_ROLE_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")


def roles_sql(app_role: str = DEFAULT_APP_ROLE, daemon_role: str = DEFAULT_DAEMON_ROLE) -> str:
    """The text of outbox/sql/roles.sql with the two role names replaced.

    Raises ValueError for a name that is not a plain lower-case identifier, or for two equal
    names (one role with both grants would not be least privilege).
    """
    for name in (app_role, daemon_role):
        if not _ROLE_NAME.fullmatch(name):
            raise ValueError(
                f"{name!r} is not a plain role name (lower-case letters, digits and _, "
                "at most 63, not starting with a digit)"
            )
    if app_role == daemon_role:
        raise ValueError("the application role and the daemon role must differ")
    text = resources.files("outbox").joinpath("sql", "roles.sql").read_text(encoding="utf-8")
    # Whole words only: `outbox_app` must not touch `outbox_apps` or `x_outbox_app`.
    text = re.sub(rf"\b{DEFAULT_APP_ROLE}\b", app_role, text)
    return re.sub(rf"\b{DEFAULT_DAEMON_ROLE}\b", daemon_role, text)


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
def roles_sql_command(app_role: str, daemon_role: str) -> None:
    """Print the SQL creating the least-privilege roles for applications and the daemon.

    Run it with psql as the owner of the outbox schema, after every `outbox migrate`; it is
    idempotent. Then create a login role per program and make it a member, e.g.
    CREATE ROLE shop_app LOGIN PASSWORD '...' IN ROLE outbox_app;
    """
    try:
        click.echo(roles_sql(app_role, daemon_role), nl=False)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
