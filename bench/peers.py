"""The side-by-side senders, each run as its own process like `outbox run`:

- ceiling: a plain asyncio loop that sends the same requests with the same Partnero client and
  no database at all (what the HTTP side alone can do on this machine);
- naive: a one-row-at-a-time poller: BEGIN; SELECT ... FOR UPDATE SKIP LOCKED LIMIT 1; POST;
  UPDATE; COMMIT, with the transaction held across the HTTP call (the floor);
- pgqueuer: the same job done with pgqueuer from PyPI (a peer users would pick).

Each prints one JSON line when it is done: when it sent its first request, when its last answer
came, and how the answers went.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import Counter
from datetime import timedelta
from decimal import Decimal
from typing import Any

import psycopg

from outbox.domain import Event, EventType
from outbox.partnero import ApiKey, PartneroClient

API_KEY = "bench-key-0123456789"
PGQ_ENTRYPOINT = "partnero_sale"


def make_client(url: str, concurrency: int) -> PartneroClient:
    return PartneroClient(url, ApiKey(API_KEY), timeout_seconds=15, max_connections=concurrency)


def sale_event(
    id_: int, key: str, customer: str, amount: Any, currency: str, payload: dict[str, Any]
) -> Event:
    return Event(
        id=id_,
        event_type=EventType.SALE,
        transaction_key=key,
        customer_key=customer,
        amount=Decimal(amount),
        currency=currency,
        payload=payload,
        attempts=0,
        lookup_required=False,
    )


class Tally:
    def __init__(self) -> None:
        self.first: float | None = None
        self.last = 0.0
        self.statuses: Counter[str] = Counter()

    def sent(self) -> None:
        if self.first is None:
            self.first = time.time()
            self.cpu_at_first = time.process_time()

    def answered(self, status: int | None) -> None:
        self.last = time.time()
        self.statuses[str(status)] += 1

    def report(self, **extra: Any) -> None:
        out = {
            "first_sent": self.first,
            "last_answer": self.last,
            "statuses": self.statuses,
            "cpu_seconds": time.process_time() - getattr(self, "cpu_at_first", 0.0),
        }
        print(json.dumps({**out, **extra}), flush=True)


async def ceiling(args: argparse.Namespace) -> None:
    events = [
        sale_event(i, f"c-{i}", f"cust-{i % 1000}", 10 + i % 90, "EUR", {"product_id": "plan_pro"})
        for i in range(1, args.count + 1)
    ]
    tally = Tally()
    queue = iter(events)
    async with make_client(args.partnero_url, args.concurrency) as client:

        async def worker() -> None:
            for event in queue:
                tally.sent()
                exchange = await client.create(event)
                tally.answered(exchange.status_code)

        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    tally.report()


NAIVE_CLAIM = """
SELECT id, transaction_key, customer_key, amount, currency, payload
FROM outbox.events
WHERE status = 'pending'
ORDER BY next_attempt_at, id
LIMIT 1
FOR UPDATE SKIP LOCKED
"""
NAIVE_DONE = """
UPDATE outbox.events
SET status = 'delivered', outcome = 'created', attempts = attempts + 1,
    last_status_code = %s, delivered_at = now(), updated_at = now()
WHERE id = %s
"""
NAIVE_RETRY = """
UPDATE outbox.events
SET attempts = attempts + 1, last_status_code = %s, updated_at = now(),
    next_attempt_at = now() + interval '1 second'
WHERE id = %s
"""


async def naive(args: argparse.Namespace) -> None:
    tally = Tally()
    async with make_client(args.partnero_url, args.concurrency) as client:

        async def worker() -> None:
            async with await psycopg.AsyncConnection.connect(args.database_url) as conn:
                while True:
                    async with conn.transaction():
                        cur = await conn.execute(NAIVE_CLAIM)
                        row = await cur.fetchone()
                        if row is None:
                            return
                        event = sale_event(*row)
                        tally.sent()
                        exchange = await client.create(event)
                        tally.answered(exchange.status_code)
                        ok = exchange.status_code is not None and 200 <= exchange.status_code < 300
                        await conn.execute(
                            NAIVE_DONE if ok else NAIVE_RETRY, (exchange.status_code, event.id)
                        )

        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    tally.report()


async def pgqueuer_worker(args: argparse.Namespace) -> None:
    """pgqueuer as its docs set it up: asyncpg, one QueueManager, one entrypoint."""
    import asyncpg
    from pgqueuer import AsyncpgDriver, Queries, QueueManager
    from pgqueuer.models import Job
    from pgqueuer.types import QueueExecutionMode

    tally = Tally()
    conn = await asyncpg.connect(args.database_url)
    client = make_client(args.partnero_url, args.concurrency)
    qm = QueueManager(Queries(AsyncpgDriver(conn)))

    @qm.entrypoint(PGQ_ENTRYPOINT)
    async def send_sale(job: Job) -> None:
        assert job.payload is not None
        e = json.loads(job.payload)
        event = sale_event(
            job.id, e["key"], e["customer"], e["amount"], e["currency"], e["payload"]
        )
        tally.sent()
        exchange = await client.create(event)
        tally.answered(exchange.status_code)
        if exchange.status_code is None or not 200 <= exchange.status_code < 300:
            raise RuntimeError(f"Partnero answered {exchange.status_code}")

    await qm.run(
        batch_size=args.batch_size,
        max_concurrent_tasks=args.concurrency,
        mode=QueueExecutionMode.drain,
        dequeue_timeout=timedelta(seconds=1),
    )
    await client.aclose()
    await conn.close()
    tally.report()


async def pgqueuer_setup(database_url: str, count: int) -> None:
    """Install pgqueuer's tables and enqueue `count` sales: the same rows the daemon gets."""
    from pgqueuer import PsycopgDriver, Queries

    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        queries = Queries(PsycopgDriver(conn))
        await queries.install()
        step = 5000
        for start in range(1, count + 1, step):
            n = min(step, count - start + 1)
            payloads: list[bytes | None] = [
                json.dumps(
                    {
                        "key": f"q-{i}",
                        "customer": f"cust-{i % 1000}",
                        "amount": str(10 + i % 90),
                        "currency": "EUR",
                        "payload": {"product_id": "plan_pro"},
                    }
                ).encode()
                for i in range(start, start + n)
            ]
            await queries.enqueue([PGQ_ENTRYPOINT] * n, payloads, [0] * n)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.peers")
    parser.add_argument("kind", choices=["ceiling", "naive", "pgqueuer"])
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--partnero-url", required=True)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--count", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    runner = {"ceiling": ceiling, "naive": naive, "pgqueuer": pgqueuer_worker}[args.kind]
    asyncio.run(runner(args))


if __name__ == "__main__":
    main()
