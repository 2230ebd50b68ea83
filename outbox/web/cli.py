"""`outbox web` (serve the pages) and `outbox web hash-password` (a line for the users file).

Click and the standard library only at import: aiohttp, Jinja2 and SQLAlchemy are imported when
the server starts, so `outbox --help` stays light. The database URL is read as the operator
commands read it (--database-url, OUTBOX_ENV_FILE, OUTBOX_DATABASE_URL)."""

from __future__ import annotations

import importlib.util
import ipaddress
import sys
from datetime import timedelta
from typing import Any

import click

from outbox.cli_common import EXIT_USAGE, database_url_from, fail

SHORT_HELP = "Serve the web page support and finance staff use (hash-password: a users-file line)."


def _parse_duration(value: str) -> timedelta:
    from outbox.ops import model

    try:
        return model.parse_duration(value)
    except ValueError as exc:
        fail(f"--max-pending-age: {exc}", EXIT_USAGE)


def _addresses(value: str | None) -> frozenset[str]:
    found = set()
    for part in (value or "").replace(",", " ").split():
        try:
            found.add(str(ipaddress.ip_address(part)))
        except ValueError:
            fail(f"--trusted-proxy: {part!r} is not an IP address", EXIT_USAGE)
    return frozenset(found)


def _names(value: str | None) -> frozenset[str]:
    return frozenset(p for p in (value or "").replace(",", " ").split() if p)


@click.group(
    "web",
    invoke_without_command=True,
    short_help=SHORT_HELP,
    context_settings={"show_default": True},
)
@click.option("--host", default="127.0.0.1", help="Address to listen on.")
@click.option("--port", default=8090, type=click.IntRange(1, 65535), help="Port to listen on.")
@click.option("--database-url", metavar="URL", help="PostgreSQL URL [env OUTBOX_DATABASE_URL]")
@click.option(
    "--users-file",
    metavar="PATH",
    help="name:role:hash lines [env OUTBOX_WEB_USERS_FILE, or the systemd credential web_users].",
)
@click.option(
    "--secret-file",
    metavar="PATH",
    help="The session cookies' signing secret, 32 characters or more [env OUTBOX_WEB_SECRET_FILE, "
    "or the credential web_secret; without one a random secret: a restart signs everyone out].",
)
@click.option("--cookie-secure", is_flag=True, help="Mark the session cookie Secure (behind TLS).")
@click.option(
    "--trust-proxy-header",
    metavar="HEADER",
    help="Behind a reverse proxy that authenticates: the header naming the user, e.g. "
    "X-Remote-User (then no users file; needs --trusted-proxy).",
)
@click.option(
    "--trusted-proxy",
    metavar="ADDRS",
    help="The proxy's addresses (comma-separated): only requests from them may carry the header.",
)
@click.option(
    "--proxy-operators",
    metavar="NAMES",
    help="Users the proxy names who may act (comma-separated); everyone else reads only.",
)
@click.option(
    "--max-pending-age",
    default="15m",
    envvar="OUTBOX_MAX_PENDING_AGE",
    help="As `outbox status --max-pending-age` [env OUTBOX_MAX_PENDING_AGE].",
)
@click.pass_context
def web_command(ctx: click.Context, /, **options: Any) -> None:
    """Serve the web page: the overview, the failed and blocked rows, each row's history, and
    retry and discard with a preview; the same facts and functions as `outbox status | failed |
    show | retry | discard`, and their --json under /api/. Every page needs a sign-in (a users
    file, or a reverse proxy that authenticates). docs/web.md says how to run it."""
    if ctx.invoked_subcommand is not None:
        return
    if importlib.util.find_spec("jinja2") is None:
        fail("outbox web needs Jinja2: pip install 'partnero-outbox[web]'", EXIT_USAGE)
    from outbox.web import server

    url = database_url_from(options["database_url"])
    settings = server.Settings(
        host=options["host"],
        port=options["port"],
        database_url=url,
        users_file=options["users_file"],
        secret_file=options["secret_file"],
        cookie_secure=options["cookie_secure"],
        proxy_header=options["trust_proxy_header"],
        trusted_proxies=_addresses(options["trusted_proxy"]),
        proxy_operators=_names(options["proxy_operators"]),
        max_pending_age=_parse_duration(options["max_pending_age"]),
    )
    server.main(settings)


@web_command.command("hash-password", short_help="Print a users-file hash of a password.")
@click.option("--name", metavar="NAME", help="Print a whole users-file line for this user.")
@click.option("--role", type=click.Choice(["operator", "viewer"]), default="viewer")
def hash_password_command(name: str | None, role: str) -> None:
    """Read a password (asked twice on a terminal, else one line from stdin) and print its
    scrypt hash, or with --name the line `name:role:hash` for the users file."""
    from outbox.web import auth

    if sys.stdin.isatty():
        password = click.prompt("password", hide_input=True, confirmation_prompt=True, err=True)
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    try:
        hashed = auth.hash_password(password)
    except auth.AuthError as exc:
        fail(str(exc), EXIT_USAGE)
    click.echo(f"{name}:{role}:{hashed}" if name else hashed)
