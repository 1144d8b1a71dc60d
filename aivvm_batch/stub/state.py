"""The server's shared state: knobs, counters, fault bookkeeping and ids (read from other threads)."""

from __future__ import annotations

import collections
import itertools
import threading
import time
from typing import Any

from .ratelimit import Limiter, RateLimit

TIMES_WINDOW = 100_000


class _StubState:
    """Knobs, counters and fault bookkeeping; read by other threads through :meth:`snapshot`."""

    def __init__(self, *, latency: float, chunks: int, api_key: str | None, reply_bytes: int | None,
                 rate_limit: RateLimit | None = None) -> None:
        self.latency = latency
        self.limiter = Limiter(rate_limit) if rate_limit is not None else None
        self.chunks = chunks
        self.api_key = api_key
        self.reply_bytes = reply_bytes
        self._lock = threading.Lock()
        self._requests = 0
        self._in_flight = 0
        self._peak = 0
        self._by_prompt: dict[str, int] = {}
        self._times: collections.deque[float] = collections.deque(maxlen=TIMES_WINDOW)
        self._fault_uses: dict[str, int] = {}
        self._ids = itertools.count(1)
        self._request_ids = itertools.count(1)

    def begin_call(self) -> None:
        """A chat request arrived: count it and its concurrency."""
        now = time.time()
        with self._lock:
            self._requests += 1
            self._times.append(now)
            self._in_flight += 1
            self._peak = max(self._peak, self._in_flight)

    def end_call(self) -> None:
        """Its response is written (or the connection is gone)."""
        with self._lock:
            self._in_flight -= 1

    def record_prompt(self, prompt: str) -> None:
        with self._lock:
            self._by_prompt[prompt] = self._by_prompt.get(prompt, 0) + 1

    def consume_fault(self, key: str, times: int) -> bool:
        """True while the fault for ``key`` has been applied fewer than ``times`` times."""
        with self._lock:
            used = self._fault_uses.get(key, 0)
            if used >= times:
                return False
            self._fault_uses[key] = used + 1
            return True

    def next_id(self, prefix: str = "chatcmpl-stub-") -> str:
        """A new object id: ``prefix`` and a counter shared by every kind of answer."""
        with self._lock:
            return f"{prefix}{next(self._ids)}"

    def next_request_id(self) -> str:
        """The ``x-request-id`` of the next HTTP answer: ``req_<counter>``."""
        return f"req_{next(self._request_ids)}"  # itertools.count: atomic under the GIL

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "requests": self._requests,
                "by_prompt": dict(self._by_prompt),
                "times": list(self._times),
                "in_flight": self._in_flight,
                "peak_in_flight": self._peak,
                "rate_limited": self.limiter.refused if self.limiter is not None else 0,
            }

    def reset(self) -> None:
        """Forget counts and fault uses; the peak restarts from what is in flight now."""
        with self._lock:
            self._requests = 0
            self._by_prompt.clear()
            self._times.clear()
            self._fault_uses.clear()
            self._peak = self._in_flight
        if self.limiter is not None:
            self.limiter.refused = 0
