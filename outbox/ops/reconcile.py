"""`outbox reconcile`: compare the settled sales and refunds of a time range with what Partnero
holds for their keys, and name every drift (docs/operations.md, "Close the month: reconcile").

No click here (outbox/ops/reconcile_cli.py renders). Three steps, each a function:

1. `load_keys`: the sales and refunds of every key with a row recorded in the range (by
   created_at), read whole: a sale of the 30th refunded on the 2nd counts as reversed.
2. `ask_partnero`: the transactions of each key whose rows are all settled, by one of two
   strategies. key_filter: every page of the documented list filter ``GET
   /v1/transactions?key=...`` for each key (`PartneroClient.lookup`, read by
   `outbox.policy.list_page_matches` as the daemon's lookup reads it: only rows whose key is
   exactly ours count). listing: every page of ``GET /v1/transactions?limit=250&page=N``, the
   whole ledger (`PartneroClient.list_page`, read by `outbox.policy.listing_page`), grouped by
   exact key. --strategy auto asks page 1 of the listing, then takes the one of fewer calls
   (meta.last_page pages against one call per key). At most `concurrency` calls at once, at
   most `rate_limit_per_second`; 429, 5xx, 408 and transport errors are retried with the
   policy's backoff (and Retry-After), RECONCILE_ATTEMPTS times at most; anything else, or
   running out, is `PartneroUnavailable`.
3. `compare`: the findings, key by key (`classify`, the same for both strategies); with the
   listing, also `unknown_here` (`strangers_in_range`, then `rows_here`).

`requeue` puts the rows of `missing` and `not_reversed` findings back to pending with
lookup_required set, recorded as an operator action (kind retry) like `outbox retry`. Nothing
here ever changes anything at Partnero.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import random
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any, TypeVar

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
LISTING_PAGE_SIZE = 250
LISTING_MAX_PAGES = 40_000  # 10 million entries
RECONCILE_ATTEMPTS = 5  # calls per page at most (fewer when OUTBOX_MAX_ATTEMPTS is lower)
RECONCILE_MAX_DELAY_SECONDS = 60.0  # the longest wait between two of them
MAX_PAGES = 1000  # pages of one key's list at most (250 entries each)


class Finding(enum.StrEnum):
    """What one key's comparison found. The first six are drift (exit 1)."""

    MISSING = "missing"  # our sale is delivered; Partnero has no live transaction
    NOT_REVERSED = "not_reversed"  # our refund is delivered; Partnero's transaction is live
    DOUBLED = "doubled"  # more than one live transaction for the key
    AMOUNT_DIFFERS = "amount_differs"  # a live transaction's amount or currency is not ours
    PRESENT_BUT_SKIPPED = "present_but_skipped"  # skipped or discarded here, live there
    UNKNOWN_HERE = "unknown_here"  # listing only: live there, created in range, no row here
    IN_FLIGHT = "in_flight"  # a row of the key is still pending: not compared
    UNSETTLED = "unsettled"  # a row of the key failed (see `outbox failed`): not compared


DRIFT: tuple[Finding, ...] = tuple(Finding)[:6]
_T = TypeVar("_T")
Progress = Callable[[int, int, str], None]  # (done, total, of what)
ListingPage = tuple[list[tuple[str, dict[str, Any]]], int | None, int | None]


class Strategy(enum.StrEnum):
    """How Partnero was asked (`--strategy auto` picks one of these)."""

    KEY_FILTER = "key_filter"  # GET /v1/transactions?key=K, every page, for each key
    LISTING = "listing"  # GET /v1/transactions?limit=250&page=N, the whole ledger


@dataclass(frozen=True, slots=True)
class Estimate:
    """The calls each strategy takes: one per key (and page) by key filter; the listing's
    pages, None when the listing was not asked."""

    key_filter: int
    listing: int | None


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


