"""The Redis client: the one way to build it, and redis-py's failures translated at the boundary."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import redis
from redis.backoff import ExponentialBackoff
from redis.exceptions import AuthenticationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry as RedisRetry

from .errors import ConfigError, StoreFull, StoreUnavailable

F = TypeVar("F", bound=Callable[..., Any])
# a worker's client rides out a Redis restart (about two minutes); every store call is idempotent
WORKER_RETRIES = 30
POOL_WAIT_SECONDS = 5.0


def connect(url: str, *, max_connections: int | None = None, retries: int = 0,
            connect_timeout: float | None = None, socket_timeout: float | None = None) -> redis.Redis:
    """The one way to build a Redis client here.

    ``max_connections``: a pool of at most that many connections, where a caller past the
    limit waits (up to 5 s, then a connection error: a wait, not a crash) instead of redis-py's
    default of failing at once past 100. ``retries``: each command is retried that many times,
    with backoff, on connection errors and timeouts (the workers' clients: ride out a restart).
    ``socket_timeout``: a reply that does not come within it is a timeout (a host cut off from
    Redis drops packets: without one, a call waits for TCP to give up, a quarter of an hour).
    """
    options: dict[str, Any] = {"health_check_interval": 30, "socket_keepalive": True}
    if connect_timeout is not None:
        options["socket_connect_timeout"] = connect_timeout
    if socket_timeout is not None:
        options["socket_timeout"] = socket_timeout
    if retries:
        options["retry"] = RedisRetry(ExponentialBackoff(cap=5.0, base=0.2), retries)
        options["retry_on_error"] = [RedisConnectionError, RedisTimeoutError]
    if max_connections is None:
        return redis.Redis.from_url(url, **options)
    pool = redis.BlockingConnectionPool.from_url(url, max_connections=max_connections,
                                                 timeout=POOL_WAIT_SECONDS, **options)
    client = redis.Redis(connection_pool=pool)
    client.auto_close_connection_pool = True
    return client


def translated(func: F) -> F:
    """Turn redis-py's failures into this package's errors (:class:`StoreUnavailable`, ...)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except AuthenticationError as exc:
            raise ConfigError(f"Redis refused the credentials in the Redis URL: {exc}") from exc
        except (RedisConnectionError, RedisTimeoutError) as exc:
            raise StoreUnavailable(f"Redis is unreachable: {exc}") from exc
        except ResponseError as exc:
            if is_out_of_memory(exc):
                raise StoreFull(FULL_MESSAGE) from exc
            if "NOAUTH" in str(exc) or "WRONGPASS" in str(exc):
                raise ConfigError(f"Redis refused the credentials in the Redis URL: {exc}") from exc
            raise

    return wrapper  # type: ignore[return-value]


FULL_MESSAGE = ("Redis is full: it reached its maxmemory and refuses writes "
                "(OOM command not allowed); free memory or raise maxmemory")


def is_out_of_memory(exc: BaseException | None) -> bool:
    """A write refused at ``maxmemory``, also wrapped: in an ERR reply of a script (Redis 6.2),
    an aborted transaction, or a kombu error (followed along ``__cause__`` / ``__context__``)."""
    seen = 0
    while exc is not None and seen < 5:
        if isinstance(exc, OutOfMemoryError) or "command not allowed when used memory" in str(exc):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False
