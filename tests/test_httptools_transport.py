"""The httptools transport on answers written byte for byte by a server here (127.0.0.1).

What aiohttp did for the worker and the hand-made client must do as well: interim answers
skipped, a body that ends with its connection, a head that never ends, header values that
would split the request, a kept-alive connection the server has closed meanwhile, a body cut
short, a body larger than the read buffer, and the pool's bound across hosts.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from urllib.parse import urlsplit

import pytest

from worker.errors import IncompleteReply, ProviderTransportError
from worker.providers.aio_httptools import HEAD_LIMIT, PAUSE_ABOVE, HttptoolsTransport
from worker.providers.call import CompletionCall
from worker.providers.proxies import names_a_proxy
from worker.providers.request_head import header_lines, plain, request_start

Answer = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
OK_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"


class Server:
    """Answers each request on a connection with ``answer``; counts connections and requests."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.connections = 0
        self.requests: list[bytes] = []
        self.server: asyncio.base_events.Server | None = None

    async def __aenter__(self) -> Server:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/api/chat"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(next((line.split(b":")[1] for line in head.split(b"\r\n")
                                   if line.lower().startswith(b"content-length:")), b"0"))
                self.requests.append(head + await reader.readexactly(length))
                await self.answer(reader, writer)
                if writer.is_closing():
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def served(answer: Answer, connections: int) -> AsyncIterator[tuple[Server, HttptoolsTransport]]:
    """A server answering with ``answer``, and a transport of ``connections`` closed at the end."""
    async with Server(answer) as server:
        transport = HttptoolsTransport(connections)
        try:
            yield server, transport
        finally:
            await transport.aclose()


def call() -> CompletionCall:
    return CompletionCall(model="m", messages=({"role": "user", "content": "hi"},), base_url="",
                          connect_timeout=2.0, read_timeout=5.0)


async def post(transport: HttptoolsTransport, url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    response = await transport.open(url, b'{"a": 1}', headers or {"content-type": "application/json"}, call(), 5.0)
    body = b""
    try:
        while data := await response.read():
            body += data
    finally:
        await response.close()
    return response.head.status, body


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), 30))


def test_an_interim_answer_is_skipped_for_the_one_that_follows() -> None:
    async def answer(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n"
                     + OK_HEAD + b"x-request-id: req_9\r\nContent-Length: 5\r\n\r\nhello")

    async def test() -> None:
        async with served(answer, 4) as (server, transport):
            response = await transport.open(server.url, b"{}", {}, call(), 5.0)
            assert (response.head.status, response.head.request_id, response.head.reason) == (200, "req_9", "OK")
            assert await response.read() == b"hello" and await response.read() == b""
            await response.close()

    run(test)


