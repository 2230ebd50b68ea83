"""The executor: deliver one claimed row and say what became of it.

A signup is `POST /v1/customers`, a sale `POST /v1/transactions`, a refund `DELETE
/v1/transactions`. A signup that names no partner, and a refund whose sale was skipped, are
settled `skipped` without any call (`policy.unsent_skip`).

For a sale whose earlier create may have reached Partnero (`lookup_required`) it looks the key up
first and creates only when Partnero does not have it (docs/design.md, "Delivery rules" 1).
Before every call it checks that the lease has more than the request timeout left, so a request
is never in flight once the lease has expired ("Delivery rules" 4). Every answer goes through the
pure policy (outbox.policy.decide); this module only carries the decision out. The result is a
Completion for the writer, never a database write.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Protocol

import structlog

from outbox import decisions, policy
from outbox.delivery.access import AccessCheck
from outbox.delivery.gate import Gate
from outbox.delivery.store import AttemptRecord, Claimed, Completion, RowState
from outbox.domain import Event, EventType, Exchange, Outcome, RequestKind, RetryPolicy, Status
from outbox.text import utcnow

log = structlog.get_logger("outbox.delivery")

# A request is started only while the lease has at least the request timeout plus this margin
# left: an expired lease then means the request is over.
LEASE_MARGIN_SECONDS = 1.0

# A lookup reads at most this many pages of the list filter (250 rows each) before it gives up
# for this attempt: a filter that matches substrings can return every key containing ours.
MAX_LOOKUP_PAGES = 200


class Client(Protocol):
    async def create_customer(self, event: Event) -> Exchange: ...
    async def create(self, event: Event) -> Exchange: ...
    async def delete(self, transaction_key: str) -> Exchange: ...
    async def lookup(self, transaction_key: str, page: int = 1) -> Exchange: ...
    async def ping(self) -> Exchange: ...


@dataclass(slots=True)
class _Progress:
    """What has happened to one row so far in this claim."""

    attempts: int
    lookup_required: bool
    records: list[AttemptRecord]
    create_started: bool = False
    last_status_code: int | None = None


class Executor:
    def __init__(
        self,
        client: Client,
        *,
        owner: str,
        retry_policy: RetryPolicy,
        request_timeout_seconds: float,
        gate: Gate,
        limiter: Callable[[], asyncio.Future[None] | None] | None = None,
        clock: Callable[[], datetime] | None = None,
        rand: Callable[[], float] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        observe: Callable[[Exchange], None] | None = None,
    ) -> None:
        self._client = client
        self._owner = owner
        self._policy = retry_policy
        self._timeout = request_timeout_seconds
        self._gate = gate
        self._limiter = limiter
        self._clock = clock or utcnow
        self._rand = rand or random.random
        self._monotonic = monotonic
        self._observe = observe
        self._progress: dict[int, _Progress] = {}
        self._access = AccessCheck(client, self._clock, observe)

    async def process(self, claimed: Claimed, lease_deadline: float) -> Completion:
        """Deliver one row; `lease_deadline` is the monotonic time the lease runs out (locally
        reckoned from before the claim was sent, so never later than the database's)."""
        event = claimed.event
        progress = _Progress(event.attempts, event.lookup_required, [])
        self._progress[event.id] = progress
        # If this raises (cancelled at shutdown, or a bug), the progress stays for cut_short(),
        # which must know whether a create had started.
        completion = await self._process(claimed, progress, lease_deadline)
        self._progress.pop(event.id, None)
        return completion

    def cut_short(self, claimed: Claimed) -> Completion:
        """The completion for a row whose processing was cancelled (shutdown): give the row back.
        A sale whose create had started may have reached Partnero: look it up next time."""
        event = claimed.event
        progress = self._progress.pop(event.id, None) or _Progress(
            event.attempts, event.lookup_required, []
        )
        return self._release(claimed, progress, "shutdown")

    # ---- the steps ----------------------------------------------------------------------------

    async def _process(self, claimed: Claimed, progress: _Progress, deadline: float) -> Completion:
        event = claimed.event
        if claimed.known_duplicate:
            return self._finish(claimed, progress, None, KNOWN_DUPLICATE)
        unsent = policy.unsent_skip(event, sale_skipped=claimed.sale_skipped)
        if unsent is not None:
            return self._finish(claimed, progress, None, unsent)
        if event.event_type is EventType.SALE and progress.lookup_required:
            looked_up = await self._look_up(claimed, progress, deadline)
            if isinstance(looked_up, Completion):
                return looked_up
            found, answer = looked_up
            if found:
                return self._finish(claimed, progress, answer, decisions.Delivered(Outcome.CREATED))
            progress.lookup_required = False  # Partnero does not have it: create it now
            after_lookup = True
        else:
            after_lookup = False
        kind = _REQUEST_KIND[event.event_type]
        exchange = await self._call(claimed, progress, kind, deadline)
        if exchange is None:
            return self._release(claimed, progress, self._gate.unsent_reason)
        # A lookup and the create it allowed are one attempt: OUTBOX_MAX_ATTEMPTS bounds them
        # together, and "gave up after N attempts" never says more than the limit.
        decision = await self._decide(event, progress, exchange, counted=not after_lookup)
        return self._finish(claimed, progress, exchange, decision)

    async def _look_up(
        self, claimed: Claimed, progress: _Progress, deadline: float
    ) -> tuple[bool, Exchange] | Completion:
        """Read the list filter page by page until it says found or absent (with the page that
        said so), or the completion that ends this claim (retry, failed, paused, released).

        The pages of one lookup are one attempt. A lookup that cannot finish (the lease runs
        short between pages, `links.next` does not point to the next page, more than
        MAX_LOOKUP_PAGES pages) is an unsettled attempt: retried with backoff, and failed when
        the attempts run out, so it can neither loop nor be read as "absent"."""
        page, last = 1, None
        while True:
            exchange = await self._call(claimed, progress, RequestKind.LOOKUP, deadline, page)
            if exchange is None:
                if last is None or self._gate.paused:
                    return self._release(claimed, progress, self._gate.unsent_reason)
                why = f"the lookup read {page - 1} pages and the lease ran short before the rest"
                exchange = last
            else:
                decision = await self._decide(claimed.event, progress, exchange, counted=page == 1)
                if isinstance(decision, decisions.LookupResult):
                    return decision.found, exchange
                if not isinstance(decision, decisions.LookupNextPage):
                    return self._finish(claimed, progress, exchange, decision)
                unsettled = _unsettled_why(page, decision.page)
                if unsettled is None:
                    page, last = decision.page, exchange
                    continue
                why = unsettled
            # The first page already counted this attempt: the policy sees it as the current one.
            current = replace(claimed.event, attempts=progress.attempts - 1, lookup_required=True)
            settled = policy.lookup_unsettled(
                current, exchange, self._clock(), self._policy, self._rand(), why
            )
            return self._finish(claimed, progress, exchange, settled)

    async def _call(
        self,
        claimed: Claimed,
        progress: _Progress,
        kind: RequestKind,
        deadline: float,
        page: int = 1,
    ) -> Exchange | None:
        """Make one call, or None when the row must be given back unsent (paused, or too
        little lease left)."""
        if not await self._may_send(deadline):
            return None
        key = claimed.event.transaction_key or ""
        if kind is RequestKind.CREATE:
            progress.create_started = True
            exchange = await self._client.create(claimed.event)
        elif kind is RequestKind.CREATE_CUSTOMER:
            exchange = await self._client.create_customer(claimed.event)
        elif kind is RequestKind.DELETE:
            exchange = await self._client.delete(key)
        else:
            exchange = await self._client.lookup(key, page)
        if self._observe is not None:
            self._observe(exchange)
        return exchange

    async def _may_send(self, deadline: float) -> bool:
        """Wait out a 429 cool-down and the rate limit; then True unless sending is paused or
        the lease has too little left for a whole request."""
        if self._gate.paused:
            return False
        await self._gate.wait_for_cooldown()
        waiting = self._limiter() if self._limiter is not None else None
        if waiting is not None:
            await waiting
        left = deadline - self._monotonic()
        return not self._gate.paused and left >= self._timeout + LEASE_MARGIN_SECONDS

    def reconfigure(
        self,
        *,
        retry_policy: RetryPolicy,
        limiter: Callable[[], asyncio.Future[None] | None] | None,
    ) -> None:
        """Settings a SIGHUP reload can change while rows are in flight."""
        self._policy = retry_policy
        self._limiter = limiter

    async def _decide(
        self, event: Event, progress: _Progress, exchange: Exchange, *, counted: bool = True
    ) -> decisions.Decision:
        """The policy's decision on one exchange, recorded. `counted`: the exchange starts a new
        attempt (False: a further page of a lookup, part of the attempt its first page began)."""
        now = self._clock()
        attempts = progress.attempts if counted else progress.attempts - 1
        current = replace(event, attempts=attempts, lookup_required=progress.lookup_required)
        decision = policy.decide(current, exchange, now, self._policy, self._rand())
        self._record(event, attempts + 1, exchange, decision, progress)
        if counted and not isinstance(decision, decisions.Pause | decisions.Forbidden):
            progress.attempts += 1
        if exchange.status_code is not None:
            progress.last_status_code = exchange.status_code
        cool_down = policy.cooldown_until(exchange, now, self._policy, self._rand())
        if cool_down is not None:
            self._gate.cool_down(cool_down)
        if isinstance(decision, decisions.Forbidden):
            decision = await self._check_access(event, progress, exchange, decision, attempts + 1)
            if counted and isinstance(decision, decisions.Failed):
                progress.attempts += 1
        return decision

    async def _check_access(
        self,
        event: Event,
        progress: _Progress,
        exchange: Exchange,
        forbidden: decisions.Forbidden,
        attempt: int,
    ) -> decisions.Failed | decisions.Pause:
        """A 403 on this row: ask `GET /v1/test` whether the key still works. If it does, the
        row alone is refused (failed); if not, the daemon pauses."""
        verdict, ping = await self._access.check(exchange.finished_at or self._clock())
        decision = policy.after_access_check(forbidden, verdict, self._clock(), self._policy)
        if ping is not None:
            self._record(event, attempt, ping, decision, progress)
        return decision

    def _record(
        self,
        event: Event,
        attempt: int,
        exchange: Exchange,
        decision: decisions.Decision,
        progress: _Progress,
    ) -> None:
        label = decisions.label_of(decision)
        record = AttemptRecord(event.id, attempt, exchange, label, self._owner, self._clock())
        progress.records.append(record)
        if isinstance(decision, decisions.LookupResult):
            _log_lookup(event, attempt, exchange, decision.found)

    def _finish(
        self,
        claimed: Claimed,
        progress: _Progress,
        exchange: Exchange | None,
        decision: decisions.Decision | _KnownDuplicate,
    ) -> Completion:
        """Carry the decision out: one log line and the completion for the writer."""
        event = claimed.event
        now = self._clock()
        end = _ending(decision, exchange, progress.lookup_required, now)
        if isinstance(decision, decisions.Pause):
            self._gate.pause(decision.until, decision.detail, refused=decision.refused)
        getattr(log, end.level)(
            end.event,
            **_row_fields(event),
            attempt=progress.attempts,
            status_code=None if exchange is None else exchange.status_code,
            duration_ms=0.0 if exchange is None else _duration_ms(exchange),
            **end.fields,
        )
        return _completion(claimed, progress, end.state)

    def _release(self, claimed: Claimed, progress: _Progress, reason: str) -> Completion:
        """Give the row back, due now. A sale whose create had started may have reached
        Partnero: look it up next time."""
        event = claimed.event
        lookup = progress.lookup_required or progress.create_started
        log.info(
            "outbox.delivery.released",
            **_row_fields(event),
            reason=reason,
            lookup_required=lookup,
        )
        state = RowState(Status.PENDING, None, None, self._clock(), lookup, None)
        return _completion(claimed, progress, state)


_REQUEST_KIND = {
    EventType.SIGNUP: RequestKind.CREATE_CUSTOMER,
    EventType.SALE: RequestKind.CREATE,
    EventType.REFUND: RequestKind.DELETE,
}


def _unsettled_why(page: int, next_page: int) -> str | None:
    """Why a lookup cannot go on from `page` to `next_page` (None: it can)."""
    if next_page != page + 1:
        return f"the lookup's page {page} pointed to page {next_page}"
    if next_page > MAX_LOOKUP_PAGES:
        return f"the lookup did not settle within {MAX_LOOKUP_PAGES} pages"
    return None


def _log_lookup(event: Event, attempt: int, exchange: Exchange, found: bool) -> None:
    log.info(
        "outbox.delivery.lookup",
        **_row_fields(event),
        attempt=attempt,
        status_code=exchange.status_code,
        found=found,
        duration_ms=_duration_ms(exchange),
    )


def _row_fields(event: Event) -> dict[str, Any]:
    """The fields every delivery log line carries about its row."""
    if event.event_type is EventType.SIGNUP:
        return {"event_id": event.id, "customer": event.customer_key, "type": "signup"}
    return {"event_id": event.id, "key": event.transaction_key, "type": event.event_type.value}


def _completion(claimed: Claimed, progress: _Progress, state: RowState) -> Completion:
    return Completion(
        event_id=claimed.event.id,
        token=claimed.token,
        state=state,
        attempts=progress.attempts,
        last_status_code=progress.last_status_code,
        attempt_records=tuple(progress.records),
    )


@dataclass(frozen=True, slots=True)
class _KnownDuplicate:
    """A second sale row of a key whose earlier sale was delivered: `duplicate`, no call."""


KNOWN_DUPLICATE = _KnownDuplicate()
_DUPLICATE_NOTE = "an earlier sale with this key was already delivered; not sent again"


@dataclass(frozen=True, slots=True)
class _Ending:
    """How a decision ends this claim: the row's new state and the log line that says so."""

    state: RowState
    level: str
    event: str
    fields: dict[str, Any]


def _ending(
    decision: decisions.Decision | _KnownDuplicate,
    exchange: Exchange | None,
    lookup_required: bool,
    now: datetime,
) -> _Ending:
    """The row's new state after `decision` (pure). `lookup_required`: the row's flag so far."""
    if isinstance(decision, _KnownDuplicate):
        return _delivered(Outcome.DUPLICATE, now, _DUPLICATE_NOTE)
    if isinstance(decision, decisions.Delivered):
        return _delivered(decision.outcome, now, None)
    if isinstance(decision, decisions.Skipped):
        return _skipped(decision, now)
    if isinstance(decision, decisions.Retry):
        assert exchange is not None
        return _retried(decision, exchange)
    if isinstance(decision, decisions.Failed):
        return _failed(decision, lookup_required, now)
    if isinstance(decision, decisions.Pause):
        return _paused(decision, lookup_required, now)
    # Lookup results are handled in _look_up and a Forbidden in _decide; reaching here would
    # be a bug in this module.
    raise AssertionError(f"unexpected decision {decision!r}")


def _delivered(outcome: Outcome, now: datetime, note: str | None) -> _Ending:
    fields: dict[str, Any] = {"outcome": outcome.value}
    if note is not None:
        fields["note"] = note
    return _Ending(
        RowState(Status.DELIVERED, outcome, None, now, False, note),
        "info",
        "outbox.delivery.delivered",
        fields,
    )


def _skipped(decision: decisions.Skipped, now: datetime) -> _Ending:
    fields = {"outcome": decision.outcome.value, "note": decision.detail}
    return _Ending(
        RowState(Status.SKIPPED, decision.outcome, None, now, False, decision.detail),
        "info",
        "outbox.delivery.skipped",
        fields,
    )


def _retried(decision: decisions.Retry, exchange: Exchange) -> _Ending:
    why = policy.describe(exchange)
    if decision.note is not None:
        why = f"{decision.note}: {why}"
    detail = f"{decision.reason.value}: {why}"
    fields = {
        "outcome": decision.reason.value,
        "retry_at": decision.at.isoformat(),
        "lookup_required": decision.lookup_required,
        "error": detail,
    }
    return _Ending(
        RowState(
            Status.PENDING, None, decision.reason, decision.at, decision.lookup_required, detail
        ),
        "warning",
        "outbox.delivery.retry",
        fields,
    )


def _failed(decision: decisions.Failed, lookup_required: bool, now: datetime) -> _Ending:
    fields = {"outcome": decision.reason.value, "error": decision.detail}
    lookup = lookup_required or decision.lookup_required
    return _Ending(
        RowState(Status.FAILED, decision.reason, decision.reason, now, lookup, decision.detail),
        "error",
        "outbox.delivery.failed",
        fields,
    )


def _paused(decision: decisions.Pause, lookup_required: bool, now: datetime) -> _Ending:
    # Due again at once: this daemon's gate holds all sending while it is paused, and the row
    # must go as soon as a new key works, not when the pause would have ended.
    fields = {"until": decision.until.isoformat(), "error": decision.detail}
    return _Ending(
        RowState(
            Status.PENDING,
            None,
            None,
            now,
            lookup_required or decision.lookup_required,
            decision.detail,
        ),
        "error",
        "outbox.delivery.paused",
        fields,
    )


def _duration_ms(exchange: Exchange) -> float | None:
    if exchange.started_at is None or exchange.finished_at is None:
        return None
    return round((exchange.finished_at - exchange.started_at).total_seconds() * 1000, 2)
