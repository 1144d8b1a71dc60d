"""kombu's Redis transport, with a worker that survives a Redis restart.

When the broker connection drops, Celery releases it and kombu closes its
channels; closing tries to requeue this worker's unacknowledged messages through
a connection that Celery has already discarded, and the AttributeError it meets
is not a connection error, so it kills the worker (kombu 5.7). Here that requeue
is skipped instead: the messages stay in Redis's unacked set and are restored by
the sweep after the visibility timeout, like those of a worker that died.

kombu records a delivered message's time (the score of ``unacked_index``, which the sweep
reads to tell a dead worker's messages) with the host's own clock; here it is Redis's
(:mod:`jobs.clock`), as every other liveness time is.

A worker takes a message only while one of its items finds a free slot of its runtime (the runtime's
:class:`~worker.credit.Credit`: kombu makes the transport, so it is found through
:mod:`worker.process_runtime`); when kombu's BRPOP brings one, the others that fit come with it, in one
round trip (:meth:`Channel._take_ahead`), and acknowledgements leave the consumer's thread
(:mod:`worker.acks`): on a link of 200 ms each way, one message a BRPOP and a round trip an
acknowledgement on that thread made a message a second, and a worker's 64 slots starved. It also keeps consuming when Redis is full (see :meth:`QoS.append`), and an acknowledgement
made while the connection is being replaced does not kill the worker (:meth:`QoS.ack`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from kombu.connection import Connection
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual as kombu_virtual
from redis.exceptions import ResponseError

from jobs import clock, scripts
from jobs.connection import is_out_of_memory

from .acks import Acknowledger
from .credit import Credit, items_in
from .process_runtime import THIS_PROCESS

logger = logging.getLogger(__name__)
IDLE_BRPOP_SECONDS = 0.1
# messages taken at most in one round trip beside the one BRPOP brought
TAKE_AHEAD_MAX = 16
# a closing channel waits this long at most for its queued acknowledgements to be sent
ACKS_CLOSE_TIMEOUT = 2.0
kombu_redis.time = clock.now  # type: ignore[attr-defined]  # the module's own `from time import time`
# Celery reconnects to the broker with kombu's waits: 2 s, then 2 s more each time, up to 30 s;
# a worker whose Redis came back waited up to half a minute. Here: 1 s, then up to 2 s.
RECONNECT_INTERVALS = {"interval_start": 1.0, "interval_step": 0.5, "interval_max": 2.0}
_ensure_connection = Connection._ensure_connection


def _ensure_connection_soon(self: Connection, *args: Any, **kwargs: Any) -> Any:
    for name, value in RECONNECT_INTERVALS.items():
        kwargs[name] = min(kwargs.get(name, value), value)
    return _ensure_connection(self, *args, **kwargs)  # type: ignore[no-untyped-call]


Connection._ensure_connection = _ensure_connection_soon  # type: ignore[method-assign]


class QoS(kombu_redis.QoS):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
        # delivery tags of messages whose unacknowledged record their take wrote already
        self.recorded: set[str] = set()
        # the credit in a process without a runtime: no slots, Celery's prefetch alone decides
        self._no_runtime = Credit()

    @property
    def credit(self) -> Credit:
        """The items this process holds against its slots: its runtime's."""
        runtime = THIS_PROCESS.get()
        return runtime.credit if runtime is not None else self._no_runtime

    def _held(self) -> list[str]:
        held = list(self._delivered)  # a copy: task threads acknowledge meanwhile
        return [tag for tag in held if tag not in self._dirty]

    def can_consume(self) -> bool:
        """Celery's prefetch allows another message, and its items would find free slots."""
        if not super().can_consume():  # type: ignore[no-untyped-call]
            return False
        return self.credit.can_take(self._held())

    def room(self) -> int:
        """How many more messages Celery's prefetch and the slots allow now."""
        held = self._held()
        prefetch = self.prefetch_count - len(held) if self.prefetch_count else TAKE_AHEAD_MAX
        return max(0, min(prefetch, self.credit.room(held), TAKE_AHEAD_MAX))

    def append(self, message: Any, delivery_tag: Any) -> None:
        """Record a delivered message as unacknowledged (and its items as held); in a full Redis,
        deliver it anyway.

        kombu takes the message (BRPOP) before recording it (HSET, refused at maxmemory).
        Raising here would lose the message and stop the consumer; delivered without the
        record, the task runs (and waits for Redis itself). Were this worker to die before
        acknowledging it, the workers' sweep enqueues the unfinished item again.
        """
        self.credit.took(delivery_tag, (getattr(message, "headers", None) or {}).get("id"), items_in(message.body))
        if delivery_tag in self.recorded:  # taken ahead: its take recorded it
            self.recorded.discard(delivery_tag)
            kombu_virtual.QoS.append(self, message, delivery_tag)
            return
        try:
            super().append(message, delivery_tag)  # type: ignore[no-untyped-call]
        except ResponseError as exc:
            if not is_out_of_memory(exc):
                raise
            logger.warning("Redis is full (maxmemory): a message is delivered without its "
                           "unacknowledged record")
            kombu_virtual.QoS.append(self, message, delivery_tag)

    def restore_visible(self, *args: Any, **kwargs: Any) -> None:
        """Nothing: the workers' sweep puts back the messages no live worker renews, on a thread
        of its own (:mod:`worker.sweeper`). kombu's scan takes a lock, reads and unlocks, three
        round trips on the consumer's thread at each pass: on a link of 200 ms each way it held
        the consumer most of every second, and the workers starved."""

    def _remove_from_indices(self, delivery_tag: Any, pipe: Any = None) -> Any:
        """Forget an acknowledged message without MULTI: a full Redis refuses every command
        queued in a transaction, but ZREM and HDEL on their own free memory and are allowed."""
        if pipe is not None:
            return super()._remove_from_indices(delivery_tag, pipe)  # type: ignore[no-untyped-call]
        with self.channel.conn_or_acquire() as client:
            return client.pipeline(transaction=False) \
                .zrem(self.unacked_index_key, delivery_tag) \
                .hdel(self.unacked_key, delivery_tag)

    def ack(self, delivery_tag: Any) -> None:
        """Acknowledge: the removal of the message's record is queued, and sent with the others
        by the channel's thread (:mod:`worker.acks`), not on the consumer's."""
        self.credit.settled(delivery_tag)
        self.channel.acks.ack(delivery_tag)
        kombu_virtual.QoS.ack(self, delivery_tag)

    def reject(self, delivery_tag: Any, requeue: bool = False) -> None:
        self.credit.settled(delivery_tag)
        try:
            super().reject(delivery_tag, requeue)  # type: ignore[no-untyped-call]
        except AttributeError:
            if self.channel.connection is not None:
                raise
            logger.warning("broker connection gone: a rejected message is put back by the sweep instead")

    def restore_unacked(self, client: Any = None) -> None:
        try:
            super().restore_unacked(client)  # type: ignore[no-untyped-call]
        except AttributeError:
            logger.warning("broker connection already gone: unacknowledged messages will be "
                           "restored after the visibility timeout")


