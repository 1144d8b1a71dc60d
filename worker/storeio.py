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
STORE_WAIT_FIRST = 0.2
STORE_WAIT_CAP = 5.0
STORE_LOG_EVERY = 30.0
logger = logging.getLogger(__name__)


class Coalescer(Generic[A, R]):
    """``await coalescer(arg)``: calls made meanwhile are flushed together by ``flush``.

    ``flush`` gets a list of arguments and returns, for each, a result or the exception to
    raise in its caller; an exception it raises itself goes to every caller of that flush.
    """

    def __init__(self, flush: Callable[[list[A]], list[R | BaseException]],
                 run: Callable[[Callable[[], list[R | BaseException]]], asyncio.Future[list[R | BaseException]]]) -> None:
        self._flush = flush
        self._run = run
        self._pending: list[tuple[A, asyncio.Future[R]]] = []
        self._task: asyncio.Task[None] | None = None

    def __call__(self, arg: A) -> asyncio.Future[R]:
        """The future of ``arg``'s result (a future, not a coroutine: one frame less to resume)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        self._pending.append((arg, future))
        if self._task is None:
            self._task = loop.create_task(self._drain())
        return future

    async def _drain(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending[:FLUSH_LIMIT], self._pending[FLUSH_LIMIT:]
                args = [arg for arg, _ in batch]
                try:
                    results = await self._run(functools.partial(self._flush, args))
                except Exception as exc:  # every caller of this flush gets it
                    results = [exc] * len(batch)
                for (_, future), result in zip(batch, results):
                    if future.done():
                        continue
                    if isinstance(result, BaseException):
                        future.set_exception(result)
                    else:
                        future.set_result(result)
        finally:
            self._task = None


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
        self.claim = Coalescer[tuple[str, int, str], Claim](self._claims, self._in_thread)
        self.record = Coalescer[tuple[str, int, ItemResult, str], Recorded](self._records, self._in_thread)
        self.keep = Coalescer[tuple[str, int, str], bool](self._keeps, self._in_thread)
        self.release = Coalescer[tuple[str, int, str], None](self._releases, self._in_thread)
        self.note_error = Coalescer[tuple[str, str], None](self._notes, self._in_thread)
        self.publish_retry = Coalescer[tuple[str, int, dict[str, Any], float], None](self._retries,
                                                                                  self._in_thread)
        # the ok answers of --cache batches, kept for later ones (jobs/cache.py)
        self.keep_answer = Coalescer[tuple[BatchOptions, ItemRequest, ItemResult], None](self._answers,
                                                                                      self._in_thread)

    def _in_thread(self, call: Callable[[], R]) -> asyncio.Future[R]:
        return self.loop.run_in_executor(self.executor, call)

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
