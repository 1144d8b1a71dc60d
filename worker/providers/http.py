"""The synchronous transport (``requests``): one place where requests/urllib3 errors are translated.

It only moves bytes: what an answer means is decided in :mod:`.exchange` and
:mod:`.reply`, shared with the asynchronous transport (:mod:`.aio`). Redirects are never
followed, urllib3 never decompresses anything (the raw body goes to the bounded
:class:`~.decoding.BodyDecoder`), and the environment's proxies are honoured
(``HTTP(S)_PROXY``, ``NO_PROXY``), as requests does.
"""

from __future__ import annotations

import http.cookiejar
import threading
from collections.abc import Generator
from typing import Any

import requests
import urllib3.exceptions

from ..errors import ConnectTimeout, IncompleteReply, ProviderError, ProviderTimeout
from .call import CompletionCall
from .decoding import decode_utf8
from .exchange import (
    READ_SIZE,
    ErrorBody,
    ErrorParser,
    Head,
    OnReply,
    check_streaming_deadline,
    connection_error,
    encode_body,
    http_error,
    media_type,
    one_line,
    past_deadline,
    read_timeout,
    reason,
    redirect_error,
    request_headers,
    retry_after,
)

_local = threading.local()


def session() -> requests.Session:
    """One keep-alive session per thread (requests sessions are not thread-safe), keeping no cookies."""
    s = getattr(_local, "session", None)
    if s is None:
        s = _local.session = requests.Session()
        # no cookies: a server's cookie must not ride along with other batches' items
        s.cookies.set_policy(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
        adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=4, max_retries=0)
        s.mount("http://", adapter)
        s.mount("https://", adapter)
    return s


def post_stream(url: str, body: dict[str, Any], headers: dict[str, str], call: CompletionCall,
                parse_error: ErrorParser, on_reply: OnReply | None = None) -> Generator[bytes, None, None]:
    """POST ``body`` and yield the raw (still encoded) bytes of a 200 as they arrive.

    ``on_reply`` is told the 200's head before its first byte (and may refuse it).
    """
    timeout = read_timeout(call)
    try:
        response = session().post(url, data=encode_body(body), headers=request_headers(headers),
                                  stream=True, allow_redirects=False, timeout=(call.connect_timeout, timeout))
    except requests.exceptions.ConnectTimeout as exc:
        raise ConnectTimeout(f"connect timeout after {call.connect_timeout:g}s") from exc
    except requests.exceptions.ReadTimeout as exc:
        raise ProviderTimeout(f"no reply within {timeout:g}s") from exc
    except requests.exceptions.RequestException as exc:
        raise connection_error(url, exc, tls=isinstance(exc, requests.exceptions.SSLError)) from exc
    with response:
        head = Head.of(response.status_code, response.reason, response.headers)
        if 300 <= head.status < 400:
            raise redirect_error(head, call)
        if head.status != 200:
            raise http_error(head, _error_body(response, head, call), call, parse_error)
        if on_reply is not None:
            on_reply(head)
        raw = response.raw
        while True:
            try:
                data = raw.read1(READ_SIZE, decode_content=False)
            except urllib3.exceptions.ReadTimeoutError as exc:
                raise ProviderTimeout(f"the reply stalled for more than {timeout:g}s") from exc
            except (urllib3.exceptions.ProtocolError, OSError) as exc:
                raise IncompleteReply(f"the connection broke before the reply ended: {reason(exc)}") from exc
            if not data:
                return
            yield data
            check_streaming_deadline(call)


def _error_body(response: requests.Response, head: Head, call: CompletionCall) -> str:
    body = ErrorBody(head, call)
    try:
        while not body.done and not past_deadline(call):
            body.feed(response.raw.read1(READ_SIZE, decode_content=False))
    except Exception:  # noqa: BLE001 - an unreadable error body is no reason to lose the status
        body.done = True
    return body.text()


__all__ = ["ProviderError", "decode_utf8", "media_type", "one_line", "post_stream", "retry_after", "session"]
