"""The measurements. Each takes the shared Postgres server and fake, makes its own database, and
returns a plain dict of what it measured (the report turns those into tables)."""

from __future__ import annotations

import contextlib
import json
import re
import statistics
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import psycopg

from bench import harness
from bench.harness import PENDING_LEFT, Child, Fake, Postgres
from bench.profile import summarize

# ---- shared helpers ----------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (0-100), nearest-rank."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def _first_received(fake: Fake) -> tuple[float, dict[str, int], int]:
    """The first arrival at the fake, answers by status, and how many distinct keys were sent,
    counting the delivery calls only (not the daemon's key check, GET /v1/test)."""
    requests = [r for r in fake.requests() if r["path"] != "/v1/test"]
    statuses: dict[str, int] = {}
    for r in requests:
        statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
    first = min(r["received_at"] for r in requests)
    keys = len({r["key"] for r in requests})
    return first, statuses, keys


class Meter:
    """CPU seconds of the process under test, Postgres and the fake between start() and stop()."""

    def __init__(
        self, pg: Postgres, fake: Fake, child: Child | None, url: str | None = None
    ) -> None:
        self._url = url
        self._sources: dict[str, Any] = {"postgres": pg, "fake": fake, "machine": _Machine()}
        if child is not None:
            self._sources["sender"] = child
        self._start: dict[str, float] = {}
        self.used: dict[str, float] = {}

    def start(self) -> None:
        self._start = {k: s.cpu_seconds() for k, s in self._sources.items()}
        self._xacts = _xacts(self._url)
        self._t0 = time.monotonic()

    def stop(self) -> None:
        self.used = {k: s.cpu_seconds() - self._start[k] for k, s in self._sources.items()}
        self.wall = time.monotonic() - self._t0
        self.xacts = _xacts(self._url) - self._xacts
        ours = sum(v for k, v in self.used.items() if k != "machine")
        # Everything else this machine ran meanwhile (other people's tests, the bench itself).
        self.others = max(0.0, self.used.pop("machine") - ours)

    def per_event_ms(self, count: int) -> dict[str, float]:
        return {k: round(v / count * 1000, 3) for k, v in self.used.items()}

    def context(self, count: int) -> dict[str, float]:
        return {
            "other_load_cores": round(self.others / self.wall, 2),
            "pg_transactions_per_event": round(self.xacts / count, 3),
        }


class _Machine:
    """Busy CPU seconds of the whole machine (all cores)."""

    def cpu_seconds(self) -> float:
        t = psutil.cpu_times()
        return float(sum(t) - t.idle - getattr(t, "iowait", 0.0))


def _xacts(url: str | None) -> int:
    if url is None:
        return 0
    return int(
        harness.scalar(
            url,
            "SELECT xact_commit + xact_rollback FROM pg_stat_database "
            "WHERE datname = current_database()",
        )
    )


