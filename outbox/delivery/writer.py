"""The writer: records results in batches, each row guarded by its lease token.

A batch that cannot be written (the database is away, or refuses it) is kept and written again;
nothing is dropped. While it holds results it has not written, `Health.unwritten_since` says
since when, and `Health.problems()` turns that into a problem once it lasts longer than the
stall limit: a writer that cannot record deliveries stops the watchdog.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from outbox.delivery.health import Health
from outbox.delivery.retrying import DB_ERRORS, retrying
from outbox.delivery.store import Completion, Store
from outbox.domain import Status
from outbox.service.metrics import Metrics
from outbox.text import first_line, utcnow

log = structlog.get_logger("outbox.writer")


@dataclass(frozen=True, slots=True)
class WriteRound:
    written: int  # results written in this round
    applied: int  # of which the row's lease still held (the others belong to another daemon)
    woken: int  # rows made due now: parked rows of a key that settled, and rows given back


@dataclass(eq=False, repr=False)
class Writer:
    store: Store
    health: Health
    on_woken: Callable[[int], None]  # told how many rows a write made due now
    metrics: Metrics | None = None
    queue: asyncio.Queue[Completion] = field(init=False, default_factory=asyncio.Queue)
    progressed: asyncio.Event = field(init=False, default_factory=asyncio.Event)  # per batch
    _batch: list[Completion] = field(init=False, default_factory=list)

    def behind(self, max_results: int, max_seconds: float) -> str | None:
        """Why the claimer should wait for the writer before claiming more (None: it need
        not): `max_results` or more results unwritten, or results held longer than
        `max_seconds`. Claiming on would only pile up results whose leases run out."""
        if self.backlog >= max_results:
            return f"{self.backlog} results unwritten"
        since = self.health.unwritten_since
        if since is not None and time.monotonic() - since > max_seconds:
            return f"results unwritten for {time.monotonic() - since:.1f} s"
        return None

    def put(self, completion: Completion) -> None:
        if self.health.unwritten_since is None:
            self.health.unwritten_since = time.monotonic()
        self.queue.put_nowait(completion)

    @property
    def backlog(self) -> int:
        return self.queue.qsize() + len(self._batch)

    async def run_once(self, max_batch: int = 1000) -> WriteRound:
        """Write the next batch (waiting for one if none is queued)."""
        if not self._batch:
            self._batch.append(await self.queue.get())
        while len(self._batch) < max_batch and not self.queue.empty():
            self._batch.append(self.queue.get_nowait())
        try:
            result = await self.store.complete(self._batch)
        except DB_ERRORS as exc:
            self.health.write_error = first_line(exc)
            self.health.last_error = f"database (writing results): {first_line(exc)}"
            raise
        self.health.write_error = None
        batch, self._batch = self._batch, []
        self.progressed.set()
        # Progress: what is still queued has waited only since now.
        self.health.unwritten_since = time.monotonic() if self.backlog else None
        self._account(
            [c for c in batch if c.token in result.applied], len(batch) - result.completed
        )
        # Rows written back as pending (a retry, a row given back) may be due before the time
        # the claimer last planned to wake, and parked rows woken here are due now.
        woken = result.woken + sum(1 for c in batch if c.state.status is Status.PENDING)
        if woken:
            self.on_woken(woken)
        return WriteRound(len(batch), result.completed, woken)

    def _account(self, applied: list[Completion], lost: int) -> None:
        """Count the results that were written under their lease, and only those: a result
        whose lease was lost belongs to the daemon that holds the row now."""
        for c in applied:
            if c.state.status is Status.DELIVERED:
                self.health.delivered += 1
                self.health.last_delivery_at = utcnow()
            elif c.state.status is Status.SKIPPED:
                self.health.skipped += 1
            elif c.state.status is Status.FAILED:
                self.health.failed += 1
            elif c.attempt_records:
                self.health.retried += 1
            if self.metrics is not None:
                self.metrics.observe_result(c.state.status, c.state.outcome, c.state.reason)
        if lost:
            log.warning(
                "outbox.writer.lease_lost",
                results=lost,
                note="another daemon holds these rows now; their results were not applied",
            )

    async def run(self, stopping: asyncio.Event) -> None:
        """Write batches until stopped, riding out database outages (other errors propagate
        to the supervisor, which restarts the writer; the unwritten batch is kept)."""
        while True:
            async for attempt in retrying(stopping, "write results"):
                with attempt:
                    await self.run_once()

    async def flush(self, deadline: float) -> bool:
        """Write everything queued, retrying until `deadline` (monotonic). True when all written."""
        while self.backlog:
            try:
                await self.run_once()
            except Exception as exc:
                if time.monotonic() >= deadline:
                    log.error(
                        "outbox.writer.unflushed",
                        results=self.backlog,
                        error=first_line(exc),
                        note="their leases will expire and the rows be picked up again",
                    )
                    return False
                if not isinstance(exc, DB_ERRORS):
                    log.error("outbox.writer.flush_failed", exc_info=exc)
                await asyncio.sleep(0.2)
        return True
