"""Tests for the stand-in chat provider (aivvm_batch.stub); real HTTP on 127.0.0.1."""

from __future__ import annotations

import asyncio
import http.client
import json
import signal
import socket
import subprocess
import sys
import time
from typing import Any, Callable

import pytest
import requests

from aivvm_batch.stub import StubServer, parse_directive
from aivvm_batch import stub as stub_module

MODEL = {"id": "gpt-3.5-turbo", "name": "GPT-3.5"}


@pytest.fixture
def server(stub_factory: Callable[..., StubServer]) -> StubServer:
    """A stand-in of each test's own: its counters and ``times=`` faults start from nothing."""
    return stub_factory()


def aivvm_body(content: str, **extra: Any) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "key": "",
        "prompt": "You are a helpful assistant.",
        "temperature": 0.7,
        **extra,
    }


def post_aivvm(srv: StubServer, content: str, **kwargs: Any) -> requests.Response:
    kwargs.setdefault("timeout", 5)
    return requests.post(f"{srv.base_url}/api/chat", json=aivvm_body(content), **kwargs)


def raw_chunks(srv: StubServer, content: str) -> tuple[requests.Response, list[bytes]]:
    resp = post_aivvm(srv, content, stream=True)
    chunks = list(resp.raw.read_chunked(decode_content=False))
    return resp, chunks


def openai_post(srv: StubServer, content: str, *, key: str | None = None, **body: Any) -> requests.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    payload = {"model": "gpt-4", "messages": [{"role": "user", "content": content}], **body}
    return requests.post(f"{srv.base_url}/v1/chat/completions", json=payload, headers=headers, timeout=5)


