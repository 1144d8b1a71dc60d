"""One clock for every host: Redis's.

Liveness and leases compare times written on one host with times read on another: a held
message's last renewal, a worker's heartbeat, an item's ``not_before``. Each host's own
clock may be off by any amount (a worker 45 s ahead declared its live peers dead at every
sweep), so every such time is Redis's: a process keeps the offset between its clock and
Redis's ``TIME`` (the round trip's midpoint), measured when it connects and again at each
lease renewal and sweep, and :func:`now` is its own clock plus that offset. Claims, pauses
and the rate limiter read ``TIME`` inside their scripts and need none of this.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

logger = logging.getLogger(__name__)
# an offset this large is worth one line in the log (once per process, and again if it changes much)
SKEW_WORTH_SAYING = 2.0
# the weight of the newest round trip in the mean kept (a link's delay, not one slow reply)
ROUND_TRIP_SMOOTHING = 0.2


def offset_of(server_seconds: int, server_micros: int, sent: float, received: float) -> float:
    """Redis's time minus ours, from a ``TIME`` reply and our clock before and after it (pure)."""
    return server_seconds + server_micros / 1e6 - (sent + received) / 2


class SharedClock:
    """This process's view of Redis's clock."""

    def __init__(self) -> None:
        self.offset = 0.0
        self.round_trip = 0.0  # seconds, an exponentially weighted mean of the syncs' round trips
        self.synced = False
        self._said: float | None = None
        self._lock = threading.Lock()

    def now(self) -> float:
        """Epoch seconds as Redis counts them."""
        return time.time() + self.offset

    def sync(self, client: Any) -> float:
        """Measure the offset again through ``client`` (a redis-py client); returns it."""
        sent = time.time()
        seconds, micros = client.time()
        received = time.time()
        offset = offset_of(int(seconds), int(micros), sent, received)
        with self._lock:
            trip = max(0.0, received - sent)
            self.round_trip = trip if not self.synced else self.round_trip + ROUND_TRIP_SMOOTHING * (trip - self.round_trip)
            self.offset, self.synced = offset, True
            if abs(offset) >= SKEW_WORTH_SAYING and (self._said is None or abs(offset - self._said) >= SKEW_WORTH_SAYING):
                self._said = offset
                logger.warning("this host's clock is %.1f s %s Redis's: every lease and liveness time "
                               "here is Redis's", abs(offset), "behind" if offset > 0 else "ahead of")
        return offset


CLOCK = SharedClock()


def now() -> float:
    """Redis's time, in epoch seconds, as this process last measured its offset."""
    return CLOCK.now()


def sync(client: Any) -> None:
    """Measure this process's offset to Redis's clock; a Redis out of reach keeps the last one."""
    try:
        CLOCK.sync(client)
    except Exception as exc:  # noqa: BLE001 - any redis-py error: the last offset stands
        logger.debug("could not read Redis's clock: %s", exc)


__all__ = ["CLOCK", "SharedClock", "now", "offset_of", "sync"]
