"""Tests of the chat providers over real HTTP on 127.0.0.1.

Two servers are used: the stand-in provider (``aivvm_batch.stub.StubServer``,
module-scoped, faults injected with ``[[stub ...]]`` directives) and a tiny
capturing server defined here, which records exactly what the client sent and
answers with a scripted status, headers and literal byte chunks.
"""

from __future__ import annotations

import gzip
import json
import math
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from aivvm_batch.stub import SPLIT_TEXT, StubServer
from worker.errors import (
    EmptyReply,
    IncompleteReply,
    ProviderHTTPError,
    ProviderTimeout,
    ProviderTransportError,
    UnsupportedModel,
)
from worker.providers import Aivvm, CompletionCall, OpenAI, StreamEnd
from worker.providers.http import decode_utf8, retry_after
from worker.providers.openai import sse_data

DEFAULT_PROMPT = (
    "You are ChatGPT, a large language model trained by OpenAI. "
    "Follow the user's instructions carefully. Respond using markdown."
)
AIVVM_MODELS = {
    "gpt-3.5-turbo": "GPT-3.5",
    "gpt-3.5-turbo-0613": "GPT-3.5-0613",
    "gpt-3.5-turbo-16k": "GPT-3.5-16K",
    "gpt-3.5-turbo-16k-0613": "GPT-3.5-16K-0613",
    "gpt-4": "GPT-4",
    "gpt-4-0613": "GPT-4-0613",
    "gpt-4-32k": "GPT-4-32K",
    "gpt-4-32k-0613": "GPT-4-32K-0613",
}
# --------------------------------------------------------------------------
# The capturing server
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Scripted:
    """What the capturing server answers."""

    status: int = 200
    chunks: tuple[bytes, ...] = (b"ok",)
    headers: tuple[tuple[str, str], ...] = ()
    delay: float = 0.0  # seconds between chunks
    chunked: bool = True
    gzip_if_accepted: bool = False  # compress the body when the client says it accepts gzip


@dataclass(frozen=True)
class Captured:
    method: str
    path: str
    headers: dict[str, str]  # lower-cased names
    body: Any


