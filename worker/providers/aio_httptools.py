"""The asynchronous transport on asyncio's protocols and httptools (llhttp, uvicorn's parser).

Chosen by measurement over aiohttp's client (``python bench/http_clients.py``): the same
streamed POSTs answered at once cost about half the CPU an item (aiohttp builds a request
object, a writer task, a timeout handle per read and its own header multidicts for each).
Here a request is one write of bytes, its answer is parsed by llhttp on the protocol's
callbacks, and a read waits with a timer only when no bytes are buffered.

It keeps aiohttp's contract (:class:`~.aio.Transport`): at most ``max_connections``
connections (a request waits for a free one until its item deadline), keep-alive reuse only
of an answer read to its end, no redirect followed, nothing decompressed, bounded heads and
buffers. A URL the environment routes through a proxy, or that carries credentials, goes to
aiohttp (:mod:`.aio_aiohttp`), which speaks to proxies.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import ssl
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import httptools

from ..errors import ConnectTimeout, IncompleteReply, ProviderTimeout
from .call import CompletionCall
from .exchange import Head, connection_error, past_deadline, reason
from .proxies import EnvironmentProxies, environment_proxy
from .request_head import Key as _Key
from .request_head import header_lines, plain, request_start

if TYPE_CHECKING:  # imported when a proxied URL first comes (aiohttp is a tenth of the worker's start-up)
    from .aio_aiohttp import AiohttpResponse, AiohttpTransport

HEAD_LIMIT = 65536  # bytes of an answer's head, trailers and chunk lines (aiohttp: 8190 a line)
HEADERS_LIMIT = 128  # header and trailer lines of an answer (aiohttp's own bound)
CHUNK_LINE_ALLOWANCE = 64  # bytes a chunk's size line and its ends may add to the bound
PAUSE_ABOVE = 1 << 20  # raw body bytes buffered before the socket is no longer read
KEEP_IDLE_SECONDS = 15.0  # an idle connection older than this is closed, not reused (as aiohttp)
_TIMED_OUT = object()


class _Spill(Exception):
    """Bytes past the end of the answer: they are no one's, and the connection is not reused."""


class _Exchange:
    """One request's answer as the parser sees it."""

    __slots__ = ("status", "reason", "headers", "lines", "fed", "body_bytes", "chunk_lines", "head_done",
                 "chunks", "buffered", "ended", "error", "keep_alive", "until_eof", "informational")

    def __init__(self) -> None:
        self.status = 0
        self.reason: list[bytes] = []
        self.headers: dict[str, str] = {}
        self.lines = 0  # header and trailer lines
        self.fed = 0  # bytes given to the parser
        self.body_bytes = 0
        self.chunk_lines = 0
        self.head_done = False
        self.chunks: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.ended = False
        self.error: BaseException | None = None
        self.keep_alive = False
        self.until_eof = False  # no Content-Length and not chunked: the body ends with the connection
        self.informational = False

    def overhead(self) -> int:
        """What the answer carried besides its body, over what its chunks' size lines may take."""
        return self.fed - self.body_bytes - CHUNK_LINE_ALLOWANCE * self.chunk_lines


