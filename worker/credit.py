"""How many items a worker process may take: a message is fetched only while one of its items can start.

Celery's prefetch counts messages, and a message carries a chunk of items: with prefetch
alone, the first worker to start reserves most of a batch and runs it in several rounds
while the others idle. Here the process counts the items it holds (those of the messages
it has taken and not yet acknowledged, less the items that need no slot any more: their
call has ended, though their results may still be on the way to Redis) and takes another
message while one of its slots is free; the message's other items wait here for this
process's next free slots, so fewer than a message's items ever wait in a process.

Waiting for a message to fit whole left slots idle behind every message's slowest items: with
chunks of 64 and 128 slots a worker took its next message only once 64 slots were free, and
8,192 replies of 0.1 to 1.0 s at 256 in flight took 23.7 s where the raw client took 18.4 s
(0.78×; 0.95× taken this way, `bench/run.py --only varied`; 0.97× with the batches' windows
widened for it, :mod:`jobs.scripts`). What that rule guarded against, an
item waiting in one process while another has slots free at a batch's end, costs at most one
message's items the wait for this process's next free slots; batches of 256, 600 and 1,100
replies of 1 s at 256 in flight took as long either way (1.57, 3.58 to 3.63, 5.54 to 5.64 s).

On a slow link to Redis a take costs round trips (BRPOP, the message's record, the take of
the others that fit, the claim of their items), during which freed slots would idle: the process
then also holds :func:`reserve` items beyond its slots, as many as its slots end while a take is
on its way (:class:`Pace` measures how long a slot is held; the round trip is the shared clock's):
it takes the next message while one of its items finds a slot or a place in the reserve. On a
local network the reserve is none.

The transport's QoS records each delivery (:meth:`Credit.took`) and acknowledgement
(:meth:`Credit.settled`) and asks, for the messages its channel holds, whether another fits
(:meth:`Credit.can_take`): a channel replaced after a lost connection starts from nothing.
The event loop reports each item's freed slot (:meth:`Credit.ended`); when a refused message would
now fit, :attr:`Credit.on_room` wakes the consumer to ask again (Celery's own loop sleeps
until a socket or a timer wakes it). Calls come from Celery's consumer, its task threads and
the loop, hence the lock. Each process's runtime holds its credit
(:attr:`worker.runtime.Runtime.credit`).
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable, Iterable

# round trips before a taken item can start: BRPOP, kombu's record of the message, the take ahead,
# and its items' claim (measured on a link of 200 ms each way with 1% loss: a flush of 31 claims
# took 0.77 s on average, two round trips: the replies carry the items' requests)
TAKE_ROUND_TRIPS = 5
# a round trip shorter than this (a local network) reserves nothing
RESERVE_FROM_SECONDS = 0.005
# the weight of the newest measure in an exponentially weighted mean
SMOOTHING = 0.1


def reserve(slots: int, round_trip: float, slot_seconds: float) -> int:
    """Items to hold beyond ``slots``: those the slots end, each held ``slot_seconds``, while a
    take of ``round_trip``-second round trips is on its way (at most as many as the slots)."""
    if slots <= 0 or slot_seconds <= 0 or round_trip < RESERVE_FROM_SECONDS:
        return 0
    return min(slots, math.ceil(slots * TAKE_ROUND_TRIPS * round_trip / slot_seconds))


class Pace:
    """How long a slot is held, on average (an exponentially weighted mean; the event loop's)."""

    def __init__(self) -> None:
        self.slot_seconds = 0.0

    def held(self, seconds: float) -> None:
        if self.slot_seconds <= 0:
            self.slot_seconds = seconds
        else:
            self.slot_seconds += SMOOTHING * (seconds - self.slot_seconds)


def items_in(body: bytes | str | None) -> int:
    """Items a task message's body ``[[batch_id, seqs], kwargs, embed]`` carries (1 if unknown)."""
    try:
        seqs = json.loads(body or b"")[0][1]
    except (ValueError, TypeError, IndexError, KeyError):
        return 1
    return len(seqs) if isinstance(seqs, list) and seqs else 1


class Credit:
    """Items held by this process against its ``slots`` (0: no limit but Celery's prefetch)."""

    def __init__(self, slots: int = 0) -> None:
        self.slots = slots
        self.ahead = 0  # items held beyond the slots (:func:`reserve`)
        self._lock = threading.Lock()
        self._by_tag: dict[str, int] = {}  # items held, by delivery tag
        self._tag_of_task: dict[str, str] = {}
        self._task_of_tag: dict[str, str] = {}
        self._last = 1
        self._refused = False  # can_take said no since the last wake
        self.on_room: Callable[[], None] | None = None

    def held(self, tags: Iterable[str]) -> int:
        """Items not yet ended of the messages ``tags``."""
        with self._lock:
            return self._held(tags)

    def can_take(self, tags: Iterable[str]) -> bool:
        """Another message may be fetched beside the messages ``tags``: a slot (or a place in the
        reserve) is free beside their items."""
        if self.slots <= 0:
            return True
        with self._lock:
            free = self._slot_free(self._held(tags))
            self._refused = self._refused or not free
        return free

    def room(self, tags: Iterable[str]) -> int:
        """How many more messages, each as large as the last one taken, it takes to fill the free
        slots beside the messages ``tags``, the last perhaps in part (0 without slots: Celery's
        prefetch alone decides, one at a time)."""
        if self.slots <= 0:
            return 0
        with self._lock:
            return max(0, -(-(self.slots + self.ahead - self._held(tags)) // self._last))

    def _held(self, tags: Iterable[str]) -> int:
        return sum(self._by_tag.get(tag, 0) for tag in tags)

    def _slot_free(self, held: int) -> bool:
        return held < self.slots + self.ahead

    def took(self, tag: str, task_id: str | None, items: int) -> None:
        with self._lock:
            self._by_tag[tag] = items
            if task_id:
                self._tag_of_task[task_id] = tag
                self._task_of_tag[tag] = task_id
            self._last = max(1, items)

    def ended(self, task_id: str | None) -> None:
        """One item of the message of task ``task_id`` needs no slot any more: its call has ended
        (its record may be on its way), or it ended without one. An item that runs again at once
        takes a slot again: the slots, not the credit, bound what is in flight."""
        with self._lock:
            tag = self._tag_of_task.get(task_id or "")
            if tag is not None and self._by_tag.get(tag, 0) > 0:
                self._by_tag[tag] -= 1
            # beside every message held, of any channel: at least what the consumer's channel
            # holds, so the consumer will agree that a slot is free
            wake = self._refused and self._slot_free(sum(self._by_tag.values()))
            if wake:
                self._refused = False
        if wake and self.on_room is not None:
            self.on_room()

    def settled(self, tag: str) -> None:
        """The message ``tag`` is acknowledged or rejected: none of its items is held any more."""
        with self._lock:
            self._by_tag.pop(tag, None)
            task_id = self._task_of_tag.pop(tag, None)
            if task_id is not None and self._tag_of_task.get(task_id) == tag:
                del self._tag_of_task[task_id]
