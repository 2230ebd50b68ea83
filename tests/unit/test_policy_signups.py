"""The policy for signups and for customers Partnero does not know (docs/design.md, "Delivery
rules" 3): pure functions, a table per rule."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

from outbox.decisions import Decision, Delivered, Failed, Retry, Skipped, label_of
from outbox.domain import Event, EventType, Exchange, Outcome, RequestKind, RetryPolicy
from outbox.policy import decide, describe, partner_reference, unsent_skip

NOW = datetime(2026, 11, 30, 12, 0, 0, tzinfo=UTC)
GRACE = 900.0
POLICY = RetryPolicy(
    max_attempts=20,
    base_delay_seconds=2.0,
    max_delay_seconds=1800.0,
    jitter=0.0,
    unknown_customer_grace_seconds=GRACE,
)


def sale(*, recorded_ago: float | None = 0.0, attempts: int = 0, **changes: Any) -> Event:
    created = None if recorded_ago is None else NOW - timedelta(seconds=recorded_ago)
    fields: dict[str, Any] = {
        "id": 1,
        "event_type": EventType.SALE,
        "transaction_key": "inv-1",
        "customer_key": "cus-1",
        "amount": Decimal("10.00"),
        "currency": "EUR",
        "payload": {},
        "attempts": attempts,
        "lookup_required": False,
        "created_at": created,
    }
    fields.update(changes)
    return Event(**fields)


def signup(payload: dict[str, Any] | None = None, **changes: Any) -> Event:
    fields: dict[str, Any] = {
        "event_type": EventType.SIGNUP,
        "transaction_key": None,
        "amount": None,
        "currency": None,
        "payload": {"partner": {"key": "partner_1"}} if payload is None else payload,
    }
    fields.update(changes)
    return sale(**fields)


def answer(kind: RequestKind, status: int, body: dict[str, Any] | None = None) -> Exchange:
    path = "/v1/customers" if kind is RequestKind.CREATE_CUSTOMER else "/v1/transactions"
    return Exchange(
        kind=kind,
        method="POST",
        path=path,
        status_code=status,
        body_excerpt="" if body is None else str(body),
        message=None if body is None else body.get("message"),
        json_body=body,
        started_at=NOW,
        finished_at=NOW,
    )


def not_found() -> Exchange:
    return answer(RequestKind.CREATE, 400, {"message": "Customer not found", "status": 0})


# ---- a sale of a customer Partnero does not know ------------------------------------------------


def test_within_the_grace_it_is_retried_with_backoff() -> None:
    decision = decide(sale(), not_found(), NOW, POLICY, 0.5)
    assert decision == Retry(at=NOW + timedelta(seconds=2), reason=Outcome.CUSTOMER_NOT_FOUND)


def test_the_last_retry_falls_at_the_end_of_the_grace() -> None:
    # Recorded 14 minutes ago, 10th attempt: the backoff (1024 s) would overshoot the grace.
    ev = sale(recorded_ago=840, attempts=9)
    decision = decide(ev, not_found(), NOW, POLICY, 0.5)
    assert decision == Retry(at=NOW + timedelta(seconds=60), reason=Outcome.CUSTOMER_NOT_FOUND)


@pytest.mark.parametrize("recorded_ago", [GRACE, GRACE + 1, 86400.0])
def test_after_the_grace_it_is_skipped_never_failed(recorded_ago: float) -> None:
    decision = decide(sale(recorded_ago=recorded_ago), not_found(), NOW, POLICY, 0.5)
    assert decision == Skipped(
        Outcome.CUSTOMER_NOT_FOUND,
        f"{describe(not_found())} [not known to Partnero 15m after the sale was recorded]",
    )


def test_a_customer_whose_signup_was_skipped_is_skipped_at_the_first_answer() -> None:
    decision = decide(sale(customer_signup_skipped=True), not_found(), NOW, POLICY, 0.5)
    assert isinstance(decision, Skipped)
    assert decision.outcome is Outcome.CUSTOMER_NOT_FOUND
    assert decision.detail.endswith("[the customer's signup was skipped: never referred]")


def test_running_out_of_attempts_within_the_grace_ends_skipped() -> None:
    few = replace(POLICY, max_attempts=3)
    assert isinstance(decide(sale(attempts=1), not_found(), NOW, few, 0.5), Retry)
    assert decide(sale(attempts=2), not_found(), NOW, few, 0.5) == Skipped(
        Outcome.CUSTOMER_NOT_FOUND,
        f"{describe(not_found())} [not known to Partnero after 3 attempts]",
    )


def test_a_row_without_its_recording_time_gets_no_grace() -> None:
    decision = decide(sale(recorded_ago=None), not_found(), NOW, POLICY, 0.5)
    assert isinstance(decision, Skipped)


def test_a_grace_of_zero_skips_at_the_first_answer() -> None:
    none = replace(POLICY, unknown_customer_grace_seconds=0)
    assert isinstance(decide(sale(), not_found(), NOW, none, 0.5), Skipped)


# ---- a signup: POST /v1/customers --------------------------------------------------------------

CUSTOMER = RequestKind.CREATE_CUSTOMER
INVALID = {"message": "The given data was invalid.", "errors": {"email": ["Not an email."]}}


@pytest.mark.parametrize(
    ("status", "body", "flagged", "expected"),
    [
        (201, {"data": {"key": "cus-1"}, "status": 1}, False, Delivered(Outcome.CREATED)),
        (200, {"data": {"key": "cus-1"}}, False, Delivered(Outcome.CREATED)),
        (422, {"message": "Duplicate key", "status": 0}, False, Delivered(Outcome.DUPLICATE)),
        (422, {"message": "duplicate KEY.", "status": 0}, False, Delivered(Outcome.DUPLICATE)),
        # After a call whose answer was lost, the customer is most likely that call's.
        (422, {"message": "Duplicate key", "status": 0}, True, Delivered(Outcome.CREATED)),
        (400, {"message": "Invalid partner key", "status": 0}, False, Outcome.INVALID_PARTNER),
        (422, INVALID, False, Outcome.VALIDATION_ERROR),
        # The transaction create's messages are not the customer create's.
        (400, {"message": "Duplicate key", "status": 0}, False, Outcome.REJECTED),
        (400, {"message": "Customer not found", "status": 0}, False, Outcome.REJECTED),
        (422, {"message": "Invalid partner key", "status": 0}, False, Outcome.REJECTED),
        (503, {"message": "Service Unavailable"}, False, Outcome.SERVER_ERROR),
        (200, {"status": 0}, False, Outcome.BAD_RESPONSE),
        (
            404,
            {"message": "The route v1/customer could not be found."},
            False,
            Outcome.BAD_RESPONSE,
        ),
    ],
)
def test_a_signup_is_read_as_partnero_means_it(
    status: int, body: dict[str, Any], flagged: bool, expected: Decision | Outcome
) -> None:
    ex = answer(CUSTOMER, status, body)
    decision = decide(signup(lookup_required=flagged), ex, NOW, POLICY, 0.5)
    if isinstance(expected, Delivered):
        assert decision == expected
    elif expected is Outcome.INVALID_PARTNER:
        assert decision == Skipped(Outcome.INVALID_PARTNER, describe(ex))
        assert label_of(decision) == "skipped:invalid_partner"
    elif expected in (Outcome.SERVER_ERROR, Outcome.BAD_RESPONSE):
        assert isinstance(decision, Retry)
        assert decision.reason is expected
    else:
        assert isinstance(decision, Failed)
        assert (decision.reason, decision.detail) == (expected, describe(ex))


# ---- rows settled without a call ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "reference"),
    [
        ({"partner": {"key": "p_1"}}, "key=p_1"),
        ({"partner": {"id": 12}}, "id=12"),
        ({"partner": {"email": "p@example.com"}}, "email=p@example.com"),
        ({"partner": {"key": None, "email": "p@example.com"}}, "email=p@example.com"),
        ({}, None),
        ({"partner": None}, None),
        ({"partner": {}}, None),
        ({"partner": {"key": None}}, None),  # a missing cookie copied as it came
        ({"partner": {"key": "  "}}, None),
        ({"partner": {"key": True}}, None),
        ({"partner": "p_1"}, None),  # refused at INSERT; never a reference
        ({"email": "c@example.com"}, None),
    ],
)
def test_partner_reference(payload: dict[str, Any], reference: str | None) -> None:
    assert partner_reference(payload) == reference


def test_a_signup_no_partner_referred_is_skipped_unsent() -> None:
    skipped = unsent_skip(signup({"email": "c@example.com"}), sale_skipped=False)
    assert isinstance(skipped, Skipped)
    assert skipped.outcome is Outcome.NOT_REFERRED
    assert label_of(skipped) == "skipped:not_referred"
    assert unsent_skip(signup(), sale_skipped=False) is None


def test_a_refund_of_a_skipped_sale_is_skipped_unsent() -> None:
    refund = sale(event_type=EventType.REFUND, customer_key=None, amount=None, currency=None)
    skipped = unsent_skip(refund, sale_skipped=True)
    assert isinstance(skipped, Skipped)
    assert skipped.outcome is Outcome.SALE_SKIPPED
    assert unsent_skip(refund, sale_skipped=False) is None
    assert unsent_skip(sale(), sale_skipped=True) is None  # only refunds follow their sale
