"""The `outbox` command line.

`migrate` and `run` live here; the other commands live in their own modules (the operator
commands in outbox/ops/, the development tools in outbox/dev/) and are imported only when one of
them runs or shows its help: `outbox --help` and `outbox status --help` import neither the daemon,
nor the fake Partnero, nor a database library (docs/benchmarks.md, "A cold command line")."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from outbox import __version__, db
from outbox.cli_common import database_url_from, fail
from outbox.service.settings import SPECS, SPECS_BY_NAME, SettingError, Settings, resolve
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


# name -> (module, attribute, the short help `outbox --help` shows without importing it)
LAZY_COMMANDS: dict[str, tuple[str, str, str]] = {
    "status": (
        "outbox.ops.cli",
        "status_command",
        "Backlog, failed and blocked rows, lag, leases; exit 1 if attention is needed.",
    ),
    "failed": (
        "outbox.ops.cli",
        "failed_command",
        "Failed rows and rows blocked behind them, newest first.",
    ),
    "show": (
        "outbox.ops.cli",
        "show_command",
        "One event (or a key's or customer's events) with its full history.",
    ),
    "retry": (
        "outbox.ops.cli",
        "retry_command",
        "Send failed or skipped rows again now (by id or filter; --dry-run).",
    ),
    "discard": (
        "outbox.ops.cli",
        "discard_command",
        "Give up on rows (by id or filter; --refunds; --dry-run).",
    ),
    "prune": (
        "outbox.ops.cli",
        "prune_command",
        "Delete old delivered and skipped rows and their attempts, in batches.",
    ),
    "reconcile": (
        "outbox.ops.reconcile_cli",
        "reconcile_command",
        "Compare settled sales and refunds with Partnero's ledger; exit 1 on drift.",
    ),
    "roles-sql": (
        "outbox.ops.roles",
        "roles_sql_command",
        "Print the SQL creating the least-privilege roles for applications and the daemon.",
    ),
    "web": (
        "outbox.web.cli",
        "web_command",
        "Serve the web page support and finance staff use (hash-password: a users-file line).",
    ),
    "demo": (
        "outbox.dev.demo",
        "demo_command",
        "Run the whole pipeline on this machine and report what happened.",
    ),
    "fake-partnero": (
        "outbox.dev.fake_partnero",
        "fake_partnero_command",
        "Serve a fake Partnero API (a test and demo tool) until SIGINT or SIGTERM.",
    ),
}


class LazyGroup(click.Group):
    """A group whose commands in LAZY_COMMANDS are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *LAZY_COMMANDS})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in LAZY_COMMANDS and cmd_name not in self.commands:
            module, attribute, _ = LAZY_COMMANDS[cmd_name]
            command = getattr(importlib.import_module(module), attribute)
            assert isinstance(command, click.Command) and command.name == cmd_name
            self.add_command(command)
        return super().get_command(ctx, cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = []
        for name in self.list_commands(ctx):
            if name in LAZY_COMMANDS and name not in self.commands:
                rows.append((name, LAZY_COMMANDS[name][2]))
            else:
                command = super().get_command(ctx, name)
                assert command is not None
                rows.append((name, command.get_short_help_str(formatter.width)))
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(
    cls=LazyGroup,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(
    __version__, prog_name="outbox", message="%(prog)s %(version)s (distribution partnero-outbox)"
)
def main() -> None:
    """Deliver sale and refund events from the outbox table to Partnero."""


@main.command("migrate")
@click.option("--database-url", metavar="URL", help="PostgreSQL URL [env OUTBOX_DATABASE_URL]")
@click.option("--status", "show_status", is_flag=True, help="List the migrations and their state.")
def migrate_command(database_url: str | None, show_status: bool) -> None:
    """Apply pending schema migrations (safe to run from several hosts at once)."""
    import psycopg
    import sqlalchemy as sa

    from outbox.db import migrate, session

    url = database_url_from(database_url)
    engine = db.create_engine(url, poolclass=sa.NullPool)
    try:
        if not show_status:
            session.check_session(url)
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
    except session.PooledConnectionError as exc:
        fail(str(exc), code=2)
    except psycopg.OperationalError as exc:
        fail(f"cannot reach the database at {db.redact(url)}: {first_line(exc)}")
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

    from outbox.daemon import Daemon, NotPartneroError, PooledConnectionError
    from outbox.db.migrate import MigrationError
    from outbox.service import logs

    settings = settings_from(options)
    logs.configure(settings.log_format, settings.log_level, secrets=[settings.api_key])
    try:
        asyncio.run(Daemon(settings, flags=options).run())
    except MigrationError as exc:
        fail(str(exc))
    except (NotPartneroError, PooledConnectionError) as exc:
        fail(str(exc), code=2)
    except KeyboardInterrupt:  # pragma: no cover - the signal handler normally wins
        pass


if __name__ == "__main__":
    main()
