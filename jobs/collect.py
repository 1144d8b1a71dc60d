"""Collecting a batch: wait for it, and write every item's result in input order."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from .errors import ConfigError, StoreUnavailable
from .formats import ResultFormat, render
from .records import BatchInfo
from .store import BatchStore

ProgressCallback = Callable[[BatchInfo], None]


def wait_until_finished(store: BatchStore, batch_id: str, on_progress: ProgressCallback | None = None,
                        poll_seconds: float = 0.5, reconnect_seconds: float = 120.0) -> BatchInfo:
    """Poll the batch's counters until every item has a final result.

    A Redis that goes away while we wait (a restart) is waited for, up to
    ``reconnect_seconds``; then :class:`StoreUnavailable` is raised.
    """
    unreachable_since: float | None = None
    while True:
        try:
            info = store.info(batch_id)
        except StoreUnavailable:
            unreachable_since = unreachable_since or time.monotonic()
            if time.monotonic() - unreachable_since > reconnect_seconds:
                raise
            time.sleep(poll_seconds)
            continue
        unreachable_since = None
        if on_progress is not None:
            on_progress(info)
        if info.finished:
            return info
        time.sleep(poll_seconds)


def write_results(store: BatchStore, batch_id: str, out: str | Path,
                  fmt: ResultFormat = ResultFormat.NATIVE) -> BatchInfo:
    """Write one line per item, in input order; the file appears whole or not at all."""
    info = store.info(batch_id)
    if not info.finished:
        raise ConfigError(
            f"batch {batch_id} is not finished ({info.done}/{info.total if info.total is not None else '?'}"
            " items done): wait with --wait"
        )
    out = Path(out)
    directory = out.parent if str(out.parent) else Path(".")
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".part", dir=directory)
    try:
        with os.fdopen(fd, "wb", buffering=1 << 20) as f:
            for seq, raw in store.iter_results(batch_id, info.total or 0):
                if raw is None:
                    raise ConfigError(f"batch {batch_id}: item {seq} has no result yet")
                f.write(render(raw, fmt))
                f.write(b"\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return info


def follow_results(store: BatchStore, batch_id: str, out: BinaryIO,
                   fmt: ResultFormat = ResultFormat.NATIVE, on_progress: ProgressCallback | None = None,
                   poll_seconds: float = 0.5) -> BatchInfo:
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
                    out.write(render(raw, fmt) + b"\n")
            offset += len(seqs)
            out.flush()
        if info.finished:
            return info
        time.sleep(poll_seconds)
