"""One HTTP exchange with a provider, free of I/O: shared by the synchronous and the
asynchronous transport, which only move bytes.

Here: the request's bytes, what the head of an answer means (a 3xx is a permanent
``redirect`` error naming its Location; any other non-200 an HTTP error built from a
bounded error body, cleared of keys), Retry-After, the item deadline, and which failures
to connect are permanent (an untrusted certificate) or transient (anything else).
"""

from __future__ import annotations

import errno
import json
import math
import socket
import ssl
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any

from ..errors import (
    ProviderError,
    ProviderHTTPError,
    ProviderTimeout,
    ProviderTransportError,
    RedirectError,
    TLSError,
)
from .call import CompletionCall
from .credentials import redact, withheld_hint
from .decoding import BodyDecoder
from .ratelimits import RateHeaders, parse_rate_headers, retry_after_ms

READ_SIZE = 65536
ERROR_BODY_LIMIT = 4096  # decoded bytes of an error body kept
ERROR_RAW_LIMIT = 65536  # raw bytes of an error body read at most
MAX_RETRY_AFTER = 3600.0
ACCEPT_ENCODING = "gzip, deflate"  # what BodyDecoder undoes; never br or zstd
ErrorParser = Callable[[int, str, "float | None"], ProviderHTTPError]
_JSON = json.JSONEncoder(allow_nan=False)  # json.dumps(body, allow_nan=False) builds one per call


@dataclass(frozen=True)
class HTTPRequest:
    """What a provider sends: built once, sent by either transport."""

    url: str
    body: dict[str, Any]
    headers: dict[str, str]


@dataclass(frozen=True)
class Head:
    """The head of an answer, as every transport sees it."""

    status: int
    reason: str = ""
    content_type: str | None = None
    content_encoding: str | None = None
    location: str | None = None
    retry_after: str | None = None
    request_id: str | None = None
    retry_after_ms: str | None = None
    # what the headers said of the provider's rate limits (worker.provider_pace learns from them)
    limits: RateHeaders | None = None

    @classmethod
    def of(cls, status: int, reason: str | None, headers: Mapping[str, str]) -> Head:
        """From a transport's case-insensitive header mapping."""
        request_id = headers.get("x-request-id")
        return cls(status, reason or "", headers.get("content-type"), headers.get("content-encoding"),
                   headers.get("location"), headers.get("retry-after"),
                   one_line(request_id)[:200] if request_id else None, headers.get("retry-after-ms"),
                   parse_rate_headers(headers))

    def wait(self) -> float | None:
        """When the server asks to be called again: ``retry-after-ms``, ``Retry-After``, else (a
        429 that said neither) when its rate limit resets."""
        seconds = retry_after_ms(self.retry_after_ms)
        if seconds is None:
            seconds = retry_after(self.retry_after)
        if seconds is None and self.status == 429 and self.limits is not None:
            seconds = self.limits.wait()
        return seconds

    @property
    def media_type(self) -> str:
        return media_type(self.content_type)


OnReply = Callable[[Head], None]  # told the head of a 200 before its first byte
OnHead = Callable[[str, Head], None]  # told every head, with the provider's scope


def encode_body(body: dict[str, Any]) -> bytes:
    """The JSON body's bytes (as requests would send ``json=``: no NaN, ASCII-escaped)."""
    return _JSON.encode(body).encode("utf-8")


def request_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The provider's headers plus the encodings :class:`BodyDecoder` undoes."""
    return {**headers, "accept-encoding": ACCEPT_ENCODING}


def read_timeout(call: CompletionCall) -> float:
    """Seconds a read may wait: the call's read timeout, shortened to the item deadline.

    Raises :class:`ProviderTimeout` when the deadline has passed: no request is sent.
    """
    remaining = call.remaining()
    if remaining is not None and remaining <= 0:
        raise ProviderTimeout("the item deadline passed before the request")
    return call.read_timeout if remaining is None else min(call.read_timeout, remaining)


def past_deadline(call: CompletionCall) -> bool:
    return call.deadline is not None and time.monotonic() > call.deadline


def check_streaming_deadline(call: CompletionCall) -> None:
    if past_deadline(call):
        raise ProviderTimeout("the item deadline passed while the reply was streaming")


def redirect_error(head: Head, call: CompletionCall) -> RedirectError:
    location = one_line(redact(head.location or "", [call.api_key]))[:300]
    return RedirectError(head.status, location or None)


def http_error(head: Head, body_text: str, call: CompletionCall, parse_error: ErrorParser) -> ProviderHTTPError:
    """The error of a non-2xx answer, from the start of its body (else the reason phrase).

    The body is also kept as the server sent it (parsed JSON, else its text; cleared of keys),
    with the answer's x-request-id, for OpenAI's output form.
    """
    raw = redact(body_text, [call.api_key])
    text = one_line(raw) or redact(head.reason, [call.api_key])
    error = parse_error(head.status, text, head.wait())
    error.kind = redact(error.kind, [call.api_key])
    body = verbatim(raw)
    if call.api_key and call.api_key in json.dumps(body, ensure_ascii=False):
        body = raw  # the key was written in JSON escapes: the cleared text instead
    error.body = body
    error.request_id = redact(head.request_id, [call.api_key]) if head.request_id else None
    hint = withheld_hint(call.key_withheld)
    if head.status in (401, 403) and hint:
        error.add_detail(hint)
    return error