@dataclass
class CaptureServer:
    reply: Scripted = field(default_factory=Scripted)
    requests: list[Captured] = field(default_factory=list)

    def __post_init__(self) -> None:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                return

            def do_POST(self) -> None:  # noqa: N802
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {k.lower(): v for k, v in self.headers.items()}
                owner.requests.append(Captured("POST", self.path, headers, json.loads(raw or b"null")))
                self._answer(owner.reply, headers)

            def _answer(self, reply: Scripted, headers: dict[str, str]) -> None:
                chunks = list(reply.chunks)
                extra = list(reply.headers)
                if reply.gzip_if_accepted and "gzip" in headers.get("accept-encoding", ""):
                    data = gzip.compress(b"".join(chunks))
                    chunks = [data[: len(data) // 2], data[len(data) // 2 :]]
                    extra.append(("Content-Encoding", "gzip"))
                self.send_response(reply.status)
                for name, value in extra:
                    self.send_header(name, value)
                if not reply.chunked:
                    body = b"".join(chunks)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for index, chunk in enumerate(chunks):
                    if index and reply.delay:
                        time.sleep(reply.delay)
                    self.wfile.write(b"%X\r\n%b\r\n" % (len(chunk), chunk))
                    self.wfile.flush()
                self.wfile.write(b"0\r\n\r\n")

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


# --------------------------------------------------------------------------
# Fixtures and helpers
# --------------------------------------------------------------------------


@pytest.fixture
def keyed_stub(stub_factory: Callable[..., StubServer]) -> StubServer:
    return stub_factory(api_key="sk-test")


@pytest.fixture()
def capture() -> Iterator[CaptureServer]:
    server = CaptureServer()
    yield server
    server.stop()


def closed_port_url() -> str:
    """A base URL on which nothing listens (connection refused)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return f"http://127.0.0.1:{port}"


def user(content: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": content}]


def reply_to(prompt: str) -> str:
    return f"Stand-in reply to: {prompt}"


def collect(chunks: Iterable[Any]) -> tuple[list[Any], BaseException | None]:
    """Everything yielded before the stream raised, and what it raised."""
    got: list[Any] = []
    try:
        for chunk in chunks:
            got.append(chunk)
    except Exception as exc:  # noqa: BLE001 - the test inspects it
        return got, exc
    return got, None


def aivvm_text(base_url: str, content: str, **kwargs: Any) -> str:
    return "".join(Aivvm.create_completion(model="gpt-4", messages=user(content), stream=True,
                                           base_url=base_url, **kwargs))


def aivvm_error(base_url: str, content: str, **kwargs: Any) -> tuple[list[str], BaseException]:
    chunks, error = collect(Aivvm.create_completion(model="gpt-4", messages=user(content), stream=True,
                                                    base_url=base_url, **kwargs))
    assert error is not None, f"expected an error, got {chunks!r}"
    return chunks, error


def sent_body(capture: CaptureServer, **kwargs: Any) -> dict[str, Any]:
    """Send one Aivvm request to the capturing server and return its JSON body."""
    kwargs.setdefault("model", "gpt-4")
    kwargs.setdefault("messages", user("Hello"))
    assert "".join(Aivvm.create_completion(stream=True, base_url=capture.base_url, **kwargs)) == "ok"
    assert len(capture.requests) == 1
    body = capture.requests[0].body
    assert isinstance(body, dict)
    return body


def sse(*events: dict[str, Any] | str) -> tuple[bytes, ...]:
    return tuple(
        b"data: %s\n\n" % (e if isinstance(e, str) else json.dumps(e)).encode("utf-8") for e in events
    )


# --------------------------------------------------------------------------
# Aivvm: the request
# --------------------------------------------------------------------------


def test_aivvm_request_line_and_headers(capture: CaptureServer) -> None:
    sent_body(capture)
    request = capture.requests[0]
    assert request.method == "POST"
    assert request.path == "/api/chat"
    assert request.headers["content-type"] == "application/json"
    assert request.headers["accept"] == "text/event-stream"


def test_aivvm_body_keys_and_defaults(capture: CaptureServer) -> None:
    body = sent_body(capture, model="gpt-4", messages=user("Hello"))
    assert set(body) == {"model", "messages", "key", "prompt", "temperature"}
    assert body["model"] == {"id": "gpt-4", "name": "GPT-4"}
    assert body["messages"] == [{"role": "user", "content": "Hello"}]
    assert body["key"] == ""
    assert body["prompt"] == DEFAULT_PROMPT
    assert body["temperature"] == 0.7


@pytest.mark.parametrize(("model_id", "name"), sorted(AIVVM_MODELS.items()))
def test_aivvm_model_is_the_table_entry(model_id: str, name: str) -> None:
    body = Aivvm.request_body(CompletionCall(model=model_id, messages=tuple(user("x"))))
    assert body["model"] == {"id": model_id, "name": name}


def test_aivvm_empty_model_means_gpt_35_turbo(capture: CaptureServer) -> None:
    body = sent_body(capture, model="")
    assert body["model"] == {"id": "gpt-3.5-turbo", "name": "GPT-3.5"}


def test_aivvm_leading_system_message_becomes_prompt(capture: CaptureServer) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    body = sent_body(capture, messages=messages)
    assert body["prompt"] == "Be brief."
    assert body["messages"] == [{"role": "user", "content": "Hi"}]


def test_aivvm_explicit_system_message_wins(capture: CaptureServer) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    body = sent_body(capture, messages=messages, system_message="Be formal.")
    assert body["prompt"] == "Be formal."
    assert body["messages"][-1] == {"role": "user", "content": "Hi"}


def test_aivvm_non_leading_system_message_stays_in_messages(capture: CaptureServer) -> None:
    messages = [{"role": "user", "content": "a"}, {"role": "system", "content": "s"},
                {"role": "user", "content": "b"}]
    body = sent_body(capture, messages=messages)
    assert body["prompt"] == DEFAULT_PROMPT
    assert body["messages"] == messages


def test_aivvm_explicit_temperature_and_key(capture: CaptureServer) -> None:
    body = sent_body(capture, temperature=0.0, api_key="user-key")
    assert body["temperature"] == 0.0
    assert body["key"] == "user-key"


# --------------------------------------------------------------------------
# Aivvm: create_completion against the stand-in
# --------------------------------------------------------------------------


def test_create_completion_streams_str_chunks(stub: StubServer) -> None:
    chunks = list(Aivvm.create_completion(model="gpt-4", messages=user("Hello there"), stream=True,
                                          base_url=stub.base_url))
    assert len(chunks) > 1
    assert all(isinstance(c, str) and c for c in chunks)
    assert "".join(chunks) == reply_to("Hello there")


def test_create_completion_without_stream_yields_one_chunk(stub: StubServer) -> None:
    chunks = list(Aivvm.create_completion(model="gpt-4", messages=user("Hello there"), stream=False,
                                          base_url=stub.base_url))
    assert chunks == [reply_to("Hello there")]


def test_unsupported_model_refused_before_any_request(capture: CaptureServer) -> None:
    with pytest.raises(ValueError) as caught:
        list(Aivvm.create_completion(model="gpt-5", messages=user("Hi"), stream=True,
                                     base_url=capture.base_url))
    assert str(caught.value) == "Model is not supported: gpt-5"
    assert isinstance(caught.value, UnsupportedModel)
    assert caught.value.kind == "unsupported_model"
    assert caught.value.transient is False
    assert capture.requests == []


def test_stub_split_characters_come_out_whole(stub: StubServer) -> None:
    text = aivvm_text(stub.base_url, "[[stub fault=split]] hi")
    assert text == f"{SPLIT_TEXT} {reply_to('hi')}"
    assert "\ufffd" not in text


def test_stub_bad_bytes_become_replacement_characters(stub: StubServer) -> None:
    text = aivvm_text(stub.base_url, "[[stub fault=badbytes]] hi")
    assert text.count("\ufffd") == 2  # b"\xff\xfe": two invalid bytes, one U+FFFD each
    assert text.replace("\ufffd\ufffd", "") == reply_to("hi")


# --------------------------------------------------------------------------
# Aivvm: base URL precedence
# --------------------------------------------------------------------------


def test_base_url_kwarg_beats_env(stub: StubServer, capture: CaptureServer,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIVVM_BASE_URL", capture.base_url)
    assert aivvm_text(stub.base_url, "Hi") == reply_to("Hi")
    assert capture.requests == []


def test_env_beats_class_url(stub: StubServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Aivvm, "url", closed_port_url())
    monkeypatch.setenv("AIVVM_BASE_URL", stub.base_url)
    chunks = Aivvm.create_completion(model="gpt-4", messages=user("Hi"), stream=True)
    assert "".join(chunks) == reply_to("Hi")


def test_class_url_used_without_kwarg_or_env(capture: CaptureServer,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Aivvm, "url", capture.base_url + "/")
    assert "".join(Aivvm.create_completion(model="gpt-4", messages=user("Hi"), stream=True)) == "ok"
    assert [r.path for r in capture.requests] == ["/api/chat"]


# --------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------


def test_character_split_across_http_chunks_comes_out_whole(capture: CaptureServer) -> None:
    capture.reply = Scripted(chunks=(b"caf\xc3", b"\xa9 ok"), delay=0.05)
    chunks = list(Aivvm.create_completion(model="gpt-4", messages=user("Hi"), stream=True,
                                          base_url=capture.base_url))
    assert "".join(chunks) == "café ok"
    assert all("\ufffd" not in c for c in chunks)


def test_invalid_bytes_become_replacement_character(capture: CaptureServer) -> None:
    capture.reply = Scripted(chunks=(b"ok \xff", b" end"))
    assert aivvm_text(capture.base_url, "Hi") == "ok \ufffd end"


def test_gzip_encoded_reply_is_decoded(capture: CaptureServer) -> None:
    """The client may not advertise gzip and then hand the compressed bytes on as text."""
    capture.reply = Scripted(chunks=(b"hello ", b"gzip"), gzip_if_accepted=True)
    assert aivvm_text(capture.base_url, "Hi") == "hello gzip"


EMOJI = "🎉".encode("utf-8")  # 4 bytes


@pytest.mark.parametrize(
    ("chunks", "expected"),
    [
        ([b"caf\xc3", b"\xa9"], ["caf", "é"]),
        ([b"a" + EMOJI[:1], EMOJI[1:] + b"b"], ["a", "🎉b"]),
        ([b"a" + EMOJI[:2], EMOJI[2:] + b"b"], ["a", "🎉b"]),
        ([EMOJI[:1], EMOJI[1:2], EMOJI[2:3], EMOJI[3:]], ["🎉"]),
        ([b"ab" + EMOJI[:2]], ["ab", "\ufffd"]),
        ([b"\xff"], ["\ufffd"]),
        ([b"a\xffb"], ["a\ufffdb"]),
        ([b"\xe9A"], ["\ufffdA"]),
        ([b"", b"x", b""], ["x"]),
        ([], []),
    ],
    ids=["2byte", "emoji-1+3", "emoji-2+2", "emoji-1+1+1+1", "truncated-end", "ff", "ff-inside",
         "latin1", "empty-chunks", "nothing"],
)
def test_decode_utf8(chunks: list[bytes], expected: list[str]) -> None:
    assert list(decode_utf8(iter(chunks))) == expected


# --------------------------------------------------------------------------
# Aivvm: errors
# --------------------------------------------------------------------------


def test_http_500_is_transient(stub: StubServer) -> None:
    chunks, error = aivvm_error(stub.base_url, "[[stub fault=status code=500]] hi")
    assert chunks == []
    assert isinstance(error, ProviderHTTPError)
    assert error.status == 500
    assert error.transient is True
    assert error.kind == "server_error"
    assert str(error) == "HTTP 500: Error"


def test_http_400_is_not_transient(stub: StubServer) -> None:
    _, error = aivvm_error(stub.base_url, "[[stub fault=status code=400]] hi")
    assert isinstance(error, ProviderHTTPError)
    assert error.status == 400
    assert error.transient is False


def test_http_429_carries_retry_after(stub: StubServer) -> None:
    _, error = aivvm_error(stub.base_url, "[[stub fault=429 retry_after=2]] hi")
    assert isinstance(error, ProviderHTTPError)
    assert error.status == 429
    assert error.transient is True
    assert error.kind == "rate_limited"
    assert error.retry_after == 2.0


def test_error_status_line_reason_used_when_body_is_empty(capture: CaptureServer) -> None:
    capture.reply = Scripted(status=502, chunks=(), chunked=False)
    _, error = aivvm_error(capture.base_url, "hi")
    assert isinstance(error, ProviderHTTPError)
    assert error.status == 502
    assert str(error) == "HTTP 502: Bad Gateway"


@pytest.mark.parametrize(
    ("value", "expected"),
    [("2", 2.0), ("0", 0.0), ("1.5", 1.5), (None, None), ("", None), ("soon", None),
     ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0)],
)
def test_retry_after(value: str | None, expected: float | None) -> None:
    assert retry_after(value) == expected


def test_retry_after_http_date_in_the_future() -> None:
    seconds = retry_after(formatdate(time.time() + 30, usegmt=True))
    assert seconds is not None
    assert 28.0 <= seconds <= 30.5


@pytest.mark.parametrize("value", ["inf", "Infinity", "1e999"])
def test_retry_after_rejects_non_finite_numbers(value: str) -> None:
    """RFC 9110: delay-seconds is 1*DIGIT. "inf" must not become an infinite wait."""
    seconds = retry_after(value)
    assert seconds is None or math.isfinite(seconds)


def test_cut_mid_stream_is_incomplete_after_partial_text(stub: StubServer) -> None:
    chunks, error = aivvm_error(stub.base_url, "[[stub fault=cut]] hi")
    partial = "".join(chunks)
    assert isinstance(error, IncompleteReply)
    assert error.transient is True
    assert partial  # some text arrived before the break
    assert reply_to("hi").startswith(partial)
    assert partial != reply_to("hi")


def test_stall_beyond_read_timeout_is_a_timeout(stub: StubServer) -> None:
    started = time.monotonic()
    chunks, error = aivvm_error(stub.base_url, "[[stub fault=stall stall=5]] hi", read_timeout=0.5)
    assert isinstance(error, ProviderTimeout)
    assert error.transient is True
    assert time.monotonic() - started < 3.0
    assert reply_to("hi").startswith("".join(chunks))


def test_connection_refused_is_a_transport_error() -> None:
    _, error = aivvm_error(closed_port_url(), "hi")
    assert isinstance(error, ProviderTransportError)
    assert error.transient is True
    assert error.kind == "connection_error"


def test_empty_body_is_an_empty_reply(stub: StubServer) -> None:
    chunks, error = aivvm_error(stub.base_url, "[[stub fault=empty]] hi")
    assert chunks == []
    assert isinstance(error, EmptyReply)
    assert error.transient is True


def test_reset_is_a_transient_transport_failure(stub: StubServer) -> None:
    chunks, error = aivvm_error(stub.base_url, "[[stub fault=reset]] hi")
    assert chunks == []
    assert isinstance(error, (ProviderTransportError, IncompleteReply))
    assert error.transient is True


def test_item_deadline_ends_a_slow_reply(stub: StubServer) -> None:
    started = time.monotonic()
    chunks, error = aivvm_error(stub.base_url, "[[stub latency=3 chunks=30]] slow",
                                deadline=time.monotonic() + 0.3)
    elapsed = time.monotonic() - started
    assert isinstance(error, ProviderTimeout)
    assert elapsed < 1.5
    assert len("".join(chunks)) < len(reply_to("slow"))


def test_passed_deadline_sends_no_request(capture: CaptureServer) -> None:
    _, error = aivvm_error(capture.base_url, "hi", deadline=time.monotonic() - 1)
    assert isinstance(error, ProviderTimeout)
    assert capture.requests == []


# --------------------------------------------------------------------------
# OpenAI-compatible provider
# --------------------------------------------------------------------------


def openai_call(base: str, content: str, **kwargs: Any) -> CompletionCall:
    return CompletionCall(model="gpt-4", messages=tuple(user(content)), base_url=base, **kwargs)


def test_openai_stream_text_and_end(stub: StubServer) -> None:
    items = list(OpenAI.stream(openai_call(stub.base_url + "/v1", "Hello there")))
    texts = [i for i in items if isinstance(i, str)]
    assert "".join(texts) == reply_to("Hello there")
    # the stand-in counts whitespace words: 2 in the prompt, 5 in the reply
    assert items[-1] == StreamEnd(finish_reason="stop", prompt_tokens=2, completion_tokens=5)
    assert sum(isinstance(i, StreamEnd) for i in items) == 1


def test_openai_create_completion_yields_only_text(stub: StubServer) -> None:
    chunks = list(OpenAI.create_completion(model="gpt-4", messages=user("Hi"), stream=True,
                                           base_url=stub.base_url + "/v1"))
    assert all(isinstance(c, str) for c in chunks)
    assert "".join(chunks) == reply_to("Hi")


def test_openai_request_shape(capture: CaptureServer) -> None:
    capture.reply = Scripted(chunks=sse(
        {"choices": [{"index": 0, "delta": {"content": "ok"}, "finish_reason": None}]},
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
        "[DONE]",
    ))
    items = list(OpenAI.stream(openai_call(capture.base_url + "/v1/", "Hi", temperature=0.2,
                                           api_key="sk-given")))
    assert items == ["ok", StreamEnd("stop", None, None)]
    request = capture.requests[0]
    assert request.method == "POST"
    assert request.path == "/v1/chat/completions"
    assert request.headers["authorization"] == "Bearer sk-given"
    assert request.headers["content-type"] == "application/json"
    assert request.body["model"] == "gpt-4"
    assert request.body["messages"] == user("Hi")
    assert request.body["stream"] is True
    assert request.body["temperature"] == 0.2


def test_openai_without_key_sends_no_authorization(capture: CaptureServer) -> None:
    capture.reply = Scripted(chunks=sse(
        {"choices": [{"delta": {"content": "ok"}, "finish_reason": "stop"}]}, "[DONE]"))
    assert "".join(OpenAI.create_completion(model="", messages=user("Hi"),
                                            base_url=capture.base_url)) == "ok"
    assert "authorization" not in capture.requests[0].headers
    assert capture.requests[0].body["model"] == "gpt-3.5-turbo"
    assert "temperature" not in capture.requests[0].body


def test_openai_missing_key_is_401_invalid_api_key(keyed_stub: StubServer) -> None:
    chunks, error = collect(OpenAI.stream(openai_call(keyed_stub.base_url + "/v1", "Hi")))
    assert chunks == []
    assert isinstance(error, ProviderHTTPError)
    assert error.status == 401
    assert error.kind == "invalid_api_key"
    assert error.transient is False


@pytest.mark.parametrize("allow", ["AIVVM_BATCH_ALLOWED_BASE_URLS", "OPENAI_BASE_URL"])
def test_openai_key_from_env_is_accepted_where_allowed(keyed_stub: StubServer, monkeypatch: pytest.MonkeyPatch,
                                                       allow: str) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.setenv(allow, keyed_stub.base_url + "/v1/")
    chunks = OpenAI.create_completion(model="gpt-4", messages=user("Hi"), base_url=keyed_stub.base_url + "/v1")
    assert "".join(chunks) == reply_to("Hi")


def test_openai_key_from_env_is_withheld_elsewhere(keyed_stub: StubServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """The seed's create_completion binds the worker's key like the worker does."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    _, error = collect(OpenAI.create_completion(model="gpt-4", messages=user("Hi"),
                                                base_url=keyed_stub.base_url + "/v1"))
    assert isinstance(error, ProviderHTTPError)
    assert error.status == 401
    assert "OPENAI_API_KEY was not sent" in str(error)


