"""The runtime of one worker process: its parts as one named object, and its event loop.

One asyncio event loop per process, in a thread of its own, runs every item in flight as a
coroutine. ``concurrency`` slots bound the requests in flight (the provider never sees
more from this process), whatever the number of Celery threads that hand chunks over.
Every few seconds (a third of the lease) the loop renews this process's hold on its work:
the claims of its items and the messages it holds unacknowledged. When the process dies,
both lapse within a lease, and the sweep puts the messages back on the queue.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import redis
from celery import Celery

from jobs.config import Settings
from jobs.queue import Publisher
from jobs.reconcile import renew_messages
from jobs.store import WORKER_RETRIES, BatchStore, connect

from .calls import ProviderCalls
from .ratelimit import RateLimiter
from .storeio import StoreIO

logger = logging.getLogger(__name__)
T = TypeVar("T")
# threads for the store's calls off the loop (each kind of call coalesces into one at a time)
IO_THREADS = 8
# new objects between two collections of the youngest generation (Python's default: 700)
GC_THRESHOLD = 50_000


class Leases:
    """The claims this process holds: ``(batch_id, seq, token)``, renewed while it lives."""

    def __init__(self) -> None:
        self._held: set[tuple[str, int, str]] = set()

    def hold(self, batch_id: str, seq: int, token: str) -> None:
        self._held.add((batch_id, seq, token))

    def drop(self, batch_id: str, seq: int, token: str) -> None:
        self._held.discard((batch_id, seq, token))

    def snapshot(self) -> list[tuple[str, int, str]]:
        return list(self._held)

    def __len__(self) -> int:
        return len(self._held)


def collect_for_work() -> None:
    """Collect garbage as a worker should: what the boot made is never scanned again, and a
    collection waits for 50,000 new objects instead of 700. Each item makes hundreds of
    short-lived objects beside the hundreds of items in flight; with Python's defaults, the
    collector took a tenth of a worker's CPU at 128 items in flight (BENCHMARKS.md)."""
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, 50, 100)


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's loop where it is installed (not on Windows), else asyncio's own."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def redis_pool_size(settings: Settings) -> int:
    """Connections of a worker process: its store threads, the lease renewal and the rate limiter."""
    return settings.redis_pool or IO_THREADS + 8


@dataclass
class Runtime:
    """Store, settings, rate limiter, HTTP calls and the loop of one worker process."""

    settings: Settings
    concurrency: int
    client: redis.Redis
    store: BatchStore
    limiter: RateLimiter
    publisher: Publisher
    loop: asyncio.AbstractEventLoop
    io: StoreIO
    calls: ProviderCalls
    slots: asyncio.Semaphore
    leases: Leases = field(default_factory=Leases)
    # the delivery tags of the messages this process holds (renewed with the claims)
    held_messages: Callable[[], list[str]] = list
    _thread: threading.Thread | None = None
    _renewal: Any = None

    @classmethod
    def start(cls, settings: Settings, app: Celery, concurrency: int,
              held_messages: Callable[[], list[str]] = list) -> Runtime:
        client = connect(settings.redis_url, max_connections=redis_pool_size(settings), retries=WORKER_RETRIES)
        store = BatchStore(client, settings.result_ttl)
        publisher = Publisher(client, app)
        loop = new_event_loop()
        executor = ThreadPoolExecutor(IO_THREADS, thread_name_prefix="aivvm-redis")
        runtime = cls(
            settings=settings, concurrency=concurrency, client=client, store=store,
            limiter=RateLimiter(client), publisher=publisher, loop=loop,
            io=StoreIO(store, publisher, executor, loop, settings.lease),
            calls=ProviderCalls(settings, concurrency), slots=asyncio.Semaphore(concurrency),
            held_messages=held_messages,
        )
        runtime._thread = threading.Thread(target=loop.run_forever, name="aivvm-loop", daemon=True)
        runtime._thread.start()
        runtime._renewal = asyncio.run_coroutine_threadsafe(runtime._renew_forever(), loop)
        return runtime

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the loop and wait for it (from another thread: a Celery task's)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    async def renew(self) -> None:
        """Extend the claims and the messages this process holds (a lease's renewal)."""
        held = self.leases.snapshot()
        if held:
            try:
                await self.io.run(self.store.keep_claims, held, self.settings.lease)
            except Exception as exc:  # the next renewal tries again
                logger.warning("could not renew %d claims: %s", len(held), exc)
        tags = self.held_messages()
        if tags:
            try:
                await self.io.run(renew_messages, self.client, tags)
            except Exception as exc:  # includes a full Redis: then the sweep restores nothing either
                logger.info("could not renew %d held messages: %s", len(tags), exc)

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.lease / 3)
            await self.renew()

    def close(self) -> None:
        """Stop the loop (after the work handed to it has ended) and close the connections."""
        if self._renewal is not None:
            self._renewal.cancel()
        if self.loop.is_running():
            asyncio.run_coroutine_threadsafe(self.calls.aclose(), self.loop).result(timeout=10)
            self.loop.call_soon_threadsafe(self.loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.io.executor.shutdown(wait=False)
        self.client.close()


_lock = threading.Lock()
_runtimes: dict[int, Runtime] = {}


def current(build: Callable[[], Runtime]) -> Runtime:
    """This process's runtime, built on first use (per process id: a forked child builds its own)."""
    pid = os.getpid()
    found = _runtimes.get(pid)
    if found is not None:
        return found
    with _lock:
        if pid not in _runtimes:
            _runtimes[pid] = build()
        return _runtimes[pid]
