"""Submitting a file (a path, or any binary stream): its lines into the store and onto the
queue, a chunk at a time.

Memory is bounded by the block size, whatever the file's length; each block costs
two Redis round trips, none per line, and its items travel in chunked messages
(:func:`jobs.queue.chunk_size`). The second round trip of a block, which carries its
requests and messages (most of Redis's work), is sent while the next block is read
(:class:`OneAhead`).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from .config import Settings
from .connection import translated
from .errors import BatchError, BatchNotFound, ConfigError, InvalidLine, StoreFull
from .intake import ChunkEntry, ChunkOutcome, Reuse
from .lines import lines_expected, numbered_lines, open_input, parse_data
from .queue import Publisher, chunk_size
from .records import BatchOptions, ItemRequest, ItemResult, RequestDefaults, invalid_result
from .store import BatchStore

CHUNK_LINES = 2000
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SubmitReport:
    batch_id: str
    total: int
    invalid: int
    enqueued: int
    resumed: bool
    # results carried over from ``reuse_from`` instead of being enqueued
    kept: int = 0
    # valid lines with a counterpart at the same line in ``reuse_from`` that could not be kept
    # (another request, provider or base URL, or an earlier result that was not ok)
    changed: int = 0
    # why the first invalid line is (file, line, field), to show beside the count
    first_invalid: str | None = None
    # valid lines answered from the cache (``BatchOptions.cache``), not enqueued
    cached: int = 0

    def cache_note(self) -> str | None:
        """One line for the terminal: how many answers the cache gave."""
        if not self.cached:
            return None
        return f"{self.cached} of {self.total} lines answered from the cache (asked before; not paid again)"

    def invalid_note(self) -> str | None:
        """One line for the terminal: how many lines are invalid, and why the first is."""
        if not self.invalid:
            return None
        more = f"; the first: {self.first_invalid}" if self.first_invalid else ""
        return f"{self.invalid} of {self.total} lines are invalid (each has its reason in the results){more}"


class OneAhead:
    """Sends each pipeline in a thread of its own while the caller goes on, one at a time: the
    next call, and :meth:`wait`, first wait for the one in flight and raise its error.

    Redis executes a block's requests and messages while the next block is parsed (a third
    of the time of ``submit`` was spent waiting for that reply).
    """

    def __init__(self) -> None:
        self._thread: ThreadPoolExecutor | None = None
        self._pending: Future[None] | None = None

    def __call__(self, pipe: Any) -> None:
        self.wait()
        if self._thread is None:
            self._thread = ThreadPoolExecutor(1, thread_name_prefix="aivvm-submit")
        self._pending = self._thread.submit(_execute, pipe)

    def wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        """Wait for the pipeline in flight, whatever it ends with (the caller is failing already,
        or done), and end the thread. A Ctrl-C meanwhile waits on: the batch may only be removed
        once nothing of it is still on its way, and that takes one round trip."""
        pending, self._pending = self._pending, None
        while pending is not None:
            try:
                wait([pending])
                pending = None
            except KeyboardInterrupt:
                continue
        if self._thread is not None:
            self._thread.shutdown(wait=False)
            self._thread = None


@translated
def _execute(pipe: Any) -> None:
    pipe.execute()


def new_batch_id() -> str:
    return "b" + uuid.uuid4().hex[:15]


def submit_file(store: BatchStore, publisher: Publisher, path: str | Path, options: BatchOptions,
                settings: Settings, *, batch_id: str | None = None, resume: bool = False,
                reuse_from: str | None = None, defaults: RequestDefaults = RequestDefaults(),
                hold: Callable[[], bool] | None = None, worker_slots: int | None = None) -> SubmitReport:
    """:func:`submit_stream` of the file at ``path``, the batch named after it."""
    with open_input(path) as stream:
        return submit_stream(store, publisher, stream, str(path), options, settings, batch_id=batch_id,
                             resume=resume, reuse_from=reuse_from, defaults=defaults, hold=hold,
                             worker_slots=worker_slots)


def submit_stream(store: BatchStore, publisher: Publisher, stream: BinaryIO, source: str,
                  options: BatchOptions, settings: Settings, *, expected_lines: int | None = None,
                  batch_id: str | None = None, resume: bool = False, reuse_from: str | None = None,
                  defaults: RequestDefaults = RequestDefaults(),
                  hold: Callable[[], bool] | None = None, worker_slots: int | None = None) -> SubmitReport:
    """Record the batch and enqueue its items, read from ``stream`` a line at a time.

    ``source`` names the input (the batch's source, as ``status`` shows it). ``expected_lines``:
    about how many lines the stream holds, to size the messages from the start; by default
    counted if the stream is a regular file (:func:`jobs.lines.lines_expected`), else the
    lines read so far (a pipe). ``worker_slots``: the slots of the smallest worker process that
    will take the messages, if known (:func:`jobs.queue.chunk_size`).

    Once ``hold()`` is true, the rest of the file is recorded without being enqueued (``run``
    interrupted while it submits: no new item starts, and the batch, with what its workers
    recorded, stays to be cancelled and resumed).

    With ``resume``, the batch may already hold some of the file: every step is
    idempotent, and items that already have a result are not enqueued again.
    With ``reuse_from`` (an earlier batch's id), an item whose request, provider and
    base URL equal the earlier batch's at the same line, and whose result there is
    ``ok``, gets that result without being enqueued. ``defaults`` fill what lines lack.

    A submission that fails (a full or lost Redis, an unreadable file, Ctrl-C) of a
    batch this call created removes the batch again, so that no worker works on a
    half-submitted batch; with ``resume`` the batch is kept, to be resumed.
    A Redis that may evict keys is refused first (:meth:`BatchStore.check_server`).
    """
    if options.cache and not options.base_url:
        raise ConfigError("--cache needs --base-url: answers are kept under the server that gave them, and "
                          "without one each worker asks the server its own environment names")
    store.check_server()
    batch_id = batch_id or new_batch_id()
    created = store.create(batch_id, source, options)
    if not created and not resume:
        raise ConfigError(f"batch {batch_id} already exists")
    ahead = OneAhead()
    try:
        report = _submit(store, publisher, stream, expected_lines, batch_id, options, settings, resume,
                         _reuse(store, reuse_from, options), defaults, ahead, hold, worker_slots)
    except BaseException as exc:
        ahead.close()  # nothing of the batch may arrive after it is removed
        if created and not resume:
            _abandon(store, batch_id)
            if isinstance(exc, StoreFull):
                raise StoreFull(f"{exc}; nothing was submitted") from exc
        raise
    else:
        ahead.close()  # its last pipeline was waited for: this ends its thread
    return report


def _submit(store: BatchStore, publisher: Publisher, stream: BinaryIO, expected_lines: int | None,
            batch_id: str, options: BatchOptions, settings: Settings, resume: bool, reuse: Reuse | None,
            defaults: RequestDefaults, ahead: OneAhead, hold: Callable[[], bool] | None,
            worker_slots: int | None) -> SubmitReport:
    if resume:
        store.update_options(batch_id, options)
    total = invalid = enqueued = kept = changed = cached = 0
    first_invalid: str | None = None
    expected = (lines_expected(stream) if expected_lines is None else expected_lines) or 0
    chunk: list[ChunkEntry] = []
    max_items, max_line_bytes = settings.max_items, settings.max_line_bytes
    providers = options.providers()
    for number, data, oversized in numbered_lines(stream, max_line_bytes):
        parsed: ItemRequest | ItemResult
        if total >= max_items:
            chunk.append(ChunkEntry(total, invalid_result(number, (
                f"line {number}: the file was cut here: a batch is limited to {max_items} "
                "items (AIVVM_BATCH_MAX_ITEMS); this line and the rest of the file were not read"))))
            invalid += 1
            total += 1
            break
        try:
            parsed = parse_data(number, data, oversized, max_line_bytes, defaults, providers)
        except InvalidLine as exc:
            parsed = invalid_result(number, str(exc), exc.item_id)
            invalid += 1
            first_invalid = first_invalid or str(exc)
        chunk.append(ChunkEntry(total, parsed))
        total += 1
        if len(chunk) >= CHUNK_LINES:
            size = chunk_size(max(total, expected), worker_slots)
            if len(chunk) % size == 0:  # a block ends on a whole message: none part-filled mid-batch
                outcome = _flush(store, publisher, batch_id, chunk, resume, reuse, size, ahead, hold, options)
                enqueued, kept, changed = enqueued + len(outcome.enqueued), kept + outcome.kept, changed + outcome.changed
                cached, invalid = cached + outcome.cached, invalid + outcome.duplicates
                chunk = []
    outcome = _flush(store, publisher, batch_id, chunk, resume, reuse, chunk_size(max(total, expected), worker_slots),
                     ahead, hold, options)
    enqueued, kept, changed = enqueued + len(outcome.enqueued), kept + outcome.kept, changed + outcome.changed
    cached, invalid = cached + outcome.cached, invalid + outcome.duplicates
    ahead.wait()  # every block is stored before the batch is finalized
    store.finalize(batch_id, total)
    return SubmitReport(batch_id, total, invalid, enqueued, resume, kept, changed, first_invalid, cached)


def _reuse(store: BatchStore, earlier_id: str | None, options: BatchOptions) -> Reuse | None:
    if earlier_id is None:
        return None
    try:
        earlier = store.info(earlier_id).options
    except BatchNotFound:
        return None
    same = earlier.provider == options.provider and earlier.base_url == options.base_url
    return Reuse(earlier_id, same_options=same)


def _abandon(store: BatchStore, batch_id: str) -> None:
    try:
        store.delete(batch_id)
    except BatchError:
        logger.warning("could not remove the half-submitted batch %s", batch_id)


def _flush(store: BatchStore, publisher: Publisher, batch_id: str, chunk: list[ChunkEntry],
           resume: bool, reuse: Reuse | None, size: int, ahead: OneAhead,
           hold: Callable[[], bool] | None, options: BatchOptions) -> ChunkOutcome:
    """Store a block of lines; its items go out in messages of ``size`` items (sized to the
    batch's lines: of a regular file, counted from the start; of a pipe, those read so far)."""
    if not chunk:
        return ChunkOutcome([])

    def enqueue(pipe: Any, seqs: list[int]) -> None:
        if hold is None or not hold():
            publisher.publish(batch_id, seqs, pipe, chunk=size)

    return store.add_chunk(batch_id, chunk, resume=resume, reuse=reuse, send=ahead, enqueue=enqueue,
                           cache=options if options.cache else None)
