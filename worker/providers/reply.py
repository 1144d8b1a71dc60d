"""Reading a 200 answer, free of I/O: the bounded body decoder, then the protocol's parser.

A transport hands raw (possibly compressed) bytes to :class:`ReplyReader`; the reader
yields the provider's items (text chunks, then a :class:`StreamEnd`) and raises the
worker's errors after handing out what came before them, so a reply cut at the size cap
keeps its text up to the cap.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Protocol

from ..errors import ProviderError
from .call import CompletionCall, Item, StreamEnd
from .credentials import redact
from .decoding import BodyDecoder
from .exchange import Head

TRAILING_LIMIT = 65536  # bytes after a complete reply read (to keep the connection) at most
TypeCheck = Callable[[str], None]  # raises if a 200's media type is no reply of the protocol


class ReplyParser(Protocol):
    """A protocol's parser of decoded reply bytes: appends items to ``out``, may raise."""

    @property
    def complete(self) -> bool:
        """The reply said it ended (bytes after that are ignored)."""

    def feed(self, data: bytes, out: list[Item]) -> None: ...

    def finish(self, out: list[Item]) -> None:
        """At the end of the body: the rest, or the error of a reply that did not end right."""


class ReplyReader:
    """One 200 answer: :meth:`start` with its head, :meth:`feed` raw bytes, :meth:`finish`."""

    def __init__(self, call: CompletionCall, parser: ReplyParser, check_type: TypeCheck | None = None) -> None:
        self.call = call
        self.parser = parser
        self.check_type = check_type
        self._decoder: BodyDecoder | None = None  # made by start(), from the head
        self._request_id: str | None = None  # the 200's x-request-id
        self.trailing = 0  # raw bytes after the reply was complete

    def start(self, head: Head) -> None:
        """The head of the 200: is it a reply of this protocol, and how is it encoded?"""
        if self.check_type is not None:
            self.check_type(head.media_type)
        self._request_id = redact(head.request_id, [self.call.api_key]) if head.request_id else None
        self._decoder = BodyDecoder(head.content_encoding, self.call.max_reply_bytes,
                                    self.call.max_decompression_ratio)

    @property
    def decoder(self) -> BodyDecoder:
        """The body's decoder; a body fed without a head is read as not encoded."""
        if self._decoder is None:
            self._decoder = BodyDecoder(None, self.call.max_reply_bytes, self.call.max_decompression_ratio)
        return self._decoder

    @property
    def stopped(self) -> bool:
        """Stop reading: the reply is complete and the server keeps sending."""
        return self.trailing > TRAILING_LIMIT

    def feed(self, raw: bytes) -> Iterator[Item]:
        if self.parser.complete:
            self.trailing += len(raw)
            return
        out: list[Item] = []
        error: ProviderError | None = None
        decoder = self.decoder
        try:
            data = decoder.feed(raw)
            if data:
                self.parser.feed(data, out)
            error = decoder.error
        except ProviderError as exc:
            error = exc
        yield from out
        if error is not None:
            raise error

    def finish(self) -> Iterator[Item]:
        out: list[Item] = []
        error: ProviderError | None = None
        try:
            if not self.parser.complete:
                data = self.decoder.finish()
                if data:
                    self.parser.feed(data, out)
            error = self.decoder.error
            if error is None:
                self.parser.finish(out)
        except ProviderError as exc:
            error = exc
        if self._request_id is not None and out and isinstance(out[-1], StreamEnd):
            out[-1] = replace(out[-1], request_id=self._request_id)
        yield from out
        if error is not None:
            raise error
