"""How the pages say things: the CLI's own sentences and `name value` lines (outbox/ops/cli.py:
the status lines, an event's status, why a row was skipped, what it waits for, how to unblock
it), so a page and `outbox show` tell the same story; and the links the templates build, with
every key URL-encoded as a query parameter (keys may hold `/`, `?`, `#`, spaces)."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from outbox.domain import Outcome, Status
from outbox.ops import cli as ops_cli
from outbox.ops import model
from outbox.text import format_duration, one_line, plural

# A time as the CLI prints it (UTC), an age ("3m ago"), a status with its outcome
# ("failed: rejected"): the CLI's own helpers, so a page and `outbox show` write them alike.
when = ops_cli._when
ago = ops_cli._ago
state = ops_cli._state


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


# What a failed row's reason class means, for people who do not read HTTP (docs/operations.md,
# "Reading the output"); the page shows it above `outbox show`'s own lines.
FAILED_MEANS = {
    Outcome.VALIDATION_ERROR: "Partnero refused the row's data (HTTP 422): sent again as it is, "
    "it fails again. Correct the data at the source, then retry it, or discard it.",
    Outcome.REJECTED: "Partnero refused the row (HTTP 400) for a reason sending it again cannot "
    "fix: its answer below says which. Fix the cause, then retry it, or discard it.",
    Outcome.FORBIDDEN: "Partnero denied this action for this transaction or account (HTTP 403), "
    "while the API key works. Ask Partnero why, then retry it, or discard it.",
    Outcome.NETWORK_ERROR: "Partnero could not be reached on any attempt until the attempts ran "
    "out. Retry it once Partnero can be reached.",
    Outcome.TIMEOUT: "Partnero did not answer in time on any attempt until the attempts ran out. "
    "Retrying is safe: a sale that may have reached Partnero is looked up before it is created "
    "again.",
    Outcome.SERVER_ERROR: "Partnero answered with server errors (5xx) until the attempts ran out. "
    "Retry it once Partnero works again.",
    Outcome.RATE_LIMITED: "Partnero kept answering 'too many requests' (429) until the attempts "
    "ran out. Retry it later.",
    Outcome.BAD_RESPONSE: "The answers were not Partnero's own (a proxy's page, an unexpected "
    "body) until the attempts ran out. Check the Partnero API address and Partnero's status, "
    "then retry it.",
    Outcome.CUSTOMER_NOT_FOUND: "Partnero did not know the customer (a row that failed before "
    "the outbox learned to skip such sales). Retry it if the customer now exists at Partnero, "
    "or discard it.",
}


def means(event: model.EventDetail) -> str | None:
    """A failed row's reason in plain words (None for any other row)."""
    if event.status is not Status.FAILED or event.outcome is None:
        return None
    return FAILED_MEANS.get(event.outcome)


def status_pairs(report: model.StatusReport | model.AttentionReport) -> list[tuple[str, str]]:
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


def counts_by_status(report: model.AttentionReport) -> dict[str, int]:
    return {
        "failed": report.total(Status.FAILED),
        "blocked": report.pending.blocked,
        "skipped": report.total(Status.SKIPPED),
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
    "means": means,
    "status_pairs": status_pairs,
    "counts_by_status": counts_by_status,
    "Status": Status,
}
