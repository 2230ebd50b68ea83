"""What the policy can decide about one HTTP exchange, and the label each decision is stored
under in outbox.attempts.decision.

Pure data, like outbox.domain: no I/O library (import-linter checks it).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime

from outbox.domain import Outcome


@dataclass(frozen=True, slots=True)
class Delivered:
    outcome: Outcome


@dataclass(frozen=True, slots=True)
class Skipped:
    """Settled with nothing (more) to send, by rule: a customer no partner referred."""

    outcome: Outcome  # one of SKIPPED_OUTCOMES
    detail: str


@dataclass(frozen=True, slots=True)
class Retry:
    at: datetime
    reason: Outcome  # the reason class; becomes the failed outcome when attempts run out
    lookup_required: bool = False  # the call may have reached Partnero
    note: str | None = None  # why, when the answer alone does not say (an unsettled lookup)


@dataclass(frozen=True, slots=True)
class Failed:
    reason: Outcome
    detail: str
    lookup_required: bool = False  # a create whose effect is unknown: look it up on a retry


@dataclass(frozen=True, slots=True)
class Pause:
    """401 (or a 403 while GET /v1/test fails too): the daemon's problem, not the row's. Stop
    sending; the row stays pending."""

    until: datetime
    detail: str
    refused: bool = True  # Partnero refused the key; False: GET /v1/test got no answer at all
    lookup_required: bool = False  # the call that led here was a create with an unknown effect


@dataclass(frozen=True, slots=True)
class Forbidden:
    """403 on a row: the row's problem if the API key still works (GET /v1/test answers 2xx),
    the daemon's if it does not. Settled by `outbox.policy.after_access_check`."""

    detail: str
    lookup_required: bool = False  # a create: its effect is not Partnero's documented answer


@dataclass(frozen=True, slots=True)
class LookupResult:
    """A lookup answered definitively: the transaction is there (found) or it is not."""

    found: bool


@dataclass(frozen=True, slots=True)
class LookupNextPage:
    """This page of the list filter did not hold the key, and Partnero says there is another."""

    page: int


Decision = Delivered | Skipped | Retry | Failed | Pause | Forbidden | LookupResult | LookupNextPage


class DecisionKind(enum.StrEnum):
    """The first part of a decision's label, as outbox.attempts.decision stores it: `kind:detail`
    (`delivered:created`, `retry:timeout+lookup`, `lookup:next_page:2`, `pause:auth`...; the
    labels are listed in docs/operations.md)."""

    DELIVERED = "delivered"
    SKIPPED = "skipped"
    RETRY = "retry"
    FAILED = "failed"
    LOOKUP = "lookup"
    FORBIDDEN = "forbidden"
    PAUSE = "pause"


_LABEL_SEPARATOR = ":"


def decision_label(kind: DecisionKind, detail: str) -> str:
    """The text stored for a decision: `decision_label(DecisionKind.PAUSE, "auth")` is
    `pause:auth`."""
    return f"{kind.value}{_LABEL_SEPARATOR}{detail}"


def label_of(decision: Decision) -> str:
    """The label the executor stores for a decision in outbox.attempts.decision."""
    if isinstance(decision, Delivered):
        return decision_label(DecisionKind.DELIVERED, decision.outcome.value)
    if isinstance(decision, Skipped):
        return decision_label(DecisionKind.SKIPPED, decision.outcome.value)
    if isinstance(decision, Retry):
        suffix = "+lookup" if decision.lookup_required else ""
        return decision_label(DecisionKind.RETRY, f"{decision.reason.value}{suffix}")
    if isinstance(decision, Failed):
        return decision_label(DecisionKind.FAILED, decision.reason.value)
    if isinstance(decision, Pause):
        return decision_label(DecisionKind.PAUSE, "auth")
    if isinstance(decision, Forbidden):
        return decision_label(DecisionKind.FORBIDDEN, "check_key")
    if isinstance(decision, LookupNextPage):
        return decision_label(DecisionKind.LOOKUP, f"next_page:{decision.page}")
    return decision_label(DecisionKind.LOOKUP, "found" if decision.found else "absent")


@dataclass(frozen=True, slots=True)
class DecisionLabel:
    """A stored decision label, read: its kind and the rest of the text."""

    kind: DecisionKind
    detail: str


def parse_decision_label(text: str) -> DecisionLabel | None:
    """The kind and detail of a stored label; None for text that is not `kind:detail` with a
    kind this vocabulary knows (a label written by another version stays readable as text)."""
    kind, separator, detail = text.partition(_LABEL_SEPARATOR)
    try:
        return DecisionLabel(DecisionKind(kind), detail) if separator else None
    except ValueError:
        return None
