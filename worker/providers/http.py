"""Streaming HTTP for providers: one place where requests/urllib3/ssl errors are translated.

A provider server may be slow, broken or hostile. Here: redirects are never followed
(a 3xx is a permanent ``redirect`` error), the body is read raw and decoded by the
bounded :class:`~.decoding.BodyDecoder` (urllib3 never decompresses anything), error
bodies are read to a few KB and cleared of keys, and a certificate that is not trusted
is a permanent ``tls_error``.
"""

from __future__ import annotations

import math
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from email.utils import parsedate_to_datetime
from typing import Any

import requests
import urllib3.exceptions

from ..errors import (
    IncompleteReply,
    ProviderError,
    ProviderHTTPError,
    ProviderTimeout,
    ProviderTransportError,
    RedirectError,
    TLSError,
)
from .base import CompletionCall
from .credentials import redact, withheld_hint
from .decoding import BodyDecoder, decode_utf8

READ_SIZE = 65536
ERROR_BODY_LIMIT = 4096  # decoded bytes of an error body kept
ERROR_RAW_LIMIT = 65536  # raw bytes of an error body read at most
MAX_RETRY_AFTER = 3600.0
ACCEPT_ENCODING = "gzip, deflate"  # what BodyDecoder undoes; never br or zstd
ErrorParser = Callable[[int, str, float | None], ProviderHTTPError]
TypeCheck = Callable[[str], None]

_local = threading.local()


def session() -> requests.Session:
    """One keep-alive session per thread (requests sessions are not thread-safe)."""
    s = getattr(_local, "session", None)
    if s is None:
        s = _local.session = requests.Session()
        adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=4, max_retries=0)
        s.mount("http://", adapter)
        s.mount("https://", adapter)
    return s


def post_stream(url: str, body: dict[str, Any], headers: dict[str, str], call: CompletionCall,
                parse_error: ErrorParser, check_type: TypeCheck | None = None) -> Iterator[bytes]:
    """POST ``body`` and yield the reply's decoded bytes as they arrive.

    ``check_type`` gets the media type of a 200 answer and raises if it is no reply.
    """
    remaining = call.remaining()
    if remaining is not None and remaining <= 0:
        raise ProviderTimeout("the item deadline passed before the request")
    read_timeout = call.read_timeout if remaining is None else min(call.read_timeout, remaining)
    headers = {**headers, "accept-encoding": ACCEPT_ENCODING}
    try:
        response = session().post(url, json=body, headers=headers, stream=True, allow_redirects=False,
                                  timeout=(call.connect_timeout, read_timeout))
    except requests.exceptions.ConnectTimeout as exc:
        raise ProviderTimeout(f"connect timeout after {call.connect_timeout:g}s") from exc
    except requests.exceptions.ReadTimeout as exc:
        raise ProviderTimeout(f"no reply within {read_timeout:g}s") from exc
    except requests.exceptions.RequestException as exc:
        raise _connection_error(url, exc) from exc
    with response:
        status = response.status_code
        if 300 <= status < 400:
            location = one_line(redact(response.headers.get("location") or "", [call.api_key]))[:300]
            raise RedirectError(status, location or None)
        if status != 200:
            text = redact(_read_error_body(response, call) or response.reason or "", [call.api_key])
            error = parse_error(status, text, retry_after(response.headers.get("retry-after")))
            hint = withheld_hint(call.key_withheld)
            if status in (401, 403) and hint:
                error.add_detail(hint)
            raise error
        if check_type is not None:
            check_type(media_type(response.headers.get("content-type")))
        yield from _read_body(response, call, read_timeout)


def media_type(content_type: str | None) -> str:
    """``text/html; charset=utf-8`` -> ``text/html``; no header -> ``""``."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def _read_body(response: requests.Response, call: CompletionCall, read_timeout: float) -> Iterator[bytes]:
    decoder = BodyDecoder(response.headers.get("content-encoding"), call.max_reply_bytes,
                          call.max_decompression_ratio)
    raw = response.raw
    while True:
        try:
            data = raw.read1(READ_SIZE, decode_content=False)
        except urllib3.exceptions.ReadTimeoutError as exc:
            raise ProviderTimeout(f"the reply stalled for more than {read_timeout:g}s") from exc
        except (urllib3.exceptions.ProtocolError, OSError) as exc:
            raise IncompleteReply(f"the connection broke before the reply ended: {_reason(exc)}") from exc
        decoded = decoder.feed(data) if data else decoder.finish()
        if decoded:
            yield decoded
        if decoder.error is not None:
            raise decoder.error
        if not data:
            return
        if call.deadline is not None and time.monotonic() > call.deadline:
            raise ProviderTimeout("the item deadline passed while the reply was streaming")


def _read_error_body(response: requests.Response, call: CompletionCall) -> str:
    """The start of an error body: a courtesy, bounded, whose loss must not hide the status."""
    kept: list[bytes] = []
    size = read = 0
    try:
        decoder = BodyDecoder(response.headers.get("content-encoding"), ERROR_BODY_LIMIT,
                              call.max_decompression_ratio)
        while size < ERROR_BODY_LIMIT and read < ERROR_RAW_LIMIT and decoder.error is None:
            data = response.raw.read1(READ_SIZE, decode_content=False)
            if not data:
                kept.append(decoder.finish())
                break
            read += len(data)
            piece = decoder.feed(data)
            size += len(piece)
            kept.append(piece)
            if call.deadline is not None and time.monotonic() > call.deadline:
                break
    except Exception:  # noqa: BLE001 - an unreadable error body is no reason to lose the status
        pass
    return one_line(b"".join(kept)[:ERROR_BODY_LIMIT].decode("utf-8", errors="replace"))


def one_line(text: str) -> str:
    """Server text fit for a one-line message: no control characters, whitespace collapsed."""
    return " ".join("".join(c if c.isprintable() else " " for c in text).split())


def _connection_error(url: str, exc: requests.exceptions.RequestException) -> ProviderError:
    """A failure to connect: a TLS refusal is permanent, anything else transient."""
    cause = _ssl_cause(exc)
    if isinstance(exc, requests.exceptions.SSLError) or cause is not None:
        if not isinstance(cause, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
            return TLSError(f"TLS error with {url}: {_tls_reason(cause, exc)} "
                            "(a certificate or TLS failure is not retried)")
    return ProviderTransportError(f"cannot reach {url}: {_reason(exc)}")


def _ssl_cause(exc: BaseException) -> ssl.SSLError | None:
    """The ``ssl`` error somewhere under a requests/urllib3 exception, if any."""
    seen: set[int] = set()
    todo: list[object] = [exc]
    while todo:
        current = todo.pop()
        if not isinstance(current, BaseException) or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, ssl.SSLError):
            return current
        todo += [current.__cause__, current.__context__, getattr(current, "reason", None), *current.args]
    return None


def _tls_reason(cause: ssl.SSLError | None, exc: BaseException) -> str:
    if isinstance(cause, ssl.SSLCertVerificationError):
        return f"the server's certificate is not trusted: {cause.verify_message or cause.reason}"
    if cause is not None:
        return f"the TLS handshake failed: {cause.reason or cause}"
    return _reason(exc)


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


def _reason(exc: BaseException) -> str:
    while exc.__context__ is not None and str(exc) == "":
        exc = exc.__context__
    text = str(exc)
    return text[:300] if text else type(exc).__name__


__all__ = ["ProviderError", "decode_utf8", "media_type", "post_stream", "retry_after", "session"]
