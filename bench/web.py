"""The web step: how long `outbox web` takes to render its pages with 1,000,000 rows in the table.

The database holds a month of history (N delivered sales, each with its attempt row, one every
30 days / N, so about N / 30 of the calls fall in the overview chart's last 24 hours), plus the
rows a person looks at: failed sales with their failed call, refunds blocked behind some of
them, skipped sales and a pending backlog. `outbox web` runs as its own process; one signed-in
client asks for each page in turn (two warm-up requests, then `rounds` timed ones) and the
step reports the median and the 95th percentile of the whole request as the client saw it
(server time and transfer on loopback).
"""

from __future__ import annotations

import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench import harness
from bench.harness import Postgres

# Rows a person looks at, on top of the history (made with the contract's trigger off, in one
# transaction, as harness.load_history does: well-formed rows in the states the daemon leaves).
_PROBLEMS = """
INSERT INTO outbox.events (event_type, transaction_key, customer_key, amount, currency, payload,
    status, outcome, attempts, last_status_code, last_error, next_attempt_at, created_at,
    updated_at)
SELECT 'sale', 'failed-' || g, 'cust-' || (g %% 1000), 25, 'EUR', '{}', 'failed', 'rejected', 1,
       400, 'HTTP 400: Duplicate customer key', t, t, t
FROM generate_series(1, %(failed)s) g, LATERAL (SELECT now() - g * interval '7 seconds' AS t) x;

INSERT INTO outbox.events (event_type, transaction_key, customer_key, payload, status, attempts,
    parked, next_attempt_at, created_at, updated_at)
SELECT 'refund', 'failed-' || g, 'cust-' || (g %% 1000), '{}', 'pending', 0, true, now(), now(),
       now()
FROM generate_series(1, %(blocked)s) g;

INSERT INTO outbox.events (event_type, transaction_key, customer_key, amount, currency, payload,
    status, outcome, attempts, last_status_code, next_attempt_at, created_at, updated_at)
SELECT 'sale', 'skipped-' || g, 'nobody-' || g, 10, 'EUR', '{}', 'skipped',
       'customer_not_found', 3, 400, now(), now() - interval '1 hour', now()
FROM generate_series(1, %(skipped)s) g;

INSERT INTO outbox.events (event_type, transaction_key, customer_key, amount, currency, payload)
SELECT 'sale', 'pending-' || g, 'cust-' || (g %% 1000), 10, 'EUR', '{}'
FROM generate_series(1, %(pending)s) g;

INSERT INTO outbox.attempts (event_id, attempt, started_at, finished_at, method, path,
    status_code, response_excerpt, error, decision, daemon)
SELECT id, 1, created_at, created_at, 'POST', '/v1/transactions', 400,
       '{"message":"Duplicate customer key","status":0}', last_error, 'failed:rejected', 'bench'
FROM outbox.events WHERE status = 'failed';
"""

PAGES = (
    ("overview", "/"),
    ("failed and blocked rows", "/rows"),
    ("failed rows, filtered by key", "/rows?key=failed-17"),
    ("skipped rows", "/rows?status=skipped"),
    ("one row", "/rows/{failed_id}"),
    ("one key", "/key?key=failed-17"),
    ("one customer", "/customer?customer=cust-17"),
    ("JSON: status", "/api/status"),
    ("JSON: rows", "/api/rows"),
)


def _seed(url: str, history: int) -> int:
    harness.load_history(url, history, days=30, spacing=30 * 86400 / (history + 1))
    with harness.connect(url, autocommit=False) as conn:
        conn.execute("ALTER TABLE outbox.events DISABLE TRIGGER events_check_insert_contract")
        sizes = {"failed": 2_000, "blocked": 200, "skipped": 5_000, "pending": 10_000}
        for statement in filter(str.strip, _PROBLEMS.split(";\n")):
            conn.execute(statement, sizes)
        conn.execute("ALTER TABLE outbox.events ENABLE TRIGGER events_check_insert_contract")
        conn.commit()
    with harness.connect(url) as conn:
        conn.execute("VACUUM ANALYZE outbox.events")
        conn.execute("VACUUM ANALYZE outbox.attempts")
    total = int(harness.scalar(url, "SELECT count(*) FROM outbox.events"))
    return total


def _start(url: str, folder: Path, password: str) -> tuple[subprocess.Popen[str], str]:
    line = subprocess.run(
        [sys.executable, "-m", "outbox.cli", "web", "hash-password", "--name", "bench"],
        input=password + "\n",
        capture_output=True,
        text=True,
        check=True,
        env=harness.child_env(),
    ).stdout.strip()
    users = folder / "users"
    users.write_text(line.replace(":viewer:", ":operator:") + "\n")
    secret = folder / "secret"
    secret.write_text("b" * 48)
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "outbox.cli", "web", "--port", str(port)],
        env=harness.child_env(
            OUTBOX_DATABASE_URL=url,
            OUTBOX_WEB_USERS_FILE=str(users),
            OUTBOX_WEB_SECRET_FILE=str(secret),
            OUTBOX_LOG_LEVEL="warning",
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    harness.wait_for(lambda: _answers(base), 30, "outbox web to listen")
    return proc, base


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _answers(base: str) -> bool:
    try:
        return httpx.get(base + "/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _sign_in(client: httpx.Client, password: str) -> None:
    form = client.get("/login").text
    found = re.search(r'name="csrf" value="([^"]+)"', form)
    assert found, "no csrf field on /login"
    answer = client.post(
        "/login", data={"username": "bench", "password": password, "csrf": found.group(1)}
    )
    assert answer.status_code in (200, 303), answer.status_code


def _time(client: httpx.Client, path: str, rounds: int) -> dict[str, Any]:
    for _ in range(2):
        client.get(path).raise_for_status()
    seconds = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        answer = client.get(path)
        seconds.append(time.perf_counter() - t0)
        answer.raise_for_status()
    seconds.sort()
    return {
        "median_ms": round(statistics.median(seconds) * 1000, 1),
        "p95_ms": round(seconds[max(0, int(len(seconds) * 0.95) - 1)] * 1000, 1),
        "bytes": len(answer.content),
    }


def web(pg: Postgres, history: int, rounds: int = 20) -> dict[str, Any]:
    """{rows, pages: {name: {path, median_ms, p95_ms, bytes}}} for `history` delivered rows."""
    url = pg.database()
    password = "bench-password-1"
    try:
        print(f"bench: web: loading {history:,} rows of history ...", flush=True)
        rows = _seed(url, history)
        failed_id = int(
            harness.scalar(url, "SELECT min(id) FROM outbox.events WHERE status = 'failed'")
        )
        with tempfile.TemporaryDirectory() as folder:
            proc, base = _start(url, Path(folder), password)
            try:
                with httpx.Client(base_url=base, timeout=60, follow_redirects=False) as client:
                    _sign_in(client, password)
                    pages = {}
                    for name, path in PAGES:
                        path = path.format(failed_id=failed_id)
                        pages[name] = {"path": path, **_time(client, path, rounds)}
                        print(f"bench:   {name}: {pages[name]}", flush=True)
            finally:
                proc.terminate()
                proc.wait(30)
        return {"rows": rows, "rounds": rounds, "pages": pages}
    finally:
        pg.drop(url)