class ErrorBody:
    """The start of an error body: a courtesy, bounded, whose loss must not hide the status.

    The transport feeds raw bytes while :attr:`done` is false (``b""`` at the end) and
    stops at the first failure to read; then :meth:`text` is one clean line.
    """

    def __init__(self, head: Head, call: CompletionCall) -> None:
        self.done = False
        self._kept: list[bytes] = []
        self._size = self._read = 0
        self._decoder: BodyDecoder | None = None
        try:
            self._decoder = BodyDecoder(head.content_encoding, ERROR_BODY_LIMIT, call.max_decompression_ratio)
        except ProviderError:
            self.done = True

    def feed(self, raw: bytes) -> None:
        if self.done or self._decoder is None:
            return
        try:
            if not raw:
                self._kept.append(self._decoder.finish())
                self.done = True
                return
            self._read += len(raw)
            piece = self._decoder.feed(raw)
        except ProviderError:
            self.done = True
            return
        self._size += len(piece)
        self._kept.append(piece)
        self.done = (self._size >= ERROR_BODY_LIMIT or self._read >= ERROR_RAW_LIMIT
                     or self._decoder.error is not None)

    def text(self) -> str:
        """The body's start as the server sent it (decoded; bounded)."""
        return b"".join(self._kept)[:ERROR_BODY_LIMIT].decode("utf-8", errors="replace")


def verbatim(text: str) -> Any:
    """An error body as it came: its JSON value if it is JSON, else its text (None if empty)."""
    if not text.strip():
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


def media_type(content_type: str | None) -> str:
    """``text/html; charset=utf-8`` -> ``text/html``; no header -> ``""``."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def one_line(text: str) -> str:
    """Server text fit for a one-line message: no control characters, whitespace collapsed."""
    if text.isprintable() and "  " not in text and text.strip() == text:  # most are (request ids)
        return text
    return " ".join("".join(c if c.isprintable() else " " for c in text).split())


def retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (seconds or an HTTP date), capped at an hour."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return min(max(0.0, seconds), MAX_RETRY_AFTER) if math.isfinite(seconds) else None
    try:
        seconds = parsedate_to_datetime(value).timestamp() - time.time()
    except (TypeError, ValueError, OverflowError):
        return None
    return min(max(0.0, seconds), MAX_RETRY_AFTER)


def connection_error(url: str, exc: BaseException, tls: bool = False) -> ProviderError:
    """A failure to connect: a TLS refusal is permanent, anything else transient.

    ``tls`` says the transport itself called it a TLS failure; otherwise an ``ssl`` error
    anywhere under ``exc`` does.
    """
    cause = ssl_cause(exc)
    if (tls or cause is not None) and not isinstance(cause, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
        return TLSError(f"TLS error with {url}: {_tls_reason(cause, exc)} "
                        "(a certificate or TLS failure is not retried)")
    said = os_cause(exc)
    if said is not None:  # the cause first: a progress line cuts the end of a long message
        return ProviderTransportError(f"{said}: cannot reach {url}")
    return ProviderTransportError(f"cannot reach {url}: {reason(exc)}")


def os_cause(exc: BaseException) -> str | None:
    """``connection refused``, ``name not resolved``...: the operating system's word for a failure to
    connect, found under a transport's exception (aiohttp's and requests' texts bury it)."""
    for current in _under(exc):
        if isinstance(current, socket.gaierror):
            return "name not resolved"
        if isinstance(current, OSError) and current.errno in _OS_CAUSES:
            return _OS_CAUSES[current.errno]
    return None


_OS_CAUSES = {errno.ECONNREFUSED: "connection refused", errno.ECONNRESET: "connection reset",
              errno.EHOSTUNREACH: "host unreachable", errno.ENETUNREACH: "network unreachable",
              errno.ETIMEDOUT: "connect timed out"}


def ssl_cause(exc: BaseException) -> ssl.SSLError | None:
    """The ``ssl`` error somewhere under a transport's exception, if any."""
    for current in _under(exc):
        if isinstance(current, ssl.SSLError) and type(current).__module__ == "ssl":
            return current  # the ssl module's own error, not a transport's subclass of it
    return None


def _under(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and every exception it wraps: causes, contexts, the transports' own fields, arguments."""
    seen: set[int] = set()
    todo: list[object] = [exc]
    while todo:
        current = todo.pop()
        if not isinstance(current, BaseException) or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        todo += [current.__cause__, current.__context__, getattr(current, "reason", None),
                 getattr(current, "os_error", None), getattr(current, "certificate_error", None),
                 *current.args]


def _tls_reason(cause: ssl.SSLError | None, exc: BaseException) -> str:
    detail = (getattr(cause, "verify_message", None) or getattr(cause, "reason", None) or cause) if cause else None
    if isinstance(cause, ssl.SSLCertVerificationError):
        return f"the server's certificate is not trusted: {detail}"
    if cause is not None:
        return f"the TLS handshake failed: {getattr(cause, 'reason', None) or cause}"
    return reason(exc)


def reason(exc: BaseException) -> str:
    """A short text for ``exc``: its message, else its cause's, else its type's name."""
    while exc.__context__ is not None and str(exc) == "":
        exc = exc.__context__
    text = one_line(str(exc))
    return text[:300] if text else type(exc).__name__
