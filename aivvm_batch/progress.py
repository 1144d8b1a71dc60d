"""Progress people can read: a live bar on a terminal, plain periodic lines otherwise.

Both show the most frequent error of failed attempts, so that a batch that fails
systematically says why while it runs.
"""

from __future__ import annotations

import sys
import time
from typing import IO, NoReturn

from tqdm import tqdm

from jobs.records import BatchInfo, Status

from .failure_signs import error_brief

PLAIN_INTERVAL_SECONDS = 5.0


def summary(info: BatchInfo) -> str:
    parts = [f"{info.counts.get(s.value, 0)} {s.value}" for s in Status if info.counts.get(s.value)]
    total = "?" if info.total is None else str(info.total)
    return f"{info.done}/{total} done" + (f" ({', '.join(parts)})" if parts else "")


class Progress:
    """Call :meth:`update` with each new view of the batch, :meth:`note` for a message, then :meth:`close`."""

    def __init__(self, stream: IO[str] | None = None, *, live: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty() if live is None else live
        self._bar: tqdm[NoReturn] | None = None  # a bar over no iterable (typeshed's tqdm)
        self._started = time.monotonic()
        self._first_done: int | None = None
        self._last_line = 0.0

    def update(self, info: BatchInfo, *, in_flight: int | None = None) -> None:
        """``in_flight``: the run was interrupted and waits for that many items (the rest is cancelled)."""
        if self._first_done is None:
            self._first_done = info.done
        if self.live:
            self._update_bar(info, in_flight)
        elif info.finished or time.monotonic() - self._last_line >= PLAIN_INTERVAL_SECONDS:
            self._last_line = time.monotonic()
            print(self._plain(info, in_flight), file=self.stream, flush=True)

    def note(self, message: str) -> None:
        """A line of its own (above the bar on a terminal)."""
        if self._bar is not None:
            self._bar.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

    def _update_bar(self, info: BatchInfo, in_flight: int | None) -> None:
        if self._bar is None:
            self._bar = tqdm(total=info.total, initial=info.done, unit="item", file=self.stream,
                             dynamic_ncols=True, desc=info.id)
        if info.total is not None and self._bar.total != info.total:
            self._bar.total = info.total
        cancelled = info.counts.get(Status.CANCELLED.value, 0) if in_flight is not None else 0
        self._bar.update(info.done - cancelled - self._bar.n)
        if in_flight is not None:
            self._bar.set_postfix_str(f"interrupted: waiting for {in_flight} in flight", refresh=True)
            return
        failures = info.done - info.counts.get(Status.OK.value, 0)
        errors = error_brief(info, 40)
        self._bar.set_postfix_str(f"not ok: {failures}" + (f", errors: {errors}" if errors else ""),
                                  refresh=True)

    def _plain(self, info: BatchInfo, in_flight: int | None) -> str:
        if in_flight is not None:
            return f"batch {info.id}: interrupted, waiting for {in_flight} items in flight ({summary(info)})"
        elapsed = max(time.monotonic() - self._started, 1e-6)
        rate = (info.done - (self._first_done or 0)) / elapsed
        eta = ""
        if info.total is not None and rate > 0 and not info.finished:
            eta = f", ETA {int((info.total - info.done) / rate)}s"
        errors = error_brief(info)
        failing = f"; failed attempts: {sum(info.errors.values())}, most often {errors}" if errors else ""
        return f"batch {info.id}: {summary(info)}, {rate:.1f} items/s{eta}{failing}"

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
