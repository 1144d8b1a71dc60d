"""Streaming HTTP for providers: one place where requests/urllib3 errors are translated."""

from __future__ import annotations

import codecs
import math
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
)
from .base import CompletionCall

READ_SIZE = 65536
ERROR_BODY_LIMIT = 4096
MAX_RETRY_AFTER = 3600.0
ErrorParser = Callable[[int, str, float | None], ProviderHTTPError]

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
                parse_error: ErrorParser) -> Iterator[bytes]:
    """POST ``body`` and yield the raw reply bytes as they arrive."""
    remaining = call.remaining()
    if remaining is not None and remaining <= 0:
        raise ProviderTimeout("the item deadline passed before the request")
    read_timeout = call.read_timeout if remaining is None else min(call.read_timeout, remaining)
    try:
        response = session().post(url, json=body, headers=headers, stream=True,
                                  timeout=(call.connect_timeout, read_timeout))
    except requests.exceptions.ConnectTimeout as exc:
        raise ProviderTimeout(f"connect timeout after {call.connect_timeout:g}s") from exc
    except requests.exceptions.ReadTimeout as exc:
        raise ProviderTimeout(f"no reply within {read_timeout:g}s") from exc
    except requests.exceptions.RequestException as exc:
        raise ProviderTransportError(f"cannot reach {url}: {_reason(exc)}") from exc
    with response:
        if response.status_code != 200:
            text = _read_error_body(response)
            raise parse_error(response.status_code, text or response.reason or "",
                              retry_after(response.headers.get("retry-after")))
        yield from _read_body(response, call, read_timeout)


def _read_body(response: requests.Response, call: CompletionCall, read_timeout: float) -> Iterator[bytes]:
    raw = response.raw
    while True:
        try:
            data = raw.read1(READ_SIZE, decode_content=True)
        except urllib3.exceptions.ReadTimeoutError as exc:
            raise ProviderTimeout(f"the reply stalled for more than {read_timeout:g}s") from exc
        except (urllib3.exceptions.ProtocolError, urllib3.exceptions.DecodeError, OSError) as exc:
            raise IncompleteReply(f"the connection broke before the reply ended: {_reason(exc)}") from exc
        if not data:
            return
        yield data
        if call.deadline is not None and time.monotonic() > call.deadline:
            raise ProviderTimeout("the item deadline passed while the reply was streaming")


def _read_error_body(response: requests.Response) -> str:
    try:
        data = response.raw.read(ERROR_BODY_LIMIT, decode_content=True)
    except Exception:  # the error body is a courtesy; its loss must not hide the status
        return ""
    return data.decode("utf-8", errors="replace").strip()


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


def decode_utf8(chunks: Iterator[bytes]) -> Iterator[str]:
    """Decode a byte stream incrementally: a character split across chunks comes out whole.

    Bytes that are not UTF-8 become U+FFFD, one per invalid sequence, deterministically.
    """
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for chunk in chunks:
        text = decoder.decode(chunk)
        if text:
            yield text
    tail = decoder.decode(b"", final=True)
    if tail:
        yield tail


def _reason(exc: BaseException) -> str:
    while exc.__context__ is not None and str(exc) == "":
        exc = exc.__context__
    text = str(exc)
    return text[:300] if text else type(exc).__name__


__all__ = ["ProviderError", "decode_utf8", "post_stream", "retry_after", "session"]
