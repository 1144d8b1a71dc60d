"""A windowed message's place in its batch's window, freed as soon as its items' calls have ended.

A batch keeps a window of its messages out (:mod:`jobs.queue`), and each windowed message that
ends releases the batch's next one. Released only once the chunk's results were recorded and
then through a round trip of the Celery thread, a message held its place for the records' round
trips too: on a link of 200 ms each way a record flush took 0.8 to 2.6 s, and the window ran
dry while slots were free (512 two-second items: 31 s, 28.7 s with this). Here the place is
freed as soon as every item of the chunk needs no slot any more (its records may be on their
way), by a call off the event loop; the window bounds what a batch has waiting for slots, and
those items wait for none.

A message that is put back after that (its chunk failed: :meth:`WindowPlace.taken_again`) counts
one out again. A worker that dies between the early release and the acknowledgement lets its
message be restored and release once more: its batch's window is then one message larger until
it finishes (the count never goes below zero).
"""

from __future__ import annotations

import logging

from redis.exceptions import RedisError

from jobs.errors import BatchError

from .runtime import Runtime

logger = logging.getLogger(__name__)


class WindowPlace:
    """The place of one windowed message of ``batch_id`` (a chunk of ``chunk`` items)."""

    def __init__(self, rt: Runtime, batch_id: str, chunk: int) -> None:
        self.rt = rt
        self.batch_id = batch_id
        self.chunk = chunk
        self.freed = False

    def free_soon(self) -> None:
        """Every item's call has ended (on the event loop): release the batch's next message."""
        if self.freed:
            return
        self.freed = True
        task = self.rt.loop.create_task(self._release())
        self.rt.background.add(task)  # the loop holds a task only weakly
        task.add_done_callback(self.rt.background.discard)

    def free_now(self) -> None:
        """The chunk has ended (a Celery thread): release now unless its calls' end did."""
        if self.freed:
            return
        self.freed = True
        self._release_here(1)

    def taken_again(self) -> None:
        """The message goes back to the queue after its place was freed: it counts out again."""
        if self.freed:
            self._release_here(-1)

    async def _release(self) -> None:
        try:
            await self.rt.io.run(self.rt.publisher.release, self.batch_id, 1, self.chunk)
        except (RedisError, BatchError) as exc:
            self._missed(exc)

    def _release_here(self, ended: int) -> None:
        """``ended`` of the batch's messages ended (-1: one more is out), on this thread."""
        try:
            self.rt.publisher.release(self.batch_id, ended, self.chunk)
        except (RedisError, BatchError) as exc:
            self._missed(exc)

    def _missed(self, exc: Exception) -> None:
        """Missed (Redis away): the sweep releases the batch's next message once the batch stalls."""
        logger.info("batch %s: could not release its next message: %s", self.batch_id, exc)
