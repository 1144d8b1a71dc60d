"""The Celery application and the fast path that enqueues a batch's items.

The app names its task module by string, so submitting needs no worker code.
Items are enqueued in chunks, each an ordinary Celery task message (built by Celery
itself once, then varied per chunk) carrying ``(batch_id, [seq, ...])``, pushed through
one Redis pipeline per block of lines: submitting costs no network round trip per line.
"""

from __future__ import annotations

import base64
import json
import math
import re
import uuid
from collections.abc import Iterator, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any

import redis
from celery import Celery

from . import keys, scripts
from .config import Settings

TASK_NAME = "worker.tasks.complete_item"
WORKER_TRANSPORT = "worker.transport:Transport"
# Markers in the template message, replaced per item (batch ids are [0-9a-z] only).
_TASK_ID, _ARGSREPR, _KWARGSREPR = "@@task_id@@", "@@argsrepr@@", "@@kwargsrepr@@"
_BODY, _TAG, _ETA = "@@body@@", "@@tag@@", "@@eta@@"
_MARKERS = (_TASK_ID, _ARGSREPR, _KWARGSREPR, _BODY, _TAG, _ETA)
# A batch is cut into at least this many messages, of at most CHUNK_MAX items each (chunk_size),
# or of LARGE_CHUNK when each of the workers that take them has that many slots.
MESSAGES_PER_BATCH = 64
CHUNK_MAX = 64
LARGE_CHUNK = 128
# a windowed message carries this (its end releases the batch's next one); retries do not
WINDOWED = {"window": 1}
# held messages of a batch that no one releases (it was deleted) go after this long
HELD_TTL = 7 * 24 * 3600
# the broker connection's timeouts (seconds): see celery_settings
BROKER_SOCKET_TIMEOUT = 10.0
BROKER_CONNECT_TIMEOUT = 5.0
BROKER_HEALTH_CHECK = 5


def celery_threads(concurrency: int) -> int:
    """Celery threads for a worker process with ``concurrency`` requests in flight.

    A thread only holds a message while its chunk runs on the event loop; enough of them hold
    enough chunks to keep ``concurrency`` in flight: as many as the requests up to 64 (a batch
    of single-item chunks), then one per 8 requests (chunks of 64 items keep 8 times that many
    in reach, covering chunks' slow tails).
    """
    return max(min(concurrency, 64), math.ceil(concurrency / 8))


def celery_settings(settings: Settings) -> dict[str, Any]:
    """The Celery configuration for ``settings``, with the delivery guarantees we rely on."""
    transport = {
        "visibility_timeout": settings.visibility_timeout,
        # a cut link drops packets: without timeouts a broker call waits for TCP to give up (a
        # quarter of an hour), and a healed worker took new messages only 9-20 s later
        "socket_timeout": BROKER_SOCKET_TIMEOUT,
        "socket_connect_timeout": BROKER_CONNECT_TIMEOUT,
        "health_check_interval": BROKER_HEALTH_CHECK,
        "socket_keepalive": True,
    }
    plain_redis = settings.redis_url.startswith("redis://")
    return {
        "broker_url": settings.redis_url,
        # named by string: submitting never imports the runtime
        "broker_transport": WORKER_TRANSPORT if plain_redis else None,
        "result_backend": None,
        "task_ignore_result": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "task_default_queue": keys.QUEUE,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": settings.prefetch_multiplier,
        "broker_transport_options": transport,
        "result_backend_transport_options": transport,
        "visibility_timeout": settings.visibility_timeout,
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        # events cost Redis publishes per task: on for Flower (AIVVM_BATCH_TASK_EVENTS=1)
        "worker_send_task_events": settings.task_events,
        # remote control (celery inspect/control: Flower's workers page) costs each worker a
        # pub/sub connection, its bindings at start and a socket more in every turn of its consumer
        "worker_enable_remote_control": settings.task_events,
        "task_send_sent_event": False,
        "worker_hijack_root_logger": False,
        # the runtime's event loop does the work; Celery's threads hand chunks over
        "worker_pool": "threads",
        **({"worker_concurrency": celery_threads(settings.concurrency)} if settings.concurrency else {}),
    }


def configure(app: Celery, settings: Settings) -> None:
    """Point ``app`` at ``settings.redis_url`` (the CLI does this before any use)."""
    app.conf.update(celery_settings(settings))


def chunk_size(total: int, worker_slots: int | None = None) -> int:
    """Items per message for a batch of ``total`` items.

    At least :data:`MESSAGES_PER_BATCH` messages a batch, so that a small batch still spreads
    over every worker process (each takes messages, not items); at most :data:`CHUNK_MAX` items
    a message, which cuts the message's cost (about 900 bytes of Redis and a fetch and an ack)
    to a few bytes an item while keeping a chunk's tail (its slowest item holds the message)
    and a redelivery after a crash small.

    ``worker_slots``: the slots of the smallest worker process that will take the batch's
    messages, when it is known (``run``'s own workers). A batch of at least
    ``MESSAGES_PER_BATCH * LARGE_CHUNK`` items then goes in messages of :data:`LARGE_CHUNK`
    items if such a message fits in those slots: each message costs a worker its fetch, its
    record, its acknowledgement, a Celery task and a hand-over to its event loop (a tenth of a
    worker's CPU with replies answered at once, at 64 items a message). A message larger than a
    worker's slots would run in two waves, and at a batch's end leave the other workers idle.
    """
    per_message = total // MESSAGES_PER_BATCH
    if worker_slots is not None and LARGE_CHUNK <= min(per_message, worker_slots):
        return LARGE_CHUNK
    return max(1, min(CHUNK_MAX, per_message))


