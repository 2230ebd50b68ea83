"""`outbox reconcile`: compare the settled sales and refunds of a time range with what Partnero
holds for their keys, and name every drift (docs/operations.md, "Close the month: reconcile").

No click here (outbox/ops/reconcile_cli.py renders). Three steps, each a function:

1. `load_keys`: the sales and refunds of every key with a row recorded in the range (by
   created_at), read whole: a sale of the 30th refunded on the 2nd counts as reversed.
2. `ask_partnero`: for each key whose rows are all settled, every page of the documented list
   filter ``GET /v1/transactions?key=...`` (`PartneroClient.lookup`, read by
   `outbox.policy.list_page_matches` as the daemon's lookup reads it: only rows whose key is
   exactly ours count). At most `concurrency` calls at once, at most `rate_limit_per_second`;
   429, 5xx, 408 and transport errors are retried with the policy's backoff (and Retry-After),
   RECONCILE_ATTEMPTS times at most; anything else, or running out, is `PartneroUnavailable`.
3. `compare`: the findings, key by key (`classify`).

`requeue` puts the rows of `missing` and `not_reversed` findings back to pending with
lookup_required set, recorded as an operator action (kind retry) like `outbox retry`. Nothing
here ever changes anything at Partnero.
"""

from __future__ import annotations

import asyncio
import enum
import random
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any

import sqlalchemy as sa
from aiolimiter import AsyncLimiter

from outbox import policy
from outbox.db import queries
from outbox.domain import EventType, Exchange, Outcome, RetryPolicy, Status
from outbox.ops import commands
from outbox.ops.model import ActionKind, ActionResult, ChangeKind, JSONDict, TimeBound
from outbox.partnero import ApiKey, PartneroClient
from outbox.service.settings import Settings

SQL_FILE = "reconcile.sql"
STRATEGY = "key_filter"  # GET /v1/transactions?key=K, every page, for each key
RECONCILE_ATTEMPTS = 5  # calls per page at most (fewer when OUTBOX_MAX_ATTEMPTS is lower)
RECONCILE_MAX_DELAY_SECONDS = 60.0  # the longest wait between two of them
MAX_PAGES = 1000  # pages of one key's list at most (250 entries each)


class Finding(enum.StrEnum):
    """What one key's comparison found. The first five are drift (exit 1)."""

    MISSING = "missing"  # our sale is delivered; Partnero has no live transaction
    NOT_REVERSED = "not_reversed"  # our refund is delivered; Partnero's transaction is live
    DOUBLED = "doubled"  # more than one live transaction for the key
    AMOUNT_DIFFERS = "amount_differs"  # a live transaction's amount or currency is not ours
    PRESENT_BUT_SKIPPED = "present_but_skipped"  # skipped or discarded here, live there
    IN_FLIGHT = "in_flight"  # a row of the key is still pending: not compared
    UNSETTLED = "unsettled"  # a row of the key failed (see `outbox failed`): not compared


DRIFT: tuple[Finding, ...] = tuple(Finding)[:5]


class PartneroUnavailable(Exception):
    """Partnero could not be asked; str() is the one line to show (never the API key)."""


@dataclass(frozen=True, slots=True)
class OurRow:
    id: int
    event_type: EventType
    status: Status
    outcome: Outcome | None
    amount: Decimal | None
    currency: str | None
    created_at: datetime


@dataclass(frozen=True, slots=True)
class TheirTransaction:
    """A transaction of Partnero's whose key is exactly ours; amount None when not a number."""

    amount: Decimal | None
    currency: str | None
    created_at: str | None
    deleted_at: str | None

    @property
    def live(self) -> bool:
        return self.deleted_at is None


@dataclass(frozen=True, slots=True)
class KeyFinding:
    key: str
    finding: Finding
    detail: str
    rows: tuple[OurRow, ...]
    transactions: tuple[TheirTransaction, ...]


@dataclass(frozen=True, slots=True)
class Requeue:
    """--requeue-missing: the operator action (None when nothing was to requeue), and the
    missing keys left alone: Partnero holds deleted transactions for them, which the daemon's
    lookup counts as delivered, so requeuing would change nothing."""

    action: ActionResult | None
    left_alone: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ReconcileReport:
    """The documented `--json` shape (docs/operations.md), in this field order."""

    ok: bool
    range_from: datetime
    range_to: datetime
    keys_filter: tuple[str, ...]
    strategy: str
    keys: int  # keys with a sale or refund in the range
    compared: int  # of them, those asked at Partnero (all rows settled)
    calls: int  # HTTP calls made
    counts: dict[str, int]  # findings by class, every class named
    findings: tuple[KeyFinding, ...]
    requeue: Requeue | None


