"""`python -m bench.client`: the CPU one Partnero create costs the sender, with no database.

Starts its own fake Partnero (its own process) and sends `--count` creates at `--concurrency`,
`--repeat` times per mode, each run in a fresh process:

- client: `PartneroClient.create`, exactly as the daemon sends (the JSON body, the httpx request,
  the aiohttp transport, the Exchange);
- raw: the same body and headers through aiohttp alone, reading the answer, no httpx objects:
  what the HTTP work costs below our client.

Prints one line per run: requests per second and the sender's CPU milliseconds per request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time

import aiohttp

from bench import harness
from bench.peers import API_KEY, make_client, sale_event
from outbox.domain import Event
from outbox.partnero import TRANSACTIONS_PATH, build_create_body

MODES = ("client", "raw")


async def _run(mode: str, url: str, count: int, concurrency: int) -> dict[str, float]:
    stamp = time.time_ns()
    events = [
        sale_event(i, f"m-{stamp}-{i}", f"cust-{i % 1000}", 10 + i % 90, "EUR", {"product_id": "p"})
        for i in range(count)
    ]
    queue = iter(events)
    statuses: list[int | None] = []
    if mode == "client":
        client = make_client(url, concurrency)

        async def send_one(event: Event) -> int | None:
            return (await client.create(event)).status_code

        close = client.aclose
    else:
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency))
        headers = {
            "Authorization": f"Bearer {API_KEY}",
            "Accept": "application/json",
            "Content-Type": "application/json",
        }

        async def send_one(event: Event) -> int | None:
            body = json.dumps(build_create_body(event), separators=(",", ":")).encode()
            async with (
                asyncio.timeout(15),
                session.post(url + TRANSACTIONS_PATH, data=body, headers=headers) as response,
            ):
                await response.read()
                return response.status

        close = session.close

    async def worker() -> None:
        for event in queue:
            statuses.append(await send_one(event))

    wall, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    await close()
    if statuses.count(201) != count:
        raise SystemExit(f"{mode}: {count - statuses.count(201)} answers were not 201")
    return {"per_second": round(count / wall), "cpu_ms_per_request": round(1000 * cpu / count, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.client", description=__doc__)
    parser.add_argument("modes", nargs="*", metavar="MODE", help="client, raw (default: both)")
    parser.add_argument("--count", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--url", help=argparse.SUPPRESS)  # a run in a child process
    args = parser.parse_args()
    args.modes = args.modes or list(MODES)
    if set(args.modes) - set(MODES):
        parser.error(f"modes are {', '.join(MODES)}")
    if args.url:
        (mode,) = args.modes
        print(json.dumps(asyncio.run(_run(mode, args.url, args.count, args.concurrency))))
        return
    fake = harness.Fake()
    try:
        for _ in range(args.repeat):
            for mode in args.modes:
                out = subprocess.run(
                    [sys.executable, "-m", "bench.client", mode, "--url", fake.url,
                     "--count", str(args.count), "--concurrency", str(args.concurrency)],
                    env=harness.child_env(), capture_output=True, text=True, check=True,
                ).stdout  # fmt: skip
                result = json.loads(out.strip().splitlines()[-1])
                print(
                    f"{mode:6s} c={args.concurrency} {result['per_second']:>6,} requests/s  "
                    f"{result['cpu_ms_per_request']:.3f} ms CPU per request",
                    flush=True,
                )
    finally:
        fake.close()


if __name__ == "__main__":
    main()
