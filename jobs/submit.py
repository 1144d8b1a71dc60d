"""Submitting a file: stream its lines into the store and onto the queue, a chunk at a time.

Memory is bounded by the chunk size, whatever the file's length; each chunk costs
two Redis round trips, none per line.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from pathlib import Path

from .config import Settings
from .errors import ConfigError, InvalidLine
from .lines import open_input, parse_line, read_lines
from .queue import Publisher
from .records import BatchOptions, ItemRequest, ItemResult, invalid_result
from .store import BatchStore, ChunkEntry

CHUNK_LINES = 2000


@dataclass(frozen=True)
class SubmitReport:
    batch_id: str
    total: int
    invalid: int
    enqueued: int
    resumed: bool


def new_batch_id() -> str:
    return "b" + uuid.uuid4().hex[:15]


def file_batch_id(path: str | Path, options: BatchOptions) -> str:
    """A batch id that is the same for the same file and provider: how ``run`` resumes."""
    digest = hashlib.sha256(json.dumps([options.provider]).encode())
    with open_input(path) as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return "r" + digest.hexdigest()[:15]


def submit_file(store: BatchStore, publisher: Publisher, path: str | Path, options: BatchOptions,
                settings: Settings, *, batch_id: str | None = None, resume: bool = False) -> SubmitReport:
    """Record the batch and enqueue its items.

    With ``resume``, the batch may already hold some of the file: every step is
    idempotent, and items that already have a result are not enqueued again.
    """
    batch_id = batch_id or new_batch_id()
    with open_input(path) as stream:
        if not store.create(batch_id, str(path), options) and not resume:
            raise ConfigError(f"batch {batch_id} already exists")
        if resume:
            store.update_options(batch_id, options)
        total = invalid = enqueued = 0
        chunk: list[ChunkEntry] = []
        for raw in read_lines(stream, settings.max_line_bytes):
            parsed: ItemRequest | ItemResult
            if total >= settings.max_items:
                parsed = invalid_result(raw.number, f"line {raw.number}: the batch is limited to "
                                        f"{settings.max_items} items (AIVVM_BATCH_MAX_ITEMS)")
            else:
                try:
                    parsed = parse_line(raw, settings.max_line_bytes)
                except InvalidLine as exc:
                    parsed = invalid_result(raw.number, str(exc), exc.item_id)
            invalid += isinstance(parsed, ItemResult)
            chunk.append(ChunkEntry(total, parsed))
            total += 1
            if len(chunk) >= CHUNK_LINES:
                enqueued += _flush(store, publisher, batch_id, chunk, resume)
                chunk = []
        enqueued += _flush(store, publisher, batch_id, chunk, resume)
    store.finalize(batch_id, total)
    return SubmitReport(batch_id, total, invalid, enqueued, resume)


def _flush(store: BatchStore, publisher: Publisher, batch_id: str, chunk: list[ChunkEntry],
           resume: bool) -> int:
    if not chunk:
        return 0
    seqs = store.add_chunk(batch_id, chunk, resume=resume,
                           enqueue=lambda pipe, seqs: publisher.publish(batch_id, seqs, pipe))
    return len(seqs)
