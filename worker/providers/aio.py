"""The asynchronous transport: one :class:`AsyncHTTP` per event loop, one connection pool.

On httptools over asyncio's protocols (:mod:`.aio_httptools`; aiohttp for proxies), chosen by
measurement (``bench/http_clients.py``): about half aiohttp's CPU per item answered at once;
httpx's pool scans every connection for each request, so its cost per request grows with the
pool (20-60 times aiohttp's CPU per item at 256 to 1,024 connections).

It only moves bytes, like the synchronous :mod:`.http`: what an answer means is decided
in :mod:`.exchange` and :mod:`.reply`. The pool never holds more than ``max_connections``
connections (a request waits for a free one, at most until its item deadline); redirects
are never followed; nothing is decompressed here (the raw body goes to the bounded
:class:`~.decoding.BodyDecoder`); the environment's proxies are honoured
(``HTTP(S)_PROXY``, ``NO_PROXY``), as requests does on the synchronous path.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any, Protocol

from .aio_httptools import HttptoolsTransport
from .call import CompletionCall
from .exchange import (
    ErrorBody,
    ErrorParser,
    Head,
    OnHead,
    OnReply,
    encode_body,
    http_error,
    past_deadline,
    read_timeout,
    redirect_error,
    request_headers,
)


class Response(Protocol):
    """An answer whose head has arrived; its body read piece by piece."""

    head: Head

    async def read(self) -> bytes:
        """The next raw bytes as they arrive; ``b""`` at the end. Raises the worker's errors."""

    async def close(self) -> None:
        """Give the connection back (kept alive if the body was read to its end)."""


class Transport(Protocol):
    def __init__(self, max_connections: int) -> None: ...

    async def open(self, url: str, data: bytes, headers: dict[str, str], call: CompletionCall,
                   read_timeout: float) -> Response:
        """Send the request and wait for the head. Raises the worker's errors."""

    async def aclose(self) -> None: ...


class AsyncHTTP:
    """Streaming POSTs on the running event loop, through one pool of ``max_connections``."""

    def __init__(self, max_connections: int, on_head: OnHead | None = None,
                 transport: type[Transport] = HttptoolsTransport) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self.max_connections = max_connections
        self.on_head = on_head
        self._transport: Transport = transport(max_connections)

    async def open_stream(self, url: str, body: dict[str, Any], headers: dict[str, str], call: CompletionCall,
                          parse_error: ErrorParser, on_reply: OnReply | None = None, scope: str = "") -> Response:
        """POST ``body`` and return a 200 whose head has arrived, its raw (still encoded) body
        to read (:meth:`Response.read`; then :meth:`Response.close`, on every path).

        A 3xx raises ``RedirectError``, another non-200 the provider's HTTP error (from
        the start of its body); ``on_reply`` is told the 200's head before its first byte, the
        pool's ``on_head`` every head, with the provider's ``scope`` (its rate limits are learned).
        """
        timeout = read_timeout(call)
        response = await self._transport.open(url, encode_body(body), request_headers(headers), call, timeout)
        try:
            head = response.head
            if self.on_head is not None:
                self.on_head(scope, head)
            if 300 <= head.status < 400:
                raise redirect_error(head, call)
            if head.status != 200:
                raise http_error(head, await _error_body(response, call), call, parse_error)
            if on_reply is not None:
                on_reply(head)
        except BaseException:
            await response.close()
            raise
        return response

    async def aclose(self) -> None:
        await self._transport.aclose()

    async def __aenter__(self) -> AsyncHTTP:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        trace: TracebackType | None) -> None:
        await self.aclose()


async def _error_body(response: Response, call: CompletionCall) -> str:
    body = ErrorBody(response.head, call)
    try:
        while not body.done and not past_deadline(call):
            body.feed(await response.read())
    except Exception:  # noqa: BLE001 - an unreadable error body is no reason to lose the status
        body.done = True
    return body.text()


__all__ = ["AsyncHTTP"]