@dataclass(frozen=True, slots=True, kw_only=True)
class Requeue:
    """--requeue-missing: the operator action (None when nothing was to requeue), and the
    missing keys left alone: Partnero holds deleted transactions for them, which the daemon's
    lookup counts as delivered, so requeuing would change nothing."""

    action: ActionResult | None
    left_alone: tuple[str, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class ReconcileReport:
    """The documented `--json` shape (docs/operations.md), in this field order."""

    ok: bool
    range_from: datetime
    range_to: datetime
    keys_filter: tuple[str, ...]
    strategy: Strategy  # the one used
    estimate: Estimate
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
    """Asks Partnero with bounded concurrency, a rate limit and bounded retries: one key's
    list filter, every page (`transactions`), or the whole ledger (`listing`)."""

    def __init__(self, client: PartneroClient, settings: Settings) -> None:
        self._client = client
        self._concurrency = settings.concurrency
        rate = settings.rate_limit_per_second
        # One call every 1/rate seconds, no burst (unlike the daemon's bucket of `rate` calls):
        # no second holds more than rate + 1 calls, however long the run.
        self._limiter = AsyncLimiter(1, 1.0 / rate) if rate > 0 else None
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
            rows, next_page = await self._ask(
                functools.partial(self._client.lookup, key, page),
                functools.partial(policy.list_page_matches, key=key),
            )
            found += [_their(row) for row in rows]
            if next_page is None:
                return found
            _check_next(f"list for key {key!r}", page, next_page)
            page = next_page
        raise PartneroUnavailable(f"Partnero's list for key {key!r} has over {MAX_PAGES} pages")

    async def listing_page(self, page: int) -> ListingPage:
        return await self._ask(
            functools.partial(self._client.list_page, page, LISTING_PAGE_SIZE),
            policy.listing_page,
        )

    async def listing(
        self, first: ListingPage, progress: Progress | None
    ) -> dict[str, list[TheirTransaction]]:
        """Every entry of the ledger, by exact key, from page 1 (`first`, already read) on:
        the pages meta.last_page names, read concurrently, or, without it, links.next."""
        pages: dict[int, list[tuple[str, dict[str, Any]]]] = {1: first[0]}
        last = first[2]
        if last is None:  # no meta.last_page: follow links.next, one page after the other
            page, following = 1, first[1]
            while following is not None:
                _check_next("listing", page, following)
                page = following
                if page > LISTING_MAX_PAGES:
                    raise PartneroUnavailable(f"Partnero's listing has over {page - 1} pages")
                pages[page], following, _ = await self.listing_page(page)
        elif last > LISTING_MAX_PAGES:
            raise PartneroUnavailable(
                f"Partnero's listing has {last} pages (over {LISTING_MAX_PAGES})"
            )
        else:
            await self._listing_pages(pages, range(2, last + 1), progress)
        found: dict[str, list[TheirTransaction]] = {}
        for number in sorted(pages):
            for key, row in pages[number]:
                found.setdefault(key, []).append(_their(row))
        return found

    async def _listing_pages(
        self,
        pages: dict[int, list[tuple[str, dict[str, Any]]]],
        wanted: range,
        progress: Progress | None,
    ) -> None:
        todo = iter(wanted)
        total = len(wanted) + 1

        async def worker() -> None:
            for number in todo:  # shared by the workers: each page is read once
                pages[number] = (await self.listing_page(number))[0]
                if progress is not None:
                    progress(len(pages), total, "pages of the listing")

        await _run_workers(worker, min(self._concurrency, max(1, len(wanted))))

    async def _ask(
        self, send: Callable[[], Awaitable[Exchange]], read: Callable[[Exchange], _T | None]
    ) -> _T:
        for attempt in range(1, self._attempts + 1):
            if self._limiter is not None:
                await self._limiter.acquire()
            exchange = await send()
            self.calls += 1
            answer = read(exchange)
            if answer is not None:
                return answer
            if not _retryable(exchange) or attempt == self._attempts:
                tries = f" ({attempt} attempts)" if attempt > 1 else ""
                raise PartneroUnavailable(
                    f"Partnero cannot be asked{tries}: {policy.describe(exchange)}"
                )
            await asyncio.sleep(self._delay(attempt, exchange))
        raise AssertionError("unreachable")  # pragma: no cover

    def _delay(self, attempt: int, exchange: Exchange) -> float:
        """The policy's backoff, or Partnero's Retry-After when longer (both capped), as the
        daemon waits."""
        return policy.retry_delay(attempt, exchange, self._policy, random.random())


def _check_next(what: str, page: int, next_page: int) -> None:
    if next_page != page + 1:
        raise PartneroUnavailable(f"Partnero's {what} names page {next_page} after page {page}")


async def _run_workers(worker: Callable[[], Coroutine[Any, Any, None]], count: int) -> None:
    try:
        async with asyncio.TaskGroup() as group:
            for _ in range(count):
                group.create_task(worker())
    except* PartneroUnavailable as errors:
        raise errors.exceptions[0] from None


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


@dataclass(frozen=True, slots=True)
class Answers:
    """What Partnero said: `theirs` for every key asked; with the listing, `ledger` every key
    of Partnero's (else None); the strategy used, the calls made and the estimate."""

    theirs: dict[str, list[TheirTransaction]]
    ledger: dict[str, list[TheirTransaction]] | None
    strategy: Strategy
    calls: int
    estimate: Estimate


async def ask_partnero(
    settings: Settings,
    keys: list[str],
    *,
    strategy: str = "auto",
    progress: Progress | None = None,
    client: PartneroClient | None = None,
) -> Answers:
    """Each key's transactions, by `strategy`: "key" (the list filter, one key after the other),
    "listing" (the whole ledger) or "auto" (page 1 of the listing, then the cheaper by calls:
    the listing's meta.last_page against one call per key). Raises PartneroUnavailable."""
    if client is None:
        client = PartneroClient(
            settings.partnero_api_url,
            ApiKey(settings.api_key),
            timeout_seconds=settings.request_timeout_seconds,
            max_connections=settings.concurrency,
            verify_tls=not settings.insecure_skip_tls_verify,
        )
    asker = _Asker(client, settings)
    async with client:
        first, pages = None, None
        if strategy == "listing" or (strategy == "auto" and keys):
            first = await asker.listing_page(1)
            pages = first[2] if first[2] is not None or first[1] else 1
        estimate = Estimate(key_filter=len(keys), listing=pages)
        chosen = strategy == "listing" or (
            strategy == "auto" and pages is not None and pages <= len(keys)
        )
        if first is not None and chosen:
            ledger = await asker.listing(first, progress)
            theirs = {key: ledger.get(key, []) for key in keys}
            return Answers(theirs, ledger, Strategy.LISTING, asker.calls, estimate)
        theirs = await _by_key(asker, keys, settings.concurrency, progress)
    return Answers(theirs, None, Strategy.KEY_FILTER, asker.calls, estimate)


async def _by_key(
    asker: _Asker, keys: list[str], concurrency: int, progress: Progress | None
) -> dict[str, list[TheirTransaction]]:
    found: dict[str, list[TheirTransaction]] = {}
    pending: Iterator[str] = iter(keys)

    async def worker() -> None:
        for key in pending:  # one iterator shared by the workers: each key is read once
            found[key] = await asker.transactions(key)
            if progress is not None:
                progress(len(found), len(keys), "keys")

    await _run_workers(worker, min(concurrency, max(1, len(keys))))
    return found


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
    ours: dict[str, list[OurRow]],
    theirs: Mapping[str, list[TheirTransaction]],
    strangers: Mapping[str, list[TheirTransaction]] | None = None,
) -> tuple[list[KeyFinding], dict[str, int]]:
    """Every key's findings, in key order, then the `unknown_here` keys of `strangers` (keys of
    Partnero's with no row here, the listing only), and the counts by class (every class
    named)."""
    findings = [f for key, rows in ours.items() for f in classify(key, rows, theirs.get(key))]
    for key, transactions in sorted((strangers or {}).items()):
        detail = f"no row here; Partnero: {_summary(transactions)}"
        findings.append(KeyFinding(key, Finding.UNKNOWN_HERE, detail, (), tuple(transactions)))
    counts = {kind.value: 0 for kind in Finding}
    for f in findings:
        counts[f.finding.value] += 1
    return findings, counts


