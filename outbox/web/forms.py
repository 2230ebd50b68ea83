"""The filters, ids and choices of the pages' query strings and forms, read into the operator
surface's own types (outbox.ops.model) with its own parsers, so a filter means on the page what
it means to `outbox failed`. A bad value is a FormError: one line, shown with a 400."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import urlencode

from outbox.domain import EventType, Outcome, Status
from outbox.ops import model

# The query parameters of /rows (and /api/rows, and the action forms by filter).
FILTER_FIELDS = ("status", "outcome", "http_status", "since", "until", "key", "customer", "type")
STATUS_CHOICES = ("failed", "blocked", "skipped")
PER_PAGE = 50
MAX_PER_PAGE = 500

T = TypeVar("T")


class FormError(ValueError):
    """A value the page cannot use, said in one line."""


def _given(form: Mapping[str, str], name: str) -> str | None:
    value = form.get(name)
    return value.strip() if value is not None and value.strip() else None


def _one_of(name: str, value: str | None, choices: tuple[str, ...]) -> str | None:
    if value is not None and value not in choices:
        raise FormError(f"{name}: {value!r} is not one of {', '.join(choices)}")
    return value


def _parsed(name: str, value: str | None, parse: Callable[[str], T]) -> T | None:
    if value is None:
        return None
    try:
        return parse(value)
    except ValueError as exc:
        raise FormError(f"{name}: {exc}") from None


def filters(form: Mapping[str, str]) -> model.Filters:
    """`status` is failed or blocked (`outbox failed --state`) or skipped (`outbox retry --status
    skipped`); the other fields are `outbox failed`'s filters."""
    status = _one_of("status", _given(form, "status"), STATUS_CHOICES)
    skipped = status == "skipped"
    outcomes = model.SKIPPED_ROW_OUTCOMES if skipped else model.FAILED_OUTCOMES
    outcome = _one_of("outcome", _given(form, "outcome"), tuple(o.value for o in outcomes))
    event_type = _one_of("type", _given(form, "type"), tuple(t.value for t in EventType))
    since = _parsed("since", _given(form, "since"), model.parse_time_bound)
    until = _parsed("until", _given(form, "until"), model.parse_time_bound)
    code = _parsed("http_status", _given(form, "http_status"), model.parse_status_code)
    return model.Filters(
        state=model.ProblemState(status) if status and not skipped else None,
        outcome=Outcome(outcome) if outcome else None,
        status_code=code,
        since=since,
        until=until,
        key=_given(form, "key"),
        customer=_given(form, "customer"),
        event_type=EventType(event_type) if event_type else None,
        status=Status.SKIPPED if skipped else None,
    )


def filter_query(form: Mapping[str, str], **extra: object) -> str:
    """The filter fields given (and `extra`), URL-encoded: for links to another page of them."""
    pairs = [(n, form[n]) for n in FILTER_FIELDS if _given(form, n) is not None]
    pairs += [(n, str(v)) for n, v in extra.items() if v is not None]
    return urlencode(pairs)


def positive(form: Mapping[str, str], name: str, default: int, maximum: int | None = None) -> int:
    value = _parsed(name, _given(form, name), model.parse_positive_int)
    if value is None:
        return default
    return min(value, maximum) if maximum else value


def event_id(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise FormError(f"{text!r} is not an event id")
    return int(text)


def ids(values: list[str]) -> tuple[int, ...]:
    """Event ids from `ids` fields (repeated, or one field of ids separated by spaces or
    commas)."""
    try:
        return tuple(model.parse_ids(" ".join(values)))
    except ValueError as exc:
        raise FormError(f"ids: {exc}") from None


@dataclass(frozen=True, slots=True)
class Confirmed:
    """A confirmed action's form: the ids previewed, the reason, the refunds choice."""

    ids: tuple[int, ...]
    reason: str
    refunds: model.RefundChoice


def refund_choice(form: Mapping[str, str]) -> model.RefundChoice:
    value = _given(form, "refunds") or "keep"
    _one_of("refunds", value, tuple(c.value for c in model.RefundChoice))
    return model.RefundChoice(value)


def confirmed(form: Mapping[str, str], id_values: list[str]) -> Confirmed:
    chosen = ids(id_values)
    if not chosen:
        raise FormError("ids: say which rows (preview them first)")
    reason = _given(form, "reason")
    if reason is None:
        raise FormError("reason: say why (it is recorded with the action)")
    return Confirmed(chosen, reason, refund_choice(form))
