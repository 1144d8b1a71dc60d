"""Workers' heartbeats: who is alive, what it holds, and the slots of all of them together."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import redis

from . import keys, scripts
from .connection import translated

# a worker not seen for this long is shown as missing (heartbeats come every sweep, 10 s by default)
WORKER_MISSING_SECONDS = 60.0


@dataclass(frozen=True)
class WorkerSeen:
    """A worker's last heartbeat: how long ago (Redis's clock), the claims it held, its note."""

    name: str
    age: float
    held: int = 0
    note: str = ""
    slots: int = 0  # its requests in flight at most (0: not said)

    @property
    def missing(self) -> bool:
        return self.age >= WORKER_MISSING_SECONDS


def worker_seen(name: str, value: str, now: float) -> WorkerSeen:
    """A heartbeat as stored (``"<seen> <held>/<slots> <note>"``; older workers wrote ``"<seen>"``
    or ``"<seen> <held> <note>"``)."""
    parts = value.split(" ", 2)
    try:
        seen = float(parts[0])
        held, _, slots = (parts[1] if len(parts) > 1 else "0").partition("/")
        held_n, slots_n = int(held), int(slots or 0)
    except ValueError:
        return WorkerSeen(name, float("inf"))
    return WorkerSeen(name, max(0.0, now - seen), held_n, parts[2] if len(parts) > 2 else "", slots_n)


class Heartbeats:
    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._worker_beat = client.register_script(scripts.WORKER_BEAT)

    @translated
    def worker_heartbeat(self, name: str, held: int = 0, note: str = "", slots: int = 0) -> None:
        """Say that worker ``name`` is alive now (Redis's time), holding ``held`` claims of its
        ``slots``; ``note``: what it wants known (``provider unreachable for 60 s``)."""
        self._worker_beat(keys=[keys.WORKERS], args=[name, f"{held}/{slots} {note}".strip()])

    @translated
    def set_slots(self, total: int, ttl: float) -> int:
        """The slots of the workers seen lately, together: how large the batches' windows are.
        Returns what was said before (0: nothing, or it had expired)."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.get(keys.SLOTS)
        pipe.set(keys.SLOTS, total, px=max(1, int(ttl * 1000)))
        before, _ = pipe.execute()
        return int(before or 0)

    @translated
    def workers(self) -> list[WorkerSeen]:
        """Every worker that ever said it was alive, the latest first, aged by Redis's clock."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(keys.WORKERS)
        pipe.time()
        entries, (seconds, micros) = pipe.execute()
        now = seconds + micros / 1e6
        seen = [worker_seen(name.decode(errors="replace"), value.decode(errors="replace"), now)
                for name, value in entries.items()]
        return sorted(seen, key=lambda w: w.age)

    @translated
    def forget_workers(self, names: Sequence[str]) -> None:
        """Stop listing these workers (not seen for a long time)."""
        if names:
            self.redis.hdel(keys.WORKERS, *names)

    def last_worker_age(self) -> float | None:
        """Seconds since the latest heartbeat of any worker, or None if none was ever seen."""
        seen = self.workers()
        return seen[0].age if seen else None