# ---- 1. our rows ------------------------------------------------------------------------------


def _q(name: str) -> sa.TextClause:
    return sa.text(queries.get(name, SQL_FILE))


def resolve_range(
    engine: sa.Engine, start: TimeBound, end: TimeBound | None
) -> tuple[datetime, datetime]:
    """[from, to) with the database's clock (`end` None: now)."""
    with engine.connect() as conn:
        now: datetime = conn.execute(_q("range_now")).scalar_one()
    return start.resolve(now), end.resolve(now) if end is not None else now


def load_keys(
    engine: sa.Engine, range_from: datetime, range_to: datetime, keys: Iterable[str] = ()
) -> dict[str, list[OurRow]]:
    """Every sale and refund of the keys with one recorded in the range, by key (in key
    order)."""
    params = {"range_from": range_from, "range_to": range_to, "keys": list(keys) or None}
    found: dict[str, list[OurRow]] = {}
    with engine.connect() as conn:
        for r in conn.execute(_q("key_rows"), params).mappings():
            outcome = None if r["outcome"] is None else Outcome(r["outcome"])
            found.setdefault(r["transaction_key"], []).append(
                OurRow(
                    id=r["id"],
                    event_type=EventType(r["event_type"]),
                    status=Status(r["status"]),
                    outcome=outcome,
                    amount=r["amount"],
                    currency=r["currency"],
                    created_at=r["created_at"],
                )
            )
    return found


def settled(rows: Iterable[OurRow]) -> bool:
    """Whether every row of a key is settled (so its key is asked at Partnero)."""
    return all(r.status not in (Status.PENDING, Status.FAILED) for r in rows)


# ---- 2. Partnero's transactions ---------------------------------------------------------------


class _Asker:
    """Reads keys' lists with bounded concurrency, a rate limit and bounded retries."""

    def __init__(self, client: PartneroClient, settings: Settings) -> None:
        self._client = client
        rate = settings.rate_limit_per_second
        # As the daemon's limiter: below one call a second the bucket holds one call.
        self._limiter = None
        if rate > 0:
            self._limiter = AsyncLimiter(1, 1.0 / rate) if rate < 1 else AsyncLimiter(rate, 1.0)
        self._attempts = max(1, min(RECONCILE_ATTEMPTS, settings.max_attempts))
        retry = settings.retry_policy()
        self._policy = RetryPolicy(
            max_attempts=self._attempts,
            base_delay_seconds=retry.base_delay_seconds,
            max_delay_seconds=min(retry.max_delay_seconds, RECONCILE_MAX_DELAY_SECONDS),
        )
        self.calls = 0

    async def transactions(self, key: str) -> list[TheirTransaction]:
        """Every transaction of Partnero's whose key is exactly `key`, deleted ones too."""
        found: list[TheirTransaction] = []
        page = 1
        while page <= MAX_PAGES:
            rows, next_page = await self._page(key, page)
            found += [_their(row) for row in rows]
            if next_page is None:
                return found
            if next_page != page + 1:
                raise PartneroUnavailable(
                    f"Partnero's list for key {key!r} names page {next_page} after page {page}"
                )
            page = next_page
        raise PartneroUnavailable(f"Partnero's list for key {key!r} has over {MAX_PAGES} pages")

    async def _page(self, key: str, page: int) -> tuple[list[dict[str, Any]], int | None]:
        for attempt in range(1, self._attempts + 1):
            if self._limiter is not None:
                await self._limiter.acquire()
            exchange = await self._client.lookup(key, page)
            self.calls += 1
            read = policy.list_page_matches(exchange, key)
            if read is not None:
                return read
            if not _retryable(exchange) or attempt == self._attempts:
                tries = f" ({attempt} attempts)" if attempt > 1 else ""
                raise PartneroUnavailable(
                    f"Partnero cannot be asked{tries}: {policy.describe(exchange)}"
                )
            await asyncio.sleep(self._delay(attempt, exchange))
        raise AssertionError("unreachable")  # pragma: no cover

    def _delay(self, attempt: int, exchange: Exchange) -> float:
        """The policy's backoff, or Partnero's Retry-After when longer (both capped)."""
        delay = policy.backoff_delay(attempt, self._policy, random.random())
        wait = exchange.retry_after_seconds
        if wait is not None and wait > delay:
            delay = min(wait, self._policy.max_delay_seconds)
        return delay


