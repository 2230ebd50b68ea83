"""The daemon's slot gate: at most `limit` calls at once, first come first served, resizable by a
reload, and a waiter cancelled at shutdown never leaks a slot."""

from __future__ import annotations

import asyncio

from outbox.delivery.slots import Slots


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_waiters_get_slots_in_arrival_order_as_slots_free() -> None:
    slots = Slots(2)
    order: list[int] = []

    async def holder(n: int, release: asyncio.Event) -> None:
        await slots.acquire()
        order.append(n)
        await release.wait()
        slots.release()

    gates = [asyncio.Event() for _ in range(5)]
    tasks = [asyncio.create_task(holder(n, gates[n])) for n in range(5)]
    await _settle()
    assert (order, slots.used) == ([0, 1], 2)
    gates[1].set()
    await _settle()
    assert (order, slots.used) == ([0, 1, 2], 2)
    for gate in gates:
        gate.set()
    await asyncio.gather(*tasks)
    assert (order, slots.used) == ([0, 1, 2, 3, 4], 0)


async def test_a_larger_limit_lets_waiters_in_at_once_and_a_smaller_one_holds_new_ones() -> None:
    slots = Slots(1)
    await slots.acquire()
    waiters = [asyncio.create_task(slots.acquire()) for _ in range(3)]
    await _settle()
    assert sum(w.done() for w in waiters) == 0
    slots.resize(3)
    await _settle()
    assert (sum(w.done() for w in waiters), slots.used) == (2, 3)
    slots.resize(1)
    slots.release()
    slots.release()
    await _settle()
    assert (sum(w.done() for w in waiters), slots.used) == (2, 1)  # still one over the limit
    slots.release()
    await _settle()
    assert (all(w.done() for w in waiters), slots.used) == (True, 1)


async def test_a_cancelled_waiter_takes_no_slot_and_blocks_no_one() -> None:
    slots = Slots(1)
    await slots.acquire()
    first = asyncio.create_task(slots.acquire())
    second = asyncio.create_task(slots.acquire())
    await _settle()
    first.cancel()
    await _settle()
    slots.release()
    await _settle()
    assert first.cancelled() and second.done() and slots.used == 1


async def test_a_waiter_cancelled_after_being_handed_a_slot_gives_it_back() -> None:
    slots = Slots(1)
    await slots.acquire()
    waiter = asyncio.create_task(slots.acquire())
    await _settle()
    slots.release()  # hands the slot to the waiter, which has not run yet
    waiter.cancel()
    await _settle()
    assert waiter.cancelled() and slots.used == 0
    await asyncio.wait_for(slots.acquire(), 1)
    assert slots.used == 1
