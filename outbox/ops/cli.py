"""The operator commands: `outbox status | failed | show | retry | discard | prune`.

Click options and rendering only; the queries and actions are in outbox/ops/commands.py,
which returns the frozen dataclasses of outbox/ops/model.py: rendered here as tables, or
serialised by `to_json` for `--json`. Every command takes `--database-url` (or
OUTBOX_DATABASE_URL) and `--json`; the JSON shapes are documented in docs/operations.md. Human
output is rich tables sized to the terminal (80 columns when piped).
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import functools
import json
import sys
import textwrap
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from types import ModuleType
from typing import TYPE_CHECKING, Any, TypeVar

import click
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from outbox import db
from outbox.cli_common import EXIT_ERROR, EXIT_USAGE, database_url_from, fail
from outbox.domain import EventType, Outcome, Status
from outbox.ops import model
from outbox.text import first_line, format_duration, one_line, plural

if TYPE_CHECKING:
    import sqlalchemy as sa


def _ops() -> ModuleType:
    """The commands module, imported when a command runs (not for `--help`): it brings
    SQLAlchemy."""
    from outbox.ops import commands

    return commands


F = TypeVar("F", bound=Callable[..., Any])
E = TypeVar("E", bound=enum.StrEnum)
R = TypeVar("R")

# Exit codes: EXIT_ERROR (1) unknown id, a row in the wrong state, database errors, and for
# status attention needed; EXIT_USAGE (2) a bad option or setting; and these.
EXIT_OK = 0
EXIT_UNKNOWN = 3  # status only: the database could not be asked

STATUS_EXIT_CODES = """\b
Exit status (for monitoring scripts):
  0  all is well
  1  attention needed: a failed row, a row blocked behind a failed or
     discarded row, the oldest waiting row older than --max-pending-age, or
     the last call to Partnero refused with 401/403 (sending is paused)
  2  bad option or setting
  3  the database could not be asked (unreachable, not migrated)"""

EXIT_CODES = """\b
Exit status: 0 done (or nothing to do), 1 an error (unknown id, a row in a
state the action does not apply to, database unreachable), 2 a bad option."""


@contextlib.contextmanager
def _engine(database_url: str | None, *, db_error_code: int = EXIT_ERROR) -> Iterator[sa.Engine]:
    """An engine on a database at this build's schema; database trouble is one clear line."""
    import sqlalchemy as sa

    from outbox.db import deadline, migrate

    url = database_url_from(database_url)
    try:
        seconds = deadline.command_seconds()
    except ValueError as exc:
        fail(f"invalid setting {deadline.ENV}: {exc}", EXIT_USAGE)
    bound = deadline.StatementDeadline(seconds)
    connect = {"connect_timeout": max(1, int(seconds))}
    engine = db.create_engine(url, poolclass=sa.NullPool, connect_args=connect)
    bound.attach(engine)
    try:
        migrate.check_current(engine)
        yield engine
    except KeyboardInterrupt:
        if not bound.expired:
            raise
        fail(
            f"no answer from the database within {seconds:g} s (a pooler's queue full, or a "
            f"lock held?); {deadline.ENV} sets the bound",
            db_error_code,
        )
    except model.OpsError as exc:
        fail(str(exc))
    except migrate.MigrationError as exc:
        fail(str(exc), db_error_code)
    except sa.exc.OperationalError as exc:
        if getattr(exc.orig, "sqlstate", None) is None:
            fail(
                f"cannot reach the database at {db.redact(url)}: {first_line(exc.orig)}",
                db_error_code,
            )
        fail(f"database error: {first_line(exc.orig)}", db_error_code)
    except sa.exc.DBAPIError as exc:
        fail(f"database error: {first_line(exc.orig)}", db_error_code)
    finally:
        bound.stop()
        engine.dispose()


def _parse(option: str, parse: Callable[[str], Any], value: str | None) -> Any:
    """Parse one option value; a bad one is `outbox: --since: '2x' is not ...` and exit 2."""
    if value is None:
        return None
    try:
        return parse(value)
    except ValueError as exc:
        fail(f"{option}: {exc}", EXIT_USAGE)


def _one_of(*choices: E) -> Callable[[str], E]:
    """A parser for one of these enum members, by value."""
    by_value = {c.value: c for c in choices}

    def check(value: str) -> E:
        if value not in by_value:
            raise ValueError(f"{value!r} is not one of {', '.join(by_value)}")
        return by_value[value]

    return check


def _console() -> Console:
    return Console(highlight=False, markup=False, emoji=False, soft_wrap=False)


