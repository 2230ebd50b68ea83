"""`outbox reconcile`: options and rendering only; the work is in outbox/ops/reconcile.py.

Settings are read as `outbox run` reads them (outbox.service.settings: flags, OUTBOX_ENV_FILE,
the environment, the defaults), so OUTBOX_RATE_LIMIT_PER_SECOND, OUTBOX_CONCURRENCY,
OUTBOX_REQUEST_TIMEOUT_SECONDS, PARTNERO_API_URL and the API key (PARTNERO_API_KEY,
--api-key-file, the systemd credential) mean the same here. The key is never printed.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from datetime import UTC
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console
from rich.text import Text

from outbox.cli_common import EXIT_USAGE, fail
from outbox.ops import model
from outbox.ops.cli import Col, _emit, _engine, _parse, _print_table, _reason, _state, render_action
from outbox.service.settings import SettingError, resolve
from outbox.text import plural

if TYPE_CHECKING:
    from outbox.ops import reconcile as _reconcile

EXIT_DRIFT = 1
EXIT_UNKNOWN = 3

RECONCILE_EXIT_CODES = """\b
Exit status:
  0  the books match (rows still in flight or failed are listed, not drift)
  1  drift: at least one missing, not_reversed, doubled, amount_differs,
     present_but_skipped or unknown_here key
  2  bad option or setting
  3  the database or Partnero could not be asked"""


def _progress() -> Callable[[int, int, str], None] | None:
    """`asked N of M keys` (or pages of the listing) on stderr, on a terminal only, at most
    five times a second."""
    if not sys.stderr.isatty():
        return None
    shown = [0.0]

    def show(done: int, total: int, what: str) -> None:
        now = time.monotonic()
        if done == total or now - shown[0] >= 0.2:
            shown[0] = now
            end = "\n" if done == total else ""
            click.echo(
                f"\rreconcile: asked Partnero for {done} of {total} {what}", err=True, nl=False
            )
            click.echo(end, err=True, nl=False)

    return show


def _rows_cell(finding: _reconcile.KeyFinding) -> str:
    return ", ".join(f"{r.event_type} #{r.id} {_state(r.status, r.outcome)}" for r in finding.rows)


def render_report(report: _reconcile.ReconcileReport, console: Console) -> None:
    when = "%Y-%m-%d %H:%M:%S"
    console.print(
        f"outbox reconcile: sales and refunds recorded from "
        f"{report.range_from.astimezone(UTC):{when}} to {report.range_to.astimezone(UTC):{when}} "
        "UTC" + (f", keys {', '.join(report.keys_filter)}" if report.keys_filter else "")
    )
    console.print(
        f"{plural(report.keys, 'key')}; {report.compared} compared with Partnero's ledger in "
        f"{plural(report.calls, 'call')}"
    )
    console.print(_how(report))
    console.print()
    _print_table(
        console,
        [Col("finding"), Col("keys", True)],
        [[name, str(count)] for name, count in report.counts.items()],
    )
    if report.findings:
        console.print()
        _print_table(
            console,
            [
                Col("key"),
                Col("finding"),
                Col("ours", shrink_to=12, optional=True),
                Col("detail", shrink_to=24),
            ],
            [[f.key, f.finding.value, _rows_cell(f), f.detail] for f in report.findings],
        )
    console.print()
    if report.ok:
        console.print(Text("the books match", style="bold green"))
    else:
        drift = sum(report.counts[k.value] for k in _ops().DRIFT)
        console.print(Text(f"drift: {drift} findings", style="bold red"))
    _render_requeue(report, console)


def _render_requeue(report: _reconcile.ReconcileReport, console: Console) -> None:
    done = report.requeue
    if done is None:
        return
    console.print()
    if done.action is None:
        console.print("--requeue-missing: nothing to requeue")
    else:
        console.print("--requeue-missing:")
        render_action(done.action, console)
    for key in done.left_alone:
        console.print(
            f"left alone: {key}: Partnero holds it deleted, and the daemon's lookup would "
            "count that as delivered; create it again at Partnero by hand, or ask why it was "
            "deleted"
        )


def _how(report: _reconcile.ReconcileReport) -> str:
    """`strategy: listing, 40 pages of GET /v1/transactions?limit=250 (key by key: 9000
    calls)`, or `strategy: key_filter, GET /v1/transactions?key=K for each of 9000 keys
    (listing: 400 pages)`."""
    from outbox.ops.reconcile import Strategy  # loaded already: it made the report

    by_key, listing = report.estimate.key_filter, report.estimate.listing
    if report.strategy is Strategy.LISTING:
        return (
            f"strategy: listing, {plural(listing or 0, 'page')} of GET "
            f"/v1/transactions?limit=250 (key by key: {plural(by_key, 'call')})"
        )
    other = "" if listing is None else f" (listing: {plural(listing, 'page')})"
    keys = plural(by_key, "key")
    return f"strategy: key_filter, GET /v1/transactions?key=K for each of {keys}{other}"


def _ops() -> Any:
    """The work, imported when the command runs (not for `--help`): it brings SQLAlchemy."""
    from outbox.ops import reconcile

    return reconcile


def _bounds(since: str | None, start: str | None, end: str | None) -> tuple[Any, Any]:
    if since is not None and (start is not None or end is not None):
        fail("give --since, or --from and --to, not both", EXIT_USAGE)
    if since is not None or start is None:
        if end is not None:
            fail("--to needs --from", EXIT_USAGE)
        return _parse("--since", model.parse_time_bound, since or "30d"), None
    return (
        _parse("--from", model.parse_time_bound, start),
        _parse("--to", model.parse_time_bound, end),
    )


@click.command(
    "reconcile",
    epilog=RECONCILE_EXIT_CODES,
    short_help="Compare settled sales and refunds with Partnero's ledger; exit 1 on drift.",
)
@click.option(
    "--since",
    metavar="WHEN",
    help="Rows recorded at or after WHEN: a duration ago (30d) or an ISO time (UTC unless it has "
    "an offset) [default: 30d].",
)
@click.option("--from", "range_from", metavar="WHEN", help="Rows recorded at or after WHEN.")
@click.option("--to", "range_to", metavar="WHEN", help="...and before WHEN [default: now].")
@click.option("--key", "keys", metavar="KEY", multiple=True, help="Only this key (repeatable).")
@click.option(
    "--strategy",
    type=click.Choice(["auto", "key", "listing"]),
    default="auto",
    show_default=True,
    help="How Partnero is read: key (the list filter, key by key), listing (the whole ledger, "
    "250 a page; finds unknown_here keys too), auto (page 1 of the listing, then the one of "
    "fewer calls).",
)
@click.option(
    "--requeue-missing",
    is_flag=True,
    help="Put missing sales and not_reversed refunds back to pending (a sale is looked up "
    "first); recorded as a retry action. Needs --reason.",
)
@click.option("--dry-run", is_flag=True, help="With --requeue-missing: show, change nothing.")
@click.option("--reason", metavar="TEXT", help="Why, for the record (--requeue-missing).")
@click.option("--actor", metavar="NAME", help="Who is acting [default: $SUDO_USER or $USER@host].")
@click.option(
    "--api-key-file", metavar="PATH", help="The API key's file [env OUTBOX_API_KEY_FILE]."
)
@click.option("--partnero-api-url", metavar="URL", help="[env PARTNERO_API_URL]")
@click.option("--database-url", metavar="URL", help="PostgreSQL URL [env OUTBOX_DATABASE_URL]")
@click.option("--json", "as_json", is_flag=True, help="One JSON object (docs/operations.md).")
def reconcile_command(**options: Any) -> None:
    """Compare the sales and refunds recorded in a time range, once settled, with the
    transactions Partnero holds for their keys, and name every drift: missing, not_reversed,
    doubled, amount_differs, present_but_skipped, and with the listing unknown_here. Keys with
    a row still pending are in_flight, with a failed row unsettled: listed, not compared.
    Read-only unless --requeue-missing; nothing is ever changed at Partnero.

    Partnero is asked with the settings of `outbox run` (OUTBOX_CONCURRENCY,
    OUTBOX_RATE_LIMIT_PER_SECOND, OUTBOX_REQUEST_TIMEOUT_SECONDS, PARTNERO_API_URL, the API key
    from PARTNERO_API_KEY, --api-key-file or the systemd credential)."""
    bounds = _bounds(options["since"], options["range_from"], options["range_to"])
    requeue, dry_run = options["requeue_missing"], options["dry_run"]
    if dry_run and not requeue:
        fail("--dry-run goes with --requeue-missing", EXIT_USAGE)
    reason = _reason(options["reason"], dry_run) if requeue else None
    flags = {n: options[n] for n in ("database_url", "api_key_file", "partnero_api_url")}
    try:
        settings = resolve(flags)
    except SettingError as exc:
        fail(str(exc), EXIT_USAGE)
    ops = _ops()
    keys = tuple(options["keys"])
    with _engine(settings.database_url, db_error_code=EXIT_UNKNOWN) as engine:
        span = ops.resolve_range(engine, *bounds)
        try:
            report = ops.reconcile(
                engine,
                settings,
                span,
                keys,
                strategy=options["strategy"],
                progress=None if options["as_json"] else _progress(),
            )
        except ops.PartneroUnavailable as exc:
            fail(str(exc), EXIT_UNKNOWN)
        if requeue:
            actor = options["actor"] or model.default_actor()
            report = ops.requeue(engine, report, dry_run=dry_run, actor=actor, reason=reason)
    _emit(report, options["as_json"], render_report)
    sys.exit(0 if report.ok else EXIT_DRIFT)
