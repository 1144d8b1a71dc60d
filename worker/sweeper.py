"""A sweep, run by the workers, that brings back the work of dead workers and lost messages.

Every ``sweep_interval`` seconds one worker (a Redis lock) first puts back on the queue the
messages no live worker has renewed for a lease (their worker died), then looks at the
running batches. A batch is examined for orphans (see :mod:`jobs.reconcile`) when the queue
is empty and its count of finished items has not moved since the previous sweep: that is
when a lost message would otherwise stall it for good.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import threading
import time
from typing import Any

import redis
from celery import bootsteps
from celery.utils.nodenames import host_format

from jobs import clock, keys
from jobs.connection import connect, is_out_of_memory
from jobs.errors import ConfigError, StoreFull, StoreUnavailable
from jobs.heartbeats import WorkerSeen
from jobs.queue import Publisher, chunk_size
from jobs.config import Settings
from jobs.queue import app as celery_app
from jobs.reconcile import release_stalled, requeue_orphans, restore_stale_messages
from jobs.records import BatchState
from jobs.store import BatchStore

from .process_runtime import THIS_PROCESS
from .runtime import Runtime

logger = logging.getLogger(__name__)
SWEEP_LOCK = keys.SWEEP_LOCK
SWEEP_SEEN = keys.SWEEP_SEEN


def sweep_once(store: BatchStore, publisher: Publisher, interval: float,
               lease: float | None = None) -> dict[str, list[int]]:
    """One sweep; returns the seqs enqueued again, by batch.

    With ``lease``, messages held unacknowledged and not renewed for that long are put back
    on the queue first (their worker is dead).
    """
    if not store.redis.set(SWEEP_LOCK, "1", nx=True, px=max(1, int(interval * 900))):
        return {}
    if lease is not None:
        restored = restore_stale_messages(store.redis, lease)
        if restored:
            logger.warning("put back on the queue %d messages of a worker that stopped renewing them "
                           "(it died)", restored)
    if store.redis.llen(keys.QUEUE):
        store.redis.delete(SWEEP_SEEN)
        return {}
    requeued: dict[str, list[int]] = {}
    for info in store.list_batches(limit=500):
        if info.state is not BatchState.RUNNING or info.finished:
            store.redis.hdel(SWEEP_SEEN, info.id)
            continue
        previous = store.redis.hget(SWEEP_SEEN, info.id)
        if previous is not None and int(previous) == info.done:
            if release_stalled(store, publisher, info):
                logger.warning("batch %s: its window had lost count; its next messages are on the queue", info.id)
                store.redis.hset(SWEEP_SEEN, info.id, info.done)
                continue
            seqs = requeue_orphans(store, publisher, info)
            if seqs:
                logger.warning("batch %s: enqueued again %d items whose message was lost", info.id, len(seqs))
                requeued[info.id] = seqs
        store.redis.hset(SWEEP_SEEN, info.id, info.done)
    return requeued


def check_redis(url: str) -> None:
    """Refuse, in one line and exit status 2, a Redis that may evict keys (at worker start).

    An unreachable Redis is not refused: Celery waits for it, as it does for the broker.
    """
    store = BatchStore(connect(url, connect_timeout=5))
    try:
        store.check_server()
    except ConfigError as exc:
        logger.critical("%s", exc)
        print(f"aivvm-batch worker: error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except StoreUnavailable as exc:
        logger.warning("could not check Redis's maxmemory-policy at start: %s", exc)
    finally:
        store.redis.close()


def beat(store: BatchStore, publisher: Publisher, settings: Settings, node: str, held: int = 0,
         note: str = "", slots: int = 0, period: float = 0.0, reserve: float = 0.0) -> int:
    """One round of the sweeper thread: say this worker is alive (holding ``held`` claims, with
    ``note``, its ``slots``), then sweep. Returns how many workers were seen alive lately (this
    one included); ``period`` (how long the last round took, wait included) and ``reserve``: see
    :func:`say_slots`."""
    clock.sync(store.redis)
    alive = 1
    try:
        store.worker_heartbeat(node, held, note, slots)
        seen = store.workers()
        alive = say_slots(store, seen, settings, period, reserve, publisher)
        gone = [worker.name for worker in seen if worker.age > FORGET_WORKER_SECONDS]
        if gone:
            store.forget_workers(gone)
        # no live worker lets a held message go a lease, nor the visibility timeout, unrenewed
        sweep_once(store, publisher, settings.sweep_interval, min(settings.lease, settings.visibility_timeout))
    except StoreFull:
        logger.warning("Redis is full (maxmemory): the sweep waits for memory to free")
    except redis.exceptions.ResponseError as exc:
        if not is_out_of_memory(exc):
            raise
        logger.warning("Redis is full (maxmemory): the sweep waits for memory to free")
    return max(alive, 1)


SOCKET_TIMEOUT = 10.0
# a worker whose heartbeat is younger than this many sweeps counts as alive (a peer)
PEER_SEEN_SWEEPS = 3
# a worker not seen for this long is no longer listed (a restarted worker is a new one)
FORGET_WORKER_SECONDS = 24 * 3600


class Outage:
    """The sweep's failures in a row: one line when they start, one when they end (pure)."""

    def __init__(self) -> None:
        self.failures = 0

    def failed(self, error: object) -> str | None:
        self.failures += 1
        if self.failures > 1:
            return None
        return f"sweep for lost messages failed ({error}); said once, until it works again"

    def passed(self) -> str | None:
        failures, self.failures = self.failures, 0
        if not failures:
            return None
        return f"sweep for lost messages works again ({failures} sweeps failed meanwhile)"