def _wait_first_request(fake: Fake, child: Child, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while fake.stats()["requests"] == 0:
        if not child.alive():
            raise RuntimeError(f"the sender exited before sending:\n{child.tail()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no request after {timeout} s:\n{child.tail()}")
        time.sleep(0.01)


def _drain(
    pg: Postgres,
    fake: Fake,
    url: str,
    child: Child,
    count: int,
    done_sql: str,
    timeout: float,
    profile: Path | None = None,
) -> dict[str, Any]:
    """Time one sender draining `count` queued rows: from the first request arriving at the fake
    to the moment the database shows no row left to do (polled every 50 ms)."""
    meter = Meter(pg, fake, child, url)
    spy: subprocess.Popen[bytes] | None = None
    try:
        _wait_first_request(fake, child)
        meter.start()
        if profile is not None:
            spy = subprocess.Popen(
                [
                    str(Path(harness.sys.executable).parent / "py-spy"),
                    "record",
                    "--pid",
                    str(child.proc.pid),
                    "--format",
                    "raw",
                    "--rate",
                    "100",
                    "--output",
                    str(profile),
                    "--full-filenames",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        end = harness.wait_until_empty(url, done_sql, timeout)
        meter.stop()
    except BaseException:
        print(child.tail(40))
        raise
    finally:
        rc = child.stop()
        if spy is not None:
            spy.wait(30)
    first, statuses, keys = _first_received(fake)
    seconds = end - first
    result = {
        "events": count,
        "seconds": round(seconds, 3),
        "events_per_second": round(count / seconds, 1),
        "answers": statuses,
        "distinct_keys_sent": keys,
        "cpu_ms_per_event": meter.per_event_ms(count),
        **meter.context(count),
        "exit_code": rc,
    }
    if profile is not None and profile.exists():
        result["profile"] = summarize(profile)
    return result


def _check_delivered(url: str, count: int) -> None:
    got = harness.scalar(url, "SELECT count(*) FROM outbox.events WHERE status = 'delivered'")
    if got != count:
        raise AssertionError(f"{got} of {count} rows delivered")


# ---- 1. throughput -----------------------------------------------------------------------------


def daemon_drain(
    pg: Postgres,
    fake: Fake,
    count: int,
    concurrency: int,
    *,
    history: int = 0,
    profile: Path | None = None,
    loaded: str | None = None,
    **settings: Any,
) -> dict[str, Any]:
    """Drain `count` pending sales (loaded here, or already in the database `loaded`)."""
    url = loaded or pg.database()
    try:
        if loaded is None:
            if history:
                harness.load_history(url, history)
            harness.load_sales(url, count)
        fake.reset()
        daemon = harness.start_daemon(url, fake.url, concurrency=concurrency, **settings)
        try:
            result = _drain(pg, fake, url, daemon, count, PENDING_LEFT, 30 + count / 100, profile)
        finally:
            daemon.close()
        _check_delivered(url, count + history)
        if result["distinct_keys_sent"] != count:
            raise AssertionError(f"sent {result['distinct_keys_sent']} keys for {count} rows")
        result["concurrency"] = concurrency
        return result
    finally:
        pg.drop(url)


# ---- 1b. signups and sales ---------------------------------------------------------------------

OUTCOMES_SQL = (
    "SELECT event_type || ':' || status || ':' || coalesce(outcome, ''), count(*) "
    "FROM outbox.events GROUP BY 1"
)
# The longest pause in settling: the most seconds between two rows settling one after the other,
# how many rows settled after it, and the rate of settling before it (from the first row
# settled to the pause's start, database clock). A sale parked behind its customer's signup that
# the signup's completion did not wake waits for OUTBOX_BLOCKED_RECHECK_SECONDS (30 by default).
PAUSE_SQL = """
WITH t AS (
    SELECT updated_at, updated_at - lag(updated_at) OVER (ORDER BY updated_at) AS gap
    FROM outbox.events
    WHERE updated_at > created_at  -- settled by the daemon (the load's rows share created_at)
), p AS (
    SELECT updated_at AS resumed, gap FROM t WHERE gap IS NOT NULL ORDER BY gap DESC LIMIT 1
)
SELECT extract(epoch FROM p.gap)::float8,
       (SELECT count(*) FROM t WHERE t.updated_at >= p.resumed),
       (SELECT count(*) / nullif(extract(epoch FROM p.resumed - p.gap - min(t.updated_at)), 0)
        FROM t WHERE t.updated_at < p.resumed)::float8
FROM p
"""


def signup_mix(
    pg: Postgres, fake: Fake, customers: int, sales_each: int, concurrency: int
) -> dict[str, Any]:
    """Drain `customers` signups, each followed by `sales_each` sales of its customer, every
    second customer referred, against the fake as Partnero behaves (a sale needs a customer it
    knows). A referred customer's signup is created and its sales delivered; the others' signups
    are skipped without a call and each of their sales costs one call (400 Customer not found)
    and is skipped. Timed like `daemon_drain`; `events` counts every row, `calls` the HTTP
    calls."""
    url = pg.database()
    count = customers * (1 + sales_each)
    referred = customers // 2  # the even-numbered customers
    try:
        harness.load_signups_and_sales(url, customers, sales_each)
        fake.reset()
        fake.configure(customers_must_exist=True)
        try:
            daemon = harness.start_daemon(url, fake.url, concurrency=concurrency)
            try:
                result = _drain(pg, fake, url, daemon, count, PENDING_LEFT, 30 + count / 100)
            finally:
                daemon.close()
        finally:
            fake.configure(customers_must_exist=False)
        with harness.connect(url) as conn:
            outcomes = {str(k): int(n) for k, n in conn.execute(OUTCOMES_SQL).fetchall()}
            pause = conn.execute(PAUSE_SQL).fetchone() or (0.0, 0, None)
    finally:
        pg.drop(url)
    expected = {
        "signup:delivered:created": referred,
        "signup:skipped:not_referred": customers - referred,
        "sale:delivered:created": referred * sales_each,
        "sale:skipped:customer_not_found": (customers - referred) * sales_each,
    }
    if outcomes != expected:
        raise AssertionError(f"rows ended {outcomes}, expected {expected}")
    # One call per referred signup and per sale; no sale was refused before its signup.
    calls = {"201": referred * (1 + sales_each), "400": (customers - referred) * sales_each}
    if result["answers"] != calls:
        raise AssertionError(f"Partnero answered {result['answers']}, expected {calls}")
    total_calls = sum(calls.values())
    result.update(
        customers=customers,
        sales_per_customer=sales_each,
        referred_customers=referred,
        outcomes=outcomes,
        calls=total_calls,
        calls_per_second=round(total_calls / result["seconds"], 1),
        longest_pause_seconds=round(float(pause[0]), 2),
        rows_after_longest_pause=int(pause[1]),
        rows_per_second_before_pause=None if pause[2] is None else round(float(pause[2]), 1),
        concurrency=concurrency,
    )
    return result


# ---- 2. latency --------------------------------------------------------------------------------

INSERT_SALE = (
    f"INSERT INTO outbox.events ({harness.SALE_COLUMNS}) "
    "VALUES ('sale', %s, %s, %s, 'EUR', '{\"product_id\": \"plan_pro\"}')"
)


def latency(
    pg: Postgres, fake: Fake, rate: float, seconds: float, concurrency: int
) -> dict[str, Any]:
    """One transaction per sale at a steady `rate`; commit (client side, right after COMMIT
    returns) to arrival at the fake (its `received_at`), both time.time() on this host."""
    url = pg.database()
    daemon = harness.start_daemon(url, fake.url, concurrency=concurrency)
    try:
        fake.reset()
        with psycopg.connect(url) as conn:  # a transaction per sale, like an application
            conn.execute(INSERT_SALE, ("warm-up", "cust-0", 10), prepare=True)
            conn.commit()
            harness.wait_until_empty(url, PENDING_LEFT, 60)
            fake.reset()
            meter = Meter(pg, fake, daemon, url)
            meter.start()
            count = int(rate * seconds)
            committed: dict[str, float] = {}
            late = 0
            t0 = time.monotonic() + 0.1
            for i in range(count):
                target = t0 + i / rate
                delay = target - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                elif delay < -0.005:
                    late += 1
                key = f"lat-{i}"
                conn.execute(INSERT_SALE, (key, f"cust-{i % 1000}", 10 + i % 90), prepare=True)
                conn.commit()
                committed[key] = time.time()
            produced = time.monotonic() - t0
        harness.wait_until_empty(url, PENDING_LEFT, 60)
        meter.stop()
        rss = daemon.rss()
    finally:
        daemon.close()
        pg.drop(url)
    arrivals = {r["key"]: r["received_at"] for r in fake.requests() if r["method"] == "POST"}
    missing = [k for k in committed if k not in arrivals]
    if missing:
        raise AssertionError(f"{len(missing)} sales never reached the fake")
    ms = [(arrivals[k] - t) * 1000 for k, t in committed.items()]
    return {
        "rate_per_second": rate,
        "events": count,
        "achieved_rate": round(count / produced, 1),
        "late_inserts": late,
        "concurrency": concurrency,
        "p50_ms": round(pct(ms, 50), 2),
        "p95_ms": round(pct(ms, 95), 2),
        "p99_ms": round(pct(ms, 99), 2),
        "max_ms": round(max(ms), 2),
        "mean_ms": round(statistics.fmean(ms), 2),
        "daemon_rss_mb": round(rss / 2**20, 1),
        "cpu_ms_per_event": meter.per_event_ms(count),
        **meter.context(count),
    }


# ---- 3. insert cost ----------------------------------------------------------------------------

PGBENCH_INSERT = """\\set k random(1, 1000000000)
INSERT INTO {table} (event_type, transaction_key, customer_key, amount, currency, payload)
VALUES ('sale', 'pgb-' || :client_id || '-' || :k, 'cust-' || (:k % 1000), 10 + (:k % 90),
        'EUR', '{{"product_id": "plan_pro"}}');
"""

INSERT_TABLES = {
    # The same columns and defaults, a primary key and nothing else.
    "plain": "CREATE TABLE public.plain_events "
    "(LIKE outbox.events INCLUDING DEFAULTS INCLUDING IDENTITY); "
    "ALTER TABLE public.plain_events ADD PRIMARY KEY (id)",
    # ... and the outbox's indexes too: what is left is the constraints and the triggers.
    "plain+indexes": "CREATE TABLE public.indexed_events "
    "(LIKE outbox.events INCLUDING DEFAULTS INCLUDING IDENTITY INCLUDING INDEXES)",
}
TABLE_NAMES = {
    "plain": "public.plain_events",
    "plain+indexes": "public.indexed_events",
    # No daemon holds the doorbell (every daemon busy with a backlog, or none running): the
    # INSERT takes a share lock on it and does not NOTIFY.
    "outbox": "outbox.events",
    # A daemon has caught up and holds the doorbell: every INSERT NOTIFYs.
    "outbox, a daemon waiting": "outbox.events",
    # To tell the parts apart (no daemon waiting): without the contract's row trigger, and
    # without the statement trigger that takes the doorbell's share lock.
    "outbox, contract trigger off": "outbox.events",
    "outbox, doorbell trigger off": "outbox.events",
}
TRIGGERS_OFF = {
    "outbox, contract trigger off": "events_check_insert_contract",
    "outbox, doorbell trigger off": "events_notify_daemon",
}
BULK_TABLES = {"plain": "public.plain_events", "outbox": "outbox.events"}
BULK_INSERT = """INSERT INTO {table}
    (event_type, transaction_key, customer_key, amount, currency, payload)
SELECT 'sale', 'bulk-{round}-' || g, 'cust-' || (g % 1000), 10 + (g % 90), 'EUR',
       '{{"product_id": "plan_pro"}}'
FROM generate_series(1, {rows}) g"""


def _listen(url: str, stop: threading.Event, doorbell: threading.Event) -> None:
    """A LISTEN outbox_events connection that reads its notifications, as the daemon's does, and
    holds the doorbell (as an idle daemon does) while `doorbell` is set."""
    armed = False
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("LISTEN outbox_events")
        while not stop.is_set():
            if doorbell.is_set() != armed:
                if armed:
                    conn.execute("SELECT outbox.disarm_doorbell()")
                else:
                    row = conn.execute("SELECT outbox.arm_doorbell(10000)").fetchone()
                    assert row == ("armed",), row
                armed = not armed
            for _ in conn.notifies(timeout=0.05):
                pass


def inserts(
    pg: Postgres, seconds: float, clients: int, rounds: int, bulk_rows: int
) -> dict[str, Any]:
    """INSERT throughput of `clients` pgbench clients, one INSERT per transaction; then one
    INSERT ... SELECT of `bulk_rows` rows per table, `rounds` times."""
    url = pg.database()
    try:
        with harness.connect(url) as conn:
            for ddl in INSERT_TABLES.values():
                conn.execute(ddl)
        stop, doorbell = threading.Event(), threading.Event()
        listener = threading.Thread(target=_listen, args=(url, stop, doorbell), daemon=True)
        listener.start()
        tps: dict[str, list[float]] = {name: [] for name in TABLE_NAMES}
        try:
            for _ in range(rounds):
                for name, table in TABLE_NAMES.items():
                    waiting = name == "outbox, a daemon waiting"
                    if waiting:
                        doorbell.set()
                        harness.wait_for(
                            lambda: _doorbell_held(url), timeout=10, what="the doorbell armed"
                        )
                    off = TRIGGERS_OFF.get(name)
                    if off:
                        harness.execute(url, f"ALTER TABLE outbox.events DISABLE TRIGGER {off}")
                    try:
                        tps[name].append(_pgbench(url, table, seconds, clients))
                    finally:
                        if off:
                            harness.execute(url, f"ALTER TABLE outbox.events ENABLE TRIGGER {off}")
                        doorbell.clear()
                        harness.wait_for(
                            lambda: not _doorbell_held(url), timeout=10, what="disarmed"
                        )
        finally:
            stop.set()
            listener.join(5)
        bulk: dict[str, list[float]] = {name: [] for name in BULK_TABLES}
        for round_ in range(rounds):
            for name, table in BULK_TABLES.items():
                t0 = time.perf_counter()
                harness.execute(url, BULK_INSERT.format(table=table, round=round_, rows=bulk_rows))
                bulk[name].append(round(bulk_rows / (time.perf_counter() - t0), 1))
        rows = {
            table: harness.scalar(url, f"SELECT count(*) FROM {table}")
            for table in set(TABLE_NAMES.values())
        }
    finally:
        pg.drop(url)
    mean = {name: round(statistics.fmean(v), 1) for name, v in tps.items()}
    bulk_mean = {name: round(statistics.fmean(v), 1) for name, v in bulk.items()}
    return {
        "clients": clients,
        "seconds_per_run": seconds,
        "rounds": rounds,
        "tps_runs": tps,
        "tps": mean,
        "rows": rows,
        "outbox_vs_plain": round(mean["outbox"] / mean["plain"], 3),
        "outbox_vs_plain_indexes": round(mean["outbox"] / mean["plain+indexes"], 3),
        "outbox_waiting_vs_plain": round(mean["outbox, a daemon waiting"] / mean["plain"], 3),
        "bulk_rows": bulk_rows,
        "bulk_rows_per_second_runs": bulk,
        "bulk_rows_per_second": bulk_mean,
        "bulk_outbox_vs_plain": round(bulk_mean["outbox"] / bulk_mean["plain"], 3),
    }


def _doorbell_held(url: str) -> bool:
    return bool(
        harness.scalar(
            url,
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
            "AND mode = 'ExclusiveLock' "
            "AND ((classid::bigint << 32) | objid::bigint) = -778825528700430751",
        )
    )


def _pgbench(url: str, table: str, seconds: float, clients: int) -> float:
    script = Path(harness.tempfile.mkstemp(prefix="bench-pgbench-", suffix=".sql")[1])
    script.write_text(PGBENCH_INSERT.format(table=table))
    try:
        out = subprocess.run(
            [
                harness.pg_bin("pgbench"),
                "--no-vacuum",
                "--client",
                str(clients),
                "--jobs",
                "2",
                "--time",
                str(int(seconds)),
                "--protocol",
                "prepared",
                "--file",
                str(script),
                url,
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    finally:
        script.unlink()
    match = re.search(r"tps = ([0-9.]+) \(without initial connection time\)", out)
    if not match:
        raise RuntimeError(f"cannot read pgbench output:\n{out}")
    return float(match.group(1))


# ---- 4. memory ---------------------------------------------------------------------------------


def memory(pg: Postgres, fake: Fake, count: int, concurrency: int) -> dict[str, Any]:
    """The daemon's RSS, sampled every 0.25 s while it delivers `count` sales (the fake keeps
    every request in memory; that is the fake's RSS, not the daemon's, and is not counted)."""
    url = pg.database()
    try:
        harness.load_sales(url, count)
        fake.reset()
        daemon = harness.start_daemon(url, fake.url, concurrency=concurrency)
        samples: list[tuple[float, int, int]] = []  # (seconds, delivered, rss bytes)
        try:
            _wait_first_request(fake, daemon)
            t0 = time.monotonic()
            with harness.connect(url) as conn:
                while True:
                    pending = conn.execute(
                        "SELECT count(*) FROM outbox.events WHERE status = 'pending'"
                    ).fetchone()[0]  # type: ignore[index]
                    samples.append((time.monotonic() - t0, count - pending, daemon.rss()))
                    if pending == 0:
                        break
                    if not daemon.alive():
                        raise RuntimeError(f"the daemon died:\n{daemon.tail()}")
                    time.sleep(0.25)
            fake_rss = fake.ps.memory_info().rss
        finally:
            daemon.close()
        _check_delivered(url, count)
    finally:
        pg.drop(url)
    peak = max(s[2] for s in samples)
    marks: dict[str, float] = {}
    for mark in (count // 4, count // 2, 3 * count // 4, count):
        at = next(s for s in samples if s[1] >= mark)
        marks[str(mark)] = round(at[2] / 2**20, 1)
    quarter = next(s for s in samples if s[1] >= count // 4)
    after = [s[2] for s in samples if s[1] >= count // 4]
    return {
        "events": count,
        "concurrency": concurrency,
        "samples": len(samples),
        "peak_rss_mb": round(peak / 2**20, 1),
        "rss_mb_at_delivered": marks,
        "growth_after_first_quarter_mb": round((max(after) - quarter[2]) / 2**20, 1),
        "seconds": round(samples[-1][0], 1),
        "fake_rss_mb_not_counted": round(fake_rss / 2**20, 1),
        "series": [(round(t, 2), d, round(r / 2**20, 1)) for t, d, r in samples],
    }


# ---- 4b. a large backlog at the defaults -------------------------------------------------------

# Per row, from its call's end (the attempt's finished_at) to its result being written
# (delivered_at): how long results wait in the writer's queue. Both times are the database's
# (the daemon reads the database's clock).
WRITE_LAG_SQL = """
SELECT max(extract(epoch FROM e.delivered_at - a.finished_at))::float8,
       percentile_cont(0.99) WITHIN GROUP (
           ORDER BY extract(epoch FROM e.delivered_at - a.finished_at))::float8
FROM outbox.events e JOIN outbox.attempts a ON a.event_id = e.id
WHERE e.status = 'delivered'
"""


def _log_events(child: Child, names: set[str]) -> list[dict[str, Any]]:
    """The daemon's JSON log lines whose event is one of `names`."""
    found = []
    for line in child.log.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if isinstance(entry, dict) and entry.get("event") in names:
                found.append(entry)
    return found


def bulk_backlog(pg: Postgres, fake: Fake, count: int, concurrency: int) -> dict[str, Any]:
    """`count` sales committed at once (an outage's backlog, a bulk import) and drained by one
    daemon with the default settings (lease 60 s). The table has no statistics yet and
    autovacuum is off for it, so the plans are those before autoanalyze has run. Measures what
    a backlog must not do: look rows up again (a lease that ran out before its result was
    written), lose leases, grow the daemon's memory, or count a row twice."""
    url = pg.database()
    try:
        with harness.connect(url) as conn:
            conn.execute("ALTER TABLE outbox.events SET (autovacuum_enabled = false)")
            conn.execute(
                f"INSERT INTO outbox.events ({harness.SALE_COLUMNS}) "
                "SELECT 'sale', 'bulk-' || g, 'cust-' || (g %% 1000), 10, 'EUR', NULL "
                "FROM generate_series(1, %(n)s::bigint) g",
                {"n": count},
            )
        fake.reset()
        daemon = harness.start_daemon(url, fake.url, concurrency=concurrency)
        rss: list[int] = []
        try:
            _wait_first_request(fake, daemon)
            started = time.monotonic()
            with harness.connect(url) as conn:
                while conn.execute(harness.PENDING_LEFT).fetchone()[0]:  # type: ignore[index]
                    if not daemon.alive():
                        raise RuntimeError(f"the daemon died:\n{daemon.tail()}")
                    rss.append(daemon.rss())
                    time.sleep(0.5)
            seconds = time.monotonic() - started
            rc = daemon.stop()
            lines = _log_events(
                daemon, {"outbox.daemon.stopped", "outbox.writer.lease_lost",
                         "outbox.claimer.held_back"},
            )  # fmt: skip
        finally:
            daemon.close()
        _check_delivered(url, count)
        with harness.connect(url) as conn:
            lag_max, lag_p99 = conn.execute(WRITE_LAG_SQL).fetchone()  # type: ignore[misc]
        calls = fake.requests()
    finally:
        pg.drop(url)
    stopped = [e for e in lines if e["event"] == "outbox.daemon.stopped"]
    return {
        "events": count,
        "concurrency": concurrency,
        "seconds": round(seconds, 1),
        "events_per_second": round(count / seconds, 1),
        "creates": sum(1 for c in calls if c.get("method") == "POST"),
        "lookups": sum(1 for c in calls if c.get("method") == "GET" and "key=" in c["path"]),
        "lost_lease_results": sum(
            int(e.get("results", 0)) for e in lines if e["event"] == "outbox.writer.lease_lost"
        ),
        "held_back": sum(1 for e in lines if e["event"] == "outbox.claimer.held_back"),
        "stop_line_delivered": stopped[0].get("delivered") if stopped else None,
        "exit_code": rc,
        "peak_rss_mb": round(max(rss) / 2**20, 1) if rss else None,
        "rss_mb_first_quarter": round(max(rss[: max(1, len(rss) // 4)]) / 2**20, 1)
        if rss
        else None,
        "write_lag_max_s": round(lag_max, 2),
        "write_lag_p99_s": round(lag_p99, 3),
    }


# ---- 5. backlog scale --------------------------------------------------------------------------


def claim_times(url: str, repeats: int, limit: int = 100) -> dict[str, float]:
    """Server-side execution time of the claim query (EXPLAIN ANALYZE, rolled back each time)."""
    from outbox.db import queries

    sql = "EXPLAIN (ANALYZE, FORMAT JSON) " + queries.get("claim")
    params = {
        "owner": "bench",
        "limit": limit,
        "lease_seconds": 60,
        "recheck_seconds": 30,
        "orphan_grace_seconds": 60,
        "in_flight_recheck_seconds": 1,
    }
    times: list[float] = []
    with psycopg.connect(url) as conn:
        cur = psycopg.ClientCursor(conn)
        for _ in range(repeats):
            cur.execute(sql, params)
            plan = cur.fetchone()[0]  # type: ignore[index]
            if isinstance(plan, str):
                plan = json.loads(plan)
            times.append(float(plan[0]["Execution Time"]))
            conn.rollback()
    return {
        "limit": limit,
        "median_ms": round(statistics.median(times), 2),
        "p95_ms": round(pct(times, 95), 2),
    }


def backlog(
    pg: Postgres,
    fake: Fake,
    history: int,
    pending: int,
    concurrency: int,
) -> dict[str, Any]:
    """Claim time with `pending` pending rows in an otherwise empty table and with `history`
    delivered rows (each with its attempt row) too; then the daemon drains the `pending` rows of
    each table, the empty one first. Both drains are the same size: a longer drain runs slower
    by itself (a 100,000-row drain ran at 1,861 events/s where 50,000-row drains ran at 2,285
    and 2,401), so comparing against the shorter throughput run would blame the history."""
    out: dict[str, Any] = {
        "history_rows": history,
        "pending_rows": pending,
        "concurrency": concurrency,
    }
    for label, hist in (("empty", 0), ("history", history)):
        url = pg.database()
        started = time.monotonic()
        if hist:
            harness.load_history(url, hist)
        harness.load_sales(url, pending)
        load_seconds = time.monotonic() - started
        out[label] = {
            "load_seconds": round(load_seconds, 1),
            "events_table_mb": round(
                harness.scalar(url, "SELECT pg_total_relation_size('outbox.events')") / 2**20, 1
            ),
            "claim_100": claim_times(url, repeats=15),
            "claim_10": claim_times(url, repeats=15, limit=10),
        }
        # daemon_drain drops the database when it is done
        out[label]["drain"] = daemon_drain(pg, fake, pending, concurrency, history=hist, loaded=url)
    out["history_vs_empty"] = round(
        out["history"]["drain"]["events_per_second"] / out["empty"]["drain"]["events_per_second"],
        3,
    )
    return out


# ---- 6. side by side ---------------------------------------------------------------------------


def _peer_result(child: Child) -> dict[str, Any]:
    for line in reversed(child.log.read_text().splitlines()):
        if line.startswith("{"):
            return dict(json.loads(line))
    raise RuntimeError(f"the peer printed no result:\n{child.tail()}")


def ceiling(pg: Postgres, fake: Fake, count: int, concurrency: int) -> dict[str, Any]:
    """The same requests from a plain asyncio loop with the same client, no database."""
    fake.reset()
    child = harness.start_peer(
        "ceiling", pg.admin_url, fake.url, concurrency=concurrency, count=count
    )
    meter = Meter(pg, fake, child)
    try:
        _wait_first_request(fake, child)
        meter.start()
        rc = child.proc.wait(30 + count / 100)
        meter.stop()
        peer = _peer_result(child)
    finally:
        child.close()
    first, statuses, _ = _first_received(fake)
    seconds = peer["last_answer"] - first
    cpu = meter.per_event_ms(count)
    cpu["sender"] = round(peer["cpu_seconds"] / count * 1000, 3)  # it reports its own
    return {
        "events": count,
        "concurrency": concurrency,
        "seconds": round(seconds, 3),
        "events_per_second": round(count / seconds, 1),
        "answers": statuses,
        "cpu_ms_per_event": cpu,
        **meter.context(count),
        "exit_code": rc,
    }


def naive(pg: Postgres, fake: Fake, count: int, concurrency: int) -> dict[str, Any]:
    url = pg.database()
    try:
        harness.load_sales(url, count)
        fake.reset()
        child = harness.start_peer("naive", url, fake.url, concurrency=concurrency)
        try:
            result = _drain(pg, fake, url, child, count, PENDING_LEFT, 60 + count / 20)
        finally:
            child.close()
        _check_delivered(url, count)
    finally:
        pg.drop(url)
    result["concurrency"] = concurrency
    return result


def pgqueuer(
    pg: Postgres, fake: Fake, count: int, concurrency: int, batch_size: int
) -> dict[str, Any]:
    import asyncio

    from bench.peers import pgqueuer_setup

    url = pg.database()
    try:
        asyncio.run(pgqueuer_setup(url, count))
        fake.reset()
        child = harness.start_peer(
            "pgqueuer", url, fake.url, concurrency=concurrency, batch_size=batch_size
        )
        try:
            done = "SELECT EXISTS (SELECT 1 FROM pgqueuer)"
            result = _drain(pg, fake, url, child, count, done, 30 + count / 100)
        finally:
            child.close()
    finally:
        pg.drop(url)
    result["concurrency"] = concurrency
    result["batch_size"] = batch_size
    return result
