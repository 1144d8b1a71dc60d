"""Acknowledgements sent together, off the consumer's thread.

Celery acknowledges each finished message on its consumer's thread, and kombu's Redis
transport makes that a round trip of its own (ZREM and HDEL of the message's unacknowledged
record), during which the consumer takes nothing. On a link of 200 ms each way, eight chunks
ending together held the consumer for over three seconds. Here the consumer only queues the
delivery tag; a thread of the channel sends every tag queued meanwhile in one pipeline.

An acknowledgement that never reaches Redis (the worker died first, or Redis is gone) leaves the
message's record: the workers' sweep puts it back once no one renews it, and its items are found
done. Closing the channel sends what is queued first (bounded by ``timeout``).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

logger = logging.getLogger(__name__)
# tags at most in one pipeline
BATCH_LIMIT = 1000
_STOP = ""


class Acknowledger:
    """Queued acknowledgements of one channel, sent by a thread of their own."""

    def __init__(self, client: Callable[[], AbstractContextManager[Any]], unacked: str, unacked_index: str) -> None:
        self._client = client
        self._unacked, self._unacked_index = unacked, unacked_index
        self._pending: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def ack(self, tag: str) -> None:
        """Queue the acknowledgement of ``tag`` (the thread starts with the first)."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="aivvm-acks", daemon=True)
                self._thread.start()
        self._pending.put(tag)

    def close(self, timeout: float) -> None:
        """Send what is queued, then stop the thread (waiting at most ``timeout`` seconds)."""
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._pending.put(_STOP)
            thread.join(timeout)

    def _run(self) -> None:
        while True:
            tags = list(self._drain())
            stop = _STOP in tags
            tags = [tag for tag in tags if tag != _STOP]
            for start in range(0, len(tags), BATCH_LIMIT):
                self._send(tags[start:start + BATCH_LIMIT])
            if stop:
                return

    def _drain(self) -> Iterator[str]:
        """The next tag (waiting for it), then every tag queued meanwhile."""
        yield self._pending.get()
        while True:
            try:
                yield self._pending.get_nowait()
            except queue.Empty:
                return

    def _send(self, tags: list[str]) -> None:
        try:
            with self._client() as client:
                # without MULTI: a full Redis refuses every command queued in a transaction, but
                # ZREM and HDEL on their own free memory and are allowed
                client.pipeline(transaction=False).zrem(self._unacked_index, *tags) \
                    .hdel(self._unacked, *tags).execute()
        except Exception as exc:  # noqa: BLE001 - any connection's failure: the sweep acknowledges
            logger.warning("could not acknowledge %d messages (%s): the sweep puts them back, and their "
                           "items are found done", len(tags), exc)