def test_a_body_without_length_ends_with_its_connection_which_is_not_kept() -> None:
    async def answer(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(OK_HEAD + b"\r\n" + b"all of it")
        await writer.drain()
        writer.close()

    async def test() -> None:
        async with served(answer, 4) as (server, transport):
            assert await post(transport, server.url) == (200, b"all of it")
            assert await post(transport, server.url) == (200, b"all of it")
            assert server.connections == 2

    run(test)


def test_a_head_that_never_ends_is_refused_at_its_bound() -> None:
    async def answer(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(OK_HEAD)
        for i in range(HEAD_LIMIT // 100 + 10):
            writer.write(b"x-filler-%d: %s\r\n" % (i, b"y" * 80))
            await writer.drain()
        await asyncio.sleep(10)

    async def test() -> None:
        async with served(answer, 4) as (server, transport):
            with pytest.raises(ProviderTransportError, match="head"):
                await post(transport, server.url)

    run(test)


@pytest.mark.parametrize("header", [{"x-k": "v\r\nx-evil: 1"}, {"x-k\r\nx-evil": "1"}, {"x-k": "v\n"}])
def test_a_header_that_would_split_the_request_is_refused_before_connecting(header: dict[str, str]) -> None:
    async def answer(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(OK_HEAD + b"Content-Length: 0\r\n\r\n")

    async def test() -> None:
        async with served(answer, 4) as (server, transport):
            with pytest.raises(ProviderTransportError, match="line break"):
                await post(transport, server.url, header)
            await asyncio.sleep(0.05)
            assert server.connections == 0 and server.requests == []

    run(test)


def test_a_kept_connection_the_server_closed_is_not_used_again() -> None:
    async def answer(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(OK_HEAD + b"Content-Length: 2\r\n\r\nok")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.close()  # keep-alive said, then closed while idle in the client's pool

    async def test() -> None:
        async with served(answer, 1) as (server, transport):
            assert await post(transport, server.url) == (200, b"ok")
            await asyncio.sleep(0.3)
            assert await post(transport, server.url) == (200, b"ok")
            assert server.connections == 2

    run(test)


def test_kept_alive_answers_share_one_connection_and_send_one_request_each() -> None:
    async def answer(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n")

    async def test() -> None:
        async with served(answer, 1) as (server, transport):
            for _ in range(3):
                assert await post(transport, server.url) == (200, b"ok")
            assert server.connections == 1
            assert len(server.requests) == 3
            first = server.requests[0]
            assert first.startswith(b"POST /api/chat HTTP/1.1\r\nHost: 127.0.0.1:")
            assert b"\r\nContent-Length: 8\r\n" in first and first.endswith(b'\r\n\r\n{"a": 1}')

    run(test)


def test_a_body_cut_short_is_an_incomplete_reply() -> None:
    async def answer(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(OK_HEAD + b"Content-Length: 100\r\n\r\nonly this")
        await writer.drain()
        writer.close()

    async def test() -> None:
        async with served(answer, 2) as (server, transport):
            with pytest.raises(IncompleteReply, match="broke before the reply ended"):
                await post(transport, server.url)

    run(test)


def test_a_body_larger_than_the_read_buffer_arrives_whole() -> None:
    size = PAUSE_ABOVE * 3 + 12345

    async def answer(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(OK_HEAD + b"Content-Length: %d\r\n\r\n" % size)
        for start in range(0, size, 65536):
            writer.write(bytes([start // 65536 % 251]) * min(65536, size - start))
            await writer.drain()

    async def test() -> None:
        async with served(answer, 2) as (server, transport):
            response = await transport.open(server.url, b"{}", {}, call(), 5.0)
            received = []
            while data := await response.read():
                received.append(data)
                await asyncio.sleep(0.01)  # a slow reader: the socket is paused meanwhile
            await response.close()
            body = b"".join(received)
            assert len(body) == size and body[-1] == (size - 1) // 65536 % 251

    run(test)


def test_a_full_pool_closes_an_idle_connection_to_another_host_for_a_new_one() -> None:
    async def answer(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(OK_HEAD + b"Content-Length: 2\r\n\r\nok")

    async def test() -> None:
        async with Server(answer) as first, Server(answer) as second:
            transport = HttptoolsTransport(1)
            assert await post(transport, first.url) == (200, b"ok")
            assert await post(transport, second.url) == (200, b"ok")
            assert await post(transport, first.url) == (200, b"ok")
            assert (first.connections, second.connections) == (2, 1)
            await transport.aclose()

    run(test)


def test_a_worker_starts_without_aiohttp_requests_or_jsonschema() -> None:
    """They are imported when a proxied URL, the synchronous path or a response schema first
    needs them: the fork server imports everything else before the workers start."""
    code = ("import sys, worker.tasks; "
            "print(sorted(m for m in ('aiohttp', 'requests', 'jsonschema') if m in sys.modules))")
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                           env={k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")})
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.strip() == "[]"


@pytest.mark.parametrize(("environ", "named"), [({"PATH": "/bin"}, False), ({"HTTPS_PROXY": ""}, False),
                                                ({"https_proxy": "http://p:3128"}, True),
                                                ({"ALL_PROXY": "socks5://p"}, True)])
def test_an_environment_without_proxies_is_told_apart_without_requests(environ: dict[str, str],
                                                                     named: bool) -> None:
    assert names_a_proxy(environ) is named


# -- what an adversary found (each broke the transport before its fix) -----------------------


def test_bytes_past_the_end_of_an_answer_are_no_ones_and_the_connection_is_not_reused() -> None:
    async def answer(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(OK_HEAD + b"Content-Length: 2\r\n\r\nok" + b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nforge")

    async def test() -> None:
        async with served(answer, 1) as (server, transport):
            assert await post(transport, server.url) == (200, b"ok")
            assert await post(transport, server.url) == (200, b"ok")
            assert server.connections == 2

    run(test)


def test_a_connection_closed_before_the_request_went_is_a_connection_error_at_once() -> None:
    """A server that accepts and closes at once, on a busy loop: the close is in before the send."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)

    def accept_and_close() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            conn.close()

    threading.Thread(target=accept_and_close, daemon=True).start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/v1"

    async def busy() -> None:
        while True:
            await asyncio.sleep(0)
            time.sleep(0.002)  # a loaded worker's loop

    async def test() -> None:
        load = asyncio.create_task(busy())
        transport = HttptoolsTransport(8)
        started = time.monotonic()
        outcomes = await asyncio.gather(*(post(transport, url) for _ in range(20)), return_exceptions=True)
        load.cancel()
        assert all(isinstance(o, ProviderTransportError) for o in outcomes), outcomes
        assert time.monotonic() - started < 3.0  # not the 5 s read timeout
        await transport.aclose()

    try:
        run(test)
    finally:
        listener.close()


def test_an_answer_that_ended_while_reading_was_paused_leaves_a_connection_that_reads() -> None:
    size = PAUSE_ABOVE + 100_000

    async def answer(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(OK_HEAD + b"Content-Length: %d\r\n\r\n" % size + b"x" * size)

    async def test() -> None:
        async with served(answer, 1) as (server, transport):
            response = await transport.open(server.url, b"{}", {}, call(), 5.0)
            await asyncio.sleep(0.3)  # all of it arrives unread: reading pauses, and the answer ends
            await response.close()
            status, body = await post(transport, server.url)
            assert (status, len(body), server.connections) == (200, size, 1)

    run(test)


@pytest.mark.parametrize("flood", [b"x-t: " + b"y" * 200_000, b"".join(b"x-t%d: 1\r\n" % i for i in range(5000)),
                                   b";ext=" + b"e" * 200_000])
def test_trailers_and_chunk_lines_are_bounded_like_the_head(flood: bytes) -> None:
    async def answer(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if flood.startswith(b";"):  # a chunk extension that never ends
            writer.write(OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n2" + flood)
        else:
            writer.write(OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n" + flood)
        await writer.drain()
        await asyncio.sleep(10)

    async def test() -> None:
        async with served(answer, 1) as (server, transport):
            with pytest.raises((IncompleteReply, ProviderTransportError), match="over 65536 bytes"):
                await post(transport, server.url)

    run(test)


@pytest.mark.parametrize("head", [b"".join(b"x-same: %d\r\n" % i for i in range(1000)),
                                  b"x-big: " + b"a" * 100_000 + b"\r\n"])
def test_a_head_over_its_bounds_is_refused_even_when_it_comes_in_one_read(head: bytes) -> None:
    async def answer(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(OK_HEAD + head + b"Content-Length: 2\r\n\r\nok")

    async def test() -> None:
        async with served(answer, 1) as (server, transport):
            with pytest.raises(ProviderTransportError, match="head or trailers"):
                await post(transport, server.url)

    run(test)


@pytest.mark.parametrize("url", ["http://127.0.0.1:99999/v1", "http://127.0.0.1:8o80/v1", "http://[::1/v1"])
def test_a_url_that_cannot_be_read_is_a_connection_error(url: str) -> None:
    async def test() -> None:
        with pytest.raises(ProviderTransportError, match="cannot reach"):
            await post(HttptoolsTransport(1), url)

    run(test)


def test_a_body_ended_by_its_connection_ends_alike_with_transfer_encoding_identity() -> None:
    async def answer(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(OK_HEAD + b"Transfer-Encoding: identity\r\n\r\nuntil close")
        await writer.drain()
        writer.close()

    async def test() -> None:
        async with Server(answer) as server:
            assert await post(HttptoolsTransport(1), server.url) == (200, b"until close")

    run(test)


def test_a_reset_in_a_body_ended_by_its_connection_is_no_end() -> None:
    async def answer(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(OK_HEAD + b"\r\ndata: {\"partial")
        await writer.drain()
        await asyncio.sleep(0.1)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST, not FIN
        writer.transport.abort()

    async def test() -> None:
        async with Server(answer) as server:
            with pytest.raises(IncompleteReply, match="reset"):
                await post(HttptoolsTransport(1), server.url)

    run(test)


# -- the request's head, as bytes --------------------------------------------------------------


@pytest.mark.parametrize(("url", "key", "start"), [
    ("http://127.0.0.1:8787/api/chat", ("http", "127.0.0.1", 8787),
     b"POST /api/chat HTTP/1.1\r\nHost: 127.0.0.1:8787\r\n"),
    ("https://api.example.com/v1/chat/completions?x=1", ("https", "api.example.com", 443),
     b"POST /v1/chat/completions?x=1 HTTP/1.1\r\nHost: api.example.com\r\n"),
    ("http://[::1]:9000", ("http", "::1", 9000), b"POST / HTTP/1.1\r\nHost: [::1]:9000\r\n"),
])
def test_the_request_line_and_host(url: str, key: tuple[str, str, int], start: bytes) -> None:
    assert request_start(urlsplit(url)) == (key, start)


def test_the_header_lines_add_a_user_agent_accept_and_the_length_unless_given() -> None:
    assert header_lines({"content-type": "application/json"}, 8) == (
        b"content-type: application/json\r\nUser-Agent: aivvm-batch\r\nAccept: */*\r\nContent-Length: 8\r\n\r\n")
    assert header_lines({"user-agent": "mine", "accept": "text/event-stream"}, 0) == (
        b"user-agent: mine\r\naccept: text/event-stream\r\nContent-Length: 0\r\n\r\n")
    assert not plain("http://127.0.0.1/a b") and plain("http://127.0.0.1/a%20b")
