"""The writer with a scripted store: results are written in batches and accounted, kept while
they cannot be written, and `Health.unwritten_since` says since when they wait."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
import structlog

from outbox.delivery.health import Health
from outbox.delivery.store import AttemptRecord, CompleteResult, Completion, RowState
from outbox.delivery.writer import Writer
from outbox.domain import Exchange, Outcome, RequestKind, Status
from outbox.service.metrics import Metrics

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


class ScriptedStore:
    """`complete` raises the scripted errors first, then writes; `lost` rows per batch were
    leased by another daemon meanwhile, `woken` parked rows are woken by each write."""

    def __init__(self, *errors: Exception, lost: int = 0, woken: int = 0) -> None:
        self.errors = list(errors)
        self.lost = lost
        self.woken = woken
        self.calls = 0
        self.written: list[list[int]] = []

    async def complete(self, batch: list[Completion]) -> CompleteResult:
        self.calls += 1
        await asyncio.sleep(0)
        if self.errors:
            raise self.errors.pop(0)
        self.written.append([c.event_id for c in batch])
        # The first `lost` rows of the batch lost their lease to another daemon.
        applied = frozenset(c.token for c in batch[self.lost :])
        return CompleteResult(len(batch) - self.lost, self.woken, applied)


def record(event_id: int) -> AttemptRecord:
    call = Exchange(RequestKind.CREATE, "POST", "/v1/transactions", 200)
    return AttemptRecord(event_id, 1, call, decision="x", daemon="unit", decided_at=NOW)


def completion(
    event_id: int,
    status: Status = Status.DELIVERED,
    outcome: Outcome | None = Outcome.CREATED,
    reason: Outcome | None = None,
    *,
    called: bool = True,
) -> Completion:
    return Completion(
        event_id=event_id,
        token=uuid.uuid4(),
        state=RowState(status, outcome, reason, NOW, lookup_required=False, last_error=None),
        attempts=1,
        last_status_code=200,
        attempt_records=(record(event_id),) if called else (),
    )


def retried(event_id: int) -> Completion:
    return completion(event_id, Status.PENDING, None, Outcome.SERVER_ERROR)


def failed(event_id: int) -> Completion:
    return completion(event_id, Status.FAILED, Outcome.REJECTED, Outcome.REJECTED)


def released(event_id: int) -> Completion:
    return completion(event_id, Status.PENDING, None, None, called=False)


class Rig:
    def __init__(self, store: ScriptedStore) -> None:
        self.store = store
        self.health = Health(database_ok=True, listening=True, stall_seconds=60.0)
        self.woken: list[int] = []
        self.metrics = Metrics()
        self.writer = Writer(store, self.health, self.woken.append, self.metrics)  # type: ignore[arg-type]

    def settled(self, status: str, outcome: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "outbox_rows_settled_total", {"status": status, "outcome": outcome}
        )
        return value or 0.0

    def retries(self, reason: str) -> float:
        value = self.metrics.registry.get_sample_value("outbox_retries_total", {"reason": reason})
        return value or 0.0


@pytest.fixture
def logs() -> Iterator[list[dict[str, Any]]]:
    with structlog.testing.capture_logs() as captured:
        yield captured


async def test_a_batch_is_written_and_accounted() -> None:
    rig = Rig(ScriptedStore())
    for c in (completion(1), completion(2), failed(3), retried(4), released(5)):
        rig.writer.put(c)

    round_ = await rig.writer.run_once()

    assert rig.store.written == [[1, 2, 3, 4, 5]]
    assert (round_.written, round_.applied) == (5, 5)
    assert rig.health.delivered == 2
    assert rig.health.failed == 1
    assert rig.health.retried == 1  # a row given back unsent is not a retry
    assert rig.health.last_delivery_at is not None
    assert rig.writer.backlog == 0
    assert rig.settled("delivered", "created") == 2
    assert rig.settled("failed", "rejected") == 1
    assert rig.retries("server_error") == 1


async def test_unwritten_since_is_set_while_results_wait_and_cleared_after() -> None:
    rig = Rig(ScriptedStore())
    assert rig.health.unwritten_since is None

    before = time.monotonic()
    rig.writer.put(completion(1))
    since = rig.health.unwritten_since
    assert since is not None and since >= before
    rig.writer.put(completion(2))
    assert rig.health.unwritten_since == since  # since the oldest, not the newest

    await rig.writer.run_once()

    assert rig.health.unwritten_since is None


async def test_a_partial_batch_leaves_the_rest_waiting_since_now() -> None:
    rig = Rig(ScriptedStore())
    for i in range(5):
        rig.writer.put(completion(i))
    since = rig.health.unwritten_since
    assert since is not None

    round_ = await rig.writer.run_once(max_batch=2)

    assert round_.written == 2
    assert rig.writer.backlog == 3
    assert rig.health.unwritten_since is not None and rig.health.unwritten_since > since
    await rig.writer.run_once()
    assert rig.store.written == [[0, 1], [2, 3, 4]]
    assert rig.health.unwritten_since is None


async def test_run_once_waits_for_a_result() -> None:
    rig = Rig(ScriptedStore())
    task = asyncio.create_task(rig.writer.run_once())
    await asyncio.sleep(0.005)
    assert not task.done()
    assert rig.store.calls == 0

    rig.writer.put(completion(7))

    round_ = await asyncio.wait_for(task, 1.0)
    assert round_.written == 1
    assert rig.store.written == [[7]]


@pytest.mark.parametrize(
    "error", [psycopg.OperationalError("server closed the connection"), ValueError("a bug")]
)
async def test_a_failed_write_keeps_the_batch_for_the_next_round(error: Exception) -> None:
    rig = Rig(ScriptedStore(error))
    rig.writer.put(completion(1))
    rig.writer.put(retried(2))
    since = rig.health.unwritten_since

    with pytest.raises(type(error)):
        await rig.writer.run_once()

    assert rig.writer.backlog == 2
    assert rig.health.unwritten_since == since  # still waiting since then: a stall shows
    assert rig.health.delivered == 0
    rig.writer.put(completion(3))

    await rig.writer.run_once()

    assert rig.store.written == [[1, 2, 3]]
    assert rig.writer.backlog == 0
    assert rig.health.unwritten_since is None
    assert (rig.health.delivered, rig.health.retried) == (2, 1)  # each counted once


async def test_a_stalled_writer_becomes_a_problem() -> None:
    rig = Rig(ScriptedStore(ValueError("a bug")))
    rig.writer.put(completion(1))
    with pytest.raises(ValueError):
        await rig.writer.run_once()
    assert rig.health.problems() == []

    assert rig.health.unwritten_since is not None
    rig.health.unwritten_since -= 61  # a minute later, still unwritten

    (problem,) = rig.health.problems()
    assert problem.startswith("results unwritten for 1m01s")


async def test_results_of_rows_another_daemon_took_are_reported(
    logs: list[dict[str, Any]],
) -> None:
    rig = Rig(ScriptedStore(lost=1))
    rig.writer.put(completion(1))
    rig.writer.put(completion(2))

    round_ = await rig.writer.run_once()

    assert (round_.written, round_.applied) == (2, 1)
    (line,) = [e for e in logs if e["event"] == "outbox.writer.lease_lost"]
    assert line["results"] == 1
    # Only the result written under its lease counts as delivered (the STATUS and stop lines,
    # the metrics): the other row is the other daemon's to count.
    assert rig.health.delivered == 1


async def test_woken_counts_pending_rows_and_woken_parked_rows() -> None:
    rig = Rig(ScriptedStore(woken=3))
    for c in (completion(1), retried(2), released(3)):
        rig.writer.put(c)

    round_ = await rig.writer.run_once()

    assert round_.woken == 5  # 3 parked rows woken + 2 rows written back as pending
    assert rig.woken == [5]


async def test_nothing_woken_calls_nobody() -> None:
    rig = Rig(ScriptedStore())
    rig.writer.put(completion(1))

    round_ = await rig.writer.run_once()

    assert round_.woken == 0
    assert rig.woken == []


async def test_flush_writes_everything() -> None:
    rig = Rig(ScriptedStore())
    for i in range(3):
        rig.writer.put(completion(i))

    assert await rig.writer.flush(time.monotonic() + 5) is True
    assert rig.store.written == [[0, 1, 2]]


async def test_flush_with_nothing_queued_writes_nothing() -> None:
    rig = Rig(ScriptedStore())

    assert await rig.writer.flush(time.monotonic()) is True
    assert rig.store.calls == 0


async def test_flush_gives_up_at_its_deadline(logs: list[dict[str, Any]]) -> None:
    rig = Rig(ScriptedStore(psycopg.OperationalError("the database is away")))
    rig.writer.put(completion(1))

    assert await rig.writer.flush(time.monotonic()) is False

    assert rig.store.calls == 1
    assert rig.writer.backlog == 1  # kept: the lease expires and the row is taken again
    (line,) = [e for e in logs if e["event"] == "outbox.writer.unflushed"]
    assert line["results"] == 1
    assert line["error"] == "the database is away"


async def test_flush_retries_until_the_deadline(
    monkeypatch: pytest.MonkeyPatch, logs: list[dict[str, Any]]
) -> None:
    real_sleep = asyncio.sleep
    pauses: list[float] = []

    async def quick_sleep(seconds: float) -> None:
        pauses.append(seconds)
        await real_sleep(0)

    monkeypatch.setattr(asyncio, "sleep", quick_sleep)
    rig = Rig(ScriptedStore(psycopg.OperationalError("away"), ValueError("a bug")))
    rig.writer.put(completion(1))

    assert await rig.writer.flush(time.monotonic() + 60) is True

    assert rig.store.calls == 3
    assert rig.store.written == [[1]]
    assert len([p for p in pauses if p > 0]) == 2
    # A database away is expected at shutdown; anything else is logged with its traceback.
    (line,) = [e for e in logs if e["event"] == "outbox.writer.flush_failed"]
    assert isinstance(line["exc_info"], ValueError)


# ---- back-pressure -------------------------------------------------------------------------------


async def test_the_writer_is_behind_with_too_many_results_and_catches_up_by_writing() -> None:
    rig = Rig(ScriptedStore())
    for n in range(3):
        rig.writer.put(completion(n))
    assert rig.writer.behind(max_results=4, max_seconds=15) is None
    rig.writer.put(completion(3))
    assert rig.writer.behind(max_results=4, max_seconds=15) == "4 results unwritten"
    rig.writer.progressed.clear()

    await rig.writer.run_once()

    assert rig.writer.progressed.is_set()  # what the claimer waits on
    assert rig.writer.behind(max_results=4, max_seconds=15) is None


async def test_the_writer_is_behind_when_results_wait_too_long() -> None:
    rig = Rig(ScriptedStore())
    rig.writer.put(completion(1))
    assert rig.writer.behind(max_results=100, max_seconds=15) is None
    rig.health.unwritten_since = time.monotonic() - 16  # held for 16 s: over a quarter lease
    why = rig.writer.behind(max_results=100, max_seconds=15)
    assert why is not None and why.startswith("results unwritten for 16.")


async def test_a_write_the_database_does_not_answer_is_a_problem_at_once() -> None:
    error = psycopg.OperationalError("no answer from the database within 10 s")
    rig = Rig(ScriptedStore(error))
    rig.writer.put(completion(1))

    with pytest.raises(psycopg.OperationalError):
        await rig.writer.run_once()

    assert rig.health.problems() == [
        "results cannot be written: no answer from the database within 10 s"
    ]
    await rig.writer.run_once()  # the database answers again
    assert rig.health.problems() == []