def settled(srv: StubServer) -> dict[str, Any]:
    """Stats once the server thread has ended its calls (it does so just after their last write)."""
    deadline = time.monotonic() + 10
    while srv.stats()["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.01)
    return srv.stats()


def sse_events(resp: requests.Response) -> list[str]:
    assert resp.headers["content-type"].startswith("text/event-stream")
    blocks = resp.content.decode("utf-8").split("\n\n")
    assert blocks[-1] == ""
    assert all(b.startswith("data: ") for b in blocks[:-1])
    return [b[len("data: ") :] for b in blocks[:-1]]


# -- parse_directive and pure helpers ---------------------------------------


def test_parse_directive_none() -> None:
    assert parse_directive("  hello world ") == ({}, "hello world")


def test_parse_directive_inline_and_edges() -> None:
    assert parse_directive("hi [[stub fault=status code=503 times=2]] there") == (
        {"fault": "status", "code": "503", "times": "2"},
        "hi there",
    )
    assert parse_directive("[[stub latency=0.5]]question") == ({"latency": "0.5"}, "question")
    assert parse_directive("q [[stub]]") == ({}, "q")
    assert parse_directive("[[stub words=3]]") == ({"words": "3"}, "")


def test_parse_directive_only_first_is_used() -> None:
    options, text = parse_directive("a [[stub fault=cut]] b [[stub fault=empty]]")
    assert options == {"fault": "cut"}
    assert text == "a b [[stub fault=empty]]"


def test_parse_directive_not_a_directive() -> None:
    assert parse_directive("[[stubborn]] [[ stub x=1]]") == ({}, "[[stubborn]] [[ stub x=1]]")


def test_build_plan_validation() -> None:
    plan = stub_module.build_plan({"fault": "429", "retry_after": "3"}, latency=0.2, chunks=5)
    assert (plan.fault, plan.retry_after, plan.latency, plan.chunks, plan.times) == ("429", 3, 0.2, 5, None)
    for bad in ({"fault": "nope"}, {"color": "red"}, {"chunks": "0"}, {"latency": "x"}, {"code": "200"}):
        with pytest.raises(ValueError):
            stub_module.build_plan(bad)


def test_chunk_helpers() -> None:
    assert stub_module.split_evenly("abcdefghij", 4) == ["abc", "def", "gh", "ij"]
    assert stub_module.split_evenly("ab", 4) == ["a", "b"]
    assert stub_module.split_evenly(b"", 4) == []
    chunks = stub_module.aivvm_chunks("héllo", 1, "split")
    assert b"".join(chunks) == "héllo".encode()
    assert any(not _decodes(c) for c in chunks)
    assert stub_module.word_text(10).split()[:2] == ["alpha", "bravo"]
    assert len(stub_module.word_text(10).split()) == 10


@pytest.mark.parametrize("text", ["", "a", "plain ascii text", "héllo wörld — 日本語 ✓ 🎉", "🎉🎉🎉"])
@pytest.mark.parametrize("parts", [1, 2, 4, 9, 50])
@pytest.mark.parametrize("fault", [None, "split"])
def test_aivvm_chunks_cover_text(text: str, parts: int, fault: str | None) -> None:
    chunks = stub_module.aivvm_chunks(text, parts, fault)
    assert b"".join(chunks) == text.encode("utf-8")
    assert all(chunks)
    if fault is None:
        assert len(chunks) == min(parts, len(text.encode("utf-8")))
    elif any(len(c.encode("utf-8")) > 1 for c in text):
        assert any(not _decodes(c) for c in chunks)


def _decodes(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


# -- Aivvm protocol ----------------------------------------------------------


def test_aivvm_success_text_and_headers(server: StubServer) -> None:
    resp = post_aivvm(server, "What is 2+2?")
    assert resp.status_code == 200
    assert resp.headers["content-type"] == "text/plain; charset=utf-8"
    assert resp.headers["transfer-encoding"] == "chunked"
    assert resp.content.decode("utf-8") == "Stand-in reply to: What is 2+2?"


def test_aivvm_directive_removed_from_reply(server: StubServer) -> None:
    resp = post_aivvm(server, "Tell me [[stub chunks=2]] a joke")
    assert resp.content.decode("utf-8") == "Stand-in reply to: Tell me a joke"


def test_aivvm_reply_uses_last_user_message(server: StubServer) -> None:
    body = aivvm_body("ignored")
    body["messages"] = [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "answer"},
        {"role": "user", "content": "second"},
    ]
    resp = requests.post(f"{server.base_url}/api/chat", json=body, timeout=5)
    assert resp.text == "Stand-in reply to: second"


def test_aivvm_chunk_count(server: StubServer) -> None:
    resp, chunks = raw_chunks(server, "count my chunks")
    assert resp.status_code == 200
    assert len(chunks) == 4
    assert b"".join(chunks) == b"Stand-in reply to: count my chunks"
    _, chunks = raw_chunks(server, "count my chunks [[stub chunks=7]]")
    assert len(chunks) == 7


def test_aivvm_words(server: StubServer) -> None:
    resp = post_aivvm(server, "[[stub words=12]]")
    assert len(resp.text.split()) == 12


def test_aivvm_split_multibyte_across_chunks(server: StubServer) -> None:
    resp, chunks = raw_chunks(server, "[[stub fault=split]] hi")
    assert resp.status_code == 200
    assert any(not _decodes(c) for c in chunks)
    joined = b"".join(chunks).decode("utf-8")  # strict
    assert joined == f"{stub_module.SPLIT_TEXT} Stand-in reply to: hi"


def test_aivvm_badbytes(server: StubServer) -> None:
    resp, chunks = raw_chunks(server, "[[stub fault=badbytes]] hi")
    assert resp.status_code == 200
    body = b"".join(chunks)
    assert stub_module.BAD_BYTES in chunks
    with pytest.raises(UnicodeDecodeError):
        body.decode("utf-8")


def test_aivvm_status_times(server: StubServer) -> None:
    content = "flaky [[stub fault=status code=503 times=2]]"
    codes = [post_aivvm(server, content) for _ in range(3)]
    assert [r.status_code for r in codes] == [503, 503, 200]
    assert codes[0].text == "Error"
    assert codes[0].headers["content-type"].startswith("text/plain")
    assert codes[2].text == "Stand-in reply to: flaky"


def test_aivvm_status_default_500(server: StubServer) -> None:
    resp = post_aivvm(server, "[[stub fault=status]] boom")
    assert (resp.status_code, resp.text) == (500, "Error")


def test_aivvm_429_retry_after(server: StubServer) -> None:
    resp = post_aivvm(server, "[[stub fault=429]] slow down")
    assert resp.status_code == 429
    assert resp.headers["retry-after"] == "1"
    resp = post_aivvm(server, "[[stub fault=429 retry_after=7]] slow down")
    assert resp.headers["retry-after"] == "7"


def test_aivvm_cut_raises_chunked_encoding_error(server: StubServer) -> None:
    resp = post_aivvm(server, "[[stub fault=cut chunks=6]] cut me", stream=True)
    assert resp.status_code == 200
    received = b""
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        for piece in resp.iter_content(chunk_size=None):
            received += piece
    assert 0 < len(received) < len("Stand-in reply to: cut me")


def test_aivvm_empty(server: StubServer) -> None:
    resp = post_aivvm(server, "[[stub fault=empty]] nothing")
    assert resp.status_code == 200
    assert resp.content == b""


def test_aivvm_reset_drops_connection(server: StubServer) -> None:
    with pytest.raises(requests.exceptions.ConnectionError):
        post_aivvm(server, "[[stub fault=reset]] bye")


def test_aivvm_stall_client_times_out_server_survives(server: StubServer) -> None:
    resp = post_aivvm(server, "[[stub fault=stall stall=3]] wait", stream=True, timeout=0.3)
    with pytest.raises(requests.exceptions.ConnectionError):  # ReadTimeoutError surfaces as this
        for _ in resp.iter_content(chunk_size=None):
            pass
    resp.close()
    assert post_aivvm(server, "still alive").text == "Stand-in reply to: still alive"


def test_aivvm_latency(server: StubServer) -> None:
    started = time.monotonic()
    resp = post_aivvm(server, "[[stub latency=0.3 chunks=3]] slow")
    elapsed = time.monotonic() - started
    assert resp.text == "Stand-in reply to: slow"
    assert 0.28 <= elapsed < 2.0


def test_aivvm_bad_requests(server: StubServer) -> None:
    url = f"{server.base_url}/api/chat"
    resp = requests.post(url, data=b"{not json", timeout=5)
    assert resp.status_code == 400 and resp.text
    resp = requests.post(url, json={"model": MODEL}, timeout=5)
    assert resp.status_code == 400
    resp = post_aivvm(server, "[[stub fault=explode]]")
    assert resp.status_code == 400


def test_aivvm_ignores_api_key() -> None:
    with StubServer(api_key="sekrit") as srv:
        assert post_aivvm(srv, "hi").text == "Stand-in reply to: hi"


def test_keep_alive_reuses_connection(server: StubServer) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        for prompt in ("one", "two [[stub fault=status code=502]]", "three"):
            conn.request("POST", "/api/chat", body=json.dumps(aivvm_body(prompt)),
                         headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            body = resp.read()
            assert resp.status in (200, 502)
            assert not resp.will_close
        assert body == b"Stand-in reply to: three"
        sock = conn.sock
        conn.request("GET", "/health")
        resp = conn.getresponse()
        assert (resp.status, resp.read()) == (200, b"ok")
        assert conn.sock is sock
    finally:
        conn.close()


# -- OpenAI protocol ---------------------------------------------------------


def test_openai_stream_events(server: StubServer) -> None:
    resp = openai_post(server, "stream please [[stub chunks=3]]", stream=True)
    assert resp.status_code == 200
    events = sse_events(resp)
    assert events[-1] == "[DONE]"
    objs = [json.loads(e) for e in events[:-1]]
    assert all(o["object"] == "chat.completion.chunk" and o["model"] == "gpt-4" for o in objs)
    assert len({o["id"] for o in objs}) == 1 and objs[0]["id"].startswith("chatcmpl-stub-")
    assert objs[0]["choices"][0]["delta"] == {"role": "assistant", "content": "", "refusal": None}
    content = [o["choices"][0]["delta"]["content"] for o in objs[1:-1]]
    assert len(content) == 3
    assert "".join(content) == "Stand-in reply to: stream please"
    assert objs[-1]["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "stop"}
    assert all("usage" not in o for o in objs)


def test_openai_stream_usage(server: StubServer) -> None:
    resp = openai_post(server, "count these words", stream=True, stream_options={"include_usage": True})
    events = sse_events(resp)
    assert events[-1] == "[DONE]"
    usage_obj = json.loads(events[-2])
    assert usage_obj["choices"] == []
    assert usage_obj["usage"] == {"prompt_tokens": 3, "completion_tokens": 6, "total_tokens": 9}
    assert json.loads(events[-3])["choices"][0]["finish_reason"] == "stop"


def test_openai_stream_split_on_characters(server: StubServer) -> None:
    resp = openai_post(server, "[[stub fault=split chunks=9]] x", stream=True)
    objs = [json.loads(e) for e in sse_events(resp)[:-1]]
    content = "".join(o["choices"][0]["delta"].get("content", "") for o in objs)
    assert content == f"{stub_module.SPLIT_TEXT} Stand-in reply to: x"


def test_openai_stream_empty(server: StubServer) -> None:
    resp = openai_post(server, "[[stub fault=empty]]", stream=True)
    assert resp.status_code == 200
    assert resp.content == b"data: [DONE]\n\n"


def test_openai_non_stream(server: StubServer) -> None:
    resp = openai_post(server, "plain json")
    assert resp.status_code == 200
    data = resp.json()
    assert data["object"] == "chat.completion"
    assert data["choices"][0]["message"] == {"role": "assistant", "content": "Stand-in reply to: plain json", "refusal": None}
    assert data["choices"][0]["finish_reason"] == "stop"
    assert data["usage"]["total_tokens"] == data["usage"]["prompt_tokens"] + data["usage"]["completion_tokens"]


def test_openai_errors(server: StubServer) -> None:
    resp = openai_post(server, "[[stub fault=429 retry_after=2]]", stream=True)
    assert resp.status_code == 429 and resp.headers["retry-after"] == "2"
    assert resp.json()["error"]["type"] == "rate_limit_exceeded"
    resp = openai_post(server, "[[stub fault=status]]")
    assert resp.status_code == 500 and resp.json()["error"]["type"] == "server_error"
    resp = requests.post(f"{server.base_url}/chat/completions", data=b"nope", timeout=5)
    assert resp.status_code == 400 and resp.json()["error"]["type"] == "invalid_request_error"


def test_openai_cut(server: StubServer) -> None:
    resp = requests.post(
        f"{server.base_url}/v1/chat/completions",
        json={"model": "m", "stream": True, "messages": [{"role": "user", "content": "[[stub fault=cut]] x"}]},
        stream=True,
        timeout=5,
    )
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        for _ in resp.iter_content(chunk_size=None):
            pass


def test_openai_api_key() -> None:
    with StubServer(api_key="sekrit") as srv:
        resp = openai_post(srv, "hi", key="wrong")
        assert resp.status_code == 401
        assert resp.json()["error"]["type"] == "invalid_api_key"
        assert openai_post(srv, "hi").status_code == 401
        ok = openai_post(srv, "hi", key="sekrit")
        assert ok.status_code == 200
        assert ok.json()["choices"][0]["message"]["content"] == "Stand-in reply to: hi"


# -- introspection -----------------------------------------------------------


def test_stats_and_reset(server: StubServer) -> None:
    post_aivvm(server, "alpha")
    post_aivvm(server, "alpha [[stub chunks=1]]")
    openai_post(server, "beta", stream=True)
    post_aivvm(server, "[[stub fault=status times=1]] gamma")
    assert post_aivvm(server, "[[stub fault=status times=1]] gamma").status_code == 200
    stats = requests.get(f"{server.base_url}/__stub/stats", timeout=5).json()
    assert stats["requests"] == 5
    assert stats["by_prompt"] == {"alpha": 2, "beta": 1, "gamma": 2}
    assert len(stats["times"]) == 5 and stats["times"] == sorted(stats["times"])
    assert server.stats() == stats

    settled(server)
    resp = requests.post(f"{server.base_url}/__stub/reset", timeout=5)
    assert resp.status_code == 204
    assert server.stats() == {"requests": 0, "by_prompt": {}, "times": [], "in_flight": 0, "peak_in_flight": 0,
                              "rate_limited": 0}
    # fault bookkeeping reset too: the times=1 fault fires again
    assert post_aivvm(server, "[[stub fault=status times=1]] gamma").status_code == 500


def test_health_and_unknown_path(server: StubServer) -> None:
    assert requests.get(f"{server.base_url}/health", timeout=5).text == "ok"
    assert requests.get(f"{server.base_url}/nope", timeout=5).status_code == 404


def test_stop_is_idempotent_and_ends_stalls() -> None:
    srv = StubServer(latency=0.0).start()
    sock = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
    body = json.dumps(aivvm_body("[[stub fault=stall stall=30]] x")).encode()
    sock.sendall(
        b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%b" % (len(body), body)
    )
    assert sock.recv(65536).startswith(b"HTTP/1.1 200")
    started = time.monotonic()
    srv.stop()
    srv.stop()
    assert time.monotonic() - started < 3
    sock.close()
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(f"{srv.base_url}/health", timeout=1)


# -- HTTP/1.1 framing, pure (literal bytes) ------------------------------------


def test_parse_request_head() -> None:
    head = stub_module.parse_request_head(
        b"\r\nPOST /api/chat?x=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 12\r\n"
        b"X-Twice: one\r\nx-twice: two\r\n\r\n"
    )
    assert (head.method, head.path, head.version) == ("POST", "/api/chat", "HTTP/1.1")
    assert head.headers == {"host": "a", "content-length": "12", "x-twice": "one, two"}
    assert head.keep_alive
    assert stub_module.body_length(head) == 12


@pytest.mark.parametrize("raw", [
    b"\r\n\r\n",
    b"GET /\r\n\r\n",
    b"GET / HTTP/2.0\r\n\r\n",
    b"GET  / HTTP/1.1\r\n\r\n",
    b"GET / HTTP/1.1\r\nno colon here\r\n\r\n",
    b"GET / HTTP/1.1\r\nA: b\r\n folded\r\n\r\n",
    b"GET / HTTP/1.1\r\nName : v\r\n\r\n",
])
def test_parse_request_head_refuses(raw: bytes) -> None:
    with pytest.raises(ValueError):
        stub_module.parse_request_head(raw)


def test_keep_alive_rules() -> None:
    def head(version: str, connection: str | None) -> stub_module.RequestHead:
        extra = f"Connection: {connection}\r\n" if connection else ""
        return stub_module.parse_request_head(f"GET / {version}\r\n{extra}\r\n".encode())

    assert head("HTTP/1.1", None).keep_alive
    assert not head("HTTP/1.1", "Close").keep_alive
    assert not head("HTTP/1.1", "upgrade, close").keep_alive
    assert not head("HTTP/1.0", None).keep_alive
    assert head("HTTP/1.0", "keep-alive").keep_alive


def test_body_length_and_chunk_size() -> None:
    def length(headers: bytes) -> int | None:
        return stub_module.body_length(stub_module.parse_request_head(b"POST / HTTP/1.1\r\n" + headers + b"\r\n"))

    assert length(b"") == 0
    assert length(b"Transfer-Encoding: chunked\r\n") is None
    for bad in (b"Content-Length: -1\r\n", b"Content-Length: 1e3\r\n", b"Content-Length: 999999999999\r\n"):
        with pytest.raises(ValueError):
            length(bad)
    assert stub_module.parse_chunk_size(b"1A;ext=1\r\n") == 26
    assert stub_module.parse_chunk_size(b"0\r\n") == 0
    for bad in (b"-1\r\n", b"\r\n", b"0x10\r\n", b"zz\r\n"):
        with pytest.raises(ValueError):
            stub_module.parse_chunk_size(bad)


def test_response_head() -> None:
    assert stub_module.response_head(429, [("Retry-After", "2")]) == (
        b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 2\r\n\r\n"
    )
    assert stub_module.response_head(599, []) == b"HTTP/1.1 599 Unknown\r\n\r\n"


def test_pad_reply() -> None:
    assert stub_module.pad_reply("short", None) == "short"
    assert stub_module.pad_reply("already long", 5) == "already long"
    for size in (6, 7, 100, 4096):
        padded = stub_module.pad_reply("héllo", size)
        assert padded.startswith("héllo") and len(padded.encode("utf-8")) == size
        assert not padded.endswith(" ")


# -- raw sockets: framing on the wire ----------------------------------------------


def exchange(srv: StubServer, request: bytes) -> bytes:
    """Send ``request`` on a new connection; everything until the server closes it."""
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as sock:
        sock.sendall(request)
        received = b""
        while data := sock.recv(65536):
            received += data
    return received


def test_chunked_request_body(server: StubServer) -> None:
    body = json.dumps(aivvm_body("sent in chunks")).encode()
    framed = b"".join(b"%X\r\n%b\r\n" % (len(p), p) for p in (body[:10], body[10:])) + b"0\r\nX-Trailer: 1\r\n\r\n"
    reply = exchange(server, b"POST /api/chat HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                             b"Connection: close\r\n\r\n" + framed)
    head, _, chunked = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"Connection: close" in head
    assert b"".join(chunked.split(b"\r\n")[1::2]) == b"Stand-in reply to: sent in chunks"


def test_bad_requests_on_the_wire(server: StubServer) -> None:
    assert exchange(server, b"NONSENSE\r\n\r\n").startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert exchange(server, b"PUT /api/chat HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}").startswith(
        b"HTTP/1.1 501 Not Implemented\r\n")
    reply = exchange(server, b"POST /api/chat HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
    assert reply.startswith(b"HTTP/1.1 400 Bad Request\r\n") and reply.endswith(b"Bad request: unreadable body")
    assert exchange(server, b"GET /health HTTP/1.0\r\n\r\n").endswith(b"\r\n\r\nok")


# -- long replies and the in-flight peak -----------------------------------------------


def test_reply_bytes_knob_and_directive() -> None:
    with StubServer(reply_bytes=5000, chunks=50) as srv:
        resp, chunks = raw_chunks(srv, "long one")
        assert resp.status_code == 200 and len(chunks) == 50
        text = b"".join(chunks).decode("utf-8")
        assert len(text) == 5000 and text.startswith("Stand-in reply to: long one ")
        assert len(post_aivvm(srv, "[[stub bytes=64]] shorter").content) == 64
        stream = openai_post(srv, "long [[stub chunks=8]]", stream=True)
        pieces = [json.loads(e)["choices"][0]["delta"].get("content", "") for e in sse_events(stream)[:-1]]
        assert len("".join(pieces).encode()) == 5000 and len([p for p in pieces if p]) == 8
    with pytest.raises(ValueError):
        stub_module.build_plan({"bytes": "-3"})


async def _open_request(port: int, content: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    body = json.dumps(aivvm_body(content)).encode()
    writer.write(b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body))
    await writer.drain()
    return reader, writer


async def _read_reply(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """(chunk count, body) of a chunked 200 response."""
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n"), head
    pieces: list[bytes] = []
    while size := stub_module.parse_chunk_size(await reader.readuntil(b"\r\n")):
        pieces.append((await reader.readexactly(size + 2))[:size])
    await reader.readexactly(2)
    return len(pieces), b"".join(pieces)


CONNECTIONS = 2000


@pytest.mark.integration  # a load of 2,000 connections: not for the fast tier
def test_two_thousand_concurrent_paced_streams() -> None:
    """2,000 streams at once, each 10 chunks over 1 s, on one server thread: all complete, exactly."""
    stub_module.raise_open_file_limit()

    async def one(port: int, i: int) -> tuple[int, bytes]:
        reader, writer = await _open_request(port, f"many {i}")
        try:
            return await _read_reply(reader)
        finally:
            writer.close()

    async def all_of_them(port: int) -> list[tuple[int, bytes]]:
        return await asyncio.wait_for(asyncio.gather(*(one(port, i) for i in range(CONNECTIONS))), 120)

    with StubServer(latency=1.0, chunks=10) as srv:
        replies = asyncio.run(all_of_them(srv.port))
        stats = settled(srv)
    assert [r[1] for r in replies] == [f"Stand-in reply to: many {i}".encode() for i in range(CONNECTIONS)]
    assert {r[0] for r in replies} == {10}
    assert stats["requests"] == CONNECTIONS and stats["in_flight"] == 0
    assert 1 <= stats["peak_in_flight"] <= CONNECTIONS


@pytest.mark.integration  # a load of 2,000 connections: not for the fast tier
def test_peak_in_flight_counts_two_thousand_held_streams() -> None:
    """Held streams (stall) are in flight together; reset restarts the peak from them; stop ends them."""
    stub_module.raise_open_file_limit()
    srv = StubServer().start()

    async def hold() -> float:
        opened = await asyncio.gather(*(_open_request(srv.port, f"[[stub fault=stall stall=60]] held {i}")
                                        for i in range(CONNECTIONS)))
        deadline = time.monotonic() + 60
        while srv.stats()["in_flight"] < CONNECTIONS and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        stats = srv.stats()
        assert (stats["in_flight"], stats["peak_in_flight"]) == (CONNECTIONS, CONNECTIONS)
        srv.reset()
        assert (srv.stats()["requests"], srv.stats()["peak_in_flight"]) == (0, CONNECTIONS)
        started = time.monotonic()
        await asyncio.to_thread(srv.stop)
        stopped = time.monotonic() - started
        for reader, writer in opened:
            await asyncio.wait_for(reader.read(), 10)  # the server dropped it: end of stream
            writer.close()
        return stopped

    try:
        assert asyncio.run(hold()) < 10
    finally:
        srv.stop()
    assert srv.stats()["in_flight"] == 0


def test_small_peak_is_exact(server: StubServer) -> None:
    for i in range(3):
        post_aivvm(server, f"one at a time {i}")
    stats = settled(server)
    assert (stats["peak_in_flight"], stats["in_flight"]) == (1, 0)


def test_stub_subprocess_serves_and_stops_on_sigterm() -> None:
    port = stub_module._listening_socket("127.0.0.1", 0, 1)
    number = port.getsockname()[1]
    port.close()
    proc = subprocess.Popen([sys.executable, "-m", "aivvm_batch", "stub", "--port", str(number),
                             "--latency", "0.2", "--chunks", "3"], stderr=subprocess.PIPE)
    try:
        line = proc.stderr.readline() if proc.stderr else b""
        assert f"http://127.0.0.1:{number}".encode() in line
        srv_url = f"http://127.0.0.1:{number}"
        resp = requests.post(f"{srv_url}/api/chat", json=aivvm_body("from a process"), stream=True, timeout=5)
        assert len(list(resp.raw.read_chunked(decode_content=False))) == 3
        assert requests.get(f"{srv_url}/__stub/stats", timeout=5).json()["peak_in_flight"] == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
