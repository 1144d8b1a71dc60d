"""Settings read from the environment (prefix ``AIVVM_BATCH_``), with documented defaults."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any

from .errors import ConfigError

ENV_PREFIX = "AIVVM_BATCH_"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


@dataclass(frozen=True)
class Settings:
    """Every knob of the runtime; the field name upper-cased, prefixed, is its variable."""

    redis_url: str = DEFAULT_REDIS_URL
    visibility_timeout: int = 3600
    max_retries: int = 5
    backoff_base: float = 1.0
    backoff_cap: float = 60.0
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    item_deadline: float = 600.0
    result_ttl: int = 7 * 24 * 3600
    max_line_bytes: int = 1024 * 1024
    max_items: int = 5_000_000
    rpm: int = 0
    tpm: int = 0
    task_events: bool = False
    # messages a worker holds per Celery thread (each carries a chunk of items)
    prefetch_multiplier: int = 1
    sweep_interval: float = 10.0
    # a reply (decoded) past this many bytes fails the item as reply_too_large
    max_reply_bytes: int = 4 * 1024 * 1024
    # decoded bytes per received byte beyond which a compressed reply is a bomb
    max_decompression_ratio: float = 100.0
    # retries of a reply cut mid-stream (each one a paid partial generation)
    max_cut_retries: int = 2
    # more tries of a reply that does not follow the JSON schema its request gave
    schema_retries: int = 1
    # comma-separated base URLs a worker's API keys may be sent to, besides each provider's
    # own default and its configured AIVVM_BASE_URL / OPENAI_BASE_URL
    allowed_base_urls: str = ""
    # requests in flight per worker process (0: the size of the Celery pool it runs in)
    concurrency: int = 0
    # a worker's hold on its claims and its messages: renewed every third of it while the
    # worker lives, so that a dead worker's items come back within about this long
    lease: float = 30.0
    # waits up to this long (a backoff, a busy item, a paused batch) happen inside the worker,
    # which keeps the message; a longer wait is handed on as a message with a countdown
    inline_wait: float = 10.0
    # Redis connections per worker process (0: sized to the concurrency)
    redis_pool: int = 0
    # a warm shutdown (SIGTERM) that has not ended after this long exits the process; its items
    # come back through their leases (a worker whose Redis is gone cannot acknowledge anything)
    shutdown_timeout: float = 60.0
    # how long an answer stays in the cache for batches submitted with --cache (jobs/cache.py)
    cache_ttl: int = 7 * 24 * 3600

    def __post_init__(self) -> None:
        if self.backoff_cap >= self.visibility_timeout / 2:
            raise ConfigError(
                f"{ENV_PREFIX}BACKOFF_CAP ({self.backoff_cap:g}s) must stay well under "
                f"{ENV_PREFIX}VISIBILITY_TIMEOUT ({self.visibility_timeout}s): a retry "
                "waiting longer than the timeout would be delivered twice"
            )
        if not 3.0 <= self.lease < 3 * self.visibility_timeout:
            raise ConfigError(
                f"{ENV_PREFIX}LEASE ({self.lease:g}s) must be at least 3s, and renewed (every third "
                f"of it) within {ENV_PREFIX}VISIBILITY_TIMEOUT ({self.visibility_timeout}s)"
            )
        if self.item_deadline >= self.visibility_timeout:
            raise ConfigError(
                f"{ENV_PREFIX}ITEM_DEADLINE ({self.item_deadline:g}s) must be shorter than "
                f"{ENV_PREFIX}VISIBILITY_TIMEOUT ({self.visibility_timeout}s)"
            )

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: object) -> Settings:
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for f in fields(cls):
            raw = env.get(ENV_PREFIX + f.name.upper())
            if raw is None or raw == "":
                continue
            kind: type[Any] = type(f.default)
            try:
                values[f.name] = _boolean(raw) if kind is bool else kind(raw)
            except ValueError:
                raise ConfigError(
                    f"{ENV_PREFIX}{f.name.upper()}={raw!r} is not a valid {kind.__name__}"
                ) from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)  # type: ignore[arg-type]


def _boolean(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(raw)