def chunks(seqs: Sequence[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(seqs), max(1, size)):
        yield list(seqs[start:start + max(1, size)])


class Publisher:
    """Pushes Celery task messages for chunks of items straight onto the queue's Redis list.

    The message is Celery's own (``as_task_v2``) for a template chunk; per chunk only the
    task id, the arguments, the countdown (``eta``) and the delivery tag change, spliced in as text.
    """

    def __init__(self, client: redis.Redis, app: Celery, held_ttl: int = HELD_TTL) -> None:
        self.redis = client
        self.held_ttl = held_ttl
        self._release = client.register_script(scripts.RELEASE_WINDOW)
        template = app.amqp.as_task_v2(_TASK_ID, TASK_NAME, args=("", [0]), kwargs={})
        headers = dict(template.headers, argsrepr=_ARGSREPR, eta=_ETA, kwargsrepr=_KWARGSREPR)
        properties = dict(
            template.properties,
            delivery_mode=2,
            delivery_info={"exchange": keys.QUEUE, "routing_key": keys.QUEUE},
            priority=0,
            body_encoding="base64",
            delivery_tag=_TAG,
        )
        envelope = json.dumps({
            "body": _BODY,
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": headers,
            "properties": properties,
        })
        self._embed = json.dumps(template.body[2])
        # the eta marker stands with its quotes: it becomes null or a quoted time
        self._parts = re.split(f"({'|'.join(map(re.escape, _MARKERS))})", envelope.replace(f'"{_ETA}"', _ETA))

    def message(self, batch_id: str, seqs: Sequence[int], kwargs: dict[str, Any] | None = None,
                countdown: float = 0.0) -> str:
        """The message of one chunk; ``kwargs`` (a retry's state) apply to each of its items."""
        body = json.dumps([[batch_id, list(seqs)], kwargs or {}], separators=(",", ":"))[:-1]
        eta = datetime.now(timezone.utc) + timedelta(seconds=countdown) if countdown > 0 else None
        values = {
            _TASK_ID: keys.task_id(batch_id, seqs[0], len(seqs)),
            _ARGSREPR: f"{batch_id} items {seqs[0]}..{seqs[-1]} ({len(seqs)})",
            _KWARGSREPR: repr(kwargs or {}),
            _BODY: base64.b64encode(f"{body},{self._embed}]".encode()).decode(),
            _TAG: uuid.uuid4().hex,
            _ETA: json.dumps(eta.isoformat()) if eta else "null",
        }
        return "".join(values.get(part, part) for part in self._parts)

    def publish(self, batch_id: str, seqs: Sequence[int], pipe: Any = None, *, chunk: int | None = None) -> None:
        """Enqueue ``seqs`` in messages of ``chunk`` items (default: :func:`chunk_size` of their count),
        behind the batch's window: they wait in its held list, and go on the queue as its earlier
        messages end (:meth:`release`), so that every batch has its turn on the one queue."""
        if not seqs:
            return
        size = chunk if chunk is not None else chunk_size(len(seqs))
        own = pipe is None
        pipe = self.redis.pipeline(transaction=False) if own else pipe
        held = keys.held(batch_id)
        pipe.rpush(held, *(self.message(batch_id, part, WINDOWED) for part in chunks(seqs, size)))
        pipe.expire(held, self.held_ttl)
        self.release(batch_id, 0, size, pipe=pipe, publishing=True)
        if own:
            pipe.execute()

    def release(self, batch_id: str, ended: int, chunk: int, *, reset: bool = False, pipe: Any = None,
                publishing: bool = False) -> int:
        """``ended`` of the batch's messages have ended: move its next ones to the queue while its
        window has room (``reset``: count none out). Its messages hold about ``chunk`` items, or
        as many as the publisher said (``publishing``), which the batch keeps. Returns how many
        moved (with ``pipe``: nothing yet)."""
        moved = self._release(keys=[keys.held(batch_id), keys.out(batch_id), keys.meta(batch_id), keys.SLOTS,
                                    keys.QUEUE],
                              args=[ended, max(1, chunk), int(reset), self.held_ttl, int(publishing)], client=pipe)
        return 0 if pipe is not None else int(moved)

    def publish_retry(self, batch_id: str, seq: int, kwargs: dict[str, Any], countdown: float,
                      pipe: Any = None) -> None:
        """Enqueue one item's next run, held by a worker until ``countdown`` seconds from now."""
        (pipe or self.redis).lpush(keys.QUEUE, self.message(batch_id, [seq], kwargs, countdown))

    def purge(self) -> None:
        """Drop every queued and unacknowledged message (private Redis only)."""
        self.redis.delete(keys.QUEUE, keys.UNACKED, keys.UNACKED_INDEX)


def message_items(raw: bytes | str) -> tuple[str, list[int]] | None:
    """The batch id and item seqs of a queued message (None if it is not one of ours)."""
    try:
        message = json.loads(raw)
        if message.get("headers", {}).get("task") != TASK_NAME:
            return None
        args = json.loads(base64.b64decode(message["body"]))[0]
        batch_id, seqs = args[0], args[1]
        return str(batch_id), [int(s) for s in ([seqs] if isinstance(seqs, int) else seqs)]
    except (ValueError, KeyError, IndexError, TypeError):
        return None


app = Celery("aivvm_batch", include=["worker.tasks"])
# Read the environment only when the configuration is first needed (plain `celery -A`
# workers), so that a bad variable is reported by whoever uses it, not at import.
app.add_defaults(lambda: celery_settings(Settings.from_env()))
