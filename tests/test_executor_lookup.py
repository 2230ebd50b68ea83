"""The executor's lookup over several pages, against the fake Partnero over real HTTP, with the
lease clock in the test's hands: the pages of one lookup are one attempt, a lookup that cannot
finish within its lease is retried and in the end fails (it never loops and is never "absent"),
and a 403 after a lookup keeps the row flagged for the next one."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import Decimal

import httpx
import pytest

from outbox.delivery.executor import Executor, Gate
from outbox.delivery.store import Claimed, Completion
from outbox.dev.fake_partnero import FakeConfig, FakePartnero
from outbox.domain import Event, EventType, RetryPolicy
from outbox.partnero import ApiKey, PartneroClient

API_KEY = "test-key-not-a-secret"
TIMEOUT = 15.0


@pytest.fixture
async def fake() -> AsyncIterator[FakePartnero]:
    server = FakePartnero(FakeConfig(api_key=API_KEY, dedupe=False))
    await server.start()
    try:
        # 600 keys that contain "K": the list filter (substrings) fills three pages of 250.
        async with httpx.AsyncClient(
            base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}
        ) as http:
            for i in range(600):
                body = {"key": f"K-{i}", "amount": 1, "customer": {"key": "c"}}
                (await http.post("/v1/transactions", json=body)).raise_for_status()
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def client(fake: FakePartnero) -> AsyncIterator[PartneroClient]:
    async with PartneroClient(fake.url, ApiKey(API_KEY), timeout_seconds=TIMEOUT) as partnero:
        yield partnero


class LeaseClock:
    """A monotonic clock that moves `step` seconds at every reading the executor takes before
    a call: the lease runs out as fast as the test wants, and nothing sleeps."""

    def __init__(self, step: float) -> None:
        self.now = 0.0
        self.step = step

    def __call__(self) -> float:
        value = self.now
        self.now += self.step
        return value


def sale(key: str, attempts: int) -> Claimed:
    event = Event(
        id=1,
        event_type=EventType.SALE,
        transaction_key=key,
        customer_key="c",
        amount=Decimal("10"),
        currency=None,
        payload={},
        attempts=attempts,
        lookup_required=True,
    )
    return Claimed(event, uuid.uuid4(), datetime.now(UTC), False)


async def deliver(
    client: PartneroClient, claimed: Claimed, *, max_attempts: int, step: float = 0.0
) -> Completion:
    executor = Executor(
        client,
        owner="test",
        retry_policy=RetryPolicy(max_attempts=max_attempts, base_delay_seconds=0.01),
        request_timeout_seconds=TIMEOUT,
        gate=Gate(lambda: datetime.now(UTC)),
        monotonic=LeaseClock(step),
    )
    return await executor.process(claimed, lease_deadline=60.0)


def records(completion: Completion) -> list[tuple[int, str, str]]:
    return [(r.attempt, r.exchange.method, r.decision) for r in completion.attempt_records]


async def test_the_pages_of_one_lookup_are_one_attempt(
    fake: FakePartnero, client: PartneroClient
) -> None:
    done = await deliver(client, sale("K", attempts=1), max_attempts=3)
    assert records(done) == [
        (2, "GET", "lookup:next_page:2"),
        (2, "GET", "lookup:next_page:3"),
        (2, "GET", "lookup:absent"),
        (2, "POST", "delivered:created"),
    ]
    assert (done.state.status, done.state.outcome, done.attempts) == ("delivered", "created", 2)
    assert [t["key"] for t in fake.ledger()].count("K") == 1


async def test_a_lookup_the_lease_cannot_hold_is_retried_then_fails_and_never_creates(
    fake: FakePartnero, client: PartneroClient
) -> None:
    """Each reading of the clock costs 25 s of a 60 s lease (timeout 15 s + 1 s margin): two
    pages fit, the third cannot start. Not "absent" (the key may be on page 3), not released
    for free (that would loop forever): a retry, and at the last attempt a failure."""
    retried = await deliver(client, sale("K", attempts=0), max_attempts=2, step=25.0)
    assert records(retried) == [(1, "GET", "lookup:next_page:2"), (1, "GET", "lookup:next_page:3")]
    assert (retried.state.status, retried.attempts, retried.state.lookup_required) == (
        "pending",
        1,
        True,
    )
    assert retried.state.last_error is not None and retried.state.last_error.startswith(
        "bad_response: "
    )
    failed = await deliver(client, sale("K", attempts=1), max_attempts=2, step=25.0)
    assert (failed.state.status, failed.state.outcome, failed.state.lookup_required) == (
        "failed",
        "bad_response",
        True,
    )
    assert failed.state.last_error is not None
    assert failed.state.last_error.startswith(
        "the lookup read 2 pages and the lease ran short before the rest: HTTP 200"
    )
    assert failed.state.last_error.endswith("[gave up after 2 attempts]")
    assert "K" not in [t["key"] for t in fake.ledger()]


async def test_a_403_after_a_lookup_keeps_the_row_flagged(
    fake: FakePartnero, client: PartneroClient
) -> None:
    """A 403 is no documented answer to a create: its effect stays unknown, so the failed row
    keeps lookup_required and a person's retry looks the key up before creating it."""
    await fake.configure(odd_answers={"K": {"answer": "forbidden"}})
    done = await deliver(client, sale("K", attempts=0), max_attempts=5)
    assert records(done)[-3:] == [
        (1, "GET", "lookup:absent"),
        (1, "POST", "forbidden:check_key"),
        (1, "GET", "failed:forbidden"),
    ]
    assert (done.state.status, done.state.outcome, done.attempts, done.state.lookup_required) == (
        "failed",
        "forbidden",
        1,
        True,
    )
