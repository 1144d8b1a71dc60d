"""A rate limit shared by every worker through Redis: requests and tokens per minute.

Scheduling, not polling: each call reserves the next free slot (generic cell rate
algorithm: the key holds the theoretical arrival time of the next request) and
sleeps until it, so callers spread evenly without a thundering herd. A slot further
away than ``max_wait`` is not reserved: the caller is told to come back later.
A 429 with Retry-After pauses the scope for every worker.
"""

from __future__ import annotations

import logging
import time

import redis
from redis.exceptions import ResponseError

from jobs import keys
from jobs.store import is_out_of_memory

from .errors import RateLimited

FULL_RETRY_SECONDS = 1.0
logger = logging.getLogger(__name__)

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS: requests_key tokens_key pause_key ; ARGV: ms_per_request ms_per_token tokens max_wait_ms
# -> ms to wait for the reserved slot, or minus the wait when it is too far to reserve
_ACQUIRE = _NOW + """
local start = now
for i = 1, 3 do
  local tat = tonumber(redis.call('GET', KEYS[i]) or '0')
  if tat > start then start = tat end
end
local wait = start - now
if wait > tonumber(ARGV[4]) then return -wait end
local costs = {tonumber(ARGV[1]), tonumber(ARGV[2]) * tonumber(ARGV[3])}
for i = 1, 2 do
  if costs[i] > 0 then
    local tat = tonumber(redis.call('GET', KEYS[i]) or '0')
    if tat < start then tat = start end
    tat = tat + costs[i]
    redis.call('SET', KEYS[i], tat, 'PX', math.max(1000, math.ceil(tat - now + 60000)))
  end
end
return wait
"""

# KEYS: pause_key ; ARGV: pause_ms (0: only read) -> ms the pause still holds
_PAUSE = _NOW + """
local until_ms = tonumber(redis.call('GET', KEYS[1]) or '0')
local wanted = now + tonumber(ARGV[1])
if tonumber(ARGV[1]) > 0 and wanted > until_ms then
  until_ms = wanted
  redis.call('SET', KEYS[1], until_ms, 'PX', tonumber(ARGV[1]) + 1000)
end
return math.max(0, until_ms - now)
"""


class RateLimiter:
    def __init__(self, client: redis.Redis, max_wait: float = 5.0) -> None:
        self.max_wait = max_wait
        self._acquire = client.register_script(_ACQUIRE)
        self._pause = client.register_script(_PAUSE)

    @staticmethod
    def _keys(scope: str) -> list[str]:
        bucket = keys.rate_bucket(scope)
        return [bucket + ":req", bucket + ":tok", bucket + ":pause"]

    def acquire(self, scope: str, *, rpm: int = 0, tpm: int = 0, tokens: int = 0) -> float:
        """Wait for this call's slot; raise :class:`RateLimited` if it is too far away.

        Returns the seconds waited. A pause that began while waiting is waited out too.
        """
        ms_per_request = 60000.0 / rpm if rpm > 0 else 0.0
        ms_per_token = 60000.0 / tpm if tpm > 0 else 0.0
        try:
            reply = int(self._acquire(keys=self._keys(scope),
                                      args=[ms_per_request, ms_per_token, max(tokens, 0),
                                            int(self.max_wait * 1000)]))
        except ResponseError as exc:
            if not is_out_of_memory(exc):
                raise
            raise RateLimited(FULL_RETRY_SECONDS) from exc  # no slot can be reserved in a full Redis
        if reply < 0:
            raise RateLimited(-reply / 1000)
        waited = reply / 1000
        time.sleep(waited)
        while (paused := self._paused(scope, 0.0)) > 0:
            if paused > self.max_wait:
                raise RateLimited(paused)
            time.sleep(paused)
            waited += paused
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
        return int(self._pause(keys=self._keys(scope)[2:], args=[int(seconds * 1000)])) / 1000
