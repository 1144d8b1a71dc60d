"""The Celery task: a thin translation of :func:`worker.item.process` into Celery terms.

Start workers with ``aivvm-batch worker`` or ``celery -A worker.tasks worker --pool threads``.
"""

from __future__ import annotations

import functools
from typing import Any

import redis
from celery import Task
from celery.exceptions import Reject, Retry
from kombu.exceptions import OperationalError
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry as RedisRetry

from jobs.config import Settings
from jobs.errors import StoreFull, StoreUnavailable
from jobs.queue import TASK_NAME, app
from jobs.store import FULL_MESSAGE, BatchStore, is_out_of_memory

from .item import Done, RunAgain, Spent, process, wait_for_store
from .ratelimit import RateLimiter
from .sweeper import Sweeper

REDIS_RETRIES = 30


@functools.lru_cache(maxsize=1)
def runtime() -> tuple[BatchStore, Settings, RateLimiter]:
    """The worker's store and settings, made once per process from the app's broker URL."""
    settings = Settings.from_env(redis_url=app.conf.broker_url)
    client = redis.Redis.from_url(
        settings.redis_url, health_check_interval=30, socket_keepalive=True,
        # ride out a Redis restart; every store call is idempotent, so a replay is safe
        retry=RedisRetry(ExponentialBackoff(cap=5.0, base=0.2), REDIS_RETRIES),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
    )
    return BatchStore(client, settings.result_ttl), settings, RateLimiter(client)


app.steps["worker"].add(Sweeper)


@app.task(bind=True, name=TASK_NAME, max_retries=None, ignore_result=True,
          acks_late=True, reject_on_worker_lost=True)
def complete_item(self: Task, batch_id: str, seq: int, attempt: int = 1,
                  not_before: float = 0.0, spent: list[int] | None = None, cuts: int = 0) -> str:
    store, settings, limiter = runtime()
    outcome = process(store, settings, batch_id, seq, attempt, not_before, limiter,
                      Spent.from_list(spent), cuts)
    if isinstance(outcome, RunAgain):
        raise publish_retry(self, batch_id, seq, outcome)
    assert isinstance(outcome, Done)
    return outcome.status


def publish_retry(task: Task, batch_id: str, seq: int, outcome: RunAgain) -> Retry:
    """Enqueue the item's next run; a full or lost Redis is waited out, never the message lost.

    Celery turns a failed publish into ``Reject(requeue=False)``, which would acknowledge
    (and so drop) the message: here the publish is tried again until Redis takes it.
    """
    kwargs: dict[str, Any] = {"attempt": outcome.attempt, "not_before": outcome.not_before,
                              "spent": outcome.spent.to_list(), "cuts": outcome.cuts}

    def publish() -> Retry:
        try:
            retry = task.retry(countdown=outcome.countdown, max_retries=None, kwargs=kwargs, throw=False)
        except Reject as rejected:
            reason = rejected.reason
            if is_out_of_memory(reason):
                raise StoreFull(FULL_MESSAGE) from reason
            if isinstance(reason, (OperationalError, RedisConnectionError, RedisTimeoutError)):
                raise StoreUnavailable(f"Redis is unreachable: {reason}") from reason
            raise
        assert isinstance(retry, Retry)
        return retry

    return wait_for_store(f"batch {batch_id} item {seq}: publish its retry", publish)
