"""The claimer: claims due rows in batches under leases and hands each to the executor.

It keeps at most `concurrency` calls in flight and, while they are all busy, up to `prefetch`
more rows claimed ahead, so that a freed slot never waits for a claim; it sleeps until a NOTIFY,
the next due row, or the poll interval. While the gate is closed (no key check has passed yet,
or the key was refused) it claims nothing and lets the key check decide.

The doorbell (migration 0003): an INSERT NOTIFYs only while some daemon "holds the doorbell" (an
advisory lock held on its claim connection), because a NOTIFY makes every inserting transaction
commit one at a time. The claimer arms it when a claim comes back short (it has caught up and
is about to sleep) and disarms it after a few full claims in a row (a backlog: it claims again
without being woken, and INSERTs go at full speed).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import KW_ONLY, dataclass, field

import structlog

from outbox.delivery.context import Context
from outbox.delivery.executor import Executor
from outbox.delivery.gate import Gate
from outbox.delivery.keycheck import KeyCheck
from outbox.delivery.retrying import DB_ERRORS
from outbox.delivery.slots import Slots
from outbox.delivery.store import Claimed, Store
from outbox.delivery.waits import wait_any
from outbox.delivery.writer import Writer
from outbox.domain import Status
from outbox.text import first_line

log = structlog.get_logger("outbox.claimer")

# Full claims in a row after which this daemon stops asking INSERTs to NOTIFY (a backlog).
DISARM_AFTER_FULL_CLAIMS = 3
# Back-pressure: no claim while the writer holds this many batches' worth of results, or has
# held results for this fraction of the lease (a result must be written well within its lease).
WRITER_MAX_BATCHES = 4
WRITER_MAX_LEASE_FRACTION = 0.25


@dataclass(frozen=True, slots=True)
class ClaimRound:
    asked: int  # rows the claim asked for (0: no room)
    claimed: int  # rows it got, each now delivered by its own task


@dataclass(eq=False, repr=False)
class Claimer:
    ctx: Context
    _: KW_ONLY
    store: Store
    executor: Executor
    writer: Writer
    gate: Gate
    key_check: KeyCheck
    wake: asyncio.Event  # set when there may be work: a notification, a write, a rescue
    slots: Slots = field(init=False)
    # Every claimed row has a task; a task holds one of the slots while its call runs.
    tasks: dict[asyncio.Task[None], Claimed] = field(init=False, default_factory=dict)
    _slot_free: asyncio.Event = field(init=False, default_factory=asyncio.Event)
    _doorbell: int | None = field(init=False, default=None)  # the generation it is armed on
    _full_claims: int = field(init=False, default=0)
    _held_back: bool = field(init=False, default=False)  # waiting for the writer (logged once)

    def __post_init__(self) -> None:
        self.slots = Slots(self.ctx.settings().concurrency)

    def _prefetch(self) -> int:
        """Rows claimed ahead of free slots: enough that slots freed during a claim's round
        trip find work waiting, and few enough that a queued row does not wait long."""
        s = self.ctx.settings()
        return min(s.batch_size, s.concurrency)

    def _claim_room(self) -> int:
        """How many rows the next claim may take: the free slots plus the prefetch, minus the
        rows already claimed."""
        return self.ctx.settings().concurrency + self._prefetch() - len(self.tasks)

    async def run(self) -> None:
        while not self.ctx.stopping.is_set():
            self.ctx.health.tick()
            if self.gate.paused:
                await self.key_check.wait_and_check()
                continue
            # Claim again once the room is at least half the prefetch (or a whole slot when
            # nothing is queued ahead), so that claims stay batches while rows keep flowing.
            if await self._wait_for_writer():
                continue
            if self._claim_room() < max(1, self._prefetch() // 2):
                self._slot_free.clear()
                self.ctx.health.tick(waiting=1.0)
                await wait_any(self._slot_free, self.ctx.stopping, timeout=1.0)
                continue
            try:
                await self.run_once()
            except DB_ERRORS as exc:
                self.ctx.health.database_ok = False
                self.ctx.health.last_error = f"database: {first_line(exc)}"
                log.warning("outbox.claimer.db_error", error=first_line(exc))
                self.ctx.health.tick(waiting=1.0)
                await wait_any(self.ctx.stopping, timeout=1.0)

    async def _wait_for_writer(self) -> bool:
        """Back-pressure: while the writer is behind, wait (up to a second) for it to write a
        batch instead of claiming. True when it waited."""
        s = self.ctx.settings()
        limit = WRITER_MAX_BATCHES * max(s.batch_size, s.concurrency)
        why = self.writer.behind(limit, s.lease_seconds * WRITER_MAX_LEASE_FRACTION)
        if why is None:
            self._held_back = False
            return False
        if not self._held_back:
            log.info("outbox.claimer.held_back", reason=why, note="waiting for the writer")
            self._held_back = True
        self.writer.progressed.clear()
        self.ctx.health.tick(waiting=1.0)
        await wait_any(self.writer.progressed, self.ctx.stopping, timeout=1.0)
        return True

    async def run_once(self) -> ClaimRound:
        """One claim, then: sleep when it came back short (after arming the doorbell), or
        count a full one towards disarming it."""
        round_ = await self.claim_once()
        if round_.claimed < round_.asked:
            self._full_claims = 0
            if not self._doorbell_armed() and await self._arm_doorbell():
                return round_  # claim once more before sleeping (see _arm_doorbell)
            await self._idle_wait()
        elif round_.asked > 0:
            self._full_claims += 1
            if self._full_claims >= DISARM_AFTER_FULL_CLAIMS and self._doorbell_armed():
                await self.store.disarm_doorbell()
                self._doorbell = None
        return round_

    async def claim_once(self) -> ClaimRound:
        s = self.ctx.settings()
        asked = min(self._claim_room(), s.batch_size)
        if asked <= 0:
            return ClaimRound(0, 0)
        self.wake.clear()
        started = time.monotonic()
        result = await self.store.claim(
            owner=s.owner,
            limit=asked,
            lease_seconds=s.lease_seconds,
            recheck_seconds=s.blocked_recheck_seconds,
            orphan_grace_seconds=s.orphan_refund_grace_seconds,
        )
        self.ctx.health.database_ok = True
        deadline = started + s.lease_seconds
        for claimed in result.claimed:
            task = asyncio.create_task(self._deliver(claimed, deadline))
            self.tasks[task] = claimed
            task.add_done_callback(self._task_done)
        return ClaimRound(asked, len(result.claimed))

    async def _deliver(self, claimed: Claimed, deadline: float) -> None:
        try:
            await self.slots.acquire()  # a row claimed ahead waits here for a free slot
            try:
                if self.ctx.stopping.is_set():
                    # Claimed ahead and never started: give it back, do not start a call now.
                    completion = self.executor.cut_short(claimed)
                else:
                    completion = await self.executor.process(claimed, deadline)
            finally:
                self.slots.release()
        except asyncio.CancelledError:
            self.writer.put(self.executor.cut_short(claimed))
            raise
        except Exception as exc:  # a bug must not lose the row or stop the daemon
            log.exception("outbox.delivery.crashed", event_id=claimed.event.id)
            self.ctx.health.last_error = f"internal error: {type(exc).__name__}"
            completion = self.executor.cut_short(claimed)
        if completion.state.last_error and completion.state.status is not Status.DELIVERED:
            self.ctx.health.last_error = completion.state.last_error
        self.writer.put(completion)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self.tasks.pop(task, None)
        self._slot_free.set()

    async def _idle_wait(self) -> None:
        """Sleep until a NOTIFY, the next due row, or the poll interval, whichever is first."""
        timeout = self.ctx.settings().poll_interval_seconds
        with contextlib.suppress(*DB_ERRORS):
            due = await self.store.next_due()
            if due is not None:
                timeout = min(timeout, max(0.05, (due - self.ctx.clock()).total_seconds()))
        self.ctx.health.tick(waiting=timeout)
        await wait_any(self.wake, self.ctx.stopping, timeout=timeout)

    def _doorbell_armed(self) -> bool:
        return self._doorbell is not None and self._doorbell == self.store.generation

    async def _arm_doorbell(self) -> bool:
        """Arm the doorbell before sleeping. True: claim once more first; False: sleep now.

        'armed': every transaction that inserted without ringing has ended, so one more claim
        sees its rows; later INSERTs ring. 'busy': such a transaction was still open after the
        wait: claim what is visible and try again. 'taken': another daemon holds the doorbell,
        INSERTs ring already, and its disarming NOTIFYs too."""
        wait = self.ctx.settings().doorbell_wait_seconds
        state, generation = await self.store.arm_doorbell(wait)
        if state == "armed":
            self._doorbell = generation
        return state != "taken"

    async def drain(self, grace: float) -> None:
        """At shutdown: let calls in flight finish for `grace` seconds, cut the rest short
        (their rows are given back, a started create flagged for a lookup)."""
        if not self.tasks:
            return
        log.info("outbox.daemon.draining", in_flight=len(self.tasks), grace_seconds=grace)
        _, pending = await asyncio.wait(list(self.tasks), timeout=grace)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
