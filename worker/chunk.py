"""Working on a chunk of items on the event loop: each item run to its end for this message.

A chunk is what one Celery message carries. Its items run as coroutines (:mod:`worker.item`),
each taking one of the process's slots (requests in flight) only for its claim and its
provider call. :func:`run_chunk` returns when every item is recorded, or handed on to a retry
message (published first), or was found done, cancelled or gone: only then may the message be
acknowledged.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from .decision import Done, ItemState, RunAgain
from .item import PUT_BACK_SECONDS, Handoff, hand_on, later, run_item
from .runtime import Runtime

logger = logging.getLogger(__name__)


async def run_chunk(rt: Runtime, batch_id: str, seqs: list[int], state: ItemState,
                    on_end: Callable[[], None] | None = None,
                    on_all_ended: Callable[[], None] | None = None) -> list[Done | Handoff]:
    """Every item of the chunk to its end for this message (a seq given twice runs once);
    ``on_end`` is called once per item, as soon as it needs no slot any more (its call has
    ended, its result may still be on its way to Redis; or it ended without a call): the next
    message's items may start meanwhile. ``on_all_ended`` is called once, after the last item's
    ``on_end``."""
    unique = list(dict.fromkeys(seqs))
    loop = asyncio.get_running_loop()
    last = _Countdown(len(unique), on_all_ended)
    runs = []
    for seq in unique:
        freed = _Once(_both(on_end, last))
        run = loop.create_task(run_item(rt, batch_id, seq, state, freed))
        run.add_done_callback(freed.on_done)  # a callback, not a wrapping coroutine: one frame less
        runs.append(run)
    outcomes = await asyncio.gather(*runs, return_exceptions=True)
    ends: list[Done | Handoff] = []
    for seq, outcome in zip(unique, outcomes):
        if isinstance(outcome, BaseException):
            if not isinstance(outcome, Exception):
                raise outcome
            # run_item hands items on itself; this is its own failure: hand on without it
            logger.error("batch %s item %s: %s; the item is put back", batch_id, seq, outcome)
            outcome = await hand_on(rt, batch_id, seq, RunAgain(later(state, PUT_BACK_SECONDS)))
        ends.append(outcome)
    return ends


class _Countdown:
    """``call`` once it has been called ``count`` times (None: nothing)."""

    def __init__(self, count: int, call: Callable[[], None] | None) -> None:
        self.left = count
        self.call = call

    def __call__(self) -> None:
        self.left -= 1
        if self.left == 0 and self.call is not None:
            self.call()


def _both(first: Callable[[], None] | None, then: Callable[[], None]) -> Callable[[], None]:
    if first is None:
        return then

    def call() -> None:
        first()
        then()

    return call


class _Once:
    """``call``, called at most once (None: nothing)."""

    def __init__(self, call: Callable[[], None] | None) -> None:
        self.call = call

    def __call__(self) -> None:
        call, self.call = self.call, None
        if call is not None:
            call()

    def on_done(self, _: object) -> None:
        self()