def _retryable(exchange: Exchange) -> bool:
    """A GET may always be asked again: after a transport error, a timeout, 429 or 5xx."""
    code = exchange.status_code
    if exchange.transport_error is not None:
        return True
    return code is not None and (code in (408, 429) or 500 <= code <= 599)


def _their(row: Mapping[str, Any]) -> TheirTransaction:
    amount = row.get("amount")
    number: Decimal | None = None
    if isinstance(amount, int | float | str) and not isinstance(amount, bool):
        try:
            number = Decimal(str(amount))
        except InvalidOperation:
            number = None
    units = row.get("amount_units")
    created, deleted = row.get("created_at"), row.get("deleted_at")
    return TheirTransaction(
        amount=number if number is not None and number.is_finite() else None,
        currency=units if isinstance(units, str) else None,
        created_at=created if isinstance(created, str) else None,
        deleted_at=None if deleted is None else str(deleted),
    )


async def ask_partnero(
    settings: Settings,
    keys: list[str],
    *,
    progress: Callable[[int, int], None] | None = None,
    client: PartneroClient | None = None,
) -> tuple[dict[str, list[TheirTransaction]], int]:
    """(each key's transactions, the calls made); raises PartneroUnavailable."""
    if client is None:
        client = PartneroClient(
            settings.partnero_api_url,
            ApiKey(settings.api_key),
            timeout_seconds=settings.request_timeout_seconds,
            max_connections=settings.concurrency,
            verify_tls=not settings.insecure_skip_tls_verify,
        )
    asker = _Asker(client, settings)
    found: dict[str, list[TheirTransaction]] = {}
    pending: Iterator[str] = iter(keys)

    async def worker() -> None:
        for key in pending:  # one iterator shared by the workers: each key is read once
            found[key] = await asker.transactions(key)
            if progress is not None:
                progress(len(found), len(keys))

    async with client:
        try:
            async with asyncio.TaskGroup() as group:
                for _ in range(min(settings.concurrency, max(1, len(keys)))):
                    group.create_task(worker())
        except* PartneroUnavailable as errors:
            raise errors.exceptions[0] from None
    return found, asker.calls


# ---- 3. the comparison -------------------------------------------------------------------------


def classify(
    key: str, rows: list[OurRow], theirs: list[TheirTransaction] | None
) -> list[KeyFinding]:
    """The findings of one key (none: the books match). `theirs` None: not asked (in flight or
    unsettled). A refund delivered as `deleted` or `not_found` means we hold the sale reversed;
    a sale delivered as `created` or `duplicate` that it is there."""

    def found(kind: Finding, detail: str) -> KeyFinding:
        return KeyFinding(key, kind, detail, tuple(rows), tuple(theirs or ()))

    if theirs is None:
        if any(r.status is Status.PENDING for r in rows):
            return [found(Finding.IN_FLIGHT, "a row is still pending: compared once settled")]
        return [found(Finding.UNSETTLED, "a row failed (see outbox failed): not compared")]
    live = [t for t in theirs if t.live]
    delivered = [r for r in rows if r.status is Status.DELIVERED]
    sales = [r for r in delivered if r.event_type is EventType.SALE]
    refunds = [r for r in delivered if r.event_type is EventType.REFUND]
    unsent = [
        r for r in rows if r.event_type is EventType.SALE and r.status is not Status.DELIVERED
    ]
    there = _summary(theirs)
    if refunds:
        return [found(Finding.NOT_REVERSED, f"refund delivered; Partnero: {there}")] if live else []
    if sales:
        if not live:
            return [found(Finding.MISSING, f"sale delivered; Partnero: {there}")]
        out = []
        if len(live) > 1:
            out.append(found(Finding.DOUBLED, f"Partnero: {there}"))
        ours = sales[-1]
        if any(_differs(ours, t) for t in live):
            mine = f"{ours.amount} {ours.currency or ''}".rstrip()
            out.append(found(Finding.AMOUNT_DIFFERS, f"ours {mine}; Partnero: {there}"))
        return out
    if unsent and live:
        return [found(Finding.PRESENT_BUT_SKIPPED, f"sale {unsent[-1].status}; Partnero: {there}")]
    return []


