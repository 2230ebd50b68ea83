"""`python -m bench [--quick] [--only NAME ...] [--profile]`: the outbox benchmarks.

Starts its own embedded Postgres and a fake Partnero (its own process) on this host, runs the
daemon as `outbox run` processes, and writes bench/results/<time>-<mode>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import harness, report, scenarios
from bench.reconcile import reconcile
from bench.web import web

ALL = (
    "throughput",
    "signups",
    "latency",
    "inserts",
    "memory",
    "bulk",
    "backlog",
    "peers",
    "reconcile",
    "web",
)


@dataclass(frozen=True)
class Sizes:
    drain: int  # sales per throughput run
    mix: int  # rows per run of the signups step (signups and sales; and sales alone)
    concurrency: tuple[int, ...]  # the daemon's OUTBOX_CONCURRENCY settings to sweep
    side_by_side: int  # concurrency of the memory, backlog and side-by-side runs
    default: int  # the daemon's default concurrency (the latency run)
    latency_seconds: float
    latency_rate: float
    insert_seconds: float
    insert_rounds: int
    bulk_rows: int  # rows of the one-statement INSERT ... SELECT of the insert-cost step
    memory: int
    bulk: int  # sales of the large-backlog step, drained at the default settings
    history: int
    history_pending: int
    naive: int
    reconcile_listing: tuple[int, ...]  # settled sales reconciled with --strategy listing
    reconcile_key: tuple[int, ...]  # ... and with --strategy key (one call per key)
    web_history: int  # delivered rows under the pages of `outbox web`


FULL = Sizes(
    drain=50_000,
    mix=20_000,
    concurrency=(8, 16, 64),
    side_by_side=64,
    default=16,
    latency_seconds=30,
    latency_rate=200,
    insert_seconds=8,
    insert_rounds=2,
    bulk_rows=200_000,
    memory=200_000,
    bulk=100_000,
    history=1_000_000,
    history_pending=100_000,
    naive=5_000,
    reconcile_listing=(10_000, 100_000),
    reconcile_key=(10_000, 30_000),
    web_history=1_000_000,
)
QUICK = Sizes(
    drain=2_000,
    mix=2_000,
    concurrency=(64,),
    side_by_side=64,
    default=16,
    latency_seconds=4,
    latency_rate=200,
    insert_seconds=2,
    insert_rounds=1,
    bulk_rows=10_000,
    memory=4_000,
    bulk=4_000,
    history=50_000,
    history_pending=2_000,
    naive=300,
    reconcile_listing=(2_000,),
    reconcile_key=(2_000,),
    web_history=20_000,
)


def signups(
    results: dict[str, Any], step: Any, pg: harness.Postgres, fake: harness.Fake, sizes: Sizes
) -> None:
    """The signups step: at the default concurrency and at the side-by-side one, `sizes.mix`
    sales alone, then the same number of rows as signups and sales (one sale per customer, and
    three), every second customer referred; each run on a fresh database."""
    mix = results.setdefault("signups", {})
    for n in dict.fromkeys((sizes.default, sizes.side_by_side)):
        runs = mix.setdefault(str(n), {})
        step(
            runs, "sales_only", f"sales only c={n}",
            scenarios.daemon_drain, pg, fake, sizes.mix, n,
        )  # fmt: skip
        for each in (1, 3):
            step(
                runs, f"1:{each}", f"1 signup : {each} sales c={n}",
                scenarios.signup_mix, pg, fake, sizes.mix // (1 + each), each, n,
            )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, under a minute")
    parser.add_argument("--only", nargs="+", choices=ALL, default=list(ALL), metavar="NAME")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also drain once under py-spy (pip install py-spy) and summarise the profile",
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--drain", type=int, help="sales per throughput run (overrides the mode)")
    parser.add_argument(
        "--mix", type=int, help="rows per run of the signups step (overrides the mode)"
    )
    parser.add_argument(
        "--concurrency", type=int, nargs="+", help="concurrency settings to sweep (overrides)"
    )
    parser.add_argument(
        "--reconcile-key", type=int, nargs="+", help="sizes reconciled key by key (overrides)"
    )
    parser.add_argument(
        "--reconcile-listing", type=int, nargs="*", help="sizes reconciled by listing (overrides)"
    )
    parser.add_argument(
        "--reconcile-runs", nargs="+", choices=("default", "c64", "rate200"), default=None
    )
    args = parser.parse_args()
    sizes = QUICK if args.quick else FULL
    if args.drain:
        sizes = replace(sizes, drain=args.drain)
    if args.mix:
        sizes = replace(sizes, mix=args.mix)
    if args.concurrency:
        sizes = replace(sizes, concurrency=tuple(args.concurrency))
    if args.reconcile_key:
        sizes = replace(sizes, reconcile_key=tuple(args.reconcile_key))
    if args.reconcile_listing is not None:
        sizes = replace(sizes, reconcile_listing=tuple(args.reconcile_listing))
    mode = "quick" if args.quick else "full"
    started = time.monotonic()
    results: dict[str, Any] = {
        "mode": mode,
        "command": "python -m bench " + " ".join(sys.argv[1:]),
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "sizes": sizes.__dict__,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = args.out / f"{stamp}-{mode}"

    def step(where: dict[str, Any], key: str, name: str, fn: Any, *a: Any, **kw: Any) -> None:
        """Run one measurement, keep its result in where[key], and save everything so far."""
        t0 = time.monotonic()
        print(f"bench: {name} ...", flush=True)
        where[key] = fn(*a, **kw)
        print(f"bench: {name} done in {time.monotonic() - t0:.0f} s", flush=True)
        results.setdefault("step_seconds", {})[name] = round(time.monotonic() - t0, 1)
        out.with_suffix(".json").write_text(harness.dumps(results))

    pg = harness.Postgres()
    fake = harness.Fake()
    try:
        results["machine"] = harness.machine(pg)
        only = set(args.only)
        c = sizes.side_by_side
        if only & {"throughput", "peers"}:
            sweep = results.setdefault("throughput", {})
            for n in sizes.concurrency if "throughput" in only else (c,):
                step(
                    sweep, str(n), f"throughput c={n}",
                    scenarios.daemon_drain, pg, fake, sizes.drain, n,
                )  # fmt: skip
        if "signups" in only:
            signups(results, step, pg, fake, sizes)
        if args.profile:
            profile = out.with_suffix(".pyspy.txt")
            step(
                results, "profile", "profile",
                scenarios.daemon_drain, pg, fake, sizes.drain // 2, c, profile=profile,
            )  # fmt: skip
        if "latency" in only:
            step(
                results, "latency", "latency",
                scenarios.latency, pg, fake, sizes.latency_rate, sizes.latency_seconds,
                sizes.default,
            )  # fmt: skip
        if "inserts" in only:
            step(
                results, "inserts", "inserts",
                scenarios.inserts, pg, sizes.insert_seconds, 8, sizes.insert_rounds,
                sizes.bulk_rows,
            )  # fmt: skip
        if "memory" in only:
            step(results, "memory", "memory", scenarios.memory, pg, fake, sizes.memory, c)
        if "bulk" in only:
            step(
                results, "bulk", "bulk backlog",
                scenarios.bulk_backlog, pg, fake, sizes.bulk, sizes.default,
            )  # fmt: skip
        if "backlog" in only:
            step(
                results, "backlog", "backlog",
                scenarios.backlog, pg, fake, sizes.history, sizes.history_pending, c,
            )  # fmt: skip
        if "peers" in only:
            peers = results.setdefault("peers", {})
            step(peers, "ceiling", "ceiling", scenarios.ceiling, pg, fake, sizes.drain, c)
            step(peers, "naive", "naive", scenarios.naive, pg, fake, sizes.naive, 1)
            step(
                peers, "pgqueuer", "pgqueuer",
                scenarios.pgqueuer, pg, fake, sizes.drain, c, max(1, c // 2),
            )  # fmt: skip
        if "reconcile" in only:
            wanted = {"listing": sizes.reconcile_listing, "key": sizes.reconcile_key}
            runs = tuple(args.reconcile_runs or ("default", "c64", "rate200"))
            step(results, "reconcile", "reconcile", reconcile, pg, fake, wanted, runs)
        if "web" in only:
            step(results, "web", "web", web, pg, sizes.web_history)
    finally:
        fake.close()
        pg.close()
    results["total_seconds"] = round(time.monotonic() - started, 1)
    out.with_suffix(".json").write_text(harness.dumps(results))
    text = report.render(results)
    out.with_suffix(".md").write_text(text)
    print(text)
    print(f"bench: results in {out}.json and {out}.md ({results['total_seconds']:.0f} s)")
    json.dumps(results)  # fail loudly here rather than in a later reader


if __name__ == "__main__":
    main()
