"""The runtime of one worker process: its parts as one named object, and its event loop.

One asyncio event loop per process, in a thread of its own, runs every item in flight as a
coroutine. ``concurrency`` slots bound the requests in flight (the provider never sees
more from this process), whatever the number of Celery threads that hand chunks over.
Every few seconds (a third of the lease) the loop renews this process's hold on its work:
the claims of its items and the messages it holds unacknowledged. When the process dies,
both lapse within a lease, and the sweep puts the messages back on the queue.

A live process cut off from Redis cannot be told from a dead one: past its lease, its items
are another worker's. So it fences itself (:class:`Contact`): once it has not reached Redis
for most of its lease it starts no call and abandons its streams (what it streamed is counted
when Redis is back), and a claim found lapsed at a renewal is taken again or given up.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import itertools
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import redis
from celery import Celery

from jobs import clock
from jobs.claims import ClaimOutcome
from jobs.config import Settings
from jobs.connection import WORKER_RETRIES, connect
from jobs.errors import BatchError
from jobs.queue import Publisher
from jobs.reconcile import renew_messages
from jobs.store import BatchStore

from .attempt import ProviderCalls
from .breaker import Breaker
from .credit import Credit, Pace, reserve
from .errors import Abandoned
from .provider_pace import ProviderPace
from .ratelimit import RateLimiter
from .slots import Slots
from .storeio import COALESCED_KINDS, StoreIO

logger = logging.getLogger(__name__)
T = TypeVar("T")
# threads for the store's calls off the loop that are not coalesced (each coalesced kind of call has
# a thread of its own: worker.storeio)
IO_THREADS = 8
# new objects between two collections of the youngest generation (Python's default: 700)
GC_THRESHOLD = 50_000
# the share of a lease without reaching Redis after which this process starts no call and
# abandons its streams: its claims lapse at the whole lease, and another worker takes its items
FENCE_SHARE = 0.8
# out of reach this share of the lease: one warning (a renewal lost on a lossy link says nothing)
WARN_SHARE = 0.4
# a reply of the workers' Redis that takes longer is a timeout (a cut link drops packets)
SOCKET_TIMEOUT = 10.0
# the lease renewal's own connection: fails fast, so that a cut is seen within seconds
PROBE_TIMEOUT = 3.0
Held = tuple[str, int, str]  # a claim: batch id, item seq, token


class Leases:
    """The claims this process holds: ``(batch_id, seq, token)``, renewed while it lives; those
    found lapsed at a renewal and taken by another are ``lost`` until dropped."""

    def __init__(self) -> None:
        self._held: set[Held] = set()
        self.lost: set[Held] = set()

    def hold(self, batch_id: str, seq: int, token: str) -> None:
        self._held.add((batch_id, seq, token))

    def drop(self, batch_id: str, seq: int, token: str) -> None:
        self._held.discard((batch_id, seq, token))
        self.lost.discard((batch_id, seq, token))

    def snapshot(self) -> list[Held]:
        return list(self._held)

    def holds(self, claim: Held) -> bool:
        return claim in self._held

    def __len__(self) -> int:
        return len(self._held)


class Contact:
    """When this process last reached Redis, and the one line to log when that changes (pure:
    the caller gives the monotonic time). A renewal that fails alone (a slow or lossy link) says
    nothing: the warning comes once Redis has been out of reach for :data:`WARN_SHARE` of a lease."""

    def __init__(self, lease: float, now: float) -> None:
        self.lease = lease
        self.last_ok = now
        self.lost_since: float | None = None
        self.failures = 0
        self.said = False

    def fenced(self, now: float) -> bool:
        """Out of reach for most of a lease: start nothing, abandon what streams."""
        return now - self.last_ok > FENCE_SHARE * self.lease

    def failed(self, now: float, error: object) -> str | None:
        """A renewal failed; the warning to log once Redis has been out of reach for a while."""
        self.failures += 1
        if self.lost_since is None:
            self.lost_since = self.last_ok
        if self.said or now - self.last_ok < WARN_SHARE * self.lease:
            return None
        self.said = True
        return (f"Redis is out of reach ({error}); this worker's claims lapse {self.lease:g} s after it "
                f"was last reached, and it starts no call after {FENCE_SHARE * self.lease:.0f} s")

    def reached(self, sent: float, lapsed: int) -> str | None:
        """A renewal sent at ``sent`` went through (its claims run a lease from then, at least);
        the line to log when Redis had been said out of reach."""
        self.last_ok = sent
        said, gone, failures = self.said, sent - (self.lost_since or sent), self.failures
        self.lost_since, self.failures, self.said = None, 0, False
        if not said:
            return None
        return (f"Redis is reachable again after {gone:.0f} s ({failures} renewals failed meanwhile; "
                f"{lapsed} claims had lapsed)")


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
    """Connections of a worker process: its store threads (coalesced calls' and the others'), the
    lease renewal and the rate limiter."""
    return settings.redis_pool or IO_THREADS + COALESCED_KINDS + 8


@dataclass
class Runtime:
    """Store, settings, rate limiter, HTTP calls and the loop of one worker process, and what
    Celery's side of the process shares with them: the items it may take (``credit``)."""

    settings: Settings
    concurrency: int
    client: redis.Redis
    store: BatchStore
    limiter: RateLimiter
    publisher: Publisher
    loop: asyncio.AbstractEventLoop
    io: StoreIO
    calls: ProviderCalls
    slots: Slots
    # the items the process holds against its slots, read by its transport (worker.credit)
    credit: Credit = field(default_factory=Credit)
    # how long a slot is held (for the reserve of items beyond the slots: worker.credit)
    pace: Pace = field(default_factory=Pace)
    # what the providers' answers said of their rate limits
    provider_pace: ProviderPace = field(default_factory=ProviderPace)
    leases: Leases = field(default_factory=Leases)
    # the delivery tags of the messages this process holds (renewed with the claims)
    held_messages: Callable[[], list[str]] = list
    # the lease renewal's store: a client of its own that fails fast
    probe: BatchStore | None = None
    contact: Contact | None = None
    # whether the provider is in this worker's reach, per scope; this worker's name in items'
    # state; the workers seen alive at the last sweep (this one included)
    breaker: Breaker = field(default_factory=Breaker)
    node: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")
    peers: int = 1
    # the socket pair through which a signal wakes Celery's consumer (worker.tasks), kept open
    # for the life of the process
    wakers: tuple[socket.socket, ...] = ()
    # tasks on the loop that nothing else refers to (a window's release): held here until they end
    background: set[asyncio.Future[None]] = field(default_factory=set)
    # a claim's token names one attempt of one runtime: a random prefix, the process, a counter (a
    # runtime is built in the process that uses it, after any fork)
    _token_prefix: str = field(default_factory=lambda: f"{os.urandom(6).hex()}{os.getpid():x}.")
    _tokens: Iterator[int] = field(default_factory=itertools.count)
    _thread: threading.Thread | None = None
    _renewal: Any = None
    # the renewal's own thread: never queued behind the store's calls, which wait out a cut
    _probe_thread: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="aivvm-lease"))

    @classmethod
    def start(cls, settings: Settings, app: Celery, concurrency: int,
              held_messages: Callable[[], list[str]] = list) -> Runtime:
        client = connect(settings.redis_url, max_connections=redis_pool_size(settings), retries=WORKER_RETRIES,
                         connect_timeout=SOCKET_TIMEOUT, socket_timeout=SOCKET_TIMEOUT)
        store = BatchStore(client, settings.result_ttl)
        probe_timeout = min(PROBE_TIMEOUT, settings.lease / 4)  # a failure is seen well before the fence
        probe = BatchStore(connect(settings.redis_url, max_connections=2, connect_timeout=probe_timeout,
                                   socket_timeout=probe_timeout), settings.result_ttl)
        clock.sync(probe.redis)
        try:
            probe.load_scripts()  # the probe fails fast (the store's connections retry for minutes)
        except BatchError as exc:  # each script loads at its first use instead
            logger.info("could not load the store's scripts ahead: %s", exc)
        publisher = Publisher(client, app)
        loop = new_event_loop()
        executor = ThreadPoolExecutor(IO_THREADS, thread_name_prefix="aivvm-redis")
        provider_pace = ProviderPace()
        runtime = cls(
            settings=settings, concurrency=concurrency, client=client, store=store,
            limiter=RateLimiter(client), publisher=publisher, loop=loop,
            io=StoreIO(store, publisher, executor, loop, settings.lease, settings.cache_ttl),
            calls=ProviderCalls(settings, concurrency, on_head=provider_pace.heard),
            slots=Slots(concurrency), credit=Credit(concurrency), provider_pace=provider_pace,
            held_messages=held_messages, probe=probe, contact=Contact(settings.lease, time.monotonic()),
        )
        runtime._thread = threading.Thread(target=loop.run_forever, name="aivvm-loop", daemon=True)
        runtime._thread.start()
        runtime._renewal = asyncio.run_coroutine_threadsafe(runtime._renew_forever(), loop)
        return runtime

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the loop and wait for it (from another thread: a Celery task's)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def claim_token(self) -> str:
        """A token of its own for the next claim of this process."""
        return f"{self._token_prefix}{next(self._tokens):x}"

    def fenced(self) -> bool:
        """Redis has been out of reach for most of a lease: this process starts no call."""
        return self.contact is not None and self.contact.fenced(time.monotonic())

    def guard(self, held: Held) -> Callable[[], None]:
        """What a stream calls at each piece: it raises :class:`Abandoned` once the claim ``held``
        is lost, or this process fenced (its items may be another worker's by now)."""
        lost = self.leases.lost

        def check() -> None:
            if held in lost:
                raise Abandoned("its claim passed to another worker")
            if self.fenced():
                raise Abandoned("Redis has been out of reach for most of the lease")

        return check

    async def renew(self) -> bool:
        """Extend the claims and the messages this process holds (a lease's renewal): through a
        connection of its own that fails fast, which also tells whether Redis is in reach.
        Returns whether Redis was reached."""
        probe, contact = self.probe or self.store, self.contact
        held = self.leases.snapshot()
        sent = time.monotonic()  # the claims run a lease from then, at least
        try:
            if held:
                kept = await self._probing(probe.keep_claims, held, self.settings.lease)
                await self._probing(clock.sync, probe.redis)  # the clock is worth no failure
            else:
                kept = []
                await self._probing(clock.CLOCK.sync, probe.redis)
        except Exception as exc:  # the next renewal tries again
            message = contact.failed(time.monotonic(), exc) if contact is not None else None
            if message:
                logger.warning("%s", message)
            return False
        # an item recorded (or released) while the renewal was on its way is no longer held: not lapsed
        lapsed = [claim for claim, ok in zip(held, kept) if not ok and self.leases.holds(claim)]
        if lapsed:
            await self._lapsed(probe, lapsed)
        message = contact.reached(sent, len(lapsed)) if contact is not None else None
        if message:
            logger.warning("%s", message)
        tags = self.held_messages()
        if tags:
            try:
                await self._probing(renew_messages, probe.redis, tags)
            except Exception as exc:  # includes a full Redis: then the sweep restores nothing either
                logger.info("could not renew %d held messages: %s", len(tags), exc)
        return True

    async def _probing(self, call: Callable[..., T], *args: Any) -> T:
        """A call of the lease renewal, on its own thread."""
        return await self.loop.run_in_executor(self._probe_thread, functools.partial(call, *args))

    async def _lapsed(self, probe: BatchStore, lapsed: list[Held]) -> None:
        """Claims that lapsed (this process was frozen or cut off): each is taken again if no one
        else took it, else lost: its stream is abandoned, and no call starts for it here."""
        lost, taken = [], 0
        by_batch: dict[str, list[tuple[int, str]]] = {}
        for batch_id, seq, token in lapsed:
            by_batch.setdefault(batch_id, []).append((seq, token))
        for batch_id, claims in by_batch.items():  # one round trip a batch: renewals wait meanwhile
            try:
                again = await self._probing(probe.claim_many, batch_id, claims, self.settings.lease)
            except Exception:  # noqa: BLE001 - unknown: the next renewal looks again
                continue
            # paused, cancelled or out of budget: no one else can take it, and its run ends it
            for (seq, token), claim in zip(claims, again):
                if claim.outcome in (ClaimOutcome.CLAIMED, ClaimOutcome.PAUSED, ClaimOutcome.CANCELLED,
                                     ClaimOutcome.BUDGET):
                    continue
                if self.leases.holds((batch_id, seq, token)):
                    lost.append((batch_id, seq, token))
                    # done: most often recorded here while the renewal was on its way; not worth a line
                    taken += claim.outcome is not ClaimOutcome.DONE
        self.leases.lost.update(lost)
        if taken:
            logger.warning("%d claims of this worker lapsed and passed to another worker: their streams are "
                           "abandoned", taken)

    async def _renew_forever(self) -> None:
        """A renewal every third of the lease, counted from the start of the last one (its round
        trips take a second on a slow link); after a failure, again soon."""
        every = self.settings.lease / 3
        wait = every
        while True:
            await asyncio.sleep(wait)
            started = time.monotonic()
            renewed = await self.renew()
            self.credit.ahead = reserve(self.credit.slots, clock.CLOCK.round_trip, self.pace.slot_seconds)
            wait = max(0.0, every - (time.monotonic() - started)) if renewed else every / 4

    def close(self) -> None:
        """Stop the loop (after the work handed to it has ended) and close the connections."""
        if self._renewal is not None:
            self._renewal.cancel()
        if self.loop.is_running():
            asyncio.run_coroutine_threadsafe(self.calls.aclose(), self.loop).result(timeout=10)
            self.loop.call_soon_threadsafe(self.loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.io.close()
        self._probe_thread.shutdown(wait=False)
        self.client.close()
        if self.probe is not None:
            self.probe.redis.close()
