"""The `outbox` command line."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click
import sqlalchemy as sa

from outbox import __version__, db, migrate
from outbox.cli_common import database_url_from, fail
from outbox.settings import SPECS, SPECS_BY_NAME, SettingError, Settings, resolve
from outbox.text import first_line

F = TypeVar("F", bound=Callable[..., Any])


def setting_options(names: list[str] | None = None) -> Callable[[F], F]:
    """Click options for the named settings (all by default), each also read from its env var."""
    specs = [SPECS_BY_NAME[n] for n in names] if names is not None else list(SPECS)

    def decorate(func: F) -> F:
        for spec in reversed(specs):
            default = "" if spec.default is None else f"; default {spec.default}"
            func = click.option(
                spec.flag,
                spec.name,
                default=None,
                metavar="BOOL" if spec.default in {"true", "false"} else "VALUE",
                help=f"{spec.help} [env {spec.envvar}{default}]",
            )(func)
        return func

    return decorate


def settings_from(options: dict[str, Any], *, need_api_key: bool = True) -> Settings:
    try:
        return resolve(options, need_api_key=need_api_key)
    except SettingError as exc:
        fail(str(exc), code=2)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="outbox")
def main() -> None:
    """Deliver sale and refund events from the outbox table to Partnero."""


@main.command("migrate")
@click.option("--database-url", metavar="URL", help="PostgreSQL URL [env OUTBOX_DATABASE_URL]")
@click.option("--status", "show_status", is_flag=True, help="List the migrations and their state.")
def migrate_command(database_url: str | None, show_status: bool) -> None:
    """Apply pending schema migrations (safe to run from several hosts at once)."""
    url = database_url_from(database_url)
    engine = db.create_engine(url, poolclass=sa.NullPool)
    try:
        if show_status:
            states = migrate.status(engine)
            for state in states:
                when = state.applied_at.isoformat(timespec="seconds") if state.applied_at else ""
                click.echo(f"{state.version}  {state.name:<32} {state.state:<8} {when}".rstrip())
            if any(s.state in {"unknown", "changed"} for s in states):
                sys.exit(1)
            return
        applied = migrate.migrate(engine)
    except migrate.MigrationError as exc:
        fail(str(exc))
    except sa.exc.OperationalError as exc:
        fail(f"cannot reach the database at {db.redact(url)}: {first_line(exc.orig)}")
    finally:
        engine.dispose()
    if applied:
        for migration in applied:
            click.echo(f"applied {migration.filename}")
    else:
        click.echo("nothing to apply: the schema is up to date")


@main.command("run", context_settings={"show_default": False})
@setting_options()
def run_command(**options: Any) -> None:
    """Run the delivery daemon (under systemd: Type=notify).

    Every setting below is also read from the environment variable named in brackets; a flag
    wins over the environment. The Partnero API key is never a flag: PARTNERO_API_KEY,
    --api-key-file, or the systemd credential partnero_api_key.
    """
    import asyncio

    from outbox import logs
    from outbox.daemon import Daemon, NotPartneroError
    from outbox.migrate import MigrationError

    settings = settings_from(options)
    logs.configure(settings.log_format, settings.log_level, secrets=[settings.api_key])
    try:
        asyncio.run(Daemon(settings, flags=options).run())
    except MigrationError as exc:
        fail(str(exc))
    except NotPartneroError as exc:
        fail(str(exc), code=2)
    except KeyboardInterrupt:  # pragma: no cover - the signal handler normally wins
        pass


def _register_commands() -> None:
    """Commands that live in their own modules."""
    from outbox.demo import demo_command
    from outbox.fake_partnero import fake_partnero_command

    main.add_command(demo_command)
    main.add_command(fake_partnero_command)

    from outbox.ops_cli import register
    from outbox.roles_cli import register as register_roles

    register(main)
    register_roles(main)


_register_commands()

if __name__ == "__main__":
    main()
