"""Whether the Redis is fit to hold batches: its memory, its eviction policy, its persistence."""

from __future__ import annotations

from dataclasses import dataclass

import redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from . import keys
from .connection import translated
from .errors import ConfigError

FULL_RATIO = 0.98
SAFE_POLICY = "noeviction"


@dataclass(frozen=True)
class ServerMemory:
    """INFO memory of the Redis: bytes used, the limit (0: none) and the eviction policy."""

    used: int
    maxmemory: int
    policy: str

    @property
    def full(self) -> bool:
        """At (or within 2% of) maxmemory: writes are refused, or soon will be."""
        return self.maxmemory > 0 and self.used >= self.maxmemory * FULL_RATIO

    def describe(self) -> str:
        return f"{self.used / 2**20:.1f} MiB used of maxmemory {self.maxmemory / 2**20:.1f} MiB"


class RedisHealth:
    """Reads of the server's own state (INFO, CONFIG), never of a batch."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    @translated
    def memory(self) -> ServerMemory:
        info = self.redis.info("memory")
        return ServerMemory(int(info.get("used_memory", 0)), int(info.get("maxmemory", 0)),
                            str(info.get("maxmemory_policy", "")))

    @translated
    def check_server(self) -> None:
        """Refuse a Redis that may evict keys: it would silently drop queued messages and batches.

        The policy comes from CONFIG GET, else (a managed Redis that disables CONFIG) from INFO.
        """
        try:
            policy = str(self.redis.config_get("maxmemory-policy").get("maxmemory-policy", ""))
        except ResponseError:
            policy = ""
        policy = policy or self.memory().policy
        if policy and policy != SAFE_POLICY:
            raise ConfigError(f"maxmemory-policy must be {SAFE_POLICY}, but this Redis has {policy}: "
                              "it would silently drop queued items and batches when memory runs out "
                              f"(CONFIG SET maxmemory-policy {SAFE_POLICY})")

    def data_loss_hint(self) -> str:
        """Why a batch may be missing although it was submitted here (BatchNotFound's hint)."""
        try:
            if not self.redis.exists(keys.BATCH_INDEX):
                return ("this Redis holds no batch at all: if the batch was submitted here, the Redis "
                        "has lost its data (restarted without persistence, or flushed)")
            info = self.redis.info("persistence")
            if info.get("aof_enabled") or not self._no_snapshots():
                return ""
            uptime = int(self.redis.info("server").get("uptime_in_seconds", 0))
        except (ResponseError, RedisConnectionError, RedisTimeoutError):
            return ""
        return (f"this Redis keeps no data across restarts (no AOF, no RDB snapshots) and started "
                f"{uptime} s ago: the batch may have been lost in a restart")

    def _no_snapshots(self) -> bool:
        try:
            return not self.redis.config_get("save").get("save")
        except ResponseError:
            return False