def strangers_in_range(
    ledger: Mapping[str, list[TheirTransaction]],
    ours: Mapping[str, list[OurRow]],
    bounds: tuple[datetime, datetime],
    keys: tuple[str, ...] = (),
) -> dict[str, list[TheirTransaction]]:
    """The keys of Partnero's ledger (narrowed to `keys` when given) not among `ours` with a
    live transaction whose `created_at` falls in `bounds` (one Partnero does not date, or dates
    in a form we cannot read, is left out): candidates for `unknown_here`."""
    wanted = set(keys)
    found: dict[str, list[TheirTransaction]] = {}
    for key, transactions in ledger.items():
        if key in ours or (wanted and key not in wanted):
            continue
        if any(t.live and _within(t.created_at, bounds) for t in transactions):
            found[key] = transactions
    return found


def _within(stamp: str | None, bounds: tuple[datetime, datetime]) -> bool:
    if stamp is None:
        return False
    try:
        when = datetime.fromisoformat(stamp)
    except ValueError:
        return False
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)  # Partnero's times are UTC
    return bounds[0] <= when < bounds[1]


def rows_here(engine: sa.Engine, keys: Iterable[str]) -> set[str]:
    """Which of `keys` have any row here (sale or refund, any time, any status)."""
    wanted = list(keys)
    if not wanted:
        return set()
    with engine.connect() as conn:
        return set(conn.execute(_q("keys_here"), {"keys": wanted}).scalars())


def reconcile(
    engine: sa.Engine,
    settings: Settings,
    bounds: tuple[datetime, datetime],
    keys: tuple[str, ...] = (),
    *,
    strategy: str = "auto",
    progress: Progress | None = None,
) -> ReconcileReport:
    """Steps 1 to 3; raises PartneroUnavailable (and the database's errors)."""
    ours = load_keys(engine, *bounds, keys)
    asked = [key for key, rows in ours.items() if settled(rows)]
    answers = asyncio.run(ask_partnero(settings, asked, strategy=strategy, progress=progress))
    strangers = None
    if answers.ledger is not None:
        strangers = strangers_in_range(answers.ledger, ours, bounds, keys)
        for key in rows_here(engine, strangers):
            del strangers[key]
    findings, counts = compare(ours, answers.theirs, strangers)
    return ReconcileReport(
        ok=not any(f.finding in DRIFT for f in findings),
        range_from=bounds[0],
        range_to=bounds[1],
        keys_filter=keys,
        strategy=answers.strategy,
        estimate=answers.estimate,
        keys=len(ours),
        compared=len(asked),
        calls=answers.calls,
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
        # A retry, as `outbox retry` records it; its statement (apply_retry) also sets
        # lookup_required on these delivered rows and clears their delivered_at.
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
