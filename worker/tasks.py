"""The Celery task: a thin translation of :func:`worker.item.process` into Celery terms.

Start workers with ``aivvm-batch worker`` or ``celery -A worker.tasks worker --pool threads``.
"""

from __future__ import annotations

import functools

import redis
from celery import Task
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from jobs.config import Settings
from jobs.queue import TASK_NAME, app
from jobs.store import BatchStore

from .item import Done, RunAgain, process
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
        retry=Retry(ExponentialBackoff(cap=5.0, base=0.2), REDIS_RETRIES),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
    )
    return BatchStore(client, settings.result_ttl), settings, RateLimiter(client)


app.steps["worker"].add(Sweeper)


@app.task(bind=True, name=TASK_NAME, max_retries=None, ignore_result=True,
          acks_late=True, reject_on_worker_lost=True)
def complete_item(self: Task, batch_id: str, seq: int, attempt: int = 1,
                  not_before: float = 0.0) -> str:
    store, settings, limiter = runtime()
    outcome = process(store, settings, batch_id, seq, attempt, not_before, limiter)
    if isinstance(outcome, RunAgain):
        raise self.retry(countdown=outcome.countdown, max_retries=None,
                         kwargs={"attempt": outcome.attempt, "not_before": outcome.not_before})
    assert isinstance(outcome, Done)
    return outcome.status