def test_openai_wrong_key_is_401(keyed_stub: StubServer) -> None:
    _, error = collect(OpenAI.stream(openai_call(keyed_stub.base_url + "/v1", "Hi", api_key="sk-wrong")))
    assert isinstance(error, ProviderHTTPError)
    assert error.status == 401
    assert "was not sent" not in str(error)


def test_openai_error_kind_from_json_type(stub: StubServer) -> None:
    _, error = collect(OpenAI.stream(openai_call(stub.base_url + "/v1", "[[stub fault=status code=404]] hi")))
    assert isinstance(error, ProviderHTTPError)
    assert error.status == 404
    assert error.kind == "not_found_error"
    assert "Stand-in fault injected" in str(error)


def test_openai_custom_json_error_body(capture: CaptureServer) -> None:
    body = {"error": {"message": "overloaded", "type": "custom_overload", "code": "x"}}
    capture.reply = Scripted(status=503, chunks=(json.dumps(body).encode(),), chunked=False,
                             headers=(("Content-Type", "application/json"),))
    _, error = collect(OpenAI.stream(openai_call(capture.base_url, "hi")))
    assert isinstance(error, ProviderHTTPError)
    assert error.status == 503
    assert error.kind == "custom_overload"
    assert error.transient is True
    assert str(error) == "HTTP 503: overloaded"


