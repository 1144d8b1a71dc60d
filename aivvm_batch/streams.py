"""Standard error that a closed pipe cannot turn into a lost batch."""

from __future__ import annotations

import sys
from typing import IO


class Unbroken:
    """A text stream that outlives its reader: once the pipe is gone (``run ... 2>&1 | head -1``),
    what is written to it is dropped. Progress must never cost the batch its results."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream
        self.gone = False

    def write(self, text: str) -> int:
        if not self.gone:
            try:
                return self._stream.write(text)
            except BrokenPipeError:
                self.gone = True
        return len(text)

    def flush(self) -> None:
        if not self.gone:
            try:
                self._stream.flush()
            except BrokenPipeError:
                self.gone = True

    def __getattr__(self, name: str) -> object:
        return getattr(self._stream, name)


def unbroken_stderr() -> None:
    """Make ``sys.stderr`` an :class:`Unbroken` stream (for the life of the process)."""
    if not isinstance(sys.stderr, Unbroken):
        sys.stderr = Unbroken(sys.stderr)
