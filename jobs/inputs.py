"""Before reading an input file: is it JSON Lines at all, and can it be read twice?

:func:`sniff` looks at the first bytes and names the common mistakes (a JSON
array, pretty-printed JSON, CSV, plain text, UTF-16, gzip) with what to do, so
that such a file is refused at once instead of becoming a batch of ``invalid``
lines. :func:`spool` copies an input that can be read only once (``-`` for
standard input, a pipe, ``/dev/stdin``, a FIFO) into a file.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from .errors import InputFileError

STDIN = "-"
SNIFF_BYTES = 64 * 1024
_UTF8_BOM = b"\xef\xbb\xbf"
_UNFINISHED = (b"{", b"[", b",", b":")

JSON_ARRAY = ("this looks like a JSON array, not JSON Lines (one JSON object per line); "
              "convert it with jq -c '.[]'")
PRETTY_JSON = ("this looks like pretty-printed JSON (an object spread over several lines), not "
               "JSON Lines (one JSON object per line); convert it with jq -c .")
CSV = ("this looks like CSV, not JSON Lines (one JSON object per line); convert it, e.g. with "
       "Miller: mlr --icsv --ojsonl cat (a column named prompt or id becomes that field)")
TSV = ("this looks like tab-separated values, not JSON Lines (one JSON object per line); convert "
       "it, e.g. with Miller: mlr --itsv --ojsonl cat (a column named prompt or id becomes that field)")
PLAIN_TEXT = ("no line is a JSON object: this is not JSON Lines; for one plain-text prompt per "
              "line, convert it with jq -R -c '{prompt: .}'")
UTF16 = ("this is UTF-16 (or another wide encoding), not UTF-8; convert it with "
         "iconv -f UTF-16 -t UTF-8")
GZIP = "this is gzip-compressed; decompress it first (gunzip, or zcat piped into aivvm-batch submit -)"


def sniff(first_bytes: bytes) -> str | None:
    """What is wrong with a file that begins with ``first_bytes``, if it is plainly not JSON Lines.

    Pure and conservative: None whenever a line is a JSON object (a JSON Lines
    file with some bad lines gets an ``invalid`` result per bad line instead).
    """
    data = first_bytes
    if data.startswith(b"\x1f\x8b"):
        return GZIP
    if data.startswith((b"\xff\xfe", b"\xfe\xff")) or b"\x00" in data[:256]:
        return UTF16
    if data.startswith(_UTF8_BOM):
        data = data[len(_UTF8_BOM):]
    lines = [line.strip() for line in data.split(b"\n")]
    lines = [line for line in lines if line]
    if not lines:
        return None
    first = lines[0]
    first_value = _json(first)
    objects_seen = any(isinstance(_json(line), dict) for line in lines)
    if first.startswith(b"["):
        if first_value is not _INVALID and objects_seen:
            return None
        return JSON_ARRAY
    if first.startswith(b"{"):
        if first_value is _INVALID and len(lines) > 1 and first.endswith(_UNFINISHED):
            return PRETTY_JSON
        return None
    if first_value is not _INVALID or objects_seen:
        return None
    if b"\t" in first:
        return TSV
    if b"," in first or b";" in first:
        return CSV
    return PLAIN_TEXT


class _Invalid:
    pass


_INVALID = _Invalid()


def _json(line: bytes) -> object:
    try:
        return json.loads(line)
    except (ValueError, RecursionError):
        return _INVALID


def read_head(path: str | Path, size: int = SNIFF_BYTES) -> bytes:
    """The first ``size`` bytes of a file that can be read again (see :func:`spool`)."""
    try:
        with open(path, "rb") as stream:
            return stream.read(size)
    except OSError as exc:
        raise InputFileError(f"cannot read {path}: {exc.strerror or exc}") from exc


def check_input(path: str | Path, shown: str | None = None) -> None:
    """Raise :class:`InputFileError` with what to do if the file is plainly not JSON Lines."""
    hint = sniff(read_head(path))
    if hint is not None:
        raise InputFileError(f"{shown or path}: {hint}")


def is_stdin(path: str | Path) -> bool:
    return str(path) == STDIN


def spool(path_or_dash: str | Path, directory: str | Path) -> Path:
    """A path to read the input from, as often as needed.

    A regular file is returned unchanged. Standard input (``-``), a pipe,
    ``/dev/stdin`` or a FIFO is copied once into a new file in ``directory``
    (mode 0600), whose path is returned: the caller removes it (or uses :func:`spooled`).
    """
    if is_stdin(path_or_dash):
        return _copy(sys.stdin.buffer, "stdin", Path(directory))
    path = Path(path_or_dash)
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise InputFileError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if stat.S_ISREG(mode):
        return path
    if stat.S_ISDIR(mode):
        raise InputFileError(f"cannot read {path}: Is a directory")
    try:
        stream = open(path, "rb")
    except OSError as exc:
        raise InputFileError(f"cannot read {path}: {exc.strerror or exc}") from exc
    with stream:
        return _copy(stream, path.name or "input", Path(directory))


def _copy(stream: BinaryIO, name: str, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{name}.", suffix=".jsonl", dir=directory)
    try:
        with os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(stream, out, 1 << 20)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


@contextlib.contextmanager
def spooled(path_or_dash: str | Path, directory: str | Path | None = None) -> Iterator[Path]:
    """:func:`spool`, and the copy removed afterwards (in a temporary folder if none is given)."""
    if not is_stdin(path_or_dash) and Path(path_or_dash).is_file():
        yield Path(path_or_dash)
        return
    with contextlib.ExitStack() as stack:
        if directory is None:
            directory = stack.enter_context(tempfile.TemporaryDirectory(prefix="aivvm-batch-"))
        path = spool(path_or_dash, directory)
        if path != Path(path_or_dash):
            stack.callback(path.unlink, missing_ok=True)
        yield path
