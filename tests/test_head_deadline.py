"""A connection whose request head does not come whole in time is closed, whichever HTTP parser
uvicorn runs (h11, as a plain install has it; httptools, as the test install has it)."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from aivvm_batch.private_redis import free_port
from aivvm_batch.serve.head_deadline import head_limited_protocol

DEADLINE = 1.0


async def hello(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


@pytest.fixture(params=[H11Protocol, HttpToolsProtocol], ids=["h11", "httptools"])
def port(request: pytest.FixtureRequest) -> Iterator[int]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(hello, host="127.0.0.1", port=port, log_level="warning", lifespan="off",
                                           http=head_limited_protocol(DEADLINE, request.param),
                                           timeout_keep_alive=30))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    yield port
    server.should_exit = True
    thread.join(10)


def closed_after(connection: socket.socket, trickle: bytes = b"") -> float:
    """Seconds until the server closes ``connection`` (sending ``trickle`` a byte every 0.2 s)."""
    started = time.monotonic()
    connection.settimeout(0.2)
    for byte in [trickle[i:i + 1] for i in range(len(trickle))] + [b""] * 100:
        if byte:
            try:
                connection.sendall(byte)
            except OSError:
                return time.monotonic() - started
        try:
            if connection.recv(1024) == b"":
                return time.monotonic() - started
        except socket.timeout:
            continue
        except OSError:
            return time.monotonic() - started
    return float("inf")


def test_a_silent_socket_and_a_trickled_head_are_closed_at_the_deadline(
        port: int, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="aivvm_batch.serve"):
        silent = socket.create_connection(("127.0.0.1", port))
        assert DEADLINE * 0.8 < closed_after(silent) < DEADLINE + 1.5
        trickled = socket.create_connection(("127.0.0.1", port))
        head = b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: 1\r\n" * 30
        assert DEADLINE * 0.8 < closed_after(trickled, head) < DEADLINE + 1.5
    assert sum("sent no whole request head in 1 s" in r.getMessage() for r in caplog.records) == 2


def test_a_kept_alive_connection_serves_one_request_after_another_past_the_deadline(port: int) -> None:
    connection = socket.create_connection(("127.0.0.1", port), timeout=5)
    for _ in range(3):
        connection.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = b""
        while not answer.endswith(b"ok"):
            answer += connection.recv(1024)
        assert answer.startswith(b"HTTP/1.1 200")
        time.sleep(DEADLINE * 0.7)  # in all, well past one deadline: each head came in time
    connection.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")  # a head that never ends
    assert closed_after(connection) < DEADLINE + 1.5
