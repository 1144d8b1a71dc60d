"""The runtime's Redis calls: off the event loop, and coalesced into multi-item scripts.

Every item coroutine asks for its own claim, record or release; the calls made while a
round trip of the same kind is under way wait for it and then travel together, one
script per batch for all of them (:class:`Coalescer`). Under load a round trip carries
hundreds of items; alone, an item pays one round trip as before.

The store's calls are synchronous redis-py calls (the same, unit-tested
:class:`~jobs.store.BatchStore` methods every other command uses), run on a small thread
pool of their own; errors arrive translated (:class:`~jobs.errors.StoreUnavailable`, ...).

A full Redis (maxmemory, noeviction) or one that is away is waited out in place
(:func:`wait_for_store`): the claim is retried before any provider call, and a paid
reply is kept in memory, its claim kept alive by the runtime's lease, until it can be
recorded. Writes that may be skipped go through :func:`best_effort`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import queue
import threading
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor
from typing import Any, Generic, TypeVar

from jobs.claims import Claim
from jobs.connection import translated
from jobs.errors import StoreFull, StoreUnavailable
from jobs.queue import Publisher
from jobs.recording import Recorded
from jobs.records import BatchOptions, ItemRequest, ItemResult
from jobs.store import BatchStore

A = TypeVar("A")
R = TypeVar("R")
T = TypeVar("T")
# items in one round trip at most (bounds the time a script holds Redis)
FLUSH_LIMIT = 512
# the kinds of call StoreIO coalesces, each on a thread of its own (and a connection)
COALESCED_KINDS = 7
STORE_WAIT_FIRST = 0.2
STORE_WAIT_CAP = 5.0
STORE_LOG_EVERY = 30.0
logger = logging.getLogger(__name__)


class Coalescer(Generic[A, R]):
    """``await coalescer(arg)``: calls made meanwhile are flushed together by ``flush``.

    ``flush`` gets a list of arguments and returns, for each, a result or the exception to
    raise in its caller; an exception it raises itself goes to every caller of that flush.
    It runs on a thread of the coalescer's own, one flush at a time, which hands the results
    back to the loop in one callback: a thread pool's round trip (its future, wrapped in the
    loop's) cost twice the CPU, about 150 µs a flush on this project's machine.
    """

    def __init__(self, flush: Callable[[list[A]], list[R | BaseException]], name: str) -> None:
        self._flush = flush
        self._name = name
        self._pending: list[tuple[A, asyncio.Future[R]]] = []
        self._busy = False  # a flush is on its way (its callers' futures wait in it)
        self._orders: queue.SimpleQueue[tuple[asyncio.AbstractEventLoop, list[tuple[A, asyncio.Future[R]]]] | None] \
            = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def __call__(self, arg: A) -> asyncio.Future[R]:
        """The future of ``arg``'s result (a future, not a coroutine: one frame less to resume)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        self._pending.append((arg, future))
        if not self._busy:  # sent on the loop's next pass: the calls made in this one go together
            self._busy = True
            loop.call_soon(self._send, loop)
        return future

    def close(self) -> None:
        """End the thread once the flush on its way (if any) is done."""
        self._orders.put(None)

    def _send(self, loop: asyncio.AbstractEventLoop) -> None:
        batch, self._pending = self._pending[:FLUSH_LIMIT], self._pending[FLUSH_LIMIT:]
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name=f"aivvm-redis-{self._name}", daemon=True)
            self._thread.start()
        self._orders.put((loop, batch))

    def _serve(self) -> None:
        while (order := self._orders.get()) is not None:
            loop, batch = order
            try:
                results = self._flush([arg for arg, _ in batch])
            except BaseException as exc:  # noqa: BLE001 - every caller of this flush gets it; the thread goes on
                results = [exc] * len(batch)
            try:
                loop.call_soon_threadsafe(self._deliver, loop, batch, results)
            except RuntimeError:  # the loop was closed: no one waits any more
                return

    def _deliver(self, loop: asyncio.AbstractEventLoop, batch: list[tuple[A, asyncio.Future[R]]],
                 results: list[R | BaseException]) -> None:
        try:
            for (_, future), result in zip(batch, results):
                if future.done():
                    continue
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)
        finally:
            if self._pending:
                self._send(loop)
            else:
                self._busy = False


def _grouped(args: Sequence[tuple[Any, ...]]) -> dict[str, list[int]]:
    """Positions of the arguments by batch id (their first element)."""
    groups: dict[str, list[int]] = {}
    for position, arg in enumerate(args):
        groups.setdefault(arg[0], []).append(position)
    return groups