def test_openai_429_retry_after(stub: StubServer) -> None:
    _, error = collect(OpenAI.stream(openai_call(stub.base_url + "/v1", "[[stub fault=429 retry_after=3]] hi")))
    assert isinstance(error, ProviderHTTPError)
    assert error.status == 429
    assert error.transient is True
    assert error.kind == "rate_limit_exceeded"
    assert error.retry_after == 3.0


def test_openai_cut_is_incomplete(stub: StubServer) -> None:
    items, error = collect(OpenAI.stream(openai_call(stub.base_url + "/v1", "[[stub fault=cut]] hi")))
    assert isinstance(error, IncompleteReply)
    assert all(isinstance(i, str) for i in items)
    assert reply_to("hi").startswith("".join(items))


def test_openai_stream_without_done_or_finish_is_incomplete(capture: CaptureServer) -> None:
    capture.reply = Scripted(chunks=sse({"choices": [{"delta": {"content": "par"}, "finish_reason": None}]}))
    items, error = collect(OpenAI.stream(openai_call(capture.base_url, "hi")))
    assert items == ["par"]
    assert isinstance(error, IncompleteReply)


@pytest.mark.parametrize(
    ("texts", "expected"),
    [
        (["data: a\n\ndata: b\n\n"], ["a", "b"]),
        (list('data: {"x": 1}\n\ndata: [DONE]\n\n'), ['{"x": 1}', "[DONE]"]),
        (["da", "ta: hel", "lo\n", "\ndata: w", "orld\n\n"], ["hello", "world"]),
        (["data: a\ndata: b\n\n"], ["a\nb"]),
        (["data: a\n", "data: b\n", "\n"], ["a\nb"]),
        (["data: a\r\n\r\ndata: b\r", "\n\r", "\n"], ["a", "b"]),
        ([": ping\n\nevent: x\nid: 1\ndata: c\n\n"], ["c"]),
        (["data:tight\n\ndata:  two\n\n"], ["tight", " two"]),
        (["data: last"], ["last"]),
        (["\n\n\n"], []),
        ([], []),
    ],
    ids=["whole", "char-by-char", "split-prefix", "multiline", "multiline-split", "crlf", "comments",
         "spaces", "no-final-blank", "blank-only", "nothing"],
)
def test_sse_data(texts: list[str], expected: list[str]) -> None:
    assert list(sse_data(iter(texts))) == expected
