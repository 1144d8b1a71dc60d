"""A rate limit shared by every worker through Redis: requests and tokens per minute.

Scheduling, not polling: each call reserves the next free slot (generic cell rate
algorithm: the key holds the theoretical arrival time of the next request) and
sleeps until it, so callers spread evenly without a thundering herd. A slot further
away than ``max_wait`` is not reserved: the caller is told to come back later.
A 429 with Retry-After pauses the scope for every worker.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable

import redis
from redis.exceptions import ResponseError

from jobs import keys, scripts
from jobs.connection import is_out_of_memory

from .errors import RateLimited

FULL_RETRY_SECONDS = 1.0
logger = logging.getLogger(__name__)


class RateLimiter:
    def __init__(self, client: redis.Redis, max_wait: float = 5.0) -> None:
        self.max_wait = max_wait
        self._acquire = client.register_script(scripts.RATE_ACQUIRE)
        self._pause = client.register_script(scripts.RATE_PAUSE)

    def reserve(self, scope: str, *, rpm: float = 0, tpm: float = 0, tokens: int = 0, burst: int = 0) -> float:
        """Reserve this call's slot and return the seconds until it; :class:`RateLimited` if too far.
        ``burst``: requests that may go at once ahead of the even spacing."""
        ms_per_request = 60000.0 / rpm if rpm >= 1e-3 else 0.0  # a rate too small to mean one: none
        ms_per_token = 60000.0 / tpm if tpm >= 1e-3 else 0.0
        try:
            reply = int(self._acquire(keys=keys.rate_keys(scope),
                                      args=[ms_per_request, ms_per_token, max(tokens, 0),
                                            int(self.max_wait * 1000), int(ms_per_request * max(burst - 1, 0))]))
        except ResponseError as exc:
            if not is_out_of_memory(exc):
                raise
            raise RateLimited(FULL_RETRY_SECONDS) from exc  # no slot can be reserved in a full Redis
        if reply < 0:
            raise RateLimited(-reply / 1000)
        return reply / 1000

    async def acquire_async(self, scope: str, run: Callable[[Callable[[], float]], Awaitable[float]], *,
                            rpm: float = 0, tpm: float = 0, tokens: int = 0, burst: int = 0) -> float:
        """Wait for this call's slot; raise :class:`RateLimited` if it is too far away. Returns the
        seconds waited; a pause that began while waiting is waited out too.

        ``run(f)`` makes each Redis call off the loop, and the waits are ``asyncio.sleep``: the
        loop is never blocked. A Redis that is away or full says come back later (:class:`RateLimited`)."""
        try:
            waited = await run(functools.partial(self.reserve, scope, rpm=rpm, tpm=tpm, tokens=tokens, burst=burst))
            await asyncio.sleep(waited)
            while (paused := await run(functools.partial(self._paused, scope, 0.0))) > 0:
                if paused > self.max_wait:
                    raise RateLimited(paused)
                await asyncio.sleep(paused)
                waited += paused
        except redis.RedisError as exc:
            raise RateLimited(FULL_RETRY_SECONDS) from exc
        return waited

    def pause(self, scope: str, seconds: float) -> None:
        """No call on ``scope`` starts for ``seconds`` (a server's Retry-After), on any worker.

        Skipped in a full Redis (the batch's own pause and the item's backoff still hold).
        """
        try:
            self._paused(scope, max(seconds, 0.001))
        except ResponseError as exc:
            if not is_out_of_memory(exc):
                raise
            logger.info("rate-limit pause of %s skipped: Redis is full", scope)

    def _paused(self, scope: str, seconds: float) -> float:
        return int(self._pause(keys=keys.rate_keys(scope)[2:], args=[int(seconds * 1000)])) / 1000
