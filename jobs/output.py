"""Writing a results file safely: the input is never overwritten, links and devices are respected.

Where an output path leads decides how it is written:

* ``-``, and paths that name one of our own file descriptors (``/dev/stdout``,
  ``/dev/fd/N``, ``/proc/self/fd/N``): that descriptor, as it is (a ``>>`` stays
  an append);
* an existing device, FIFO or socket: opened and written in place, never replaced;
* anything else: a regular file at the symlink's target (the link is kept), written
  aside and renamed into place, so it is whole or absent. A new file gets the
  umask's normal mode (``0666 & ~umask``); a replaced one keeps its mode.

Call :func:`check_output` before any work, so that a mistake costs nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import stat
import sys
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import BinaryIO

from .errors import ConfigError

STDIO = "-"
_OUR_FD = re.compile(r"^/(?:dev/fd|proc/(?:self|thread-self|%d)/fd)/(\d+)$" % os.getpid())
_STD_NAMES = {"/dev/stdin": 0, "/dev/stdout": 1, "/dev/stderr": 2}
_MAX_LINK_HOPS = 40


class Kind(str, Enum):
    DESCRIPTOR = "descriptor"  # one of this process's open file descriptors
    SPECIAL = "special"  # a device, FIFO or socket: written in place
    FILE = "file"  # a regular file (existing or not): replaced atomically


@dataclass(frozen=True)
class Target:
    """Where an output path leads: the descriptor, the special file, or the regular file."""

    kind: Kind
    path: Path
    fd: int | None = None


def is_stdio(path: str | Path) -> bool:
    return str(path) == STDIO


def resolve(path: str | Path) -> Target:
    """Follow ``path``'s symlinks one hop at a time, as far as the file they lead to."""
    if is_stdio(path):
        return Target(Kind.DESCRIPTOR, Path("/dev/stdout"), 1)
    current = os.path.abspath(path)
    for _ in range(_MAX_LINK_HOPS):
        fd = _descriptor_of(current)
        if fd is not None:
            return Target(Kind.DESCRIPTOR, Path(current), fd)
        if not os.path.islink(current):
            break
        current = os.path.normpath(os.path.join(os.path.dirname(current), os.readlink(current)))
    real = Path(os.path.realpath(current))
    try:
        mode = os.stat(real).st_mode
    except FileNotFoundError:
        return Target(Kind.FILE, real)
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror or exc}") from exc
    if stat.S_ISDIR(mode):
        raise ConfigError(f"{path} is a directory: give a file name for the results")
    return Target(Kind.FILE if stat.S_ISREG(mode) else Kind.SPECIAL, real)


def _descriptor_of(path: str) -> int | None:
    if path in _STD_NAMES:
        return _STD_NAMES[path]
    match = _OUR_FD.match(path)
    return int(match.group(1)) if match else None


def check_output(path: str | Path, input_path: str | Path | None = None) -> None:
    """Raise :class:`ConfigError` unless results can be written to ``path``.

    Refused: the input file itself (also through a link or a hard link), a
    directory, a descriptor not open for writing, and a place we may not write
    (probed by creating and removing a file beside it: permissions alone do not
    tell, as root or under /proc). Nothing is truncated.
    """
    target = resolve(path)
    if target.kind is Kind.DESCRIPTOR:
        assert target.fd is not None
        _check_descriptor(path, target.fd)
        return
    if input_path is not None and _same_regular_file(target.path, input_path):
        raise ConfigError(f"the output {path} is the input file {input_path}: the results would "
                          "overwrite the prompts; choose another output file")
    if target.kind is Kind.SPECIAL:
        if not os.access(target.path, os.W_OK):
            raise ConfigError(f"cannot write {path}: permission denied")
        return
    directory = _nearest_existing(target.path.parent)
    if not directory.is_dir():
        raise ConfigError(f"cannot write {path}: {directory} is not a directory")
    if directory != target.path.parent:  # as cp and curl -o: a missing folder is a typo more often than not
        raise ConfigError(f"cannot write {path}: the folder {target.path.parent} does not exist (create it first)")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write {path}: no permission to create files in {directory}")
    if target.path.parent.is_dir():
        try:
            fd, probe = tempfile.mkstemp(prefix=f".{target.path.name}.", suffix=".probe",
                                         dir=target.path.parent)
        except OSError as exc:
            raise ConfigError(f"cannot write {path}: {exc.strerror or exc}") from None
        os.close(fd)
        os.unlink(probe)


def _check_descriptor(path: str | Path, fd: int) -> None:
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    except OSError:
        raise ConfigError(f"cannot write {path}: file descriptor {fd} is not open") from None
    if flags & os.O_ACCMODE not in (os.O_WRONLY, os.O_RDWR):
        raise ConfigError(f"cannot write {path}: file descriptor {fd} is not open for writing")


def _same_regular_file(output: Path, input_path: str | Path) -> bool:
    if is_stdio(input_path):
        return False
    try:
        out, inp = os.stat(output), os.stat(input_path)
    except OSError:
        return False
    return stat.S_ISREG(out.st_mode) and (out.st_dev, out.st_ino) == (inp.st_dev, inp.st_ino)


def _nearest_existing(directory: Path) -> Path:
    while not directory.exists() and directory != directory.parent:
        directory = directory.parent
    return directory


def write_atomically(path: str | Path, chunks: Iterable[bytes]) -> None:
    """Write ``chunks`` to ``path``: whole or not at all for a file, in place for the rest.

    An exception from ``chunks`` (the batch is not finished, Ctrl-C) leaves an
    existing file untouched and no temporary file behind.
    """
    target = resolve(path)
    if target.kind is not Kind.FILE:
        with _open_in_place(target) as stream:
            for chunk in chunks:
                stream.write(chunk)
        return
    final = target.path
    mode = _mode_for(final)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".part", dir=final.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb", buffering=1 << 20) as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_directory(final.parent)


@contextlib.contextmanager
def open_output(path: str | Path) -> Iterator[BinaryIO]:
    """A stream to write results into as they come (``collect --follow``).

    A regular file is truncated when this opens: call :func:`check_output` and make
    sure the batch exists first.
    """
    target = resolve(path)
    if target.kind is not Kind.FILE:
        with _open_in_place(target) as stream:
            yield stream
        return
    fd = os.open(target.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    with os.fdopen(fd, "wb") as stream:
        yield stream
        stream.flush()
        os.fsync(stream.fileno())


@contextlib.contextmanager
def _open_in_place(target: Target) -> Iterator[BinaryIO]:
    if target.kind is Kind.DESCRIPTOR:
        assert target.fd is not None
        if target.fd == 1:
            sys.stdout.flush()
        fd = os.dup(target.fd)
    else:
        try:
            fd = os.open(target.path, os.O_WRONLY)
        except OSError as exc:
            raise ConfigError(f"cannot write {target.path}: {exc.strerror or exc}") from exc
    with os.fdopen(fd, "wb") as stream:
        yield stream
        stream.flush()


def default_mode() -> int:
    """The mode ``open()`` would give a new file: ``0666 & ~umask``."""
    return 0o666 & ~_umask()


def _mode_for(path: Path) -> int:
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return default_mode()


def _umask() -> int:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    current = os.umask(0o022)
    os.umask(current)
    return current


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