def say_slots(store: BatchStore, seen: list[WorkerSeen], settings: Settings, period: float = 0.0,
              reserve: float = 0.0, publisher: Publisher | None = None) -> int:
    """Store the slots of the workers seen lately, together, and their reserve (the batches'
    windows are sized by them: :mod:`jobs.queue`); returns how many workers that is.

    ``reserve``: the items this worker holds beyond its slots, a share of them
    (:func:`reserve_share`); every worker's is taken to be the same share of its slots (they
    share the links to Redis). A window of twice the slots alone was all held by the workers on
    a link of 200 ms each way (each held its slots again in reserve), so they took turns for its
    messages: one worker's slots idled while the other held 90 items waiting. On a local network
    the reserve is none, and the windows are as they were.

    Lately is a few sweeps, each as long as this worker's last round (``period``) when that was
    longer than the interval: a round is a dozen round trips, and on a link of 200 ms each way
    with a sweep every second it took 3 to 4 s, so a live peer's heartbeat was often older than
    three intervals; its slots went uncounted and every batch's window shrank to half (its
    workers' slots idled while their next messages were held).

    With ``publisher``, slots more than were said before widen the running batches' windows at
    once (:func:`widen_windows`)."""
    lately_seconds = PEER_SEEN_SWEEPS * max(settings.sweep_interval, period)
    lately = [worker for worker in seen if worker.age < lately_seconds]
    if any(worker.slots for worker in lately):
        total = math.ceil(sum(worker.slots for worker in lately) * (1 + reserve))
        before = store.set_slots(total, lately_seconds)
        if publisher is not None and total > before:
            widen_windows(store, publisher)
    return len(lately)


def widen_windows(store: BatchStore, publisher: Publisher) -> int:
    """The held messages of the batches under way go out as far as their windows, larger now;
    returns how many went. A batch submitted before any worker said its slots had a window as for
    64 (128 items), and only its messages' ends widened it: `run` with 10 s replies ran 128 items
    at a time for the first 10 s whenever its workers said their slots after it had submitted."""
    under_way = [info for info in store.list_batches(limit=500)
                 if info.state in (BatchState.RUNNING, BatchState.SUBMITTING) and not info.finished]
    pipe = store.redis.pipeline(transaction=False)
    for info in under_way:
        pipe.llen(keys.held(info.id))
    return sum(publisher.release(info.id, 0, chunk_size(info.total or 1))
               for info, held in zip(under_way, pipe.execute()) if held)


