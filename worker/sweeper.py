"""A sweep, run by the workers, that brings back the work of dead workers and lost messages.

Every ``sweep_interval`` seconds one worker (a Redis lock) first puts back on the queue the
messages no live worker has renewed for a lease (their worker died), then looks at the
running batches. A batch is examined for orphans (see :mod:`jobs.reconcile`) when the queue
is empty and its count of finished items has not moved since the previous sweep: that is
when a lost message would otherwise stall it for good.
"""

from __future__ import annotations

import logging
import sys
import threading
from typing import Any

import redis
from celery import bootsteps

from jobs import keys
from jobs.errors import ConfigError, StoreFull, StoreUnavailable
from jobs.queue import Publisher
from jobs.config import Settings
from jobs.queue import app as celery_app
from jobs.reconcile import requeue_orphans, restore_stale_messages
from jobs.records import BatchState
from jobs.store import BatchStore, connect, is_out_of_memory

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


def beat(store: BatchStore, publisher: Publisher, settings: Settings, node: str) -> None:
    """One round of the sweeper thread: say this worker is alive, then sweep."""
    try:
        store.worker_heartbeat(node)
        sweep_once(store, publisher, settings.sweep_interval, settings.lease)
    except StoreFull:
        logger.warning("Redis is full (maxmemory): the sweep waits for memory to free")
    except redis.exceptions.ResponseError as exc:
        if not is_out_of_memory(exc):
            raise
        logger.warning("Redis is full (maxmemory): the sweep waits for memory to free")


class Sweeper(bootsteps.StartStopStep):
    """Runs :func:`sweep_once` in a daemon thread of each worker process.

    At start it refuses an evicting Redis (:func:`check_redis`) and says the worker is
    alive; then it says so again at every sweep (``BatchStore.worker_heartbeat``).
    """

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)  # type: ignore[no-untyped-call]
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, parent: Any) -> None:
        settings = Settings.from_env(redis_url=celery_app.conf.broker_url)
        check_redis(settings.redis_url)
        store = BatchStore(connect(settings.redis_url, max_connections=2, retries=3), settings.result_ttl)
        publisher = Publisher(store.redis, parent.app)
        node = str(getattr(parent, "hostname", None) or "celery")

        def loop() -> None:
            try:
                store.worker_heartbeat(node)
            except StoreUnavailable as exc:
                logger.warning("heartbeat failed: %s", exc)
            while not self._stop.wait(settings.sweep_interval):
                try:
                    beat(store, publisher, settings, node)
                except Exception:  # a failed sweep is retried at the next interval
                    logger.exception("sweep for lost messages failed")

        self._thread = threading.Thread(target=loop, name="aivvm-batch-sweeper", daemon=True)
        self._thread.start()

    def stop(self, parent: Any) -> None:
        self._stop.set()