def to_json(value: Any) -> Any:
    """A result of outbox.ops as its documented JSON (docs/operations.md, "JSON output"): a
    dataclass is an object of its fields in their order, a tuple a list; times are ISO 8601 in
    UTC, amounts strings, seconds and milliseconds 3 decimals, enums their value. A dict is a
    JSON document already (a payload, the filters or selection as given) and stays as it is."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple):
        return [to_json(item) for item in value]
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat()
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, float):
        return round(value, 3)
    return value


def _emit(result: R, as_json: bool, render: Callable[[R, Console], None]) -> None:
    """A result as its JSON (--json) or rendered for people."""
    if as_json:
        click.echo(json.dumps(to_json(result), indent=2))
    else:
        render(result, _console())


# ---- shared options ----------------------------------------------------------------------------


def database_options(func: F) -> F:
    func = click.option(
        "--json",
        "as_json",
        is_flag=True,
        help="Print one JSON object (its fields: docs/operations.md).",
    )(func)
    return click.option(
        "--database-url", metavar="URL", help="PostgreSQL URL [env OUTBOX_DATABASE_URL]"
    )(func)


def filter_options(func: F) -> F:
    options = [
        click.option(
            "--state", metavar="STATE", help="failed or blocked (a pending row behind one)."
        ),
        click.option(
            "--outcome",
            metavar="REASON",
            help="The failed row's reason: "
            + ", ".join(model.FAILED_OUTCOMES)
            + "; for skipped rows (retry --status skipped) why: "
            + ", ".join(model.SKIPPED_ROW_OUTCOMES)
            + ".",
        ),
        click.option("--status-code", metavar="CODE", help="The last HTTP status, e.g. 400."),
        click.option(
            "--since",
            metavar="WHEN",
            help="Recorded at or after WHEN: a duration ago (30m, 2h, 7d) or an ISO time (UTC "
            "unless it has an offset).",
        ),
        click.option("--until", metavar="WHEN", help="Recorded before WHEN (as --since)."),
        click.option("--key", metavar="KEY", help="Transaction key (exact; a signup has none)."),
        click.option("--customer", metavar="KEY", help="Customer key (exact)."),
        click.option("--type", "event_type", metavar="TYPE", help="signup, sale or refund."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


# What `--state` takes: the rows `outbox failed` lists (skipped ones are not a problem).
_LISTED_STATES = (model.ProblemState.FAILED, model.ProblemState.BLOCKED)


def _filters(options: dict[str, Any]) -> model.Filters:
    """The filters given; `--status` (retry only) says whether they select failed rows (and
    blocked ones) or skipped rows, and so which outcomes `--outcome` takes."""
    status = _parse("--status", _one_of(*model.RETRY_STATUSES), options.pop("status", None))
    skipped = status is Status.SKIPPED
    if skipped and options["state"] is not None:
        fail("--state is for failed and blocked rows, not with --status skipped", EXIT_USAGE)
    outcomes = model.SKIPPED_ROW_OUTCOMES if skipped else model.FAILED_OUTCOMES
    return model.Filters(
        state=_parse("--state", _one_of(*_LISTED_STATES), options.pop("state")),
        outcome=_parse("--outcome", _one_of(*outcomes), options.pop("outcome")),
        status_code=_parse("--status-code", model.parse_status_code, options.pop("status_code")),
        since=_parse("--since", model.parse_time_bound, options.pop("since")),
        until=_parse("--until", model.parse_time_bound, options.pop("until")),
        key=options.pop("key"),
        customer=options.pop("customer"),
        event_type=_parse("--type", _one_of(*EventType), options.pop("event_type")),
        status=status,
    )


def action_options(func: F) -> F:
    options = [
        click.option(
            "--all", "all_rows", is_flag=True, help="Every row the action applies to, no filter."
        ),
        click.option(
            "--dry-run", is_flag=True, help="Show exactly what would change; change nothing."
        ),
        click.option(
            "--reason", metavar="TEXT", help="Why (required unless --dry-run); it is recorded."
        ),
        click.option(
            "--actor",
            metavar="NAME",
            help="Who is acting, for the record [default: $SUDO_USER or $USER @ hostname].",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _selection(ids: tuple[str, ...], filters: model.Filters, all_rows: bool) -> model.Selection:
    parsed: list[int] = _parse("ID", model.parse_ids, " ".join(ids)) if ids else []
    if parsed and (filters.given() or all_rows):
        fail("give event ids or filters (or --all), not both", EXIT_USAGE)
    if not parsed and not filters.given() and not all_rows:
        fail(
            "say which rows: event ids, filters (--outcome, --status-code, --since, --until, "
            "--key, --customer, --type, --state) or --all",
            EXIT_USAGE,
        )
    return model.Selection(ids=tuple(parsed), filters=filters, all_rows=all_rows)


def _reason(reason: str | None, dry_run: bool) -> str | None:
    if reason is not None and not reason.strip():
        reason = None
    if reason is None and not dry_run:
        fail("--reason is required: say why (it is recorded with the action)", EXIT_USAGE)
    return reason.strip() if reason else None


# ---- rendering helpers -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Col:
    name: str
    right: bool = False
    shrink_to: int | None = None  # may be cut (with an ellipsis) down to this width
    optional: bool = False  # left out when the table does not fit even after cutting


# The first columns of every table of events: which row it is.
_EVENT_COLUMNS = (
    Col("id", True),
    Col("type"),
    Col("key", shrink_to=12),
    Col("customer", shrink_to=10),
)


def _event_cells(
    event_id: int, event_type: EventType, key: str | None, customer_key: str | None
) -> list[str]:
    """A signup has no transaction key (`-`): its customer, in the next column, names it."""
    return [str(event_id), event_type.value, _dash(key), _dash(customer_key)]


def _print_table(console: Console, columns: list[Col], rows: list[list[str]]) -> None:
    """An aligned table no wider than the console: columns that may shrink are cut with an
    ellipsis, widest first, and the others keep their full width."""
    widths = [max([len(c.name), *(len(r[i]) for r in rows)]) for i, c in enumerate(columns)]

    def floor(i: int) -> int:
        return max(columns[i].shrink_to or widths[i], len(columns[i].name))

    while True:
        # Two characters between columns (a space of padding and the box's blank divider).
        excess = sum(widths) + 2 * (len(columns) - 1) - console.width
        if excess <= 0 or sum(widths[i] - floor(i) for i in range(len(columns))) >= excess:
            break
        optional = [i for i, c in enumerate(columns) if c.optional]
        if not optional:
            break
        drop = optional[-1]
        columns = columns[:drop] + columns[drop + 1 :]
        widths = widths[:drop] + widths[drop + 1 :]
        rows = [r[:drop] + r[drop + 1 :] for r in rows]
    while excess > 0:
        candidates = [i for i in range(len(columns)) if widths[i] > floor(i)]
        if not candidates:
            break
        widest = max(candidates, key=lambda i: widths[i] - floor(i))
        cut = min(excess, widths[widest] - floor(widest), max(1, excess // len(candidates)))
        widths[widest] -= cut
        excess -= cut
    table = Table(
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        show_edge=False,
        header_style="bold",
        padding=(0, 1, 0, 0),
    )
    for c, width in zip(columns, widths, strict=True):
        table.add_column(
            c.name,
            justify="right" if c.right else "left",
            no_wrap=True,
            overflow="ellipsis",
            width=width,
        )
    for row in rows:
        table.add_row(*row)
    console.print(table)


def _print_pairs(console: Console, pairs: list[tuple[str, str]]) -> None:
    """`name   value` lines, values wrapped under themselves to the console width."""
    if not pairs:
        return
    indent = max(len(name) for name, _ in pairs) + 2
    width = max(40, console.width - indent)
    for name, value in pairs:
        lines = textwrap.wrap(value, width, break_on_hyphens=False) or [""]
        console.print(Text(name.ljust(indent), style="bold") + Text(lines[0]))
        for line in lines[1:]:
            console.print(" " * indent + line)


def _when(value: datetime | None) -> str:
    """A time as 2026-01-31 14:05:09 (UTC)."""
    if value is None:
        return "-"
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def _ago(seconds: float | None) -> str:
    return "-" if seconds is None else f"{format_duration(seconds)} ago"


def _dash(value: Any) -> str:
    return "-" if value is None or value == "" else str(value)


def _one_line(text: str | None) -> str:
    return one_line(text or "") or "-"


def _state(status: Status, outcome: Outcome | None) -> str:
    """`failed: customer_not_found`, `pending`, `delivered: created`..."""
    return f"{status}: {outcome}" if outcome else str(status)


def _behind(b: model.BlockedBy) -> str:
    return f"behind #{b.id} ({b.event_type}, {_state(b.status, b.outcome)})"


# ---- outbox status -----------------------------------------------------------------------------


def render_status(report: model.StatusReport, console: Console) -> None:
    if report.ok:
        console.print(Text("outbox status: OK", style="bold green"))
    else:
        console.print(Text("outbox status: attention needed", style="bold red"))
        for problem in report.problems:
            console.print(f"  - {problem}")
    console.print()
    _print_table(
        console,
        [Col("type"), Col("status"), Col("outcome"), Col("rows", True), Col("oldest", True)],
        [
            [
                row.event_type.value,
                row.status.value,
                _dash(row.outcome),
                str(row.events),
                format_duration(row.oldest_age_seconds),
            ]
            for row in report.counts
        ]
        or [["-", "no events yet", "", "", ""]],
    )
    console.print()
    _print_pairs(console, _status_pairs(report))


def _status_pairs(report: model.StatusReport | model.AttentionReport) -> list[tuple[str, str]]:
    pending = report.pending
    details = f"{pending.in_flight} in flight, {pending.blocked} blocked"
    line = f"{plural(pending.events, 'row')} ({details})"
    if pending.events:
        line += f"; oldest {_ago(pending.oldest_age_seconds)}"
        waiting = pending.oldest_waiting_age_seconds
        if waiting is not None and waiting != pending.oldest_age_seconds:
            line += f", oldest not blocked {_ago(waiting)}"
    pairs = [("pending", line)]
    last = report.last_delivered_at
    pairs.append(
        (
            "last delivery",
            "never"
            if last is None
            else f"{_when(last)} UTC ({_ago(report.last_delivery_age_seconds)})",
        )
    )
    for n, lease in enumerate(report.leases):
        pairs.append(("leases" if n == 0 else "", _lease_line(lease)))
    if not report.leases:
        pairs.append(("leases", "none (nothing in flight)"))
    attempt = report.last_attempt
    if attempt is not None:
        answer = str(attempt.status_code) if attempt.status_code else "no answer"
        pairs.append(
            (
                "last call",
                f"{attempt.method} {attempt.path} -> {answer} {attempt.decision}, "
                f"{_ago(attempt.age_seconds)} by {attempt.daemon} (event {attempt.event_id})",
            )
        )
    return pairs


def _lease_line(lease: model.Lease) -> str:
    expired = f", {lease.expired} expired" if lease.expired else ""
    when = lease.expires_in_seconds
    expiry = (
        f"expires in {format_duration(when)}"
        if when > 0
        else f"expired {format_duration(-when)} ago"
    )
    return f"{lease.owner}: {plural(lease.events, 'row')}{expired}, last {expiry}"


@click.command(
    "status",
    epilog=STATUS_EXIT_CODES,
    short_help="Backlog, failed and blocked rows, lag, leases; exit 1 if attention is needed.",
)
@database_options
@click.option(
    "--max-pending-age",
    metavar="DURATION",
    default="15m",
    show_default=True,
    envvar="OUTBOX_MAX_PENDING_AGE",
    help="Attention needed when the oldest pending row that is not blocked is older than this "
    "[env OUTBOX_MAX_PENDING_AGE].",
)
def status_command(database_url: str | None, as_json: bool, max_pending_age: str) -> None:
    """The backlog, what needs a person, and whether the daemons keep up.

    Counts by type, status and outcome; pending rows (in flight, blocked behind a failed or
    discarded row); the oldest pending row; the last delivery; the daemons holding leases; the
    last HTTP call.
    """
    limit: timedelta = _parse("--max-pending-age", model.parse_duration, max_pending_age)
    with _engine(database_url, db_error_code=EXIT_UNKNOWN) as engine:
        report = _ops().status(engine, limit)
    _emit(report, as_json, render_status)
    sys.exit(EXIT_OK if report.ok else EXIT_ERROR)


# ---- outbox failed -----------------------------------------------------------------------------


def _problem_cell(row: model.Problem) -> str:
    if row.blocked_by is not None:
        return f"behind #{row.blocked_by.id} ({row.blocked_by.status})"
    return str(row.outcome)


def _reason_cell(row: model.Problem) -> str:
    if row.blocked_by is not None:
        b = row.blocked_by
        return f"waits for {b.event_type} #{b.id}: " + _state(b.status, b.outcome)
    # The daemon's last_error starts with the outcome, which the problem column shows already.
    return _one_line(row.last_error).removeprefix(f"{row.outcome}: ")


def render_failed(page: model.FailedPage, console: Console) -> None:
    rows = page.rows
    if not rows:
        console.print("no failed or blocked rows" + (" match" if page.filters else ""))
        return
    _print_table(
        console,
        [
            *_EVENT_COLUMNS,
            Col("problem", shrink_to=18),
            Col("http", True),
            Col("tries", True),
            Col("age", True),
            Col("reason", shrink_to=12, optional=True),
        ],
        [
            [
                *_event_cells(row.id, row.event_type, row.transaction_key, row.customer_key),
                _problem_cell(row),
                _dash(row.last_status_code),
                str(row.attempts),
                format_duration(row.age_seconds),
                _reason_cell(row),
            ]
            for row in rows
        ],
    )
    first = (page.page - 1) * page.limit + 1
    footer = f"rows {first}-{first + len(rows) - 1} of {page.total}, newest first"
    if page.page < page.pages:
        footer += f"; next: --page {page.page + 1}"
    console.print(footer)
    console.print("details: outbox show ID; act: outbox retry ID / outbox discard ID")


@click.command(
    "failed",
    epilog=EXIT_CODES,
    short_help="Failed rows and rows blocked behind them, newest first.",
)
@database_options
@filter_options
@click.option("--limit", default="50", metavar="N", show_default=True, help="Rows per page.")
@click.option("--page", default="1", metavar="N", show_default=True, help="Which page.")
def failed_command(
    database_url: str | None, as_json: bool, limit: str, page: str, **options: Any
) -> None:
    """Failed rows, and rows blocked behind a failed or discarded row, newest first.

    A blocked row is pending but cannot be sent until a person retries or discards the row it
    waits for (its `problem` says which: for a sale, maybe its customer's failed signup).
    Filters apply to the row itself and combine with AND; times are when the shop recorded the
    event (created_at). Skipped rows (customers no partner referred) are not listed: they need
    no one (`outbox retry --status skipped` takes them back).
    """
    filters = _filters(options)
    per_page = _parse("--limit", model.parse_positive_int, limit)
    page_no = _parse("--page", model.parse_positive_int, page)
    with _engine(database_url) as engine:
        found = _ops().failed(engine, filters, limit=per_page, page=page_no)
    _emit(found, as_json, render_failed)


# ---- outbox show -------------------------------------------------------------------------------


def _render_event(
    event: model.EventDetail, console: Console, *, full_payload: bool = False
) -> None:
    # A signup is named by its customer: it has no transaction key.
    name = event.customer_key if event.transaction_key is None else event.transaction_key
    title = f"event {event.id}: {event.event_type} {name}"
    console.print(Text(title, style="bold"))
    _print_pairs(console, _event_pairs(event, full_payload=full_payload))
    console.print()
    history = event.attempt_history
    console.print(
        Text(f"HTTP calls ({len(history)})", style="bold") if history else "no HTTP calls"
    )
    for a in history:
        code = f"HTTP {a.status_code}" if a.status_code is not None else "no answer"
        console.print(
            f"  {a.attempt:>2}  {_when(a.started_at)}  {a.method} {a.path}  "
            f"({a.duration_ms:.0f} ms)"
        )
        console.print(f"      {code}, {a.decision}")
        answer = _one_line(a.error or a.response_excerpt)
        _print_wrapped(console, answer, indent=6, max_lines=3)
    if event.operator_actions:
        console.print()
        console.print(Text("operator actions", style="bold"))
    for action in event.operator_actions:
        console.print(
            f"  #{action.action_id}  {_when(action.at)}  {action.change} by {action.actor}"
        )
        _print_wrapped(
            console,
            f"was {_state(action.previous_status, action.previous_outcome)} after "
            f"{plural(action.previous_attempts, 'attempt')}; reason: {action.reason}",
            indent=6,
            max_lines=3,
        )


# A payload longer than this is cut in `outbox show` (--full-payload, or --json, has it whole).
PAYLOAD_SHOWN_CHARS = 2000


def _payload_text(payload: dict[str, Any], full: bool) -> str:
    text = json.dumps(payload, sort_keys=True, ensure_ascii=False)
    if full or len(text) <= PAYLOAD_SHOWN_CHARS:
        return text
    rest = len(text) - PAYLOAD_SHOWN_CHARS
    return f"{text[:PAYLOAD_SHOWN_CHARS]}... ({rest:,} more characters: --full-payload)"


def _dated(event: model.EventDetail) -> str:
    """The time a sale carries to Partnero (`created_at`, which Partnero backdates it to)."""
    own = (event.payload or {}).get("created_at")
    if isinstance(own, int) and not isinstance(own, bool):
        return f"created_at {own} (from the payload)"
    stamp = int(event.created_at.timestamp())
    return f"created_at {stamp} (the recorded time; not sent with OUTBOX_SEND_CREATED_AT=false)"


def _event_pairs(event: model.EventDetail, *, full_payload: bool) -> list[tuple[str, str]]:
    pairs = [
        ("status", _state(event.status, event.outcome) + (" (parked)" if event.parked else ""))
    ]
    if event.blocked_by is not None:
        pairs.append(("waits for", _behind(event.blocked_by).removeprefix("behind ")))
    pairs.append(("customer", _dash(event.customer_key)))
    if event.amount is not None:
        pairs.append(("amount", f"{event.amount} {event.currency or ''}".strip()))
    if event.payload:
        pairs.append(("payload", _payload_text(event.payload, full_payload)))
    pairs.append(("attempts", str(event.attempts)))
    pairs.append(("recorded", f"{_when(event.created_at)} UTC ({_ago(event.age_seconds)})"))
    if event.event_type is EventType.SALE:
        pairs.append(("dated", _dated(event)))
    if event.delivered_at:
        pairs.append(("delivered", _when(event.delivered_at) + " UTC"))
    elif event.status is Status.PENDING:
        pairs.append(("next attempt", _when(event.next_attempt_at) + " UTC"))
    pairs += _answer_pairs(event)
    # lookup_required: an earlier create may have reached Partnero; it is looked up first.
    flags = [
        name
        for name, on in (
            ("lookup_required", event.lookup_required),
            ("order_released", event.order_released),
        )
        if on
    ]
    if flags:
        pairs.append(("flags", ", ".join(flags)))
    if event.lease_owner:
        pairs.append(
            ("leased by", f"{event.lease_owner} until {_when(event.lease_expires_at)} UTC")
        )
    if event.blocked_by is not None:
        pairs.append(("to unblock", _unblock_hint(event.id, event.blocked_by)))
    return pairs


def _answer_pairs(event: model.EventDetail) -> list[tuple[str, str]]:
    """What became of the row: why a skipped row was skipped (and the answer that did it, if
    a call did: a row skipped without a call has only the daemon's note saying the same), the
    last error of a row not delivered, or the last answer."""
    if event.status is Status.SKIPPED and event.outcome in SKIPPED_WHY:
        why = [("why", SKIPPED_WHY[event.outcome])]
        if event.last_error and event.last_status_code is not None:
            why.append(("answer", _one_line(event.last_error)))
        return why
    if event.last_error and event.status is not Status.DELIVERED:
        return [("last error", _one_line(event.last_error))]
    if event.last_status_code is not None:
        return [("last answer", f"HTTP {event.last_status_code}")]
    return []


# `outbox show`: why a skipped row was skipped, and what a person may do (docs/operations.md,
# "A customer nobody referred").
SKIPPED_WHY = {
    Outcome.NOT_REFERRED: "no partner referred this customer (no partner reference in the "
    "payload): Partnero would ignore the signup, so it was not sent; nothing to do",
    Outcome.INVALID_PARTNER: "Partnero refused the partner reference (400 Invalid partner key), "
    "so it has no such customer and no partner earns on their sales; if the reference was "
    "wrong, correct the payload (or the partner at Partnero) and `outbox retry` this row",
    Outcome.CUSTOMER_NOT_FOUND: "Partnero does not know this customer (never referred): nothing "
    "to pay; `outbox retry` sends it again if a person added the customer at Partnero",
    Outcome.SALE_SKIPPED: "its sale was skipped (Partnero does not know the customer): nothing "
    "to reverse, so it was not sent; it goes back to pending when its sale is retried",
}


def _unblock_hint(event_id: int, b: model.BlockedBy) -> str:
    if b.status is Status.DISCARDED:
        return (
            f"outbox discard {b.id} --refunds release (send it anyway), or "
            f"outbox discard {event_id} (give up on it)"
        )
    return f"outbox retry {b.id} or outbox discard {b.id} (see its history)"


def _print_wrapped(console: Console, text: str, *, indent: int, max_lines: int) -> None:
    lines = textwrap.wrap(text, max(20, console.width - indent), break_on_hyphens=False) or ["-"]
    if len(lines) > max_lines:
        lines = [*lines[: max_lines - 1], lines[max_lines - 1][:-1] + "…"]
    for line in lines:
        console.print(" " * indent + line)


Shown = model.EventShown | model.KeyShown | model.CustomerShown


def render_shown(shown: Shown, console: Console, *, full_payload: bool = False) -> None:
    events = [shown.event] if isinstance(shown, model.EventShown) else shown.events
    for n, event in enumerate(events):
        if n:
            console.print()
        _render_event(event, console, full_payload=full_payload)


@click.command(
    "show",
    epilog=EXIT_CODES,
    short_help="One event (or a key's or customer's events) with its full history.",
)
@database_options
@click.argument("event_id", metavar="[ID]", required=False)
@click.option("--key", metavar="KEY", help="Every event of this transaction key, in order.")
@click.option(
    "--customer",
    metavar="KEY",
    help="Every event of this customer: its signups, its sales and their refunds, in order "
    "(reads the whole table: customer keys of sales have no index).",
)
@click.option(
    "--full-payload",
    is_flag=True,
    help=f"Print payloads whole (longer than {PAYLOAD_SHOWN_CHARS:,} characters they are cut; "
    "--json always has them whole).",
)
def show_command(
    database_url: str | None,
    as_json: bool,
    event_id: str | None,
    key: str | None,
    customer: str | None,
    full_payload: bool,
) -> None:
    """One event and its full history: every HTTP call (time, request, status, answer,
    decision) and every operator action; or, with --key, every event of a transaction key in
    delivery order (sales before refunds, then by id); or, with --customer, a customer's
    signups, then its sales, each followed by its refunds."""
    if [event_id, key, customer].count(None) != 2:
        fail("give an event ID, --key KEY or --customer KEY (one of them)", EXIT_USAGE)
    with _engine(database_url) as engine:
        if event_id is not None:
            parsed: list[int] = _parse("ID", model.parse_ids, event_id)
            if len(parsed) != 1:
                fail(f"ID: {event_id!r} is not one event id", EXIT_USAGE)
            shown: Shown = _ops().show_event(engine, parsed[0])
        elif key is not None:
            shown = _ops().show_key(engine, key)
        else:
            assert customer is not None
            shown = _ops().show_customer(engine, customer)
    _emit(shown, as_json, functools.partial(render_shown, full_payload=full_payload))


# ---- outbox retry / outbox discard -------------------------------------------------------------


_DO = {kind: kind.value for kind in model.ChangeKind}
_DONE = {
    model.ChangeKind.RETRY: "retried",
    model.ChangeKind.DISCARD: "discarded",
    model.ChangeKind.RELEASE: "released",
    model.ChangeKind.WAKE: "woke",
}


def _summary(changes: tuple[model.Change, ...], *, conditional: bool) -> str:
    """`discard 1 row and release 1 row` (or `would ...`), parked rows woken last."""
    counts = Counter(c.change for c in changes)
    words = _DO if conditional else _DONE
    parts = [
        f"{words[change]} {plural(n, 'parked row' if change is model.ChangeKind.WAKE else 'row')}"
        for change, n in counts.items()
    ]
    text = ", ".join(parts[:-1]) + (" and " if len(parts) > 1 else "") + parts[-1]
    return ("would " if conditional else "") + text


def render_action(result: model.ActionResult, console: Console) -> None:
    changes = result.changes
    if not changes:
        console.print(f"nothing to {result.action}: no row matches")
    else:
        if result.dry_run:
            console.print(f"dry run: {_summary(changes, conditional=True)}; nothing was changed")
        _print_table(
            console,
            [
                *_EVENT_COLUMNS,
                Col("change"),
                Col("before", shrink_to=16),
                Col("tries", True),
            ],
            [
                [
                    *_event_cells(c.event_id, c.event_type, c.transaction_key, c.customer_key),
                    c.change.value,
                    _state(c.previous_status, c.previous_outcome),
                    str(c.previous_attempts),
                ]
                for c in changes
            ],
        )
    left_blocked = result.left_blocked if isinstance(result, model.DiscardResult) else ()
    for row in left_blocked:
        _print_wrapped(
            console,
            f"refund {row.event_id} ({row.transaction_key}) stays blocked behind its "
            f"discarded sale {row.sale_id} (--refunds keep). Decide later: outbox discard "
            f"{row.sale_id} --refunds release|discard",
            indent=0,
            max_lines=4,
        )
    if changes and not result.dry_run:
        _print_wrapped(
            console,
            f"{_summary(changes, conditional=False)}: action {result.action_id} by "
            f"{result.actor} ({result.reason}); running daemons were notified",
            indent=0,
            max_lines=4,
        )


@dataclass(frozen=True)
class _Action:
    """What every action command was told: where, which rows, and for the record."""

    database_url: str | None
    as_json: bool
    selection: model.Selection
    dry_run: bool
    reason: str | None  # None only on a dry run
    actor: str


def _action(options: dict[str, Any], *, refuse: str | None = None) -> _Action:
    """The action's arguments, checked in the order the operator reads the errors: the rows,
    then what this action refuses (`refuse`: a message for --state blocked), then the reason."""
    dry_run = bool(options.pop("dry_run"))
    database_url, as_json = options.pop("database_url"), bool(options.pop("as_json"))
    selection = _selection(options.pop("ids"), _filters(options), options.pop("all_rows"))
    if refuse is not None and selection.filters.state is model.ProblemState.BLOCKED:
        fail(refuse, EXIT_USAGE)
    return _Action(
        database_url=database_url,
        as_json=as_json,
        selection=selection,
        dry_run=dry_run,
        reason=_reason(options.pop("reason"), dry_run),
        actor=options.pop("actor") or model.default_actor(),
    )


def action_command(name: str, short_help: str) -> Callable[[F], click.Command]:
    """An action command: by ids or the filters (or --all), with --dry-run, --reason, --actor."""

    def decorate(func: F) -> click.Command:
        for option in (action_options, filter_options):
            func = option(func)
        func = click.argument("ids", metavar="[ID]...", nargs=-1)(func)
        func = database_options(func)
        return click.command(name, epilog=EXIT_CODES, short_help=short_help)(func)

    return decorate


def _run_action(action: _Action, run: Callable[[sa.Engine], model.ActionResult]) -> None:
    with _engine(action.database_url) as engine:
        result = run(engine)
    _emit(result, action.as_json, render_action)


@action_command("retry", "Send failed or skipped rows again now (by id or filter; --dry-run).")
@click.option(
    "--status",
    metavar="STATUS",
    help="Which rows the filters select: failed (the default: as `outbox failed` lists them) or "
    "skipped (customers no partner referred: for one a person has since added at Partnero).",
)
def retry_command(**options: Any) -> None:
    """Send rows again, now: by id (failed, skipped or discarded rows), or the failed rows the
    filters select (as `outbox failed` lists them), or with --status skipped the skipped ones.

    The row goes back to pending, due at once, with its attempt count reset so every retry class
    has its full budget; a sale whose earlier create may have reached Partnero is still looked
    up first. The refunds skipped behind a retried sale (sale_skipped) go back to pending with
    it. Rows parked behind it are woken and running daemons are notified. Recorded in
    outbox.operator_actions with --reason and --actor.
    """
    act = _action(
        options,
        refuse="--state blocked: retry takes failed rows; the rows blocked behind them are "
        "woken with them",
    )
    _run_action(
        act,
        lambda engine: _ops().retry(
            engine, act.selection, dry_run=act.dry_run, actor=act.actor, reason=act.reason
        ),
    )


@click.option(
    "--refunds",
    metavar="WHAT",
    default="keep",
    show_default=True,
    help="What becomes of pending refunds queued behind a discarded sale: keep (they stay "
    "blocked, visibly), discard (discarded too), release (sent anyway; Partnero will most "
    "likely answer not_found).",
)
def _discard(refunds: str, **options: Any) -> None:
    """Give up on rows: by id (failed, or pending and not in flight), or the failed and blocked
    rows the filters select (as `outbox failed` lists them).

    A discarded row is never sent. Recorded in outbox.operator_actions with --reason and
    --actor, with every row's status before. Skipped rows are refused: they are settled and
    never sent already (`outbox prune` deletes them).
    """
    what = _parse("--refunds", _one_of(*model.RefundChoice), refunds)
    act = _action(options)
    _run_action(
        act,
        lambda engine: _ops().discard(
            engine,
            act.selection,
            refunds=what,
            dry_run=act.dry_run,
            actor=act.actor,
            reason=act.reason,
        ),
    )


discard_command = action_command(
    "discard", "Give up on rows (by id or filter; --refunds; --dry-run)."
)(_discard)


# ---- outbox prune ------------------------------------------------------------------------------


def render_prune(result: model.PruneResult, console: Console) -> None:
    pruned = result.pruned
    what = f"{plural(pruned.delivered, 'delivered row')}, {plural(pruned.skipped, 'skipped row')}"
    if result.include_discarded:
        what += f", {plural(pruned.discarded, 'discarded row')}"
    verb = "would prune" if result.dry_run else "pruned"
    console.print(
        f"{verb} {what} and {plural(pruned.attempts, 'attempt')} in "
        f"{plural(result.batches, 'batch')} of at most {result.batch_size} "
        f"(older than {format_duration(result.older_than_seconds)}: before "
        f"{_when(result.cutoff)} UTC)" + ("; nothing was changed" if result.dry_run else "")
    )
    if result.kept_open_key:
        console.print(
            f"kept {plural(result.kept_open_key, 'old row')} whose transaction key still has "
            "a pending or failed row"
        )


@click.command(
    "prune",
    epilog=EXIT_CODES,
    short_help="Delete old delivered and skipped rows and their attempts, in batches.",
)
@database_options
@click.option(
    "--older-than",
    metavar="DURATION",
    envvar="OUTBOX_PRUNE_OLDER_THAN",
    help="Delete rows delivered, skipped (or discarded) longer ago than this, e.g. 30d "
    "[required; env OUTBOX_PRUNE_OLDER_THAN].",
)
@click.option(
    "--include-discarded", is_flag=True, help="Delete discarded rows too (by when discarded)."
)
@click.option(
    "--batch-size", default="1000", metavar="N", show_default=True, help="Rows per transaction."
)
@click.option("--dry-run", is_flag=True, help="Count what would be deleted; delete nothing.")
@click.option(
    "--reason", metavar="TEXT", default="retention", show_default=True, help="For the record."
)
@click.option("--actor", metavar="NAME", help="Who is acting [default: $SUDO_USER or $USER@host].")
def prune_command(
    database_url: str | None,
    as_json: bool,
    older_than: str | None,
    include_discarded: bool,
    batch_size: str,
    dry_run: bool,
    reason: str,
    actor: str | None,
) -> None:
    """Delete delivered and skipped rows and their attempts older than --older-than, in short
    batches, the oldest first.

    Failed and pending rows are never deleted, nor any row whose transaction key still has a
    pending or failed row; discarded rows only with --include-discarded. Each batch is its own
    transaction, so the table is never locked for long. A run that deleted rows is recorded in
    outbox.operator_actions.
    """
    if older_than is None:
        fail("--older-than is required, e.g. --older-than 30d", EXIT_USAGE)
    age: timedelta = _parse("--older-than", model.parse_duration, older_than)
    size: int = _parse("--batch-size", model.parse_positive_int, batch_size)
    who = actor or model.default_actor()
    with _engine(database_url) as engine:
        result = _ops().prune(
            engine,
            age,
            include_discarded=include_discarded,
            batch_size=size,
            dry_run=dry_run,
            actor=who,
            reason=reason.strip() or "retention",
        )
    _emit(result, as_json, render_prune)
