"""The coalescer: calls made while a flush is on its way travel together in the next one, each
flush on the coalescer's own thread, results back on the loop."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import pytest

from worker.storeio import COALESCED_KINDS, FLUSH_LIMIT, Coalescer, StoreIO


def test_calls_made_during_a_flush_travel_together_in_the_next_one() -> None:
    flushes: list[list[int]] = []
    release = threading.Event()
    threads: set[str] = set()

    def flush(args: list[int]) -> list[int | BaseException]:
        threads.add(threading.current_thread().name)
        if not flushes:
            release.wait(5)  # the first flush is slow: the next calls gather meanwhile
        flushes.append(args)
        return [a * 10 if a % 3 else ValueError(f"no {a}") for a in args]

    async def main() -> list[int | BaseException]:
        coalescer = Coalescer[int, int](flush, "test")
        first = coalescer(1)
        await asyncio.sleep(0.05)
        later = [coalescer(n) for n in range(2, 6)]
        release.set()
        results = await asyncio.gather(first, *later, return_exceptions=True)
        coalescer.close()
        return results

    results = asyncio.run(main())
    assert flushes == [[1], [2, 3, 4, 5]]
    assert results[0] == 10 and results[1] == 20 and results[3] == 40 and results[4] == 50
    assert isinstance(results[2], ValueError)  # its own exception, the others unaffected
    assert threads == {"aivvm-redis-test"} and threading.current_thread().name not in threads


@pytest.mark.parametrize("error", [ConnectionError("Redis went away"), GeneratorExit("not an Exception")])
def test_a_flush_that_raises_fails_its_callers_and_the_next_flush_still_runs(error: BaseException) -> None:
    """Whatever the flush raises, an Exception or not, goes to its callers; the thread goes on."""
    calls = {"n": 0}

    def flush(args: list[int]) -> list[int | BaseException]:
        calls["n"] += 1
        if calls["n"] == 1:
            raise error
        return list(args)

    async def main() -> tuple[list[int | BaseException], int]:
        coalescer = Coalescer[int, int](flush, "failing")
        failed = list(await asyncio.gather(coalescer(1), coalescer(2), return_exceptions=True))
        again = await asyncio.wait_for(coalescer(3), 5)
        coalescer.close()
        return failed, again

    failed, again = asyncio.run(main())
    # 1 and 2, asked in the same pass of the loop, went together, and their flush raised
    assert all(isinstance(f, type(error)) for f in failed) and again == 3 and calls["n"] == 2


def echo_counting(sizes: list[int]) -> Callable[[list[int]], list[int | BaseException]]:
    """A flush that answers each argument with itself and notes how many it carried."""
    def flush(args: list[int]) -> list[int | BaseException]:
        sizes.append(len(args))
        return list(args)

    return flush


def gathered(flush: Callable[[list[int]], list[int | BaseException]], calls: int) -> list[int]:
    """The results of ``calls`` calls asked in one pass of the loop."""
    async def main() -> list[int]:
        coalescer = Coalescer[int, int](flush, "test")
        results = await asyncio.gather(*(coalescer(n) for n in range(calls)))
        coalescer.close()
        return results

    return asyncio.run(main())


def test_calls_asked_in_one_pass_of_the_loop_go_in_one_flush() -> None:
    sizes: list[int] = []
    assert gathered(echo_counting(sizes), 64) == list(range(64)) and sizes == [64]


def test_a_flush_carries_at_most_the_limit() -> None:
    sizes: list[int] = []
    assert gathered(echo_counting(sizes), FLUSH_LIMIT * 2 + 3) == list(range(FLUSH_LIMIT * 2 + 3))
    assert max(sizes) <= FLUSH_LIMIT and sum(sizes) == FLUSH_LIMIT * 2 + 3


def test_every_coalesced_kind_is_counted_in_the_redis_pool() -> None:
    io = StoreIO(store=None, publisher=None, executor=None, loop=None,  # type: ignore[arg-type]
                 claim_ttl=1.0, cache_ttl=1)
    assert len(io.coalescers) == COALESCED_KINDS
