"""Finding items whose task message was lost, so they can be enqueued again.

kombu's Redis transport takes a message with BRPOP and only then, in a second round
trip, records it as unacknowledged. A worker killed between the two (or a Redis
restarted under it) loses that message for good, and nothing would ever complete the
item. Such an item is an *orphan*: it has no result, no live claim, and no message
for it is queued or held unacknowledged anywhere. Enqueueing an orphan again is safe
even in a race, since a duplicate message finds the item claimed or done.
"""

from __future__ import annotations

import json

from . import keys
from .queue import Publisher
from .records import BatchInfo
from .store import BatchStore

QUEUE_SCAN_LIMIT = 100_000


def pending_task_ids(store: BatchStore) -> set[str] | None:
    """Task ids with a message queued or unacknowledged; None if the queue is too long to read now."""
    if store.redis.llen(keys.QUEUE) > QUEUE_SCAN_LIMIT:
        return None
    ids = set()
    for raw in store.redis.lrange(keys.QUEUE, 0, -1):
        ids.add(json.loads(raw)["headers"]["id"])
    for raw in store.redis.hvals("unacked"):
        message = json.loads(raw)[0]
        ids.add(message["headers"]["id"])
    return ids


def orphans(store: BatchStore, info: BatchInfo) -> list[int]:
    batch_id = info.id
    if info.finished or info.total is None:
        return []
    unfinished = list(store.unfinished(batch_id, info.total))
    if not unfinished:
        return []
    pending = pending_task_ids(store)
    if pending is None:
        return []
    claimed = store.claimed(batch_id, unfinished)
    return [seq for seq in unfinished
            if seq not in claimed and f"{batch_id}:{seq}" not in pending]


def requeue_orphans(store: BatchStore, publisher: Publisher, info: BatchInfo) -> list[int]:
    seqs = orphans(store, info)
    publisher.publish(info.id, seqs)
    return seqs
