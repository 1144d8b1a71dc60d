"""The process's slots: first come, first served; a cancelled waiter never keeps a slot."""

from __future__ import annotations

import asyncio

import pytest

from worker.slots import Slots


def test_slots_are_handed_in_the_order_asked_and_never_more_than_there_are() -> None:
    async def main() -> tuple[list[int], int]:
        slots = Slots(2)
        order: list[int] = []
        peak = held = 0

        async def one(i: int) -> None:
            nonlocal peak, held
            await slots.acquire()
            held += 1
            peak = max(peak, held)
            order.append(i)
            await asyncio.sleep(0)
            held -= 1
            slots.release()

        await asyncio.gather(*(one(i) for i in range(10)))
        return order, peak

    order, peak = asyncio.run(main())
    assert order == list(range(10)) and peak == 2


def test_a_waiter_cancelled_before_its_turn_is_passed_over() -> None:
    async def main() -> tuple[bool, int]:
        slots = Slots(1)
        await slots.acquire()
        cancelled = asyncio.ensure_future(slots.acquire())
        after = asyncio.ensure_future(slots.acquire())
        await asyncio.sleep(0)
        cancelled.cancel()
        await asyncio.sleep(0)
        slots.release()
        await asyncio.wait_for(after, 1)  # the slot went past the cancelled one
        slots.release()
        return cancelled.cancelled(), slots.free

    was_cancelled, free = asyncio.run(main())
    assert was_cancelled and free == 1


def test_a_waiter_cancelled_as_it_is_handed_a_slot_gives_it_on() -> None:
    async def main() -> int:
        slots = Slots(1)
        await slots.acquire()
        waiter = asyncio.ensure_future(slots.acquire())
        await asyncio.sleep(0)
        slots.release()  # handed to the waiter, which has not run yet
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        return slots.free

    assert asyncio.run(main()) == 1


def test_no_slots_fewer_than_none() -> None:
    with pytest.raises(ValueError):
        Slots(-1)