class Channel(kombu_redis.Channel):
    QoS = QoS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """kombu's channel, its idle BRPOP shortened to :data:`IDLE_BRPOP_SECONDS` on a Redis that
        takes a fraction of a second (6.0 and later): closing the channel waits for the BRPOP in
        flight, so a worker's warm shutdown lasted up to kombu's second after its last task."""
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
        self.acks = Acknowledger(self.conn_or_acquire, self.unacked_key, self.unacked_index_key)
        try:
            major = int(str(self.client.info("server").get("redis_version", "0")).split(".")[0])
        except Exception:  # noqa: BLE001 - an unknown version keeps kombu's whole second
            return
        if major >= 6:
            self.brpop_timeout = IDLE_BRPOP_SECONDS

    def _brpop_read(self, **options: Any) -> bool:
        """kombu's (a message that BRPOP brought), then those that fit beside it."""
        delivered = bool(super()._brpop_read(**options))  # type: ignore[no-untyped-call]
        if delivered:
            self._take_ahead()
        return delivered

    def _take_ahead(self) -> None:
        """Take the messages that fit now, in one round trip that also records them as
        unacknowledged (as kombu records each message it delivers, in a round trip of its own)."""
        qos: QoS = self.qos
        wanted = qos.room()
        queues: Sequence[str] = sorted(self.active_queues)
        if wanted <= 0 or not queues:
            return
        lists = [(self._q_for_pri(queue, pri), queue)  # type: ignore[no-untyped-call]
                 for pri in self.priority_steps for queue in queues]
        try:
            with self.conn_or_acquire() as client:
                taken = client.eval(scripts.TAKE_MESSAGES, 2 + len(lists), qos.unacked_key, qos.unacked_index_key,
                                    *(key for key, _ in lists), wanted)
        except Exception as exc:  # noqa: BLE001 - nothing was taken: BRPOP takes them as before
            logger.debug("could not take messages ahead: %s", exc)
            return
        for number, raw in zip(taken[::2], taken[1::2]):
            message = json.loads(raw)
            qos.recorded.add(message["properties"]["delivery_tag"])
            self.connection._deliver(message, lists[int(number) - 1][1])

    def close(self) -> None:
        """kombu's, without waiting out the BRPOP in flight: Redis is first asked to end it as its
        timeout would (CLIENT UNBLOCK). A message it took already is not lost: its reply is on the
        way, and kombu reads it as before."""
        if self._in_poll and not self.closed:
            self._unblock_brpop()
        self.acks.close(ACKS_CLOSE_TIMEOUT)
        super().close()  # type: ignore[no-untyped-call]

    def _unblock_brpop(self) -> None:
        try:
            host, port = self.client.connection._sock.getsockname()[:2]
            with self.conn_or_acquire() as client:
                for entry in client.client_list(_type="normal"):
                    if entry.get("addr", "").rsplit(":", 1) == [str(host), str(port)]:
                        client.client_unblock(entry["id"])
                        return
        except Exception as exc:  # noqa: BLE001 - then the BRPOP ends at its own timeout
            logger.debug("could not end the BRPOP in flight early: %s", exc)

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        """kombu's, with one client kept per connection pool: kombu builds a new ``Redis`` for
        every record and acknowledgement of a message (65 µs each with redis-py 8)."""
        if client:
            yield client
            return
        pool = self.pool
        kept = getattr(self, "_kept_client", None)
        if kept is None or kept.connection_pool is not pool:
            kept = self._kept_client = self._create_client()  # type: ignore[no-untyped-call]
        yield kept

    def _size(self, queue: str) -> int:
        """The queue's length, read without MULTI (a full Redis refuses any queued command)."""
        with self.conn_or_acquire() as client:
            pipe = client.pipeline(transaction=False)
            for pri in self.priority_steps:
                pipe.llen(self._q_for_pri(queue, pri))  # type: ignore[no-untyped-call]
            return sum(size for size in pipe.execute() if isinstance(size, int))

    def _queue_bind(self, exchange: str, routing_key: str, pattern: str, queue: str) -> None:
        """Declare the queue's binding; a worker starting in a full Redis goes on without it
        (consuming needs none; a publish that needs it declares it again)."""
        try:
            super()._queue_bind(exchange, routing_key, pattern, queue)  # type: ignore[no-untyped-call]
        except ResponseError as exc:
            if not is_out_of_memory(exc):
                raise
            logger.warning("Redis is full (maxmemory): the binding of queue %s is declared later", queue)


class Transport(kombu_redis.Transport):
    Channel = Channel
