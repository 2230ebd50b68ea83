"""The executor, driven by a scripted Partnero client and a clock in the test's hands: no
network, no database. Each test scripts the answers, runs one claimed row through
`Executor.process` (or `cut_short`) and reads the Completion the writer would record."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

from outbox.delivery.executor import LEASE_MARGIN_SECONDS, Executor
from outbox.delivery.gate import Gate
from outbox.delivery.store import Claimed, Completion
from outbox.domain import (
    Event,
    EventType,
    Exchange,
    Outcome,
    RequestKind,
    RetryPolicy,
    Status,
    TransportError,
)

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
TIMEOUT = 10.0
LEASE = 60.0
OWNER = "unit-test:1"
POLICY = RetryPolicy(
    max_attempts=5, base_delay_seconds=2.0, max_delay_seconds=600.0, auth_pause_seconds=30.0
)

# ---- answers -------------------------------------------------------------------------------


def _exchange(kind: RequestKind, method: str, path: str, **fields: Any) -> Exchange:
    return Exchange(kind=kind, method=method, path=path, started_at=NOW, finished_at=NOW, **fields)


def create_answer(code: int, body: dict[str, Any] | None = None, **fields: Any) -> Exchange:
    body = {"status": 1, "data": {"key": "K"}} if body is None and code < 300 else body
    return _exchange(
        RequestKind.CREATE,
        "POST",
        "/v1/transactions",
        status_code=code,
        json_body=body,
        message=(body or {}).get("message"),
        body_excerpt="{...}",
        **fields,
    )


def created() -> Exchange:
    return create_answer(200)


def duplicate() -> Exchange:
    return create_answer(400, {"status": 0, "message": "Duplicate key"})


def lost(kind: RequestKind = RequestKind.CREATE) -> Exchange:
    method, path = {
        RequestKind.CREATE: ("POST", "/v1/transactions"),
        RequestKind.DELETE: ("DELETE", "/v1/transactions"),
        RequestKind.LOOKUP: ("GET", "/v1/transactions?key=K"),
    }[kind]
    return _exchange(
        kind,
        method,
        path,
        transport_error=TransportError.UNKNOWN_OUTCOME,
        error="ReadTimeout: no answer in 10 s",
    )


def refused(code: int, kind: RequestKind = RequestKind.CREATE) -> Exchange:
    method = "DELETE" if kind is RequestKind.DELETE else "POST"
    return _exchange(
        kind,
        method,
        "/v1/transactions",
        status_code=code,
        json_body={"message": "Unauthenticated." if code == 401 else "Forbidden."},
        message="Unauthenticated." if code == 401 else "Forbidden.",
    )


def lookup_page(keys: list[str], next_page: int | None, code: int = 200) -> Exchange:
    following = (
        None if next_page is None else f"https://api.partnero.com/v1/transactions?page={next_page}"
    )
    return _exchange(
        RequestKind.LOOKUP,
        "GET",
        "/v1/transactions?key=K",
        status_code=code,
        json_body={"data": [{"key": k} for k in keys], "links": {"next": following}},
    )


def lookup_404() -> Exchange:
    return _exchange(
        RequestKind.LOOKUP,
        "GET",
        "/v1/transactions?key=K",
        status_code=404,
        body_excerpt="<html>Not Found</html>",
    )


def deleted() -> Exchange:
    return _exchange(
        RequestKind.DELETE, "DELETE", "/v1/transactions", status_code=200, json_body={"status": 1}
    )


def delete_not_found() -> Exchange:
    body = {"status": 0, "message": "Transaction not found"}
    return _exchange(
        RequestKind.DELETE,
        "DELETE",
        "/v1/transactions",
        status_code=404,
        json_body=body,
        message=body["message"],
    )


def ping(code: int) -> Exchange:
    return _exchange(
        RequestKind.PING,
        "GET",
        "/v1/test",
        status_code=code,
        json_body={"status": 1} if code < 300 else {"message": "Unauthenticated."},
    )


# ---- the scripted client, the clocks, the rows -----------------------------------------------


class ScriptedClient:
    """Answers each call with the next scripted answer of its kind; records every call."""

    def __init__(self, *answers: Exchange) -> None:
        self.script: list[Exchange] = list(answers)
        self.calls: list[tuple[RequestKind, Any]] = []
        self.before: dict[RequestKind, Callable[[], Any]] = {}

    async def _answer(self, kind: RequestKind, argument: Any) -> Exchange:
        self.calls.append((kind, argument))
        hook = self.before.get(kind)
        if hook is not None:
            await hook()
        for i, answer in enumerate(self.script):
            if answer.kind is kind:
                return self.script.pop(i)
        raise AssertionError(f"unscripted {kind} call ({argument!r})")

    async def create_customer(self, event: Event) -> Exchange:
        return await self._answer(RequestKind.CREATE_CUSTOMER, event.customer_key)

    async def create(self, event: Event) -> Exchange:
        return await self._answer(RequestKind.CREATE, event.transaction_key)

    async def delete(self, transaction_key: str) -> Exchange:
        return await self._answer(RequestKind.DELETE, transaction_key)

    async def lookup(self, transaction_key: str, page: int = 1) -> Exchange:
        return await self._answer(RequestKind.LOOKUP, (transaction_key, page))

    async def ping(self) -> Exchange:
        return await self._answer(RequestKind.PING, None)

    def kinds(self) -> list[RequestKind]:
        return [kind for kind, _ in self.calls]


class Clock:
    """Wall clock for the policy; it moves only when the test moves it."""

    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> datetime:
        return self.now


class Monotonic:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_event(
    kind: EventType = EventType.SALE,
    *,
    key: str = "K",
    attempts: int = 0,
    lookup_required: bool = False,
    event_id: int = 1,
) -> Event:
    return Event(
        id=event_id,
        event_type=kind,
        transaction_key=key,
        customer_key="C-1",
        amount=Decimal("10.00") if kind is EventType.SALE else None,
        currency="EUR" if kind is EventType.SALE else None,
        payload={},
        attempts=attempts,
        lookup_required=lookup_required,
    )


def claim(event: Event, *, known_duplicate: bool = False, sale_skipped: bool = False) -> Claimed:
    expires = NOW + timedelta(seconds=LEASE)
    return Claimed(event, uuid.uuid4(), expires, known_duplicate, sale_skipped)


def again(claimed: Claimed, completion: Completion) -> Claimed:
    """The same row claimed again, as the writer left it."""
    event = replace(
        claimed.event,
        attempts=completion.attempts,
        lookup_required=completion.state.lookup_required,
    )
    return claim(event)


class Rig:
    def __init__(self, *answers: Exchange) -> None:
        self.client = ScriptedClient(*answers)
        self.clock = Clock()
        self.monotonic = Monotonic()
        self.gate = Gate(self.clock)
        self.observed: list[Exchange] = []
        self.executor = Executor(
            self.client,
            owner=OWNER,
            retry_policy=POLICY,
            request_timeout_seconds=TIMEOUT,
            gate=self.gate,
            clock=self.clock,
            rand=lambda: 0.5,  # no jitter: delays are exactly the backoff
            monotonic=self.monotonic,
            observe=self.observed.append,
        )

    def deadline(self, left: float = LEASE) -> float:
        return self.monotonic.now + left

    async def process(self, claimed: Claimed, left: float = LEASE) -> Completion:
        return await self.executor.process(claimed, self.deadline(left))


def labels(completion: Completion) -> list[tuple[int, str]]:
    return [(r.attempt, r.decision) for r in completion.attempt_records]


# ---- signups and the rows settled without a call ----------------------------------------------


def signup(payload: dict[str, Any]) -> Event:
    return replace(
        make_event(EventType.SALE),
        event_type=EventType.SIGNUP,
        transaction_key=None,
        amount=None,
        currency=None,
        payload=payload,
    )


def customer_answer(code: int, body: dict[str, Any]) -> Exchange:
    return _exchange(
        RequestKind.CREATE_CUSTOMER,
        "POST",
        "/v1/customers",
        status_code=code,
        json_body=body,
        message=body.get("message"),
        body_excerpt="{...}",
    )


async def test_a_referred_signup_is_created_through_the_customers_call() -> None:
    rig = Rig(customer_answer(201, {"data": {"key": "C-1"}, "status": 1}))

    done = await rig.process(claim(signup({"partner": {"key": "p_1"}})))

    assert (done.state.status, done.state.outcome, done.attempts) == (
        Status.DELIVERED,
        Outcome.CREATED,
        1,
    )
    assert rig.client.calls == [(RequestKind.CREATE_CUSTOMER, "C-1")]
    assert labels(done) == [(1, "delivered:created")]
    assert done.attempt_records[0].exchange.path == "/v1/customers"


async def test_an_invalid_partner_key_skips_the_signup() -> None:
    rig = Rig(customer_answer(400, {"message": "Invalid partner key", "status": 0}))

    done = await rig.process(claim(signup({"partner": {"key": "nobody"}})))

    assert (done.state.status, done.state.outcome, done.attempts) == (
        Status.SKIPPED,
        Outcome.INVALID_PARTNER,
        1,
    )
    assert done.state.last_error == "HTTP 400: Invalid partner key"
    assert labels(done) == [(1, "skipped:invalid_partner")]


async def test_a_signup_no_partner_referred_is_skipped_without_a_call() -> None:
    rig = Rig()

    done = await rig.process(claim(signup({"email": "c@example.com"})))

    assert (done.state.status, done.state.outcome, done.attempts) == (
        Status.SKIPPED,
        Outcome.NOT_REFERRED,
        0,
    )
    assert rig.client.calls == [] and done.attempt_records == ()
    assert done.state.last_error is not None and "not sent" in done.state.last_error


async def test_a_refund_of_a_skipped_sale_is_skipped_without_a_call() -> None:
    rig = Rig()

    done = await rig.process(claim(make_event(EventType.REFUND), sale_skipped=True))

    assert (done.state.status, done.state.outcome) == (Status.SKIPPED, Outcome.SALE_SKIPPED)
    assert rig.client.calls == []


async def test_a_sale_whose_customer_signup_was_skipped_is_skipped_at_the_first_not_found() -> None:
    rig = Rig(create_answer(400, {"message": "Customer not found", "status": 0}))
    event = replace(make_event(), customer_signup_skipped=True, created_at=NOW)

    done = await rig.process(claim(event))

    assert (done.state.status, done.state.outcome, done.attempts) == (
        Status.SKIPPED,
        Outcome.CUSTOMER_NOT_FOUND,
        1,
    )
    assert labels(done) == [(1, "skipped:customer_not_found")]


# ---- sales -------------------------------------------------------------------------------


async def test_a_sale_created() -> None:
    rig = Rig(created())
    claimed = claim(make_event(attempts=2))

    done = await rig.process(claimed)

    assert done.event_id == 1
    assert done.token == claimed.token
    assert done.state.status is Status.DELIVERED
    assert done.state.outcome is Outcome.CREATED
    assert done.state.reason is None
    assert done.attempts == 3
    assert done.state.lookup_required is False
    assert done.state.last_error is None
    assert done.last_status_code == 200
    assert rig.client.calls == [(RequestKind.CREATE, "K")]
    (record,) = done.attempt_records
    assert record.event_id == 1
    assert record.attempt == 3  # the third attempt: two were made before
    assert record.decision == "delivered:created"
    call = record.exchange
    assert (call.method, call.path, call.status_code) == ("POST", "/v1/transactions", 200)
    assert record.daemon == OWNER
    assert record.decided_at == NOW
    assert call.error is None
    assert [e.kind for e in rig.observed] == [RequestKind.CREATE]  # every call is measured


async def test_a_duplicate_is_delivered() -> None:
    rig = Rig(duplicate())

    done = await rig.process(claim(make_event()))

    assert (done.state.status, done.state.outcome) == (Status.DELIVERED, Outcome.DUPLICATE)
    assert done.attempts == 1
    assert labels(done) == [(1, "delivered:duplicate")]


async def test_a_known_duplicate_is_delivered_without_a_call() -> None:
    rig = Rig()

    done = await rig.process(claim(make_event(attempts=1), known_duplicate=True))

    assert (done.state.status, done.state.outcome) == (Status.DELIVERED, Outcome.DUPLICATE)
    assert done.attempts == 1
    assert done.attempt_records == ()
    assert rig.client.calls == []
    assert done.state.last_error is not None and "already delivered" in done.state.last_error


async def test_a_lost_create_is_retried_with_a_lookup_first() -> None:
    rig = Rig(lost(), lookup_page([], None), created())
    first = claim(make_event())

    done = await rig.process(first)

    assert done.state.status is Status.PENDING
    assert done.state.outcome is None
    assert done.state.reason is Outcome.TIMEOUT
    assert done.state.lookup_required is True
    assert done.attempts == 1
    assert done.state.next_attempt_at == NOW + timedelta(seconds=POLICY.base_delay_seconds)
    assert done.state.last_error is not None and done.state.last_error.startswith("timeout: ")
    assert done.last_status_code is None
    assert labels(done) == [(1, "retry:timeout+lookup")]
    (record,) = done.attempt_records
    assert record.exchange.error == "ReadTimeout: no answer in 10 s"

    # Next time: the lookup says Partnero does not have it, so it is created now.
    rig.clock.now = done.state.next_attempt_at
    done = await rig.process(again(first, done))

    assert (done.state.status, done.state.outcome) == (Status.DELIVERED, Outcome.CREATED)
    assert rig.client.kinds() == [RequestKind.CREATE, RequestKind.LOOKUP, RequestKind.CREATE]
    # The lookup and the create it allowed are one attempt.
    assert labels(done) == [(2, "lookup:absent"), (2, "delivered:created")]
    assert done.attempts == 2
    assert done.state.lookup_required is False


async def test_a_lost_create_found_by_the_lookup_is_not_created_again() -> None:
    rig = Rig(lookup_page(["K"], None))

    done = await rig.process(claim(make_event(attempts=1, lookup_required=True)))

    assert (done.state.status, done.state.outcome) == (Status.DELIVERED, Outcome.CREATED)
    assert rig.client.kinds() == [RequestKind.LOOKUP]
    assert labels(done) == [(2, "lookup:found")]
    assert done.state.lookup_required is False


async def test_a_lost_create_on_the_last_attempt_fails_still_flagged() -> None:
    rig = Rig(lost())

    done = await rig.process(claim(make_event(attempts=POLICY.max_attempts - 1)))

    assert (done.state.status, done.state.outcome, done.state.reason) == (
        Status.FAILED,
        Outcome.TIMEOUT,
        Outcome.TIMEOUT,
    )
    assert done.attempts == POLICY.max_attempts
    assert done.state.lookup_required is True  # a retry by a person must look it up first
    assert labels(done) == [(POLICY.max_attempts, "failed:timeout")]


async def test_a_lookup_and_its_create_on_the_last_attempt_give_up_within_the_limit() -> None:
    rig = Rig(lookup_page([], None), lost())
    last = POLICY.max_attempts

    done = await rig.process(claim(make_event(attempts=last - 1, lookup_required=True)))

    assert (done.state.status, done.state.outcome, done.attempts) == (
        Status.FAILED,
        Outcome.TIMEOUT,
        last,
    )
    assert labels(done) == [(last, "lookup:absent"), (last, "failed:timeout")]
    assert done.state.last_error is not None
    assert done.state.last_error.endswith(f"[gave up after {last} attempts]")


async def test_a_flagged_sale_found_on_page_two() -> None:
    rig = Rig(lookup_page(["K1", "K2", "XK"], 2), lookup_page(["K3", "K"], None))

    done = await rig.process(claim(make_event(lookup_required=True)))

    assert (done.state.status, done.state.outcome) == (Status.DELIVERED, Outcome.CREATED)
    assert rig.client.calls == [(RequestKind.LOOKUP, ("K", 1)), (RequestKind.LOOKUP, ("K", 2))]
    # The pages of one lookup are one attempt.
    assert labels(done) == [(1, "lookup:next_page:2"), (1, "lookup:found")]
    assert done.attempts == 1


async def test_a_flagged_sale_absent_from_every_page_is_created() -> None:
    rig = Rig(lookup_page(["K1"], 2), lookup_page(["K2"], 3), lookup_page(["K3"], None), created())

    done = await rig.process(claim(make_event(lookup_required=True)))

    assert (done.state.status, done.state.outcome) == (Status.DELIVERED, Outcome.CREATED)
    assert rig.client.calls == [
        (RequestKind.LOOKUP, ("K", 1)),
        (RequestKind.LOOKUP, ("K", 2)),
        (RequestKind.LOOKUP, ("K", 3)),
        (RequestKind.CREATE, "K"),
    ]
    assert labels(done) == [
        (1, "lookup:next_page:2"),
        (1, "lookup:next_page:3"),
        (1, "lookup:absent"),
        (1, "delivered:created"),
    ]
    assert done.attempts == 1
    assert done.state.lookup_required is False


async def test_a_lookup_404_is_not_absent() -> None:
    rig = Rig(lookup_404())

    done = await rig.process(claim(make_event(lookup_required=True)))

    assert RequestKind.CREATE not in rig.client.kinds()
    assert done.state.status is Status.PENDING
    assert done.state.reason is Outcome.BAD_RESPONSE
    assert done.state.lookup_required is True
    assert done.attempts == 1
    assert labels(done) == [(1, "retry:bad_response+lookup")]


async def test_a_lookup_the_lease_cannot_finish_is_retried_not_absent() -> None:
    rig = Rig(lookup_page(["K1"], 2))

    async def lease_runs_short() -> None:
        rig.monotonic.now += LEASE  # the first page took the whole lease

    rig.client.before[RequestKind.LOOKUP] = lease_runs_short
    done = await rig.process(claim(make_event(attempts=1, lookup_required=True)))

    assert rig.client.calls == [(RequestKind.LOOKUP, ("K", 1))]
    assert done.state.status is Status.PENDING
    assert done.state.reason is Outcome.BAD_RESPONSE
    assert done.state.lookup_required is True
    assert done.attempts == 2
    assert done.state.last_error is not None and done.state.last_error.startswith("bad_response: ")
    assert labels(done) == [(2, "lookup:next_page:2")]

    # On the last attempt it fails, saying why.
    rig = Rig(lookup_page(["K1"], 2))
    rig.client.before[RequestKind.LOOKUP] = lease_runs_short
    done = await rig.process(
        claim(make_event(attempts=POLICY.max_attempts - 1, lookup_required=True))
    )

    assert (done.state.status, done.state.outcome) == (Status.FAILED, Outcome.BAD_RESPONSE)
    assert done.state.lookup_required is True
    assert done.state.last_error is not None
    assert done.state.last_error.startswith("the lookup read 1 pages and the lease ran short")


# ---- refunds -------------------------------------------------------------------------------


async def test_a_refund_deleted() -> None:
    rig = Rig(deleted())

    done = await rig.process(claim(make_event(EventType.REFUND)))

    assert (done.state.status, done.state.outcome) == (Status.DELIVERED, Outcome.DELETED)
    assert rig.client.calls == [(RequestKind.DELETE, "K")]
    assert labels(done) == [(1, "delivered:deleted")]


async def test_a_refund_of_a_transaction_partnero_does_not_have_is_not_found() -> None:
    rig = Rig(delete_not_found())

    done = await rig.process(claim(make_event(EventType.REFUND)))

    assert (done.state.status, done.state.outcome) == (Status.DELIVERED, Outcome.NOT_FOUND)
    assert labels(done) == [(1, "delivered:not_found")]


async def test_a_refund_whose_delete_was_lost_is_deleted_by_the_next_404() -> None:
    rig = Rig(lost(RequestKind.DELETE), delete_not_found())
    first = claim(make_event(EventType.REFUND))

    done = await rig.process(first)
    assert done.state.status is Status.PENDING
    assert done.state.reason is Outcome.TIMEOUT
    assert done.state.lookup_required is True  # for a refund: the DELETE may have landed

    done = await rig.process(again(first, done))

    # Not looked up (only sales are), and the 404 is read as our earlier DELETE's doing.
    assert rig.client.kinds() == [RequestKind.DELETE, RequestKind.DELETE]
    assert (done.state.status, done.state.outcome) == (Status.DELIVERED, Outcome.DELETED)
    assert labels(done) == [(2, "delivered:deleted")]
    assert done.attempts == 2


# ---- 401, 403 and the gate ---------------------------------------------------------------


async def test_a_401_pauses_the_gate_without_counting_an_attempt() -> None:
    rig = Rig(refused(401))

    done = await rig.process(claim(make_event(attempts=3)))

    assert done.state.status is Status.PENDING
    assert done.state.outcome is None and done.state.reason is None
    assert done.attempts == 3
    assert done.state.next_attempt_at == NOW  # due as soon as the key works again
    assert labels(done) == [(4, "pause:auth")]
    assert rig.gate.paused and rig.gate.refused
    assert rig.gate.paused_until == NOW + timedelta(seconds=POLICY.auth_pause_seconds)
    assert rig.gate.pause_detail is not None and "PARTNERO_API_KEY" in rig.gate.pause_detail


async def test_a_paused_gate_gives_rows_back_unsent_and_uncounted() -> None:
    rig = Rig()
    rig.gate.pause(NOW + timedelta(seconds=30), "refused")

    done = await rig.process(claim(make_event(attempts=2, lookup_required=True)))

    assert rig.client.calls == []
    assert done.state.status is Status.PENDING
    assert done.attempts == 2
    assert done.state.lookup_required is True
    assert done.attempt_records == ()
    assert done.state.next_attempt_at == NOW


async def test_a_403_while_the_key_works_fails_the_row_forbidden() -> None:
    rig = Rig(refused(403), ping(200))

    done = await rig.process(claim(make_event(attempts=1)))

    assert done.state.status is Status.FAILED
    assert (done.state.outcome, done.state.reason) == (Outcome.FORBIDDEN, Outcome.FORBIDDEN)
    assert done.attempts == 2
    # A create answered 403 may or may not have landed: a retry looks it up first.
    assert done.state.lookup_required is True
    assert done.state.last_error is not None and done.state.last_error.endswith(
        "[GET /v1/test: OK]"
    )
    assert labels(done) == [(2, "forbidden:check_key"), (2, "failed:forbidden")]
    assert [r.exchange.path for r in done.attempt_records] == ["/v1/transactions", "/v1/test"]
    assert not rig.gate.paused
    assert rig.client.kinds() == [RequestKind.CREATE, RequestKind.PING]


async def test_a_403_on_a_refund_while_the_key_works_fails_unflagged() -> None:
    rig = Rig(refused(403, RequestKind.DELETE), ping(200))

    done = await rig.process(claim(make_event(EventType.REFUND)))

    assert (done.state.status, done.state.outcome) == (Status.FAILED, Outcome.FORBIDDEN)
    assert done.state.lookup_required is False


async def test_a_403_while_the_key_is_refused_pauses() -> None:
    rig = Rig(refused(403), ping(401))

    done = await rig.process(claim(make_event(attempts=1)))

    assert done.state.status is Status.PENDING
    assert done.state.outcome is None
    assert done.attempts == 1  # not charged
    assert labels(done) == [(2, "forbidden:check_key"), (2, "pause:auth")]
    assert rig.gate.paused and rig.gate.refused
    assert rig.gate.paused_until == NOW + timedelta(seconds=POLICY.auth_pause_seconds)


async def test_a_403_whose_key_check_gets_no_answer_pauses_unrefused() -> None:
    rig = Rig(refused(403), ping(503))

    done = await rig.process(claim(make_event()))

    assert done.state.status is Status.PENDING
    assert done.attempts == 0
    assert rig.gate.paused
    assert not rig.gate.refused


async def test_two_403s_in_flight_cost_one_key_check() -> None:
    rig = Rig(refused(403), refused(403), ping(200))
    pinging = asyncio.Event()
    answer = asyncio.Event()

    async def slow_ping() -> None:
        pinging.set()
        await answer.wait()

    rig.client.before[RequestKind.PING] = slow_ping
    one = claim(make_event(key="A", event_id=1))
    two = claim(make_event(key="B", event_id=2))
    first = asyncio.create_task(rig.process(one))
    await pinging.wait()  # the first 403's key check is under way
    second = asyncio.create_task(rig.process(two))
    for _ in range(5):
        await asyncio.sleep(0)  # the second 403 arrives and waits for the check
    answer.set()

    done = await asyncio.gather(first, second)

    assert rig.client.kinds().count(RequestKind.PING) == 1
    for completion in done:
        state = completion.state
        assert (state.status, state.outcome) == (Status.FAILED, Outcome.FORBIDDEN)
    assert labels(done[0]) == [(1, "forbidden:check_key"), (1, "failed:forbidden")]
    # The second row's 403 is settled by the first check: no GET /v1/test of its own.
    assert labels(done[1]) == [(1, "forbidden:check_key")]


async def test_a_403_after_the_last_key_check_gets_its_own() -> None:
    rig = Rig(refused(403), ping(200), refused(403), ping(200))
    await rig.process(claim(make_event(key="A", event_id=1)))

    later = NOW + timedelta(seconds=5)
    rig.clock.now = later
    rig.client.script[0] = replace(rig.client.script[0], started_at=later, finished_at=later)
    done = await rig.process(claim(make_event(key="B", event_id=2)))

    assert rig.client.kinds().count(RequestKind.PING) == 2
    assert labels(done) == [(1, "forbidden:check_key"), (1, "failed:forbidden")]


# ---- the lease -----------------------------------------------------------------------------


async def test_too_little_lease_before_the_first_call_gives_the_row_back_unsent() -> None:
    rig = Rig(created())

    done = await rig.process(
        claim(make_event(attempts=2)), left=TIMEOUT + LEASE_MARGIN_SECONDS - 0.01
    )

    assert rig.client.calls == []
    assert done.state.status is Status.PENDING
    assert done.attempts == 2
    assert done.state.outcome is None and done.state.reason is None
    assert done.state.lookup_required is False
    assert done.attempt_records == ()
    assert done.state.next_attempt_at == NOW


async def test_just_enough_lease_sends() -> None:
    rig = Rig(created())

    done = await rig.process(claim(make_event()), left=TIMEOUT + LEASE_MARGIN_SECONDS)

    assert done.state.status is Status.DELIVERED


# ---- cut short (shutdown) ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "flagged"),
    [(EventType.SALE, True), (EventType.REFUND, False)],
)
async def test_cut_short_during_a_call(kind: EventType, flagged: bool) -> None:
    rig = Rig()
    calling = asyncio.Event()

    async def hang() -> None:
        calling.set()
        await asyncio.Event().wait()

    rig.client.before[RequestKind.CREATE] = hang
    rig.client.before[RequestKind.DELETE] = hang
    claimed = claim(make_event(kind, attempts=1))
    task = asyncio.create_task(rig.process(claimed))
    await calling.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    done = rig.executor.cut_short(claimed)

    assert done.state.status is Status.PENDING
    assert done.attempts == 1
    assert done.state.outcome is None
    # A create that had started may have reached Partnero: look it up next time.
    assert done.state.lookup_required is flagged
    assert done.state.next_attempt_at == NOW


async def test_cut_short_before_any_call_keeps_the_rows_flag() -> None:
    rig = Rig()

    plain = rig.executor.cut_short(claim(make_event(event_id=1)))
    flagged = rig.executor.cut_short(claim(make_event(event_id=2, lookup_required=True)))

    assert (plain.state.status, plain.state.lookup_required) == (Status.PENDING, False)
    assert (flagged.state.status, flagged.state.lookup_required) == (Status.PENDING, True)
    assert rig.client.calls == []


# ---- 429 and the rate limit ----------------------------------------------------------------


async def test_a_429_cools_the_whole_daemon_down_for_retry_after() -> None:
    rig = Rig(create_answer(429, {"message": "Too Many Attempts."}, retry_after_seconds=5.0))

    done = await rig.process(claim(make_event()))

    assert done.state.status is Status.PENDING
    assert done.state.reason is Outcome.RATE_LIMITED
    assert done.state.lookup_required is False  # refused before anything was applied
    assert done.state.next_attempt_at == NOW + timedelta(seconds=5)
    assert rig.gate.cooldown_until == NOW + timedelta(seconds=5)
    assert not rig.gate.paused


async def test_a_row_waits_for_the_rate_limit_and_goes_unsent_if_paused_meanwhile() -> None:
    rig = Rig(created())
    permits: list[asyncio.Future[None]] = []

    def limiter() -> asyncio.Future[None]:
        permits.append(asyncio.get_running_loop().create_future())
        return permits[-1]

    rig.executor.reconfigure(retry_policy=POLICY, limiter=limiter)
    task = asyncio.create_task(rig.process(claim(make_event())))
    for _ in range(5):
        await asyncio.sleep(0)
    assert len(permits) == 1 and not task.done()  # waiting for its turn

    rig.gate.pause(NOW + timedelta(seconds=30), "another row got a 401")
    permits[0].set_result(None)
    done = await task

    assert rig.client.calls == []
    assert done.state.status is Status.PENDING
    assert done.attempts == 0
