"""A rate limit as hosted APIs enforce it: token buckets of requests (and tokens) per minute
with a burst, stated in OpenAI's headers on every answer and refused with a 429 that says when
to come back (``retry-after``, ``retry-after-ms``) beyond it."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class RateLimit:
    """``rpm`` requests a minute, ``burst`` at once at most (default: a second's worth, at least 1);
    ``tpm`` tokens a minute (the prompt's and ``max_tokens``), a burst of a second's worth."""

    rpm: int
    burst: int | None = None
    tpm: int | None = None

    def __post_init__(self) -> None:
        if self.rpm < 1 or (self.burst is not None and self.burst < 1) or (self.tpm is not None and self.tpm < 1):
            raise ValueError("rpm, burst and tpm must be at least 1")


class _Bucket:
    def __init__(self, per_minute: int, capacity: float) -> None:
        self.per_second = per_minute / 60.0
        self.capacity = capacity
        self.level = capacity
        self.at = 0.0

    def refill(self, now: float) -> None:
        if self.at:
            self.level = min(self.capacity, self.level + (now - self.at) * self.per_second)
        self.at = now

    def short(self, cost: float) -> float:
        """Seconds until ``cost`` fits (0: it fits now)."""
        deficit = min(cost, self.capacity) - self.level
        return deficit / self.per_second if deficit > 1e-9 else 0.0  # not short by a rounding

    def headers(self, resource: str, limit: int) -> list[tuple[str, str]]:
        return [(f"x-ratelimit-limit-{resource}", str(limit)),
                (f"x-ratelimit-remaining-{resource}", str(max(0, math.floor(self.level)))),
                (f"x-ratelimit-reset-{resource}", go_duration((self.capacity - self.level) / self.per_second))]


class Limiter:
    """The stand-in's buckets, shared by its connections (thread-safe: stats are read elsewhere)."""

    def __init__(self, limit: RateLimit, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.clock = clock
        self._lock = threading.Lock()
        self._requests = _Bucket(limit.rpm, limit.burst or max(1.0, limit.rpm / 60.0))
        self._tokens = _Bucket(limit.tpm, max(1.0, limit.tpm / 60.0)) if limit.tpm else None
        self.refused = 0

    def take(self, tokens: int) -> tuple[float, list[tuple[str, str]]]:
        """Admit a request of ``tokens`` (0: admitted, else the seconds to wait) and the headers to send."""
        with self._lock:
            now = self.clock()
            buckets = [self._requests] + ([self._tokens] if self._tokens else [])
            for bucket in buckets:
                bucket.refill(now)
            wait = max(self._requests.short(1), self._tokens.short(tokens) if self._tokens else 0.0)
            if wait == 0:
                self._requests.level -= 1
                if self._tokens is not None:
                    self._tokens.level -= min(tokens, self._tokens.capacity)
            else:
                self.refused += 1
            headers = self._requests.headers("requests", self.limit.rpm)
            if self._tokens is not None and self.limit.tpm:
                headers += self._tokens.headers("tokens", self.limit.tpm)
        if wait:
            headers += [("retry-after", str(math.ceil(wait))), ("retry-after-ms", str(math.ceil(wait * 1000)))]
        return wait, headers


def go_duration(seconds: float) -> str:
    """``0.05`` -> ``50ms``, ``1.5`` -> ``1.5s``, ``360`` -> ``6m0s`` (as OpenAI writes resets)."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    minutes, rest = divmod(round(seconds, 3), 60)
    text = f"{rest:.3f}".rstrip("0").rstrip(".") or "0"
    return f"{int(minutes)}m{text}s" if minutes else f"{text}s"