class _Connection(asyncio.Protocol):
    """One keep-alive connection: the parser's callbacks fill the current exchange."""

    def __init__(self, pool: _Pool, key: _Key) -> None:
        self.pool = pool
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        # as aiohttp's parser of answers: what servers in the field send
        self.parser.set_dangerous_leniencies(lenient_headers=True, lenient_optional_cr_before_lf=True,
                                             lenient_spaces_after_chunk_size=True)
        self.exchange: _Exchange | None = None
        self.waiter: asyncio.Future[object] | None = None
        self.lost = False
        self.paused = False
        self.reusable = True
        self.idle_since = 0.0

    # -- asyncio's side

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        ex = self.exchange
        if ex is None:  # idle in the pool: the server closed it
            self.pool.discard(self)
            return
        if not ex.ended and ex.error is None:
            if ex.head_done and ex.until_eof and exc is None:  # a reset is no end
                ex.ended = True
            else:
                ex.error = exc or ConnectionResetError("the server closed the connection")
        self._wake()

    def data_received(self, data: bytes) -> None:
        ex = self.exchange
        if ex is None or ex.ended or ex.error is not None:  # bytes nobody asked for: not reusable
            self.reusable = False
            self.close()
            return
        ex.fed += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            ex.error = ValueError("the server switched protocols")
        except httptools.HttpParserError as exc:
            if isinstance(exc.__context__, _Spill):
                self.reusable = False
            else:
                ex.error = ValueError(f"malformed answer: {exc.__context__ or exc}")
        if ex.error is None and (ex.overhead() > HEAD_LIMIT or ex.lines > HEADERS_LIMIT):
            ex.error = ValueError(f"the answer's head or trailers are over {HEAD_LIMIT} bytes "
                                  f"or {HEADERS_LIMIT} lines")
        if ex.error is not None or not self.reusable:
            self.close()
        elif ex.buffered > PAUSE_ABOVE and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        return False  # close; connection_lost ends the exchange

    # -- httptools' side

    def on_message_begin(self) -> None:
        ex = self.exchange
        if ex is not None and ex.ended:
            raise _Spill()

    def on_status(self, status: bytes) -> None:
        assert self.exchange is not None
        self.exchange.reason.append(status)

    def on_header(self, name: bytes, value: bytes) -> None:
        ex = self.exchange
        assert ex is not None
        ex.lines += 1
        if not ex.head_done:  # trailers are counted, not kept
            ex.headers.setdefault(name.decode("latin-1").lower(), value.decode("latin-1"))

    def on_headers_complete(self) -> None:
        ex = self.exchange
        assert ex is not None
        status = self.parser.get_status_code()
        if 100 <= status < 200:  # an interim answer (100 Continue, 103 Early Hints): the real one follows
            ex.informational = True
            ex.reason.clear()
            ex.headers.clear()
            return
        ex.status = status
        ex.head_done = True
        chunked = "chunked" in ex.headers.get("transfer-encoding", "").lower()
        ex.until_eof = "content-length" not in ex.headers and not chunked and status not in (204, 304)

    def on_chunk_header(self) -> None:
        assert self.exchange is not None
        self.exchange.chunk_lines += 1

    def on_body(self, body: bytes) -> None:
        ex = self.exchange
        assert ex is not None
        ex.chunks.append(body)
        ex.buffered += len(body)
        ex.body_bytes += len(body)

    def on_message_complete(self) -> None:
        ex = self.exchange
        assert ex is not None
        if ex.informational:
            ex.informational = False
            return
        ex.keep_alive = self.parser.should_keep_alive()
        ex.ended = True

    # -- the transport's side

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def usable(self, now: float) -> bool:
        return (self.reusable and not self.lost and self.transport is not None
                and not self.transport.is_closing() and now - self.idle_since <= KEEP_IDLE_SECONDS)

    async def wait(self, until: float) -> bool:
        """Until the parser or the connection says something; False once the loop's clock is past ``until``."""
        loop = asyncio.get_running_loop()
        waiter = self.waiter = loop.create_future()
        timer = loop.call_at(until, _expire, waiter)
        try:
            return await waiter is not _TIMED_OUT
        finally:
            timer.cancel()
            self.waiter = None

    def send(self, request: bytes) -> None:
        self.exchange = ex = _Exchange()
        if self.lost or self.transport is None or self.transport.is_closing():  # closed before a byte went
            ex.error = ConnectionResetError("the server closed the connection")
            return
        self.transport.write(request)

    def take(self) -> bytes:
        ex = self.exchange
        assert ex is not None
        data = ex.chunks.popleft() if len(ex.chunks) == 1 else b"".join(ex.chunks)
        ex.chunks.clear()
        ex.buffered = 0
        self.resume()
        return data

    def resume(self) -> None:
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()


