"""Collecting a batch: wait for it, and write every item's result in input order."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from .errors import ConfigError, StoreUnavailable, WaitTimeout
from .formats import ResultFormat, render
from .output import write_atomically
from .records import BatchInfo
from .store import BatchStore

ProgressCallback = Callable[[BatchInfo], None]
DEFAULT_IDLE_WARNING_SECONDS = 60.0


@dataclass
class WaitGuard:
    """Ends a wait after ``timeout`` seconds, and says once when no worker seems to be working.

    ``on_idle`` gets one line when the batch has not progressed for ``idle_warning``
    seconds and no worker's heartbeat is that recent either (or none was ever seen).
    """

    store: BatchStore
    timeout: float | None = None
    idle_warning: float | None = DEFAULT_IDLE_WARNING_SECONDS
    on_idle: Callable[[str], None] | None = None
    _started: float = field(default_factory=time.monotonic)
    _progress_at: float = field(default_factory=time.monotonic)
    _done: int | None = None
    _warned: bool = False

    def observe(self, info: BatchInfo) -> None:
        now = time.monotonic()
        if info.done != self._done:
            self._done, self._progress_at = info.done, now
        if info.finished:
            return
        self.check_deadline(info.id, f"{info.done}/{_total(info)} items done")
        if (self.on_idle is None or self.idle_warning is None or self._warned
                or now - self._progress_at < self.idle_warning):
            return
        age = self.store.last_worker_age()
        if age is not None and age < self.idle_warning:
            return
        self._warned = True
        self.on_idle(f"no worker has taken an item for {self.idle_warning:g} s: "
                      "start one with aivvm-batch worker")

    def check_deadline(self, batch_id: str, state: str) -> None:
        if self.timeout is not None and time.monotonic() - self._started >= self.timeout:
            raise WaitTimeout(f"batch {batch_id} did not finish within {self.timeout:g} s "
                              f"({state}); stopped waiting")


def _total(info: BatchInfo) -> str:
    return "?" if info.total is None else str(info.total)


def wait_until_finished(store: BatchStore, batch_id: str, on_progress: ProgressCallback | None = None,
                        poll_seconds: float = 0.5, reconnect_seconds: float = 120.0,
                        guard: WaitGuard | None = None) -> BatchInfo:
    """Poll the batch's counters until every item has a final result.

    A Redis that goes away while we wait (a restart) is waited for, up to
    ``reconnect_seconds``; then :class:`StoreUnavailable` is raised. ``guard``
    may end the wait (:class:`WaitTimeout`) and warns when no worker is working.
    """
    def unreachable() -> None:
        if guard is not None:
            guard.check_deadline(batch_id, "Redis is unreachable")

    for info in views(store, batch_id, poll_seconds, reconnect_seconds,
                      observe=guard.observe if guard is not None else None, on_unreachable=unreachable):
        if on_progress is not None:
            on_progress(info)
        if info.finished:
            return info
    raise AssertionError("unreachable")


Poll = float | Callable[[BatchInfo | None], float]  # seconds, or seconds after this view (None: none read)


def views(store: BatchStore, batch_id: str, poll_seconds: Poll, reconnect_seconds: float, *,
          observe: ProgressCallback | None = None,
          on_unreachable: Callable[[], None] | None = None) -> Iterator[BatchInfo]:
    """Each new view of the batch, every ``poll_seconds`` (a function: what it says of the last
    view), for as long as the caller iterates.

    A Redis that goes away (a restart) is waited for, up to ``reconnect_seconds``; then
    :class:`StoreUnavailable` is raised. ``observe`` sees each view first (a Redis error in it
    counts as Redis being away); ``on_unreachable`` runs at each failed read.
    """
    unreachable_since: float | None = None
    while True:
        try:
            info = store.info(batch_id)
            if observe is not None:
                observe(info)
        except StoreUnavailable:
            if on_unreachable is not None:
                on_unreachable()
            unreachable_since = unreachable_since or time.monotonic()
            if time.monotonic() - unreachable_since > reconnect_seconds:
                raise
            time.sleep(_seconds(poll_seconds, None))
            continue
        unreachable_since = None
        yield info
        time.sleep(_seconds(poll_seconds, info))


def _seconds(poll: Poll, info: BatchInfo | None) -> float:
    return poll(info) if callable(poll) else poll


def write_results(store: BatchStore, batch_id: str, out: str | Path,
                  fmt: ResultFormat = ResultFormat.NATIVE) -> BatchInfo:
    """Write one line per item, in input order; a file appears whole or not at all.

    ``out`` may be ``-`` (standard output), a symlink (its target is written) or a
    device (written in place): see :mod:`jobs.output`.
    """
    info = store.info(batch_id)
    if not info.finished:
        raise ConfigError(
            f"batch {batch_id} is not finished ({info.done}/{_total(info)}"
            " items done): wait with --wait"
        )
    write_atomically(out, _lines(store, info, fmt))
    return info


def _lines(store: BatchStore, info: BatchInfo, fmt: ResultFormat) -> Iterator[bytes]:
    for seq, raw in store.iter_results(info.id, info.total or 0):
        if raw is None:
            raise ConfigError(f"batch {info.id}: item {seq} has no result yet")
        yield render(raw, fmt, info.created) + b"\n"


def follow_results(store: BatchStore, batch_id: str, out: BinaryIO,
                   fmt: ResultFormat = ResultFormat.NATIVE, on_progress: ProgressCallback | None = None,
                   poll_seconds: float = 0.5, guard: WaitGuard | None = None) -> BatchInfo:
    """Write results as they are recorded (completion order), until the batch finishes.

    An item run again by ``retry`` is written again when its new result arrives.
    """
    offset = 0
    while True:
        info = store.info(batch_id)
        if on_progress is not None:
            on_progress(info)
        while seqs := store.finished_since(batch_id, offset):
            for raw in store.results_of(batch_id, seqs):
                if raw is not None:
                    out.write(render(raw, fmt, info.created) + b"\n")
            offset += len(seqs)
            out.flush()
        if info.finished:
            return info
        if guard is not None:
            guard.observe(info)
        time.sleep(poll_seconds)
