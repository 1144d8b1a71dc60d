"""An uploaded file read back as a stream: literal chunks in, the lines and the line count of a file out."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from aivvm_batch.serve.content import expected_lines, open_content
from jobs.files import StoredFile
from jobs.lines import lines_expected, numbered_lines


class ChunkedFiles:
    """A file store holding one file as the given chunks."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks
        self.reads = 0

    def iter_content(self, file_id: str) -> Iterator[bytes]:
        for chunk in self.chunks:
            self.reads += 1
            yield chunk

    def stored(self) -> StoredFile:
        return StoredFile("file-1", "owner", "in.jsonl", "batch", sum(map(len, self.chunks)), 0)


def files(chunks: list[bytes]) -> Any:
    return ChunkedFiles(chunks)


@pytest.mark.parametrize("chunks", [
    [b'{"prompt": "a"}\n{"prompt": "b"}\n'],
    [b'{"prompt": "a"}\n{"pro', b'mpt": "b"}\n', b"", b"\n", b'{"prompt": "c"}'],
    [bytes([byte]) for byte in b'\xef\xbb\xbf{"prompt": "a"}\r\n\n{"prompt": "b"}\n'],
])
def test_the_stream_holds_the_chunks_joined_and_reads_as_a_file_does(tmp_path: Path, chunks: list[bytes]) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"".join(chunks))
    with open_content(files(chunks), "file-1") as stream:
        streamed = list(numbered_lines(stream, 8))
    with open(path, "rb") as stream:
        assert streamed == list(numbered_lines(stream, 8))


def test_the_stream_reads_the_chunks_as_it_goes() -> None:
    store = files([b"a\n" * 10, b"b\n" * 10, b"c\n" * 10])
    stream = open_content(store, "file-1")
    assert stream.readline() == b"a\n"
    assert store.reads == 1
    assert stream.read() == b"a\n" * 9 + b"b\n" * 10 + b"c\n" * 10


@pytest.mark.parametrize("chunks", [
    [], [b"{}\n"], [b"{}"], [b"{}\n{", b"}\n{}"], [b"{}\n\n{}\n"], [b"\xef\xbb\xbf{}\r\n", b"{}\r\n"],
    [b"x" * 9 + b"\n" + b"abcdefghi\n" * 4, b"abcdefghi\n" * 995],
])
def test_the_line_count_is_a_regular_file_s(tmp_path: Path, chunks: list[bytes]) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"".join(chunks))
    store = files(chunks)
    with open(path, "rb") as stream:
        for limit in (7, 50, 100, 64 << 20):
            assert expected_lines(store, store.stored(), count_limit=limit) == lines_expected(stream, limit)


def test_the_line_count_reads_no_further_than_its_limit() -> None:
    store = files([b"abcdefghi\n" * 10] * 100)
    assert expected_lines(store, store.stored(), count_limit=250) == 1000
    assert store.reads == 3