def _differs(ours: OurRow, theirs: TheirTransaction) -> bool:
    if theirs.amount is None or ours.amount is None or theirs.amount != ours.amount:
        return True
    return ours.currency is not None and theirs.currency != ours.currency


def _summary(theirs: list[TheirTransaction]) -> str:
    """`1 live (12.5 EUR), 1 deleted`, or `nothing`."""
    live = [t for t in theirs if t.live]
    if not theirs:
        return "nothing"
    amounts = ", ".join(f"{t.amount} {t.currency or ''}".rstrip() for t in live)
    parts = [f"{len(live)} live ({amounts})" if live else "0 live"]
    if len(theirs) > len(live):
        parts.append(f"{len(theirs) - len(live)} deleted")
    return ", ".join(parts)


def compare(
    ours: dict[str, list[OurRow]], theirs: Mapping[str, list[TheirTransaction]]
) -> tuple[list[KeyFinding], dict[str, int]]:
    """Every key's findings, in key order, and the counts by class (every class named)."""
    findings = [f for key, rows in ours.items() for f in classify(key, rows, theirs.get(key))]
    counts = {kind.value: 0 for kind in Finding}
    for f in findings:
        counts[f.finding.value] += 1
    return findings, counts


def reconcile(
    engine: sa.Engine,
    settings: Settings,
    bounds: tuple[datetime, datetime],
    keys: tuple[str, ...] = (),
    *,
    progress: Callable[[int, int], None] | None = None,
) -> ReconcileReport:
    """Steps 1 to 3; raises PartneroUnavailable (and the database's errors)."""
    ours = load_keys(engine, *bounds, keys)
    asked = [key for key, rows in ours.items() if settled(rows)]
    theirs, calls = asyncio.run(ask_partnero(settings, asked, progress=progress))
    findings, counts = compare(ours, theirs)
    return ReconcileReport(
        ok=not any(f.finding in DRIFT for f in findings),
        range_from=bounds[0],
        range_to=bounds[1],
        keys_filter=keys,
        strategy=STRATEGY,
        keys=len(ours),
        compared=len(asked),
        calls=calls,
        counts=counts,
        findings=tuple(findings),
        requeue=None,
    )


# ---- --requeue-missing -----------------------------------------------------------------------


def requeue_rows(findings: Iterable[KeyFinding]) -> tuple[list[int], list[str]]:
    """(the ids to requeue, the missing keys left alone): the delivered sales of `missing`
    keys at which Partnero holds nothing at all, the delivered refunds of `not_reversed` ones."""
    ids: list[int] = []
    left: list[str] = []
    for f in findings:
        wanted = {Finding.MISSING: EventType.SALE, Finding.NOT_REVERSED: EventType.REFUND}
        if f.finding not in wanted:
            continue
        if f.finding is Finding.MISSING and f.transactions:
            left.append(f.key)
            continue
        ids += [
            r.id
            for r in f.rows
            if r.event_type is wanted[f.finding] and r.status is Status.DELIVERED
        ]
    return sorted(ids), left


def requeue(
    engine: sa.Engine,
    report: ReconcileReport,
    *,
    dry_run: bool,
    actor: str,
    reason: str | None,
) -> ReconcileReport:
    """The report with what --requeue-missing did (or, on a dry run, would do)."""
    ids, left = requeue_rows(report.findings)
    selection: JSONDict = {
        "reconcile": {
            "from": report.range_from.isoformat(),
            "to": report.range_to.isoformat(),
            "keys": list(report.keys_filter),
            "findings": [Finding.MISSING.value, Finding.NOT_REVERSED.value],
        }
    }

    def body(conn: sa.Connection) -> ActionResult:
        # Under the locks, still delivered: a row requeued or changed meanwhile is left as is.
        locked = commands._locked(conn, "lock_events", {"ids": ids})
        rows = [r for r in locked if r.status is Status.DELIVERED]
        changes = [commands._change(r, ChangeKind.RETRY) for r in rows]
        if changes and not dry_run:
            conn.execute(_q("requeue"), {"ids": [c.event_id for c in changes]})
        # Records the action and notifies the daemons; its own retry statement then finds
        # nothing left to change (it takes failed, discarded and skipped rows only).
        return commands._commit(
            conn,
            ActionKind.RETRY,
            changes,
            selection=selection,
            dry_run=dry_run,
            actor=actor,
            reason=reason,
        )

    action = commands._run_action(engine, dry_run, body) if ids else None
    return replace(report, requeue=Requeue(action=action, left_alone=tuple(left)))
