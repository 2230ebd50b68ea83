"""How the pages say things: the CLI's own sentences and `name value` lines (outbox/ops/cli.py:
the status lines, an event's status, why a row was skipped, what it waits for, how to unblock
it), so a page and `outbox show` tell the same story; and the links the templates build, with
every key URL-encoded as a query parameter (keys may hold `/`, `?`, `#`, spaces)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

from outbox.domain import Outcome, Status
from outbox.ops import cli as ops_cli
from outbox.ops import model
from outbox.text import format_duration, one_line, plural


def when(value: datetime | None) -> str:
    return "-" if value is None else value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def ago(seconds: float | None) -> str:
    return "-" if seconds is None else f"{format_duration(seconds)} ago"


def state(status: Status | str, outcome: Outcome | str | None) -> str:
    return f"{status}: {outcome}" if outcome else str(status)


def key_url(key: str) -> str:
    return "/key?" + urlencode({"key": key})


def customer_url(customer: str) -> str:
    return "/customer?" + urlencode({"customer": customer})


def rows_url(**query: Any) -> str:
    given = {k: v for k, v in query.items() if v is not None}
    return "/rows" + ("?" + urlencode(given) if given else "")


def event_pairs(event: model.EventDetail) -> list[tuple[str, str]]:
    """`outbox show`'s lines for one event (status, why, waits for, to unblock...)."""
    return ops_cli._event_pairs(event, full_payload=False)


def status_pairs(report: model.StatusReport) -> list[tuple[str, str]]:
    """`outbox status`'s lines under the table (pending, last delivery, leases, last call)."""
    return ops_cli._status_pairs(report)


def problem(row: model.Problem) -> str:
    """`outbox failed`'s problem column."""
    return ops_cli._problem_cell(row)


def reason(row: model.Problem) -> str:
    """`outbox failed`'s reason column."""
    return ops_cli._reason_cell(row)


def answer(attempt: model.Attempt) -> str:
    return one_line(attempt.error or attempt.response_excerpt or "") or "-"


def previous(entry: model.ActionEntry) -> str:
    return (
        f"was {state(entry.previous_status, entry.previous_outcome)} after "
        f"{plural(entry.previous_attempts, 'attempt')}"
    )


def event_name(event: model.EventDetail) -> str:
    """A signup is named by its customer: it has no transaction key."""
    return (event.customer_key if event.transaction_key is None else event.transaction_key) or ""


def counts_by_status(report: model.StatusReport) -> dict[str, int]:
    return {
        "failed": report.totals.failed,
        "blocked": report.pending.blocked,
        "skipped": report.totals.skipped,
    }


FILTERS = {
    "when": when,
    "ago": ago,
    "duration": format_duration,
    "key_url": key_url,
    "customer_url": customer_url,
    "problem": problem,
    "reason": reason,
    "answer": answer,
    "previous": previous,
    "event_name": event_name,
    "plural": plural,
}
GLOBALS = {
    "state": state,
    "rows_url": rows_url,
    "event_pairs": event_pairs,
    "status_pairs": status_pairs,
    "counts_by_status": counts_by_status,
    "Status": Status,
}
