"""The Celery task: a chunk of items handed to this process's event loop.

Start workers with ``aivvm-batch worker`` or ``celery -A worker.tasks worker``. A message
carries ``(batch_id, [seq, ...])`` (and, for a retry, the item's state); its Celery thread
waits while the chunk runs on the loop, and the message is acknowledged when it returns:
when each item is recorded or handed on to a retry message.
"""

from __future__ import annotations

import functools
import logging
import signal
import socket
import threading
from collections import Counter
from typing import Any

from celery import Task, bootsteps
from celery.exceptions import Reject
from celery.worker import state as worker_state

from jobs.config import Settings
from jobs.queue import TASK_NAME, app

from . import shutdown  # noqa: F401 - connects the bound on a warm shutdown
from .chunk import run_chunk
from .decision import ItemState
from .item import ABANDONED, LATE, Handoff
from .process_runtime import THIS_PROCESS
from .runtime import Runtime, collect_for_work
from .sweeper import Sweeper
from .window import WindowPlace

logger = logging.getLogger(__name__)
DEFAULT_CONCURRENCY = 64
# the consumer is woken when a refused message would fit (Credit.on_room); it also looks again
# this often, for a message refused beside those of a channel since replaced
CREDIT_RECHECK_SECONDS = 0.25


def held_delivery_tags() -> list[str]:
    """The delivery tags of every message this process holds: running, waiting or counting down."""
    for _ in range(3):
        try:
            requests = [*worker_state.reserved_requests, *worker_state.active_requests,
                        *worker_state.scheduled_requests]
        except RuntimeError:  # a set changed under us (the consumer thread): look again
            continue
        tags = {getattr(r.message, "delivery_tag", None) for r in requests}
        return [str(tag) for tag in tags if tag]
    return []


def runtime(pool_size: int = DEFAULT_CONCURRENCY) -> Runtime:
    """This process's runtime, built on first use; its concurrency is ``AIVVM_BATCH_CONCURRENCY``,
    else the size of Celery's pool (``pool_size``)."""

    def build() -> Runtime:
        settings = Settings.from_env(redis_url=app.conf.broker_url)
        return Runtime.start(settings, app, settings.concurrency or pool_size, held_delivery_tags)

    return THIS_PROCESS.get_or_build(build)


class RuntimeStep(bootsteps.StartStopStep):
    """Builds the runtime when the worker starts (its loop, pools and lease renewal), and has
    the consumer's event loop woken to take a message as soon as slots free, and to stop as
    soon as a signal asks."""

    requires = ("celery.worker.components:Hub",)  # type: ignore[assignment]

    def start(self, parent: Any) -> None:
        rt = runtime(int(getattr(parent, "concurrency", 0) or DEFAULT_CONCURRENCY))
        collect_for_work()
        hub = getattr(parent, "hub", None)
        if hub is not None:
            rt.credit.on_room = functools.partial(hub.call_soon, _recheck)
            hub.call_repeatedly(CREDIT_RECHECK_SECONDS, _recheck)
            rt.wakers = _wake_on_signals(hub)


def _wake_on_signals(hub: Any) -> tuple[socket.socket, ...]:
    """A signal wakes the consumer's loop at once. Celery's handlers only set a flag that the
    loop reads between two polls, and a poll interrupted by a signal resumes (PEP 475): a warm
    shutdown would wait for the next message or timer, up to a tenth of a second that ``run``
    waits for at its end. Returns the sockets to keep open for the life of the process (none
    off the main thread: only it may set the wakeup fd)."""
    if threading.current_thread() is not threading.main_thread():
        return ()
    reader, writer = socket.socketpair()
    reader.setblocking(False)
    writer.setblocking(False)

    def drain() -> None:
        try:
            reader.recv(4096)
        except BlockingIOError:
            pass

    hub.add_reader(reader.fileno(), drain)
    signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    return reader, writer


def _recheck() -> None:
    """A tick of the consumer's loop: kombu asks each channel again whether it may consume."""


app.steps["worker"].add(RuntimeStep)
app.steps["worker"].add(Sweeper)


@app.task(bind=True, name=TASK_NAME, max_retries=None, ignore_result=True,  # type: ignore[untyped-decorator]
          acks_late=True, reject_on_worker_lost=True)
def complete_item(self: Task, batch_id: str, seqs: int | list[int], attempt: int = 1,
                  not_before: float = 0.0, spent: list[int] | None = None, cuts: int = 0,
                  mismatches: int = 0, down: list[str] | None = None, window: int = 0, waits: int = 0) -> str:
    rt = runtime()
    items = [seqs] if isinstance(seqs, int) else [int(s) for s in seqs]
    state = ItemState.from_kwargs(attempt, not_before, spent, cuts, mismatches, down, waits)
    task_id = self.request.id
    # a windowed message's end releases the batch's next one (behind the other batches' messages)
    place = WindowPlace(rt, batch_id, len(items)) if window else None
    try:
        ends = rt.run(run_chunk(rt, batch_id, items, state, on_end=lambda: rt.credit.ended(task_id),
                                on_all_ended=place.free_soon if place is not None else None))
    except Exception as exc:
        # run_chunk hands every item on itself; if even that failed, the message goes back
        if place is not None:
            place.taken_again()
        raise Reject(exc, requeue=True) from exc
    if place is not None:
        place.free_now()
    counts = Counter("retry" if isinstance(end, Handoff) else end.status for end in ends)
    paid_elsewhere = [seq for seq, end in zip(dict.fromkeys(items), ends)
                      if not isinstance(end, Handoff) and end.status in (LATE, ABANDONED)]
    if paid_elsewhere:
        logger.warning("batch %s: %d replies paid here but not recorded (items %s): their claims had passed to "
                       "another worker (counted in the items' usage)", batch_id, len(paid_elsewhere),
                       ", ".join(map(str, paid_elsewhere)))
    return " ".join(f"{name}={n}" for name, n in sorted(counts.items()))
