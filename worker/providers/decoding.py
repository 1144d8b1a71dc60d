"""Pure, bounded decoders of a reply: content-encoding, UTF-8. No I/O; fed literal bytes.

A server decides how big its reply is and how much it expands; these decoders decide how
much of it the worker keeps. :class:`BodyDecoder` undoes ``Content-Encoding`` (gzip,
deflate) itself, never producing more than a fixed step at a time, so a 64 KB gzip bomb
never becomes 64 MB in memory: past ``max_bytes`` decoded bytes, or past ``max_ratio``
decoded bytes per compressed byte, it stops with :class:`ReplyTooLarge`.
"""

from __future__ import annotations

import codecs
import zlib
from collections.abc import Iterator

from ..errors import IncompleteReply, MalformedReply, ReplyTooLarge

STEP = 64 * 1024  # most decoded bytes produced by one inflate call
RATIO_FLOOR = 64 * 1024  # below this many decoded bytes the ratio is not judged
_GZIP = zlib.MAX_WBITS | 16
_ZLIB = zlib.MAX_WBITS
_RAW_DEFLATE = -zlib.MAX_WBITS


class BodyDecoder:
    """Undo a reply's ``Content-Encoding`` (none, gzip or deflate), bounded.

    :meth:`feed` returns the decoded bytes that fit under the limits; once a limit is
    passed it keeps returning nothing and :attr:`error` says why. The caller hands out
    what was returned, then raises :attr:`error`.
    """

    def __init__(self, content_encoding: str | None, max_bytes: int, max_ratio: float) -> None:
        codings = [c.strip().lower() for c in (content_encoding or "").split(",")]
        codings = [c for c in codings if c and c != "identity"]
        if len(codings) > 1:
            raise MalformedReply(f"the reply is encoded several times ({content_encoding}); "
                                 "only one of gzip or deflate is accepted")
        self.coding = codings[0] if codings else None
        if self.coding not in (None, "gzip", "x-gzip", "deflate"):
            raise MalformedReply(f"the reply has content-encoding {self.coding}, which was not asked for "
                                 "(only gzip and deflate are accepted)")
        self.max_bytes = max_bytes
        self.max_ratio = max_ratio
        self.decoded = 0  # bytes handed out
        self.consumed = 0  # compressed bytes inflated so far
        self.error: ReplyTooLarge | None = None
        self._inflater: zlib._Decompress | None = None
        self._head = b""  # the first bytes of a deflate body, until its format is known
        if self.coding in ("gzip", "x-gzip"):
            self._inflater = zlib.decompressobj(_GZIP)

    def feed(self, data: bytes) -> bytes:
        if self.error is not None:
            return b""
        try:
            if self.coding is None:
                return self._bounded(data)
            return self._inflate(data)
        except zlib.error as exc:
            raise MalformedReply(f"the {self.coding} reply cannot be decompressed: {exc}") from exc

    def finish(self) -> bytes:
        """The rest, at the end of the body; a compressed stream must have ended too."""
        if self.error is not None or self.coding is None:
            return b""
        try:
            tail = self._inflate(b"")
        except zlib.error as exc:
            raise MalformedReply(f"the {self.coding} reply cannot be decompressed: {exc}") from exc
        if self.error is None and self._started and not self._inflater_done:
            raise IncompleteReply(f"the {self.coding} reply ended before its compressed stream did")
        return tail

    # -- internals ---------------------------------------------------------------------

    @property
    def _started(self) -> bool:
        return self.consumed > 0 or bool(self._head)

    @property
    def _inflater_done(self) -> bool:
        return self._inflater is not None and self._inflater.eof

    def _bounded(self, data: bytes) -> bytes:
        """``data`` up to the byte cap; past it, the error."""
        room = self.max_bytes - self.decoded
        if len(data) > room:
            data = data[:room]
            self.error = ReplyTooLarge(
                f"the reply is larger than {self.max_bytes} bytes (AIVVM_BATCH_MAX_REPLY_BYTES); "
                f"the first {self.max_bytes} bytes are kept")
        self.decoded += len(data)
        return data

    def _inflate(self, data: bytes) -> bytes:
        if self._inflater is None:  # deflate: zlib-wrapped (RFC 9110) or raw, as servers send both
            self._head += data
            if len(self._head) < 2 and data:
                return b""
            if not self._head:
                return b""
            cmf, flg = self._head[0], self._head[1] if len(self._head) > 1 else 0
            wrapped = cmf & 0x0F == 8 and (cmf * 256 + flg) % 31 == 0
            self._inflater = zlib.decompressobj(_ZLIB if wrapped else _RAW_DEFLATE)
            data, self._head = self._head, b""
        assert self._inflater is not None
        out: list[bytes] = []
        pending = data
        while self.error is None:
            if self._inflater.eof:
                pending = self._inflater.unused_data + pending
                if not pending or self.coding == "deflate":
                    break  # bytes after a deflate stream are ignored, as urllib3 does
                self._inflater = zlib.decompressobj(_GZIP)  # another gzip member
            room = self.max_bytes - self.decoded
            step = min(STEP, room + 1)
            before = len(pending)
            piece = self._inflater.decompress(pending, step)
            pending = self._inflater.unconsumed_tail
            self.consumed += before - len(pending) - len(self._inflater.unused_data)
            if piece:
                out.append(self._bounded(piece))
                self._check_ratio()
            if not self._inflater.eof and not pending and len(piece) < step:
                break  # everything given was inflated: wait for more
            if not piece and len(pending) == before and not self._inflater.eof:
                break  # no progress (cannot happen with zlib; never spin)
        return b"".join(out)

    def _check_ratio(self) -> None:
        if self.error is None and self.decoded > RATIO_FLOOR and self.decoded > self.max_ratio * self.consumed:
            self.error = ReplyTooLarge(
                f"the {self.coding} reply expands more than {self.max_ratio:g} times "
                f"(AIVVM_BATCH_MAX_DECOMPRESSION_RATIO): a decompression bomb; "
                f"the first {self.decoded} bytes are kept")


def decode_utf8(chunks: Iterator[bytes]) -> Iterator[str]:
    """Decode a byte stream incrementally: a character split across chunks comes out whole.

    Bytes that are not UTF-8 become U+FFFD, one per invalid sequence, deterministically.
    A character cut by an error is dropped, never half-decoded.
    """
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for chunk in chunks:
        text = decoder.decode(chunk)
        if text:
            yield text
    tail = decoder.decode(b"", final=True)
    if tail:
        yield tail
