"""The reconcile step: `outbox reconcile --since 30d --json` timed as its own process against
the fake, per strategy (key, listing), for N settled sales recorded in the last 29 days and the
same N transactions in the fake's ledger (loaded with POST /_fake/ledger/bulk).

Each run starts from a fresh request log and ledger, so the fake's log holds exactly the
reconcile's calls: calls/s is calls over the span from the first call received to the last, and
the busiest one-second window (the calls received in any second) shows the rate limit kept.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from typing import Any

from bench import harness
from bench.harness import Fake, Postgres

# --reconcile-runs NAME: (the run's label in the results, its settings)
RUNS: dict[str, tuple[str, dict[str, str]]] = {
    "default": ("c=16 (default)", {}),
    "c64": ("c=64", {"OUTBOX_CONCURRENCY": "64"}),
    "rate200": ("c=16, rate limit 200/s", {"OUTBOX_RATE_LIMIT_PER_SECOND": "200"}),
}


def _ledger(url: str) -> list[dict[str, Any]]:
    """The database's sales as the fake's ledger entries: same key, amount, currency, time."""
    with harness.connect(url) as conn:
        rows = conn.execute(
            "SELECT transaction_key, amount, currency, customer_key, "
            "extract(epoch FROM created_at)::float8 FROM outbox.events ORDER BY id"
        ).fetchall()
    return [
        {"key": k, "amount": int(a), "amount_units": c, "customer": cu, "created_at": t}
        for k, a, c, cu, t in rows
    ]


def busiest_second(times: list[float]) -> int:
    """The most calls received in any window of one second."""
    times = sorted(times)
    best, lo = 0, 0
    for hi, t in enumerate(times):
        while t - times[lo] >= 1.0:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


def _run(
    url: str, fake: Fake, ledger: list[dict[str, Any]], strategy: str, env: dict[str, str]
) -> dict[str, Any]:
    fake.reset()
    fake.load_ledger(ledger)
    child_env = harness.child_env(OUTBOX_DATABASE_URL=url, PARTNERO_API_URL=fake.url, **env)
    args = [sys.executable, "-m", "outbox.cli", "reconcile", "--since", "30d", "--json"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    fake_cpu = fake.cpu_seconds()
    t0 = time.monotonic()
    done = subprocess.run(
        [*args, "--strategy", strategy], env=child_env, capture_output=True, text=True
    )
    seconds = time.monotonic() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    fake_cpu = fake.cpu_seconds() - fake_cpu
    if done.returncode != 0:
        raise RuntimeError(f"reconcile exited {done.returncode}: {done.stderr[-2000:]}")
    out = json.loads(done.stdout)
    received = [r["received_at"] for r in fake.requests() if r["method"] == "GET"]
    span = max(received) - min(received) if len(received) > 1 else 0.0
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {
        "strategy": out["strategy"],
        "ok": out["ok"],
        "keys": out["keys"],
        "calls": out["calls"],
        "calls_at_fake": len(received),
        "seconds": round(seconds, 2),
        "calls_per_second": round(len(received) / span, 1) if span else None,
        "busiest_second": busiest_second(received),
        "reconcile_cpu_seconds": round(cpu, 2),
        "fake_cpu_seconds": round(fake_cpu, 2),
    }


def reconcile(
    pg: Postgres, fake: Fake, sizes: dict[str, tuple[int, ...]], runs: tuple[str, ...] = tuple(RUNS)
) -> dict[str, Any]:
    """{rows: {strategy: {run: result}}} for each size of each strategy in `sizes`
    ({"listing": (10000, 100000), "key": (10000, 30000)})."""
    results: dict[str, Any] = {}
    for count in sorted({n for ns in sizes.values() for n in ns}):
        url = pg.database()
        try:
            harness.load_history(url, count, days=29, spacing=29 * 86400 / (count + 1))
            ledger = _ledger(url)
            for strategy, counts in sizes.items():
                if count not in counts:
                    continue
                done = results.setdefault(str(count), {}).setdefault(strategy, {})
                for name, env in (RUNS[r] for r in runs):
                    print(f"bench: reconcile {count} {strategy} {name} ...", flush=True)
                    done[name] = _run(url, fake, ledger, strategy, env)
                    print(f"bench:   {done[name]}", flush=True)
        finally:
            fake.reset()
            pg.drop(url)
    return results
