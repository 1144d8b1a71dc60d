"""The process's slots (requests in flight): taken first come, first served, in constant time.

asyncio's Semaphore looks through its waiters at every take and every release: those woken but
not yet run stay at the head of its queue, and a release walks past them (a worker's items end
in bursts, a claim's flush starts dozens at once). At 128 slots that cost about 10 µs an item.
Here a release hands its slot to the first waiter still waiting, and a take with none waiting is
a counter.
"""

from __future__ import annotations

import asyncio
from collections import deque


class Slots:
    """``count`` slots: :meth:`acquire` waits for one, :meth:`release` gives it back (to the
    longest waiting caller, if any). A waiter cancelled after it was handed a slot gives it on."""

    def __init__(self, count: int) -> None:
        if count < 0:
            raise ValueError("slots cannot be fewer than none")
        self._free = count
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def free(self) -> int:
        return self._free

    async def acquire(self) -> None:
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():  # handed a slot as it was cancelled
                self.release()
            raise

    def release(self) -> None:
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():  # a cancelled waiter is passed over
                waiter.set_result(None)
                return
        self._free += 1
