"""An uploaded file read back from the file store as a binary stream, a chunk at a time.

What a batch's submission reads its input file from (:func:`jobs.submit.submit_stream`):
no copy on disk, and no more of the file in memory than a chunk and a line.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import TYPE_CHECKING, BinaryIO

from jobs.files import CHUNK_BYTES, FileStore, StoredFile
from jobs.lines import LINE_COUNT_LIMIT

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer


class _Chunks(io.RawIOBase):
    """The bytes of an iterator of chunks, as a raw stream (ends where the iterator ends)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._chunk = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        while not self._chunk:
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self._chunk = memoryview(chunk)
        target = memoryview(buffer).cast("B")
        size = min(len(target), len(self._chunk))
        target[:size] = self._chunk[:size]
        self._chunk = self._chunk[size:]
        return size


def open_content(files: FileStore, file_id: str) -> BinaryIO:
    """The file's content as a stream (a file deleted meanwhile is :class:`jobs.files.FileNotFound`)."""
    return io.BufferedReader(_Chunks(files.iter_content(file_id)), CHUNK_BYTES)


def expected_lines(files: FileStore, stored: StoredFile, count_limit: int = LINE_COUNT_LIMIT) -> int:
    """About how many lines the file has, as :func:`jobs.lines.lines_expected` counts a regular
    file's: the newlines of its first ``count_limit`` bytes, past them extrapolated by its size."""
    newlines = scanned = 0
    last = b"\n"
    for chunk in files.iter_content(stored.id):
        block = chunk[:count_limit - scanned]
        newlines += block.count(b"\n")
        scanned += len(block)
        last = block[-1:] or last
        if scanned >= count_limit:
            break
    if 0 < scanned < stored.bytes:
        return newlines * stored.bytes // scanned
    return newlines + (last != b"\n")
