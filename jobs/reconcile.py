"""Bringing back work whose worker died, and items whose task message was lost.

Two ways an item can be stranded, and the sweep's answer to each:

* Its message is held, unacknowledged, by a worker that died. kombu would restore it only
  after the visibility timeout (an hour by default). Each live worker renews its held
  messages instead (:func:`renew_messages`: the score of kombu's ``unacked_index`` is set
  to now every few seconds), so a message whose score is older than a few renewals belongs
  to a dead worker and is put back on the queue at once (:func:`restore_stale_messages`).
* Its message was lost: kombu's Redis transport takes a message with BRPOP and only then,
  in a second round trip, records it as unacknowledged; a worker killed between the two (or
  a Redis restarted under it) loses that message for good. Such an item is an *orphan*: it
  has no result, no live claim, and no message for it is queued or held unacknowledged
  anywhere (:func:`orphans`).

Both are safe in a race: a duplicate message finds its items claimed or done.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

import redis

from . import clock, keys, scripts
from .queue import Publisher, chunk_size, message_items
from .records import BatchInfo
from .store import BatchStore

QUEUE_SCAN_LIMIT = 100_000
RESTORE_LIMIT = 1000


def pending_items(store: BatchStore) -> set[tuple[str, int]] | None:
    """``(batch_id, seq)`` of every item with a message queued or unacknowledged; None if the
    queue is too long to read now."""
    if store.redis.llen(keys.QUEUE) > QUEUE_SCAN_LIMIT:
        return None
    raws = list(store.redis.lrange(keys.QUEUE, 0, -1))
    for raw in store.redis.hvals(keys.UNACKED):
        try:
            raws.append(json.dumps(json.loads(raw)[0]))
        except (ValueError, IndexError, TypeError):
            continue
    items: set[tuple[str, int]] = set()
    for raw in raws:
        found = message_items(raw)
        if found is not None:
            items.update((found[0], seq) for seq in found[1])
    return items


def orphans(store: BatchStore, info: BatchInfo) -> list[int]:
    batch_id = info.id
    if info.finished or info.total is None:
        return []
    unfinished = list(store.unfinished(batch_id, info.total))
    if not unfinished:
        return []
    pending = pending_items(store)
    if pending is None:
        return []
    held = set(held_items(store, batch_id))
    claimed = store.claimed(batch_id, unfinished)
    return [seq for seq in unfinished if seq not in claimed and seq not in held and (batch_id, seq) not in pending]


def held_items(store: BatchStore, batch_id: str) -> list[int]:
    """The seqs of the batch's messages still held behind its window."""
    seqs: list[int] = []
    for raw in store.redis.lrange(keys.held(batch_id), 0, -1):
        found = message_items(raw)
        if found is not None:
            seqs += found[1]
    return seqs


def release_stalled(store: BatchStore, publisher: Publisher, info: BatchInfo) -> int:
    """A stalled batch with messages held and none of its items queued or held unacknowledged: its
    window lost count (a message lost, an end not counted); its next messages go out."""
    if not store.redis.llen(keys.held(info.id)):
        return 0
    pending = pending_items(store)
    if pending is None or any(batch_id == info.id for batch_id, _ in pending):
        return 0
    return publisher.release(info.id, 0, chunk_size(info.total or 1), reset=True)


def requeue_orphans(store: BatchStore, publisher: Publisher, info: BatchInfo) -> list[int]:
    seqs = orphans(store, info)
    publisher.publish(info.id, seqs)
    return seqs


def renew_messages(client: redis.Redis, delivery_tags: Iterable[str]) -> None:
    """Say that this live worker still holds these messages (``ZADD XX``: an acknowledged one
    is not brought back), at Redis's time (:mod:`jobs.clock`), as kombu's own record of them is."""
    now = clock.now()
    mapping = {tag: now for tag in delivery_tags}
    if mapping:
        client.zadd(keys.UNACKED_INDEX, mapping, xx=True)


def restore_stale_messages(client: redis.Redis, older_than: float) -> int:
    """Put back on the queue every unacknowledged message not renewed for ``older_than`` seconds:
    its worker is dead (by Redis's clock, whatever this host's says). Returns how many were put back."""
    stale: list[bytes] = list(client.zrangebyscore(keys.UNACKED_INDEX, 0, clock.now() - older_than,
                                                   start=0, num=RESTORE_LIMIT))  # type: ignore[arg-type]
    if not stale:
        return 0
    restore = client.register_script(scripts.RESTORE_MESSAGE)
    restored = 0
    for tag, raw in zip(stale, client.hmget(keys.UNACKED, stale)):
        if raw is None:
            client.zrem(keys.UNACKED_INDEX, tag)
            continue
        try:
            message = json.loads(raw)[0]
            message["headers"]["redelivered"] = True
            message["properties"]["delivery_info"]["redelivered"] = True
        except (ValueError, IndexError, KeyError, TypeError):
            continue
        restored += int(restore(keys=[keys.UNACKED, keys.UNACKED_INDEX, keys.QUEUE],
                                args=[tag, json.dumps(message)]))
    return restored
