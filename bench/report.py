"""The results of one run as Markdown tables (the numbers docs/benchmarks.md quotes)."""

from __future__ import annotations

from typing import Any


def _table(head: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return [*out, ""]


def _n(value: float) -> str:
    return f"{value:,.0f}"


def _cpu(run: dict[str, Any], who: str) -> str:
    value = run.get("cpu_ms_per_event", {}).get(who)
    return "-" if value is None else f"{value:.3f}"


def render(r: dict[str, Any]) -> str:
    lines = [f"# outbox benchmark ({r['mode']}, {r['started_at']})", "", f"`{r['command']}`", ""]
    m = r.get("machine", {})
    if m:
        pg = m["postgres_settings"]
        lines += [
            f"- machine: {m['nproc']} cores ({m['cpu']}), {m['memory_gib']} GiB, "
            f"Linux {m['kernel']}",
            f"- Python {m['python']}, PostgreSQL {m['postgres']} (embedded, Unix socket; "
            + ", ".join(f"{k}={v}" for k, v in sorted(pg.items()))
            + ")",
            f"- httpx {m['httpx']}, psycopg {m['psycopg']}, pgqueuer {m['pgqueuer']}",
            "",
        ]
    targets: list[list[Any]] = []

    sweep = r.get("throughput", {})
    if sweep:
        lines += ["## Throughput (backlog drained by `outbox run`)", ""]
        rows = [
            [
                c,
                _n(run["events"]),
                f"{run['seconds']:.1f}",
                f"**{_n(run['events_per_second'])}**",
                _cpu(run, "sender"),
                _cpu(run, "postgres"),
                _cpu(run, "fake"),
                run["pg_transactions_per_event"],
                run["other_load_cores"],
            ]
            for c, run in sorted(sweep.items(), key=lambda kv: int(kv[0]))
        ]
        lines += _table(
            [
                "concurrency",
                "events",
                "seconds",
                "events/s",
                "daemon CPU ms/event",
                "Postgres CPU ms/event",
                "fake CPU ms/event",
                "pg transactions/event",
                "other load (cores)",
            ],
            rows,
        )
        best = max(run["events_per_second"] for run in sweep.values())
        targets.append(["throughput >= 2,000 events/s", f"{_n(best)} (best)", best >= 2000])

    mix = r.get("signups", {})
    if mix:
        lines += ["## Signups and sales (every second customer referred; fake as Partnero)", ""]
        rows = []
        for c, runs in sorted(mix.items(), key=lambda kv: int(kv[0])):
            for name, run in runs.items():
                label = "sales only" if name == "sales_only" else f"1 signup : {name[2:]} sales"
                rows.append(
                    [
                        c,
                        label,
                        _n(run["events"]),
                        _n(run.get("calls", run["events"])),
                        f"{run['seconds']:.1f}",
                        f"**{_n(run['events_per_second'])}**",
                        _n(run.get("calls_per_second", run["events_per_second"])),
                        _cpu(run, "sender"),
                        _cpu(run, "postgres"),
                        run["pg_transactions_per_event"],
                        run.get("longest_pause_seconds", "-"),
                        run.get("rows_after_longest_pause", "-"),
                        _n(run["rows_per_second_before_pause"])
                        if run.get("rows_per_second_before_pause")
                        and run.get("longest_pause_seconds", 0) >= 1
                        else "-",
                        run["other_load_cores"],
                    ]
                )
        lines += _table(
            [
                "concurrency",
                "rows",
                "events",
                "HTTP calls",
                "seconds",
                "events/s",
                "calls/s",
                "daemon CPU ms/event",
                "Postgres CPU ms/event",
                "pg transactions/event",
                "longest pause s",
                "rows settled after it",
                "rows/s before it",
                "other load (cores)",
            ],
            rows,
        )

    lat = r.get("latency")
    if lat:
        lines += ["## Latency (commit to arrival at the fake)", ""]
        lines += _table(
            [
                "rate",
                "events",
                "p50 ms",
                "p95 ms",
                "p99 ms",
                "max ms",
                "late inserts",
                "other load",
            ],
            [
                [
                    f"{lat['achieved_rate']}/s",
                    lat["events"],
                    lat["p50_ms"],
                    lat["p95_ms"],
                    lat["p99_ms"],
                    lat["max_ms"],
                    lat["late_inserts"],
                    lat["other_load_cores"],
                ]
            ],
        )
        targets.append(["latency p50 < 5 ms", lat["p50_ms"], lat["p50_ms"] < 5])
        targets.append(["latency p99 < 25 ms", lat["p99_ms"], lat["p99_ms"] < 25])

    ins = r.get("inserts")
    if ins:
        lines += [f"## Insert cost ({ins['clients']} pgbench clients, one INSERT each)", ""]
        lines += _table(
            ["table", "INSERTs/s (mean)", "runs"],
            [
                [name, _n(tps), ", ".join(_n(x) for x in ins["tps_runs"][name])]
                for name, tps in ins["tps"].items()
            ],
        )
        lines += [
            f"outbox / plain = **{ins['outbox_vs_plain']:.2f}** (no daemon waiting), "
            f"outbox / plain with the same indexes = {ins['outbox_vs_plain_indexes']:.2f}, "
            f"outbox with a daemon waiting (every INSERT NOTIFYs) / plain = "
            f"{ins['outbox_waiting_vs_plain']:.2f}",
            "",
        ]
        lines += [f"One INSERT ... SELECT of {_n(ins['bulk_rows'])} rows:", ""]
        lines += _table(
            ["table", "rows/s (mean)", "runs"],
            [
                [name, _n(rate), ", ".join(_n(x) for x in ins["bulk_rows_per_second_runs"][name])]
                for name, rate in ins["bulk_rows_per_second"].items()
            ],
        )
        lines += [f"outbox / plain = {ins['bulk_outbox_vs_plain']:.2f}", ""]
        targets.append(
            [
                "inserts >= 90% of plain",
                f"{ins['outbox_vs_plain']:.0%}",
                ins["outbox_vs_plain"] >= 0.9,
            ]
        )

    mem = r.get("memory")
    if mem:
        lines += [f"## Memory (daemon RSS delivering {_n(mem['events'])} sales)", ""]
        marks = mem["rss_mb_at_delivered"]
        lines += _table(
            ["peak MB", *[f"at {_n(int(k))} MB" for k in marks], "growth after 1st quarter MB"],
            [[mem["peak_rss_mb"], *marks.values(), mem["growth_after_first_quarter_mb"]]],
        )
        flat = mem["growth_after_first_quarter_mb"] <= 5
        targets.append(["peak RSS < 100 MB", mem["peak_rss_mb"], mem["peak_rss_mb"] < 100])
        targets.append(
            [
                "RSS flat (growth <= 5 MB after 1st quarter)",
                mem["growth_after_first_quarter_mb"],
                flat,
            ]
        )

    bulk = r.get("bulk")
    if bulk:
        lines += [
            f"## A large backlog ({_n(bulk['events'])} sales at once, default settings, "
            "no statistics yet)",
            "",
        ]
        lines += _table(
            [
                "events/s", "seconds", "creates", "lookups", "lost-lease results",
                "held back", "stop line delivered", "peak RSS MB", "RSS MB 1st quarter",
                "write lag max s", "write lag p99 s",
            ],
            [[
                _n(bulk["events_per_second"]), bulk["seconds"], _n(bulk["creates"]),
                bulk["lookups"], bulk["lost_lease_results"], bulk["held_back"],
                bulk["stop_line_delivered"], bulk["peak_rss_mb"], bulk["rss_mb_first_quarter"],
                bulk["write_lag_max_s"], bulk["write_lag_p99_s"],
            ]],
        )  # fmt: skip
        lines.append("")
        targets.append(["large backlog: no lookups", bulk["lookups"], bulk["lookups"] == 0])
        targets.append(
            [
                "large backlog: true count in the stop line",
                bulk["stop_line_delivered"],
                bulk["stop_line_delivered"] == bulk["events"],
            ]
        )

    bl = r.get("backlog")
    if bl:
        lines += [
            f"## Backlog scale ({_n(bl['history_rows'])} delivered + "
            f"{_n(bl['pending_rows'])} pending rows)",
            "",
        ]
        rows = []
        for label in ("empty", "history"):
            part = bl[label]
            drain = part.get("drain")
            rows.append(
                [
                    label,
                    part["events_table_mb"],
                    part["claim_100"]["median_ms"],
                    part["claim_100"]["p95_ms"],
                    part["claim_10"]["median_ms"],
                    _n(drain["events_per_second"]) if drain else "-",
                    _n(drain["events"]) if drain else "-",
                ]
            )
        lines += _table(
            [
                "table",
                "events MB",
                "claim 100 median ms",
                "claim 100 p95 ms",
                "claim 10 median ms",
                "events/s",
                "drained",
            ],
            rows,
        )
        if "history_vs_empty" in bl:
            ratio = bl["history_vs_empty"]
            lines += [f"history / empty throughput = **{ratio:.2f}**", ""]
            label = f"{_n(bl['history_rows'])} rows of history: within 10% of empty"
            targets.append([label, f"{ratio:.0%}", ratio >= 0.9])

    peers = r.get("peers")
    if peers and sweep:
        c = str(r["sizes"]["side_by_side"])
        ours = sweep[c]
        base = ours["events_per_second"]
        lines += [f"## Side by side (same fake, concurrency {c}; naive: one worker)", ""]
        rows = []
        for name, run in (
            ("no database (ceiling)", peers["ceiling"]),
            ("outbox run", ours),
            ("pgqueuer", peers["pgqueuer"]),
            ("naive FOR UPDATE poller (floor)", peers["naive"]),
        ):
            rows.append(
                [
                    name,
                    _n(run["events"]),
                    _n(run["events_per_second"]),
                    f"{run['events_per_second'] / base:.2f}",
                    _cpu(run, "sender"),
                    _cpu(run, "postgres"),
                    run["other_load_cores"],
                ]
            )
        lines += _table(
            [
                "sender",
                "events",
                "events/s",
                "vs outbox run",
                "sender CPU ms/event",
                "Postgres CPU ms/event",
                "other load (cores)",
            ],
            rows,
        )
        vs_pgq = base / peers["pgqueuer"]["events_per_second"]
        vs_ceiling = base / peers["ceiling"]["events_per_second"]
        targets.append(["throughput >= 1.5x pgqueuer", f"{vs_pgq:.2f}x", vs_pgq >= 1.5])
        targets.append(["throughput >= 60% of ceiling", f"{vs_ceiling:.0%}", vs_ceiling >= 0.6])

    prof = r.get("profile", {}).get("profile")
    if prof and prof.get("samples"):
        lines += [f"## Profile of `outbox run` (py-spy, {prof['samples']} samples)", ""]
        lines += _table(["self time by package", "%"], prof["self_by_package_pct"][:10])
        lines += _table(["inclusive", "%"], prof["inclusive_pct"][:15])

    lines += _reconcile(r.get("reconcile"))
    lines += _web(r.get("web"), targets)
    if targets:
        lines += ["## Targets", ""]
        lines += _table(
            ["target", "measured", "met"],
            [[t, v, "yes" if ok else "**no**"] for t, v, ok in targets],
        )
    lines.append(f"total {r.get('total_seconds', 0):.0f} s; steps: {r.get('step_seconds', {})}")
    return "\n".join(lines) + "\n"


def _reconcile(runs: dict[str, Any] | None) -> list[str]:
    """The reconcile step: one row per size, strategy and run."""
    if not runs:
        return []
    fields = ("calls", "seconds", "calls_per_second", "busiest_second")
    fields += ("reconcile_cpu_seconds", "fake_cpu_seconds")
    rows = [
        [size, strategy, name, *(res[f] for f in fields)]
        for size, by in runs.items()
        for strategy, named in by.items()
        for name, res in named.items()
    ]
    head = ["sales", "strategy", "run", "calls", "s", "calls/s", "busiest 1 s"]
    head += ["reconcile CPU s", "fake CPU s"]
    return ["## outbox reconcile --since 30d --json", "", *_table(head, rows)]


def _web(run: dict[str, Any] | None, targets: list[list[Any]]) -> list[str]:
    """The web step: one row per page; the overview's target is 200 ms."""
    if not run:
        return []
    rows = [[name, f"`{page['path']}`", page["median_ms"], page["p95_ms"], _n(page["bytes"])]
            for name, page in run["pages"].items()]  # fmt: skip
    overview = run["pages"]["overview"]["median_ms"]
    targets.append(["overview under 200 ms", f"{overview} ms", overview < 200])
    title = (
        f"## outbox web, {_n(run['rows'])} rows in outbox.events ({run['rounds']} requests each)"
    )
    return [title, "", *_table(["page", "path", "median ms", "p95 ms", "bytes"], rows)]
