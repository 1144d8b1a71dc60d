"""What an answer's headers say of the provider's rate limits: free of I/O.

The forms read (every one a limit per minute, as each vendor documents it):

- OpenAI, Azure OpenAI, vLLM and LiteLLM proxies: ``x-ratelimit-limit-requests``,
  ``x-ratelimit-remaining-requests``, ``x-ratelimit-reset-requests`` (a Go duration:
  ``1s``, ``6m0s``, ``20ms``), and the same for ``-tokens``;
- Anthropic: ``anthropic-ratelimit-requests-limit``, ``-remaining``, ``-reset`` (an RFC 3339
  time), and the same for ``tokens``;
- the IETF draft: ``ratelimit-limit``, ``ratelimit-remaining``, ``ratelimit-reset`` (seconds),
  its window from ``ratelimit-policy`` (``100;w=60``), requests.

``retry-after-ms`` (OpenAI's, in milliseconds) is preferred to ``retry-after`` when both came.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

# a reset or a wait past this is not believed (an hour, as Retry-After is capped)
MAX_SECONDS = 3600.0
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|us|µs|ns|h|m|s)")
_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
_WINDOW = re.compile(r";\s*w\s*=\s*(\d+)")
_ANY_OF_THEM = ("x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-limit-tokens",
                "x-ratelimit-remaining-tokens", "x-ratelimit-reset-requests", "x-ratelimit-reset-tokens",
                "anthropic-ratelimit-requests-limit", "anthropic-ratelimit-tokens-limit", "ratelimit-limit",
                "ratelimit-remaining")


@dataclass(frozen=True)
class Limit:
    """One resource's limit (requests or tokens): per minute, what is left, and when it is full again."""

    per_minute: float | None = None
    remaining: float | None = None
    reset: float | None = None  # seconds


@dataclass(frozen=True)
class RateHeaders:
    requests: Limit = Limit()
    tokens: Limit = Limit()

    @property
    def known(self) -> bool:
        return self.requests != Limit() or self.tokens != Limit()

    def wait(self) -> float | None:
        """When to come back after a refusal, from the resets: the exhausted resource's, else the
        soonest (a 429 without Retry-After)."""
        resets = [(limit.remaining, limit.reset) for limit in (self.requests, self.tokens) if limit.reset is not None]
        exhausted = [reset for remaining, reset in resets if remaining is not None and remaining < 1]
        if exhausted:
            return max(exhausted)
        return min((reset for _, reset in resets), default=None)


def parse_duration(value: str) -> float | None:
    """Seconds of a Go duration (``6m0s``, ``1.5s``, ``20ms``) or a plain number of seconds."""
    text = value.strip()
    number = _number(text)
    if number is not None:
        return _seconds(number)
    position, total = 0, 0.0
    for match in _DURATION_PART.finditer(text):
        if match.start() != position:
            return None
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        position = match.end()
    return _seconds(total) if position == len(text) and text else None


def parse_time_until(value: str, now: float) -> float | None:
    """Seconds from ``now`` (epoch) to an RFC 3339 time (Anthropic's resets)."""
    try:
        moment = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    if moment.tzinfo is None:
        return None
    return _seconds(max(0.0, moment.timestamp() - now))


def retry_after_ms(value: str | None) -> float | None:
    """Seconds from a ``retry-after-ms`` header."""
    number = _number(value or "")
    return None if number is None else _seconds(number / 1000)


def parse_rate_headers(headers: Mapping[str, str], now: float | None = None) -> RateHeaders | None:
    """The limits an answer's headers state (case-insensitive mapping), or ``None`` if none;
    ``now``: epoch seconds, for Anthropic's resets (default: the clock)."""
    if not any(name in headers for name in _ANY_OF_THEM):  # most answers: a few lookups, nothing built
        return None
    now = time.time() if now is None else now
    found = RateHeaders(
        _first(_openai(headers, "requests"), _anthropic(headers, "requests", now), _ietf(headers)),
        _first(_openai(headers, "tokens"), _anthropic(headers, "tokens", now)),
    )
    return found if found.known else None


def _openai(headers: Mapping[str, str], resource: str) -> Limit:
    reset = headers.get(f"x-ratelimit-reset-{resource}")
    return Limit(_number(headers.get(f"x-ratelimit-limit-{resource}")),
                 _number(headers.get(f"x-ratelimit-remaining-{resource}")),
                 parse_duration(reset) if reset else None)


def _anthropic(headers: Mapping[str, str], resource: str, now: float) -> Limit:
    reset = headers.get(f"anthropic-ratelimit-{resource}-reset")
    return Limit(_number(headers.get(f"anthropic-ratelimit-{resource}-limit")),
                 _number(headers.get(f"anthropic-ratelimit-{resource}-remaining")),
                 parse_time_until(reset, now) if reset else None)


def _ietf(headers: Mapping[str, str]) -> Limit:
    limit = _number(headers.get("ratelimit-limit"))
    window = _WINDOW.search(headers.get("ratelimit-policy") or "")
    seconds = float(window.group(1)) if window else 60.0
    per_minute = limit * 60.0 / seconds if limit is not None and seconds > 0 else None
    reset = _number(headers.get("ratelimit-reset"))
    return Limit(per_minute, _number(headers.get("ratelimit-remaining")), None if reset is None else _seconds(reset))


def _first(*limits: Limit) -> Limit:
    return next((limit for limit in limits if limit != Limit()), Limit())


def _number(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        number = float(value.strip())
    except ValueError:
        return None
    return number if math.isfinite(number) and number >= 0 else None


def _seconds(value: float) -> float | None:
    return min(value, MAX_SECONDS) if math.isfinite(value) and value >= 0 else None