def what_to_say(runtime: Runtime | None) -> tuple[int, str]:
    """A heartbeat's claims held and note (a provider out of reach, the pace a provider allows)
    from this process's runtime."""
    if runtime is None:
        return 0, ""
    notes = (runtime.breaker.note(time.monotonic()), runtime.provider_pace.note())
    return len(runtime.leases), "; ".join(note for note in notes if note)


def reserve_share(runtime: Runtime | None) -> float:
    """The items this process holds beyond its slots (:func:`worker.credit.reserve`), per slot."""
    if runtime is None or runtime.credit.slots <= 0:
        return 0.0
    return runtime.credit.ahead / runtime.credit.slots


def slots_of(runtime: Runtime | None) -> int:
    """The slots a heartbeat says this process has (0 before its runtime is built)."""
    return runtime.credit.slots if runtime is not None else 0


class Sweeper(bootsteps.StartStopStep):
    """Runs :func:`sweep_once` in a daemon thread of each worker process.

    At start it refuses an evicting Redis (:func:`check_redis`) and says the worker is
    alive; then it says so again at every sweep (``BatchStore.worker_heartbeat``).

    It requires the runtime's step, so that its first heartbeat says the worker's slots
    (Celery orders steps that require nothing of each other by string hashes: with some seeds
    it came first). One said with none left the batches' windows at their least until the
    next sweep (10 s by default): a batch started with the workers ran 128 items at a time
    meanwhile (`run --concurrency 1024`, 1 s replies).
    """

    requires = ("worker.tasks:RuntimeStep",)  # type: ignore[assignment]

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)  # type: ignore[no-untyped-call]
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, parent: Any) -> None:
        settings = Settings.from_env(redis_url=celery_app.conf.broker_url)
        check_redis(settings.redis_url)
        store = BatchStore(connect(settings.redis_url, max_connections=2, retries=3, connect_timeout=SOCKET_TIMEOUT,
                                   socket_timeout=SOCKET_TIMEOUT), settings.result_ttl)
        publisher = Publisher(store.redis, parent.app)
        # the process id too: two workers started with one name on one host are two workers
        # (a name given with %h, as run's fork server gives it, is expanded here as Celery would)
        node = f"{host_format(getattr(parent, 'hostname', None) or 'celery')}/{os.getpid()}"
        outage = Outage()

        def loop() -> None:
            try:
                store.worker_heartbeat(node, slots=slots_of(THIS_PROCESS.get()))
                say_slots(store, store.workers(), settings, publisher=publisher)
            except StoreUnavailable as exc:
                logger.warning("heartbeat failed: %s", exc)
            started = time.monotonic()
            while not self._stop.wait(settings.sweep_interval):
                runtime = THIS_PROCESS.get()
                period, started = time.monotonic() - started, time.monotonic()
                try:
                    alive = beat(store, publisher, settings, node, *what_to_say(runtime), slots_of(runtime),
                                 period, reserve_share(runtime))
                except (StoreUnavailable, redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
                    message = outage.failed(exc)
                    if message:
                        logger.warning("%s", message)
                    continue
                except Exception:  # a bug: said once, retried at the next interval
                    message = outage.failed("an unexpected error")
                    if message:
                        logger.exception("sweep for lost messages failed")
                    continue
                if runtime is not None:
                    runtime.peers = alive
                message = outage.passed()
                if message:
                    logger.warning("%s", message)

        self._thread = threading.Thread(target=loop, name="aivvm-batch-sweeper", daemon=True)
        self._thread.start()

    def stop(self, parent: Any) -> None:
        self._stop.set()
