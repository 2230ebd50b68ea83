"""Record signup, sale and refund events from Python, inside the caller's own transaction.

    with Session(engine) as session, session.begin():
        session.add(order)
        if new_customer:  # the signup, with the partnero_partner cookie's value if any
            outbox.record_signup(session, customer_key=order.customer_id,
                                 partner_key=request.cookies.get("partnero_partner"))
        outbox.record_sale(session, transaction_key=order.invoice_id,
                           customer_key=order.customer_id, amount=order.total, currency="EUR")

The row commits or rolls back with the caller's transaction; nothing here commits. The database
enforces the insert contract, so a broken row raises sqlalchemy.exc.IntegrityError naming the rule.
A payload that is not a JSON object (a list, a string, a datetime or Decimal inside) raises
TypeError naming where, before anything is sent to the database.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Session

metadata = sa.MetaData(schema="outbox")

# The columns an application may set (docs/design.md, "The insert contract"). The daemon's
# columns are left out on purpose: they are not the application's to write.
events = sa.Table(
    "events",
    metadata,
    sa.Column("id", sa.BigInteger, primary_key=True),
    sa.Column("event_type", sa.Text),
    sa.Column("transaction_key", sa.Text),
    sa.Column("customer_key", sa.Text),
    sa.Column("amount", sa.Numeric),
    sa.Column("currency", sa.Text),
    sa.Column("payload", JSONB(none_as_null=True)),
)

Executor = Session | sa.Connection
Amount = Decimal | int | str


_JSON_SCALARS = (str, int, float, bool, type(None))


def _json_problem(value: object, path: str) -> str | None:
    """Where `value` stops being JSON (a dict with str keys, a list, str, number, bool, None), as
    a sentence naming the path; None when it is JSON all the way down."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                return f"{path} has the key {key!r}, not a string"
            problem = _json_problem(item, f"{path}[{key!r}]")
            if problem:
                return problem
        return None
    if isinstance(value, list | tuple):
        for index, item in enumerate(value):
            problem = _json_problem(item, f"{path}[{index}]")
            if problem:
                return problem
        return None
    if isinstance(value, _JSON_SCALARS):
        return None
    hint = ""
    if isinstance(value, datetime):
        hint = " (Partnero takes created_at as Unix seconds: int(value.timestamp()))"
    elif isinstance(value, Decimal):
        hint = " (write it as a string or a number)"
    return f"{path} is a {type(value).__name__}, which JSON has no type for{hint}"


def _payload(payload: object) -> dict[str, Any] | None:
    """The payload as a plain dict, or a TypeError that says what is wrong with it, before the
    database or the JSON encoder gives a less readable one."""
    if payload is None:
        return None
    if not isinstance(payload, Mapping):
        raise TypeError(
            f"payload must be a JSON object (a dict) or None, not {type(payload).__name__}"
        )
    problem = _json_problem(payload, "payload")
    if problem:
        raise TypeError(problem)
    return dict(payload)


def _insert(
    executor: Executor,
    event_type: str,
    transaction_key: str | None,
    customer_key: str | None,
    *,
    amount: Decimal | None = None,
    currency: str | None = None,
    payload: Mapping[str, Any] | None = None,
) -> int:
    values = {
        "event_type": event_type,
        "transaction_key": transaction_key,
        "customer_key": customer_key,
        "amount": amount,
        "currency": currency,
        "payload": _payload(payload),
    }
    statement = sa.insert(events).values(**values).returning(events.c.id)
    event_id = executor.execute(statement).scalar_one()
    return int(event_id)


def record_sale(
    executor: Executor,
    *,
    transaction_key: str,
    customer_key: str,
    amount: Amount,
    currency: str | None = None,
    payload: Mapping[str, Any] | None = None,
) -> int:
    """Add a sale to the outbox in the caller's transaction; return its event id."""
    if isinstance(amount, float):
        raise TypeError("amount must be a Decimal, int or str, not float (money loses cents)")
    return _insert(
        executor,
        "sale",
        transaction_key,
        customer_key,
        amount=Decimal(amount),
        currency=currency,
        payload=payload,
    )


def record_refund(
    executor: Executor,
    *,
    transaction_key: str,
    customer_key: str | None = None,
    payload: Mapping[str, Any] | None = None,
) -> int:
    """Add a refund (reverses the whole sale with this key) in the caller's transaction."""
    return _insert(executor, "refund", transaction_key, customer_key, payload=payload)


def record_signup(
    executor: Executor,
    *,
    customer_key: str,
    payload: Mapping[str, Any] | None = None,
    partner_key: str | None = None,
) -> int:
    """Add a signup (the new customer `customer_key`) in the caller's transaction. Record every
    signup: without a partner reference the daemon settles it without a call. `partner_key` is
    the partnero_partner cookie's value, sent as payload.partner.key when not None; a payload
    that names the partner itself (`partner`: key, id or email) leaves it None."""
    values = dict(_payload(payload) or {})
    if partner_key is not None:
        if values.get("partner") is not None:
            raise ValueError("give the partner as partner_key or as payload['partner'], not both")
        values["partner"] = {"key": partner_key}
    return _insert(executor, "signup", None, customer_key, payload=values)