class StoreIO:
    """The store as the event loop sees it: awaitable, coalesced, never blocking the loop."""

    def __init__(self, store: BatchStore, publisher: Publisher, executor: Executor,
                 loop: asyncio.AbstractEventLoop, claim_ttl: float, cache_ttl: int) -> None:
        self.store = store
        self.cache_ttl = cache_ttl
        self.publisher = publisher
        self.executor = executor
        self.loop = loop
        self.claim_ttl = claim_ttl
        self.claim = Coalescer[tuple[str, int, str], Claim](self._claims, "claim")
        self.record = Coalescer[tuple[str, int, ItemResult, str], Recorded](self._records, "record")
        self.keep = Coalescer[tuple[str, int, str], bool](self._keeps, "keep")
        self.release = Coalescer[tuple[str, int, str], None](self._releases, "release")
        self.note_error = Coalescer[tuple[str, str], None](self._notes, "note")
        self.publish_retry = Coalescer[tuple[str, int, dict[str, Any], float], None](self._retries, "retry")
        # the ok answers of --cache batches, kept for later ones (jobs/cache.py)
        self.keep_answer = Coalescer[tuple[BatchOptions, ItemRequest, ItemResult], None](self._answers, "answer")
        self.coalescers: tuple[Coalescer[Any, Any], ...] = (
            self.claim, self.record, self.keep, self.release, self.note_error, self.publish_retry, self.keep_answer)

    def close(self) -> None:
        """End the coalescers' threads and the executor's (what is on its way still ends)."""
        for coalescer in self.coalescers:
            coalescer.close()
        self.executor.shutdown(wait=False)

    async def run(self, call: Callable[..., R], *args: Any) -> R:
        """Any synchronous store call, off the loop."""
        return await self.loop.run_in_executor(self.executor, functools.partial(call, *args))

    def _claims(self, args: list[tuple[str, int, str]]) -> list[Claim | BaseException]:
        results: list[Claim | BaseException] = [RuntimeError("not claimed")] * len(args)
        for batch_id, positions in _grouped(args).items():
            try:
                claims = self.store.claim_many(batch_id, [(args[p][1], args[p][2]) for p in positions],
                                               self.claim_ttl)
            except Exception as exc:
                claims = [exc] * len(positions)  # type: ignore[list-item]
            for position, claim in zip(positions, claims):
                results[position] = claim
        return results

    def _records(self, args: list[tuple[str, int, ItemResult, str]]) -> list[Recorded | BaseException]:
        """Results ``(batch_id, seq, result, claim token)``: fenced by their claims (:class:`Recorded`)."""
        results: list[Recorded | BaseException] = [Recorded.NOT] * len(args)
        for batch_id, positions in _grouped(args).items():
            try:
                recorded: list[Recorded | BaseException] = list(self.store.record_many(
                    batch_id, [(args[p][1], args[p][2]) for p in positions], [args[p][3] for p in positions]))
            except Exception as exc:
                recorded = [exc] * len(positions)
            for position, one in zip(positions, recorded):
                results[position] = one
        return results

    def _keeps(self, args: list[tuple[str, int, str]]) -> list[bool | BaseException]:
        """Whether each claim ``(batch_id, seq, token)`` is still its token's (extended if so)."""
        return list(self.store.keep_claims(args, self.claim_ttl))

    def _releases(self, args: list[tuple[str, int, str]]) -> list[None | BaseException]:
        self.store.release_many(args)
        return [None] * len(args)

    def _notes(self, args: list[tuple[str, str]]) -> list[None | BaseException]:
        self.store.note_attempt_errors(args)
        return [None] * len(args)

    def _answers(self, args: list[tuple[BatchOptions, ItemRequest, ItemResult]]) -> list[None | BaseException]:
        self.store.keep_answers(args, self.cache_ttl)
        return [None] * len(args)

    def _retries(self, args: list[tuple[str, int, dict[str, Any], float]]) -> list[None | BaseException]:
        _publish_retries(self.publisher, args)
        return [None] * len(args)


@translated
def _publish_retries(publisher: Publisher, retries: list[tuple[str, int, dict[str, Any], float]]) -> None:
    pipe = publisher.redis.pipeline(transaction=False)
    for batch_id, seq, kwargs, countdown in retries:
        publisher.publish_retry(batch_id, seq, kwargs, countdown, pipe=pipe)
    pipe.execute()


async def wait_for_store(what: str, call: Callable[[], Awaitable[T]]) -> T:
    """``await call()`` until Redis takes it: a full Redis or one that is away is waited out.

    Backoff doubles from 0.2 s to 5 s; a warning says why every 30 s. The item's claim
    stays alive meanwhile (the runtime renews every claim it holds).
    """
    delay, waited, logged = STORE_WAIT_FIRST, 0.0, -STORE_LOG_EVERY
    while True:
        try:
            return await call()
        except StoreUnavailable as exc:
            if waited - logged >= STORE_LOG_EVERY:
                reason = "Redis is full (maxmemory)" if isinstance(exc, StoreFull) else str(exc)
                logger.warning("%s: %s; waiting for it (%.0f s so far)", what, reason, waited)
                logged = waited
        await asyncio.sleep(delay)
        waited += delay
        delay = min(delay * 2, STORE_WAIT_CAP)


async def best_effort(what: str, call: Callable[[], Awaitable[object]]) -> None:
    """A write that may be skipped in a full or lost Redis (counters, pauses, releases)."""
    try:
        await call()
    except StoreUnavailable as exc:
        logger.info("%s skipped: %s", what, exc)
