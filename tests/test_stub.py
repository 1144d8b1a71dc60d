"""Tests for the stand-in chat provider (aivvm_batch.stub); real HTTP on 127.0.0.1."""

from __future__ import annotations

import http.client
import json
import socket
import time
from typing import Any, Iterator

import pytest
import requests

from aivvm_batch.stub import StubServer, parse_directive
from aivvm_batch import stub as stub_module

MODEL = {"id": "gpt-3.5-turbo", "name": "GPT-3.5"}


@pytest.fixture(scope="module")
def server() -> Iterator[StubServer]:
    with StubServer() as srv:
        yield srv


@pytest.fixture()
def fresh() -> Iterator[StubServer]:
    with StubServer() as srv:
        yield srv


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
    assert objs[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
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
    assert data["choices"][0]["message"] == {"role": "assistant", "content": "Stand-in reply to: plain json"}
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


def test_stats_and_reset(fresh: StubServer) -> None:
    post_aivvm(fresh, "alpha")
    post_aivvm(fresh, "alpha [[stub chunks=1]]")
    openai_post(fresh, "beta", stream=True)
    post_aivvm(fresh, "[[stub fault=status times=1]] gamma")
    assert post_aivvm(fresh, "[[stub fault=status times=1]] gamma").status_code == 200
    stats = requests.get(f"{fresh.base_url}/__stub/stats", timeout=5).json()
    assert stats["requests"] == 5
    assert stats["by_prompt"] == {"alpha": 2, "beta": 1, "gamma": 2}
    assert len(stats["times"]) == 5 and stats["times"] == sorted(stats["times"])
    assert fresh.stats() == stats

    resp = requests.post(f"{fresh.base_url}/__stub/reset", timeout=5)
    assert resp.status_code == 204
    assert fresh.stats() == {"requests": 0, "by_prompt": {}, "times": []}
    # fault bookkeeping reset too: the times=1 fault fires again
    assert post_aivvm(fresh, "[[stub fault=status times=1]] gamma").status_code == 500


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
