"""The insert contract (docs/insert-contract.md), enforced by Postgres, tested with real INSERTs."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

import outbox
from outbox import db
from outbox.dev import pgtemp
from tests.helpers import psql

DOCUMENT = Path(__file__).resolve().parent.parent / "docs" / "insert-contract.md"

VALID_SALE: dict[str, Any] = {
    "event_type": "sale",
    "transaction_key": "inv_1001",
    "customer_key": "cust_1",
    "amount": Decimal("99.99"),
    "currency": "EUR",
    "payload": None,
}


def insert(conn: sa.Connection, **columns: Any) -> int:
    names = ", ".join(columns)
    values = ", ".join(
        f"CAST(:{name} AS jsonb)" if name == "payload" else f":{name}" for name in columns
    )
    params = {
        k: json.dumps(v) if k == "payload" and v is not None else v for k, v in columns.items()
    }
    return int(
        conn.execute(
            sa.text(f"INSERT INTO outbox.events ({names}) VALUES ({values}) RETURNING id"), params
        ).scalar_one()
    )


def sale(**overrides: Any) -> dict[str, Any]:
    return {**VALID_SALE, **overrides}


def refund(**overrides: Any) -> dict[str, Any]:
    return {"event_type": "refund", "transaction_key": "inv_1001", **overrides}


def signup(**overrides: Any) -> dict[str, Any]:
    return {
        "event_type": "signup",
        "customer_key": "cust_1",
        "payload": {"partner": {"key": "partner_1"}},
        **overrides,
    }


# (rule name, the columns of a row that breaks exactly that rule)
BROKEN_ROWS: list[tuple[str, dict[str, Any]]] = [
    ("event_type_known", sale(event_type="chargeback")),
    ("event_type_known", sale(event_type=None)),
    ("event_type_known", sale(event_type="Sale")),
    ("transaction_key_required", sale(transaction_key=None)),
    ("transaction_key_required", sale(transaction_key="")),
    ("transaction_key_required", refund(transaction_key=None)),
    ("transaction_key_no_surrounding_whitespace", sale(transaction_key=" inv_1")),
    ("transaction_key_no_surrounding_whitespace", sale(transaction_key="inv_1 ")),
    ("transaction_key_no_control_characters", sale(transaction_key="inv_1\t")),
    ("transaction_key_no_control_characters", sale(transaction_key="inv\n1")),
    ("transaction_key_max_255_characters", sale(transaction_key="k" * 256)),
    ("transaction_key_not_dot_segment", sale(transaction_key="..")),
    ("transaction_key_not_dot_segment", refund(transaction_key=".")),
    ("sale_requires_customer_key", sale(customer_key=None)),
    ("customer_key_not_empty", sale(customer_key="")),
    ("customer_key_not_empty", refund(customer_key="")),
    ("customer_key_no_surrounding_whitespace", sale(customer_key="cust_1 ")),
    ("customer_key_no_control_characters", sale(customer_key="cu\x07st")),
    ("customer_key_max_255_characters", sale(customer_key="c" * 256)),
    ("sale_requires_amount", sale(amount=None)),
    ("sale_requires_positive_amount", sale(amount=Decimal("0"))),
    ("sale_requires_positive_amount", sale(amount=Decimal("-5.00"))),
    ("amount_max_4_decimal_places", sale(amount=Decimal("10.00001"))),
    ("amount_below_100_billion", sale(amount=Decimal("100000000000"))),
    ("amount_below_100_billion", sale(amount=Decimal("NaN"))),
    ("refund_has_no_amount", refund(amount=Decimal("10.00"))),
    ("currency_is_iso_4217_code", sale(currency="eur")),
    ("currency_is_iso_4217_code", sale(currency="EURO")),
    ("currency_is_iso_4217_code", sale(currency="")),
    ("refund_has_no_currency", refund(currency="EUR")),
    ("payload_is_json_object", sale(payload=[1, 2])),
    ("payload_is_json_object", sale(payload="text")),
    ("payload_does_not_override_columns", sale(payload={"key": "other"})),
    ("payload_does_not_override_columns", sale(payload={"amount": 1})),
    ("payload_does_not_override_columns", sale(payload={"action": "refund"})),
    ("payload_does_not_override_columns", sale(payload={"amount_units": "USD"})),
    ("payload_does_not_override_customer_key", sale(payload={"customer": {"key": "x"}})),
    ("payload_customer_is_object", sale(payload={"customer": "x"})),
    ("payload_has_no_bulk_transactions", sale(payload={"transactions": []})),
    ("created_at_is_unix_seconds", sale(payload={"created_at": "2026-11-30T12:00:00Z"})),
    ("created_at_is_unix_seconds", sale(payload={"created_at": "1764504000"})),  # a string
    ("created_at_is_unix_seconds", sale(payload={"created_at": 1764504000123})),  # Date.now()
    ("created_at_is_unix_seconds", sale(payload={"created_at": 1764504000.5})),
    ("created_at_is_unix_seconds", sale(payload={"created_at": 1764504000.0})),  # not an integer
    ("created_at_is_unix_seconds", sale(payload={"created_at": -1})),
    ("created_at_is_unix_seconds", sale(payload={"created_at": None})),
    ("created_at_is_unix_seconds", sale(payload={"created_at": True})),
    # PHP's json_encode of a DateTime
    (
        "created_at_is_unix_seconds",
        sale(payload={"created_at": {"date": "2026-11-30 12:00:00.000000", "timezone_type": 3}}),
    ),
    ("created_at_is_unix_seconds", refund(payload={"created_at": "yesterday"})),
    ("signup_has_no_amount", signup(amount=Decimal("10.00"))),
    ("signup_has_no_currency", signup(currency="EUR")),
    ("signup_has_no_transaction_key", signup(transaction_key="inv_1001")),
    ("signup_has_no_transaction_key", signup(transaction_key="")),
    ("signup_partner_is_object", signup(payload={"partner": "partner_1"})),  # the bare cookie
    ("signup_partner_is_object", signup(payload={"partner": ["partner_1"]})),
    ("signup_requires_customer_key", signup(customer_key=None)),
    ("customer_key_not_empty", signup(customer_key="")),
    ("payload_does_not_override_columns", signup(payload={"key": "cust_1"})),
]

# What each rule's DETAIL says after "See the rule in docs/insert-contract.md: ".
RULE_DETAILS: dict[str, str] = {
    "amount_below_100_billion": "amount must be a number below 100000000000.",
    "amount_max_4_decimal_places": "amount has at most 4 decimal places.",
    "created_at_is_unix_seconds": (
        "payload.created_at, if present, is Unix time in whole seconds (an integer, "
        "not milliseconds, not a date string)."
    ),
    "currency_is_iso_4217_code": "currency is NULL or three capital letters (EUR).",
    "customer_key_max_255_characters": "customer_key has at most 255 characters.",
    "customer_key_no_control_characters": "customer_key has no control characters.",
    "customer_key_no_surrounding_whitespace": (
        "customer_key neither starts nor ends with whitespace."
    ),
    "customer_key_not_empty": "customer_key is NULL or not empty.",
    "event_type_known": "event_type is 'sale', 'refund' or 'signup'.",
    "payload_customer_is_object": "payload.customer, if present, is an object.",
    "payload_does_not_override_columns": (
        "payload has no key, amount, action or amount_units: those come from columns."
    ),
    "payload_does_not_override_customer_key": (
        "payload.customer has no key: it comes from the customer_key column."
    ),
    "payload_has_no_bulk_transactions": (
        "payload has no transactions list: one row is one transaction."
    ),
    "payload_is_json_object": "payload is NULL or a JSON object.",
    "refund_has_no_amount": "a refund has no amount (it reverses its sale).",
    "refund_has_no_currency": "a refund has no currency.",
    "sale_requires_amount": "a sale has an amount.",
    "sale_requires_customer_key": "a sale has a customer_key.",
    "sale_requires_positive_amount": "a sale's amount is above 0.",
    "signup_has_no_amount": "a signup has no amount.",
    "signup_has_no_currency": "a signup has no currency.",
    "signup_has_no_transaction_key": (
        "a signup has no transaction_key (its customer_key identifies it)."
    ),
    "signup_partner_is_object": "payload.partner, if present, is an object (key, id or email).",
    "signup_requires_customer_key": "a signup has a customer_key.",
    "transaction_key_max_255_characters": "transaction_key has at most 255 characters.",
    "transaction_key_no_control_characters": "transaction_key has no control characters.",
    "transaction_key_no_surrounding_whitespace": (
        "transaction_key neither starts nor ends with whitespace."
    ),
    "transaction_key_not_dot_segment": "transaction_key is not . or ..",
    "transaction_key_required": "a sale or refund has a transaction_key, not empty.",
}

# Daemon-owned columns an INSERT may not set, one at a time.
DAEMON_COLUMNS: list[tuple[str, Any]] = [
    ("status", "delivered"),
    ("status", "failed"),
    ("outcome", "created"),
    ("attempts", 3),
    ("lookup_required", True),
    ("parked", True),
    ("order_released", True),
    ("lease_owner", "host:1"),
    ("last_error", "boom"),
    ("last_status_code", 500),
    ("delivered_at", "2026-01-01T00:00:00Z"),
    ("next_attempt_at", "2030-01-01T00:00:00Z"),
    ("created_at", "2020-01-01T00:00:00Z"),
]


@pytest.fixture(scope="module")
def shared_engine(databases: pgtemp.DatabaseFactory) -> Iterator[sa.Engine]:
    """One database for the many parametrized cases: refused rows leave nothing behind and the
    valid-row cases roll back, so they cannot see each other."""
    url = databases.create_migrated()
    eng = db.create_engine(url, poolclass=sa.NullPool)
    yield eng
    eng.dispose()
    databases.drop(url)


def count_events(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.text("SELECT count(*) FROM outbox.events")).scalar_one())


@pytest.mark.parametrize(
    ("rule", "row"), BROKEN_ROWS, ids=[f"{r}-{i}" for i, (r, _) in enumerate(BROKEN_ROWS)]
)
def test_broken_row_is_refused_naming_its_rule(
    shared_engine: sa.Engine, rule: str, row: dict[str, Any]
) -> None:
    with pytest.raises(sa.exc.IntegrityError) as refused, shared_engine.begin() as conn:
        insert(conn, **row)
    assert f'"{rule}"' in str(refused.value.orig)
    diag = refused.value.orig.diag  # type: ignore[union-attr]
    assert (diag.sqlstate, diag.constraint_name) == ("23514", rule)
    assert diag.message_detail == f"See the rule in docs/insert-contract.md: {RULE_DETAILS[rule]}"
    assert count_events(shared_engine) == 0


def test_every_rule_has_a_broken_row_and_a_line_in_the_document() -> None:
    section = DOCUMENT.read_text().split("## 2. The rules")[1].split("Worth knowing")[0]
    documented = set(re.findall(r"^\| `([a-z0-9_]+)` \|", section, flags=re.MULTILINE))
    assert {rule for rule, _ in BROKEN_ROWS} == set(RULE_DETAILS)
    assert documented == set(RULE_DETAILS) | {"daemon_owned_columns_not_insertable"}


@pytest.mark.parametrize(("column", "value"), DAEMON_COLUMNS, ids=[c for c, _ in DAEMON_COLUMNS])
def test_daemon_owned_columns_cannot_be_inserted(
    shared_engine: sa.Engine, column: str, value: Any
) -> None:
    with pytest.raises(sa.exc.IntegrityError) as refused, shared_engine.begin() as conn:
        insert(conn, **sale(), **{column: value})
    assert "daemon_owned_columns_not_insertable" in str(refused.value.orig)
    assert count_events(shared_engine) == 0


def test_id_cannot_be_chosen_by_the_application(engine: sa.Engine) -> None:
    with pytest.raises(sa.exc.ProgrammingError, match="id"), engine.begin() as conn:
        insert(conn, id=42, **sale())


def test_one_broken_row_refuses_the_whole_statement(engine: sa.Engine) -> None:
    with pytest.raises(sa.exc.IntegrityError, match="sale_requires_amount"), engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO outbox.events (event_type, transaction_key, customer_key, amount) "
                "VALUES ('sale', 'a', 'c', 10), ('sale', 'b', 'c', NULL)"
            )
        )
    assert count_events(engine) == 0


def test_a_refusal_explains_the_rule_without_repeating_the_row(engine: sa.Engine) -> None:
    row = sale(currency="eur", payload={"customer": {"email": "jane.doe@example.com"}})
    with pytest.raises(sa.exc.IntegrityError) as refused, engine.begin() as conn:
        insert(conn, **row)
    diag = refused.value.orig.diag  # type: ignore[union-attr]
    assert (diag.sqlstate, diag.constraint_name, diag.schema_name, diag.table_name) == (
        "23514",
        "currency_is_iso_4217_code",
        "outbox",
        "events",
    )
    assert diag.message_primary == (
        'new row for relation "events" violates check constraint "currency_is_iso_4217_code"'
    )
    assert diag.message_detail == (
        f"See the rule in docs/insert-contract.md: {RULE_DETAILS['currency_is_iso_4217_code']}"
    )
    assert "jane.doe" not in str(refused.value.orig)  # the database error, not SQLAlchemy's


def test_an_update_that_breaks_a_rule_is_refused_too(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        event_id = insert(conn, **sale())
    refused = pytest.raises(sa.exc.IntegrityError, match="sale_requires_positive_amount")
    with refused, engine.begin() as conn:
        conn.execute(sa.text("UPDATE outbox.events SET amount = 0 WHERE id = :i"), {"i": event_id})
    with engine.begin() as conn:  # the daemon's own columns are not the contract's business
        conn.execute(
            sa.text(
                "UPDATE outbox.events SET status = 'failed', outcome = 'rejected' WHERE id = :i"
            ),
            {"i": event_id},
        )


# The daemon's bookkeeping rules, checked when an UPDATE sets their columns (migration 0003).
BOOKKEEPING: list[tuple[str, str]] = [
    ("attempts_not_negative", "attempts = -1"),
    ("delivered_has_delivered_outcome", "status = 'delivered', outcome = 'rejected'"),
    ("lease_complete_or_absent", "lease_token = gen_random_uuid()"),
    ("outcome_known", "outcome = 'paid'"),
    ("status_known", "status = 'sent'"),
]


@pytest.mark.parametrize(("rule", "assignment"), BOOKKEEPING, ids=[r for r, _ in BOOKKEEPING])
def test_an_update_that_breaks_a_bookkeeping_rule_is_refused_naming_it(
    engine: sa.Engine, rule: str, assignment: str
) -> None:
    with engine.begin() as conn:
        event_id = insert(conn, **sale())
    with pytest.raises(sa.exc.IntegrityError) as refused, engine.begin() as conn:
        conn.execute(
            sa.text(f"UPDATE outbox.events SET {assignment} WHERE id = :i"), {"i": event_id}
        )
    assert refused.value.orig.diag.constraint_name == rule  # type: ignore[union-attr]
    assert f'violates check constraint "{rule}"' in str(refused.value.orig)


VALID_ROWS: list[dict[str, Any]] = [
    sale(),
    sale(currency=None),
    sale(amount=Decimal("0.0001")),
    sale(amount=10),
    sale(amount=Decimal("99999999999.9999")),
    sale(amount=Decimal("10.50000")),  # trailing zeros are not precision
    sale(transaction_key="k" * 255, customer_key="c" * 255),
    sale(transaction_key="inv/2026/ü-7 #1"),  # anything printable, quoted in the URL later
    sale(
        payload={
            "product_id": "prod_123",
            "product_type": "monthly",
            "options": {"create_customer": True},
            "customer": {"partner": {"key": "partner_1"}, "email": "a@example.com"},
            "products": [{"product_id": "a", "product_price": 29.99}],
        }
    ),
    sale(payload={}),
    sale(payload={"created_at": 1764504000}),  # Unix seconds: Partnero backdates the sale
    sale(payload={"created_at": 0}),
    sale(payload={"created_at": 99999999999}),
    sale(payload={"customer": {"created_at": "2026-11-30T12:00:00Z"}}),  # a date string there
    refund(),
    refund(customer_key="cust_1"),
    refund(payload={"reason": "chargeback"}),
    signup(),
    signup(payload=None),
    signup(payload={}),  # no partner: recorded all the same, skipped by the daemon
    signup(payload={"partner": None}),
    signup(payload={"partner": {"key": None}}),  # a missing cookie, copied as it is
    signup(
        payload={
            "partner": {"email": "partner1@example.com"},
            "email": "jane@example.com",
            "name": "Jane",
            "surname": "Doe",
            "tags": ["trial"],
            "options": {"referral_url": "https://shop.example/?aff=partner_1"},
        }
    ),
]


@pytest.mark.parametrize("row", VALID_ROWS, ids=range(len(VALID_ROWS)))
def test_valid_rows_are_accepted_as_pending(shared_engine: sa.Engine, row: dict[str, Any]) -> None:
    with shared_engine.connect() as conn:
        event_id = insert(conn, **row)
        stored = conn.execute(
            sa.text("SELECT status, attempts, outcome FROM outbox.events WHERE id = :id"),
            {"id": event_id},
        ).one()
        conn.rollback()
    assert tuple(stored) == ("pending", 0, None)


def stored_rows(engine: sa.Engine) -> list[sa.Row[Any]]:
    with engine.connect() as conn:
        return list(
            conn.execute(
                sa.text(
                    "SELECT event_type, transaction_key, customer_key, amount, currency, payload "
                    "FROM outbox.events ORDER BY id"
                )
            ).all()
        )


def test_sql_functions_record_signup_sale_and_refund(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        signup_id = conn.execute(
            sa.text("SELECT outbox.record_signup('cust_9', '{\"partner\": {\"id\": 7}}')")
        ).scalar_one()
        sale_id = conn.execute(
            sa.text(
                "SELECT outbox.record_sale("
                "'inv_9', 'cust_9', 12.50, 'USD', '{\"product_id\": \"p\"}')"
            )
        ).scalar_one()
        refund_id = conn.execute(sa.text("SELECT outbox.record_refund('inv_9')")).scalar_one()
        conn.execute(sa.text("SELECT outbox.record_signup('cust_10')"))
    assert signup_id < sale_id < refund_id
    assert stored_rows(engine) == [
        ("signup", None, "cust_9", None, None, {"partner": {"id": 7}}),
        ("sale", "inv_9", "cust_9", Decimal("12.50"), "USD", {"product_id": "p"}),
        ("refund", "inv_9", None, None, None, None),
        ("signup", None, "cust_10", None, None, {}),  # the default payload: no partner
    ]
    for call, rule in [
        ("outbox.record_sale('inv_10', 'c', -1)", "sale_requires_positive_amount"),
        ("outbox.record_signup(NULL)", "signup_requires_customer_key"),
        ("outbox.record_signup('c', '{\"partner\": \"p\"}')", "signup_partner_is_object"),
    ]:
        with pytest.raises(sa.exc.IntegrityError, match=rule), engine.begin() as conn:
            conn.execute(sa.text(f"SELECT {call}"))


def test_python_helper_joins_the_callers_transaction(engine: sa.Engine) -> None:
    with Session(engine) as session, session.begin():
        sale_id = outbox.record_sale(
            session,
            transaction_key="inv_py",
            customer_key="c",
            amount=Decimal("5.00"),
            currency="EUR",
            payload={"product_id": "p1"},
        )
        outbox.record_refund(session, transaction_key="inv_py")
        assert sale_id > 0
    assert count_events(engine) == 2

    # Rolled back with the caller's transaction: nothing stays behind.
    with Session(engine) as session:
        outbox.record_sale(session, transaction_key="inv_gone", customer_key="c", amount=1)
        session.rollback()
    assert count_events(engine) == 2

    # Works on a Core connection too, and a broken row raises naming the rule.
    with (
        pytest.raises(sa.exc.IntegrityError, match="sale_requires_positive_amount"),
        engine.begin() as conn,
    ):
        outbox.record_sale(conn, transaction_key="inv_bad", customer_key="c", amount=0)
    with pytest.raises(TypeError, match="float"), engine.begin() as conn:
        outbox.record_sale(conn, transaction_key="inv_f", customer_key="c", amount=1.1)  # type: ignore[arg-type]
    assert count_events(engine) == 2


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ([{"product_id": "p1"}], r"^payload must be a JSON object \(a dict\) or None, not list$"),
        ('{"product_id": "p1"}', r"^payload must be a JSON object \(a dict\) or None, not str$"),
        (
            {"created_at": datetime(2026, 11, 30, tzinfo=UTC)},
            r"^payload\['created_at'\] is a datetime, which JSON has no type for "
            r"\(Partnero takes created_at as Unix seconds: int\(value.timestamp\(\)\)\)$",
        ),
        (
            {"products": [{"product_price": Decimal("9.99")}]},
            r"^payload\['products'\]\[0\]\['product_price'\] is a Decimal",
        ),
        ({"options": {1: "x"}}, r"^payload\['options'\] has the key 1, not a string$"),
    ],
    ids=["list", "json-text", "datetime", "decimal-deep", "int-key"],
)
def test_python_helpers_refuse_a_payload_that_is_not_a_json_object(
    engine: sa.Engine, payload: Any, message: str
) -> None:
    """A clear TypeError that says where, before anything reaches the database."""
    for call in (
        lambda c: outbox.record_sale(
            c, transaction_key="inv_p", customer_key="c", amount=1, payload=payload
        ),
        lambda c: outbox.record_refund(c, transaction_key="inv_p", payload=payload),
        lambda c: outbox.record_signup(c, customer_key="c", payload=payload),
    ):
        with pytest.raises(TypeError, match=message), engine.begin() as conn:
            call(conn)
    assert count_events(engine) == 0


def test_python_signup_helper(engine: sa.Engine) -> None:
    with Session(engine) as session, session.begin():
        signup_id = outbox.record_signup(
            session, customer_key="cust_s1", partner_key="partner_1", payload={"name": "Jane"}
        )
        sale_id = outbox.record_sale(
            session, transaction_key="inv_s1", customer_key="cust_s1", amount=5
        )
        assert 0 < signup_id < sale_id
    with engine.begin() as conn:
        outbox.record_signup(conn, customer_key="cust_s2")  # no cookie: recorded all the same
        outbox.record_signup(conn, customer_key="cust_s3", payload={"partner": {"email": "p@x.io"}})
    signups = [row for row in stored_rows(engine) if row.event_type == "signup"]
    assert [(row.customer_key, row.payload) for row in signups] == [
        ("cust_s1", {"name": "Jane", "partner": {"key": "partner_1"}}),
        ("cust_s2", {}),
        ("cust_s3", {"partner": {"email": "p@x.io"}}),
    ]

    # A broken row raises naming the rule; a partner given twice raises before any INSERT.
    for customer_key, payload, rule in [
        ("", None, "customer_key_not_empty"),
        ("cust_s4", {"partner": "partner_1"}, "signup_partner_is_object"),
        ("cust_s4", {"key": "cust_s4"}, "payload_does_not_override_columns"),
    ]:
        with pytest.raises(sa.exc.IntegrityError, match=rule), engine.begin() as conn:
            outbox.record_signup(conn, customer_key=customer_key, payload=payload)
    with pytest.raises(ValueError, match="not both"), engine.begin() as conn:
        outbox.record_signup(
            conn, customer_key="cust_s4", partner_key="p", payload={"partner": {"id": 1}}
        )
    assert count_events(engine) == 4


def test_psql_foreign_client_inserts_and_gets_named_errors(
    engine: sa.Engine, database_url: str
) -> None:
    ok = psql(
        database_url,
        "BEGIN;"
        "INSERT INTO outbox.events (event_type, transaction_key, customer_key, amount, currency) "
        "VALUES ('sale', 'psql_1', 'cust_1', 49.90, 'EUR');"
        "INSERT INTO outbox.events (event_type, transaction_key) VALUES ('refund', 'psql_1');"
        'SELECT outbox.record_signup(\'cust_2\', \'{"partner": {"key": "partner_1"}}\');'
        "COMMIT;",
    )
    assert ok.returncode == 0, ok.stderr
    refused = psql(
        database_url,
        "INSERT INTO outbox.events (event_type, transaction_key, customer_key, amount) "
        "VALUES ('refund', 'psql_2', 'cust_1', 10);",
    )
    assert refused.returncode != 0
    assert 'violates check constraint "refund_has_no_amount"' in refused.stderr
    assert count_events(engine) == 3
