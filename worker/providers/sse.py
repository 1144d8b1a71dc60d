"""A bounded reader of server-sent events, fed text as it arrives: no I/O."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from ..errors import ReplyTooLarge


class SSEParser:
    """The ``data`` payloads of an event stream, one per event.

    A line, or an event, longer than ``max_chars`` raises :class:`ReplyTooLarge`: a line
    that never ends must not grow without bound. Events found before the limit was
    passed are yielded first.
    """

    def __init__(self, max_chars: int | None = None) -> None:
        self.max_chars = max_chars
        self._pending: list[str] = []  # pieces of the line not ended yet
        self._pending_chars = 0
        self._data: list[str] = []
        self._data_chars = 0

    def feed(self, text: str) -> Iterator[str]:
        start = 0
        while (end := text.find("\n", start)) >= 0:
            line = "".join(self._pending) + text[start:end] if self._pending else text[start:end]
            self._pending, self._pending_chars, start = [], 0, end + 1
            line = line.rstrip("\r")
            if not line:
                if self._data:
                    yield "\n".join(self._data)
                    self._data, self._data_chars = [], 0
            elif line.startswith("data:"):
                self._data.append(line[5:].removeprefix(" "))
                self._data_chars += len(self._data[-1])
                self._check_size(self._data_chars)
        if start < len(text):
            self._pending.append(text[start:])
            self._pending_chars += len(text) - start
            self._check_size(self._pending_chars + self._data_chars)

    def finish(self) -> Iterator[str]:
        """The last event, when the stream ended without a blank line after it."""
        line = "".join(self._pending)
        self._pending, self._pending_chars = [], 0
        if line.startswith("data:"):
            self._data.append(line[5:].removeprefix(" ").rstrip("\r"))
        if self._data:
            yield "\n".join(self._data)
            self._data, self._data_chars = [], 0

    def _check_size(self, chars: int) -> None:
        if self.max_chars is not None and chars > self.max_chars:
            raise ReplyTooLarge(f"an event of the stream is longer than {self.max_chars} characters "
                                "(AIVVM_BATCH_MAX_REPLY_BYTES)")


def sse_data(texts: Iterable[str], max_chars: int | None = None) -> Iterator[str]:
    """The ``data`` payloads of an event stream given as pieces of text."""
    parser = SSEParser(max_chars)
    for text in texts:
        yield from parser.feed(text)
    yield from parser.finish()