def _expire(waiter: asyncio.Future[object]) -> None:
    if not waiter.done():
        waiter.set_result(_TIMED_OUT)


class _Pool:
    """At most ``limit`` connections in all; idle ones kept by scheme, host and port."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = 0
        self.idle: dict[_Key, list[_Connection]] = {}
        self.waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    def take_idle(self, key: _Key) -> _Connection | None:
        idle = self.idle.get(key)
        now = asyncio.get_running_loop().time()
        while idle:
            conn = idle.pop()
            if conn.usable(now):
                return conn
            conn.close()
            self._gone()
        return None

    async def connection(self, key: _Key, connect: Callable[[], Awaitable[_Connection]],
                         remaining: Callable[[], float | None]) -> _Connection:
        """An idle connection of ``key``, else a new one by ``connect`` once there is room, waiting
        for it at most ``remaining()`` seconds (the item's deadline)."""
        while True:
            conn = self.take_idle(key)
            if conn is not None:
                return conn
            if self.room():
                break
            if not await self.wait(remaining()):
                raise ProviderTimeout("the item deadline passed while waiting for a connection")
        self.count += 1
        try:
            return await connect()
        except BaseException:
            self._gone()
            raise

    def room(self) -> bool:
        """Whether a new connection may be made (an idle one of another host is closed for it)."""
        if self.count < self.limit:
            return True
        for conns in self.idle.values():
            if conns:
                conns.pop(0).close()
                self._gone()
                return True
        return False

    async def wait(self, timeout: float | None) -> bool:
        """Until a connection may be free; False after ``timeout`` seconds."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiters.append(future)
        woken = False
        try:
            await asyncio.wait_for(asyncio.shield(future), timeout)
            woken = True
        except asyncio.TimeoutError:
            return False
        finally:
            if future in self.waiters:
                self.waiters.remove(future)
            elif not woken and future.done():  # woken but not going on: the next waiter's turn
                self._next()
        return True

    def give_back(self, conn: _Connection, reusable: bool) -> None:
        conn.exchange = None
        now = asyncio.get_running_loop().time()
        conn.idle_since = now
        if reusable and conn.usable(now):
            conn.resume()  # an answer that ended while the socket was paused
            self.idle.setdefault(conn.key, []).append(conn)
        else:
            conn.close()
            self._gone()
            return
        self._next()

    def discard(self, conn: _Connection) -> None:
        """An idle connection the server closed."""
        idle = self.idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)
            self._gone()

    def _gone(self) -> None:
        self.count -= 1
        self._next()

    def _next(self) -> None:
        while self.waiters:
            future = self.waiters.popleft()
            if not future.done():
                future.set_result(None)
                return


class HttptoolsTransport:
    """Streaming POSTs over pooled HTTP/1.1 connections on the running loop."""

    def __init__(self, max_connections: int) -> None:
        self.max_connections = max_connections
        self._pool = _Pool(max_connections)
        self._aiohttp: AiohttpTransport | None = None
        self._tls: ssl.SSLContext | None = None
        self._targets: dict[str, tuple[_Key, bytes] | None] = {}

    async def open(self, url: str, data: bytes, headers: dict[str, str], call: CompletionCall,
                   read_timeout: float) -> HttptoolsResponse | AiohttpResponse:
        try:
            target = self._target(url)
        except ValueError as exc:  # a port out of range, a bracket not closed
            raise connection_error(url, exc) from exc
        if target is None:
            if self._aiohttp is None:
                from .aio_aiohttp import AiohttpTransport

                self._aiohttp = AiohttpTransport(self.max_connections)
            return await self._aiohttp.open(url, data, headers, call, read_timeout)
        key, start = target
        try:
            request = start + header_lines(headers, len(data)) + data
        except ValueError as exc:
            raise connection_error(url, exc) from exc
        conn = await self._pool.connection(key, functools.partial(self._connect, url, key, call), call.remaining)
        try:
            conn.send(request)
            ex = conn.exchange
            assert ex is not None
            until = asyncio.get_running_loop().time() + read_timeout  # a head in pieces has as long in all
            while not ex.head_done:
                if ex.error is not None:
                    raise connection_error(url, ex.error)
                if not await conn.wait(until):
                    raise ProviderTimeout(f"no reply within {read_timeout:g}s")
            if ex.error is not None:  # a head over its bounds that came whole in one read
                raise connection_error(url, ex.error)
        except BaseException:
            self._pool.give_back(conn, reusable=False)
            raise
        return HttptoolsResponse(self._pool, conn, url, read_timeout)

    def _target(self, url: str) -> tuple[_Key, bytes] | None:
        """The pool's key and the request line with its Host; None for what aiohttp sends
        (a proxy, credentials in the URL, another scheme). Decided once per URL."""
        if url in self._targets:
            return self._targets[url]
        if len(self._targets) >= EnvironmentProxies.LIMIT:
            self._targets.clear()
        parts = urlsplit(url)
        decided = None
        if (parts.scheme in ("http", "https") and parts.hostname and parts.username is None
                and environment_proxy(url) is None and plain(url)):
            decided = request_start(parts)
        self._targets[url] = decided
        return decided

    async def _connect(self, url: str, key: _Key, call: CompletionCall) -> _Connection:
        scheme, host, port = key
        loop = asyncio.get_running_loop()
        tls = self._tls_context() if scheme == "https" else None
        remaining = call.remaining()
        timeout = call.connect_timeout if remaining is None else min(call.connect_timeout, max(remaining, 0.0))
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: _Connection(self._pool, key), host, port, ssl=tls,
                                       server_hostname=host if tls is not None else None),
                timeout)
        except asyncio.TimeoutError as exc:
            if past_deadline(call):
                raise ProviderTimeout("the item deadline passed while waiting for a connection") from exc
            raise ConnectTimeout(f"connect timeout after {call.connect_timeout:g}s") from exc
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            raise connection_error(url, exc) from exc
        return conn

    def _tls_context(self) -> ssl.SSLContext:
        if self._tls is None:
            self._tls = ssl.create_default_context()
        return self._tls

    async def aclose(self) -> None:
        for conns in self._pool.idle.values():
            for conn in conns:
                conn.close()
        self._pool.idle.clear()
        if self._aiohttp is not None:
            await self._aiohttp.aclose()
            self._aiohttp = None


class HttptoolsResponse:
    def __init__(self, pool: _Pool, conn: _Connection, url: str, read_timeout: float) -> None:
        self._pool = pool
        self._conn: _Connection | None = conn
        self._read_timeout = read_timeout
        ex = conn.exchange
        assert ex is not None
        self._exchange = ex
        self.head = Head.of(ex.status, b"".join(ex.reason).decode("latin-1").strip(), ex.headers)

    async def read(self) -> bytes:
        ex = self._exchange
        conn = self._conn
        until = 0.0
        while not ex.chunks:
            if ex.error is not None:
                raise IncompleteReply(f"the connection broke before the reply ended: {reason(ex.error)}")
            if ex.ended or conn is None:
                return b""
            if not until:  # one deadline for the body's next bytes, whatever else comes meanwhile
                until = asyncio.get_running_loop().time() + self._read_timeout
            if not await conn.wait(until):
                raise ProviderTimeout(f"the reply stalled for more than {self._read_timeout:g}s")
        return conn.take() if conn is not None else b""

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            ex = self._exchange
            self._pool.give_back(conn, ex.ended and ex.keep_alive and ex.error is None and conn.reusable)


__all__ = ["HttptoolsTransport"]
