"""Local stand-in chat provider ("stub") for trying aivvm-batch and for tests.

This is NOT a model and generates nothing: it is a small deterministic HTTP
server on 127.0.0.1 that answers chat requests with canned text so the batch
worker can be tried end to end, tested and benchmarked without a real
provider.  It speaks two protocols:

* Aivvm / chatbot-ui: ``POST /api/chat`` -> the reply as plain UTF-8 text,
  streamed with ``Transfer-Encoding: chunked``, one HTTP chunk per reply chunk.
  Chunks are cut on bytes, so a multi-byte character may straddle two chunks.
* OpenAI-compatible: ``POST /v1/chat/completions`` (and ``/chat/completions``)
  -> server-sent ``chat.completion.chunk`` events (``"stream": true``) or one
  ``chat.completion`` JSON object.

The reply is ``"Stand-in reply to: <last user message>"``.  A message may
carry one directive ``[[stub k=v k=v ...]]`` that is removed from the text and
injects a fault or changes the reply (see :func:`parse_directive` and
:func:`build_plan`).  ``GET /__stub/stats``, ``POST /__stub/reset`` and
``GET /health`` let tests inspect the server.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import itertools
import json
import math
import re
import signal
import socket
import socketserver
import struct
import sys
import threading
import time
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from typing import Any, Callable, Iterable, Sequence, TypeVar

__all__ = [
    "StubServer",
    "serve",
    "FaultPlan",
    "ChatRequest",
    "parse_directive",
    "find_directive",
    "build_plan",
    "last_user_prompt",
    "reply_text",
    "word_text",
    "split_evenly",
    "aivvm_chunks",
    "openai_stream_parts",
    "parse_chat_request",
]

AIVVM_PATH = "/api/chat"
OPENAI_PATHS = frozenset({"/v1/chat/completions", "/chat/completions"})
STATS_PATH = "/__stub/stats"
RESET_PATH = "/__stub/reset"
HEALTH_PATH = "/health"

FAULTS = frozenset({"status", "429", "cut", "stall", "badbytes", "split", "empty", "reset"})
DIRECTIVE_KEYS = frozenset(
    {"fault", "code", "retry_after", "stall", "times", "latency", "chunks", "words"}
)
SPLIT_TEXT = "Stand-in reply: héllo wörld — 日本語 ✓ 🎉"
VOCABULARY = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel")
BAD_BYTES = b"\xff\xfe"
DONE_EVENT = b"data: [DONE]\n\n"
TIMES_WINDOW = 100_000
MAX_BODY_BYTES = 32 * 1024 * 1024
DEFAULT_STALL = 30.0

_DIRECTIVE_RE = re.compile(r"[ \t]*\[\[stub(?P<body>(?:\s+[^\s\[\]]+)*)\s*\]\][ \t]*")
_OPENAI_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_api_key",
    404: "not_found_error",
    429: "rate_limit_exceeded",
}

_Seq = TypeVar("_Seq", str, bytes)


# --------------------------------------------------------------------------
# Pure functions: directives, reply text, chunking, protocol payloads
# --------------------------------------------------------------------------


def parse_directive(text: str) -> tuple[dict[str, str], str]:
    """Find the first ``[[stub k=v ...]]`` in ``text``.

    Returns ``(options, text_without_directive)``; the remaining text is
    stripped, and words on both sides of a removed inline directive are kept
    one space apart.  Without a directive: ``({}, text.strip())``.  A token
    without ``=`` maps to an empty value; a repeated key keeps the last value.
    """
    match = _DIRECTIVE_RE.search(text)
    if match is None:
        return {}, text.strip()
    options: dict[str, str] = {}
    for token in match.group("body").split():
        key, _, value = token.partition("=")
        options[key] = value
    before, after = text[: match.start()], text[match.end() :]
    glue = " " if before[-1:].strip() and after[:1].strip() else ""
    return options, (before + glue + after).strip()


def message_text(content: Any) -> str:
    """Text of a message ``content``: a string, or OpenAI-style text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = (p.get("text") for p in content if isinstance(p, dict))
        return "".join(p for p in parts if isinstance(p, str))
    return ""


def find_directive(messages: Sequence[dict[str, Any]]) -> dict[str, str]:
    """Options of the directive in the latest message that carries one."""
    for message in reversed(messages):
        text = message_text(message.get("content"))
        if _DIRECTIVE_RE.search(text):
            return parse_directive(text)[0]
    return {}


def last_user_prompt(messages: Sequence[dict[str, Any]]) -> str:
    """Content of the last ``user`` message, directive removed, stripped."""
    for message in reversed(messages):
        if message.get("role") == "user":
            return parse_directive(message_text(message.get("content")))[1]
    return ""


def messages_key(messages: Sequence[dict[str, Any]]) -> str:
    """Bookkeeping key for ``times=``: sha1 of the messages JSON (sorted keys)."""
    encoded = json.dumps(messages, sort_keys=True, ensure_ascii=False).encode("utf-8")
    return hashlib.sha1(encoded).hexdigest()


@dataclass(frozen=True)
class FaultPlan:
    """What to do for one request, after merging its directive with server knobs."""

    fault: str | None = None
    code: int = 500
    retry_after: int = 1
    stall: float = DEFAULT_STALL
    times: int | None = None
    latency: float = 0.0
    chunks: int = 4
    words: int | None = None

    @property
    def error_status(self) -> int | None:
        """HTTP error status this plan answers with, if any."""
        if self.fault == "status":
            return self.code
        if self.fault == "429":
            return 429
        return None


def _int_option(options: dict[str, str], key: str, default: int, lo: int, hi: int | None = None) -> int:
    if key not in options:
        return default
    try:
        value = int(options[key])
    except ValueError:
        raise ValueError(f"stub directive: {key}={options[key]!r} is not an integer") from None
    if value < lo or (hi is not None and value > hi):
        bounds = f">= {lo}" if hi is None else f"in {lo}..{hi}"
        raise ValueError(f"stub directive: {key} must be {bounds}")
    return value


def _float_option(options: dict[str, str], key: str, default: float) -> float:
    if key not in options:
        return default
    try:
        value = float(options[key])
    except ValueError:
        raise ValueError(f"stub directive: {key}={options[key]!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"stub directive: {key} must be a finite number >= 0")
    return value


def build_plan(options: dict[str, str], *, latency: float = 0.0, chunks: int = 4) -> FaultPlan:
    """Validate directive ``options`` into a :class:`FaultPlan`.

    ``latency``/``chunks`` are the server-wide defaults the directive may
    override.  Raises ``ValueError`` for unknown keys, unknown faults or bad
    numbers (the server answers those with 400).
    """
    unknown = sorted(set(options) - DIRECTIVE_KEYS)
    if unknown:
        raise ValueError(f"stub directive: unknown key(s) {', '.join(unknown)}")
    fault = options.get("fault")
    if fault is not None and fault not in FAULTS:
        raise ValueError(f"stub directive: unknown fault {fault!r}")
    return FaultPlan(
        fault=fault,
        code=_int_option(options, "code", 500, 400, 599),
        retry_after=_int_option(options, "retry_after", 1, 0),
        stall=_float_option(options, "stall", DEFAULT_STALL),
        times=_int_option(options, "times", 0, 0) if "times" in options else None,
        latency=_float_option(options, "latency", latency),
        chunks=_int_option(options, "chunks", chunks, 1),
        words=_int_option(options, "words", 0, 0) if "words" in options else None,
    )


def word_text(count: int) -> str:
    """``count`` deterministic words cycling over :data:`VOCABULARY`."""
    return " ".join(VOCABULARY[i % len(VOCABULARY)] for i in range(count))


def reply_text(prompt: str, *, words: int | None = None, split: bool = False) -> str:
    """The canned reply: ``Stand-in reply to: <prompt>`` or ``words`` words.

    With ``split`` the multi-byte :data:`SPLIT_TEXT` is put in front.
    """
    base = word_text(words) if words is not None else f"Stand-in reply to: {prompt}"
    return f"{SPLIT_TEXT} {base}" if split else base


def even_cuts(length: int, parts: int) -> list[int]:
    """Interior offsets cutting ``length`` items into ``parts`` near-equal pieces."""
    parts = max(1, min(parts, length))
    size, extra = divmod(length, parts)
    cuts, offset = [], 0
    for index in range(parts - 1):
        offset += size + (1 if index < extra else 0)
        cuts.append(offset)
    return cuts


def cut_at(seq: _Seq, cuts: Iterable[int]) -> list[_Seq]:
    """Cut ``seq`` at the given offsets; never yields empty pieces."""
    if not seq:
        return []
    bounds = [0, *sorted({c for c in cuts if 0 < c < len(seq)}), len(seq)]
    return [seq[a:b] for a, b in zip(bounds, bounds[1:])]


def split_evenly(seq: _Seq, parts: int) -> list[_Seq]:
    """``seq`` in at most ``parts`` near-equal non-empty pieces (``[]`` if empty)."""
    return cut_at(seq, even_cuts(len(seq), parts))


def multibyte_cuts(text: str) -> list[int]:
    """UTF-8 byte offsets one byte into every multi-byte character of ``text``."""
    cuts, offset = [], 0
    for char in text:
        size = len(char.encode("utf-8"))
        if size > 1:
            cuts.append(offset + 1)
        offset += size
    return cuts


def aivvm_chunks(text: str, parts: int, fault: str | None = None) -> list[bytes]:
    """Byte chunks of the Aivvm body for ``text``.

    ``fault="split"`` also cuts inside every multi-byte character (so at least
    one is certainly split when there is one); ``fault="badbytes"`` inserts
    :data:`BAD_BYTES` as its own chunk in the middle.
    """
    data = text.encode("utf-8")
    cuts = even_cuts(len(data), parts)
    if fault == "split":
        cuts += multibyte_cuts(text)
    chunks = cut_at(data, cuts)
    if fault == "badbytes":
        chunks.insert((len(chunks) + 1) // 2, BAD_BYTES)
    return chunks


def chunk_frame(data: bytes) -> bytes:
    """One HTTP/1.1 chunk (``data`` must be non-empty)."""
    return b"%X\r\n%b\r\n" % (len(data), data)


def sse_event(payload: dict[str, Any]) -> bytes:
    """``data: <json>\\n\\n``."""
    return b"data: %b\n\n" % json.dumps(payload, ensure_ascii=False).encode("utf-8")


def word_count(text: str) -> int:
    """Whitespace word count: the stub's token estimate."""
    return len(text.split())


def usage_for(messages: Sequence[dict[str, Any]], reply: str) -> dict[str, int]:
    """OpenAI ``usage`` with whitespace word counts as token counts."""
    prompt = sum(word_count(message_text(m.get("content"))) for m in messages)
    completion = word_count(reply)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def openai_chunk(
    completion_id: str, created: int, model: str, delta: dict[str, str], finish_reason: str | None = None
) -> dict[str, Any]:
    """One ``chat.completion.chunk`` object with a single choice."""
    return {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }


def openai_stream_parts(
    text: str,
    parts: int,
    *,
    completion_id: str,
    created: int,
    model: str,
    usage: dict[str, int] | None = None,
) -> tuple[list[bytes], list[bytes], list[bytes]]:
    """SSE events as ``(head, body, tail)``.

    ``head`` is the role event, ``body`` one content event per text piece
    (cut on characters), ``tail`` the finish event, the usage event (when
    ``usage`` is given) and ``data: [DONE]``.
    """
    head = [sse_event(openai_chunk(completion_id, created, model, {"role": "assistant", "content": ""}))]
    body = [
        sse_event(openai_chunk(completion_id, created, model, {"content": piece}))
        for piece in split_evenly(text, parts)
    ]
    tail = [sse_event(openai_chunk(completion_id, created, model, {}, "stop"))]
    if usage is not None:
        tail.append(
            sse_event(
                {
                    "id": completion_id,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model,
                    "choices": [],
                    "usage": usage,
                }
            )
        )
    tail.append(DONE_EVENT)
    return head, body, tail


def openai_completion(
    text: str, *, completion_id: str, created: int, model: str, usage: dict[str, int]
) -> dict[str, Any]:
    """A non-streamed ``chat.completion`` object."""
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
        ],
        "usage": usage,
    }


def openai_error(status: int, message: str) -> dict[str, Any]:
    """OpenAI-style error body for ``status``."""
    default = "server_error" if status >= 500 else "invalid_request_error"
    kind = _OPENAI_ERROR_TYPES.get(status, default)
    return {"error": {"message": message, "type": kind, "code": kind}}


@dataclass(frozen=True)
class ChatRequest:
    """A parsed chat request (either protocol)."""

    messages: list[dict[str, Any]]
    prompt: str
    plan: FaultPlan
    key: str
    model: str
    stream: bool
    include_usage: bool


def parse_chat_request(raw: bytes, *, latency: float = 0.0, chunks: int = 4) -> ChatRequest:
    """Parse a chat request body of either protocol; ``ValueError`` if invalid."""
    body = json.loads(raw)
    if not isinstance(body, dict):
        raise ValueError("request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise ValueError("'messages' must be a list of objects")
    model = body.get("model")
    stream_options = body.get("stream_options")
    include_usage = isinstance(stream_options, dict) and stream_options.get("include_usage") is True
    return ChatRequest(
        messages=messages,
        prompt=last_user_prompt(messages),
        plan=build_plan(find_directive(messages), latency=latency, chunks=chunks),
        key=messages_key(messages),
        model=model if isinstance(model, str) else "stub",
        stream=bool(body.get("stream")),
        include_usage=include_usage,
    )


# --------------------------------------------------------------------------
# Shared server state
# --------------------------------------------------------------------------


class _StubState:
    """Knobs, counters and fault bookkeeping shared by all handler threads."""

    def __init__(self, *, latency: float, chunks: int, api_key: str | None) -> None:
        self.latency = latency
        self.chunks = chunks
        self.api_key = api_key
        self.stop_event = threading.Event()
        self._lock = threading.Lock()
        self._requests = 0
        self._by_prompt: dict[str, int] = {}
        self._times: collections.deque[float] = collections.deque(maxlen=TIMES_WINDOW)
        self._fault_uses: dict[str, int] = {}
        self._ids = itertools.count(1)
        self._connections: set[socket.socket] = set()

    def record_arrival(self) -> None:
        now = time.time()
        with self._lock:
            self._requests += 1
            self._times.append(now)

    def record_prompt(self, prompt: str) -> None:
        with self._lock:
            self._by_prompt[prompt] = self._by_prompt.get(prompt, 0) + 1

    def consume_fault(self, key: str, times: int) -> bool:
        """True while the fault for ``key`` has been applied fewer than ``times`` times."""
        with self._lock:
            used = self._fault_uses.get(key, 0)
            if used >= times:
                return False
            self._fault_uses[key] = used + 1
            return True

    def next_id(self) -> str:
        with self._lock:
            return f"chatcmpl-stub-{next(self._ids)}"

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "requests": self._requests,
                "by_prompt": dict(self._by_prompt),
                "times": list(self._times),
            }

    def reset(self) -> None:
        with self._lock:
            self._requests = 0
            self._by_prompt.clear()
            self._times.clear()
            self._fault_uses.clear()

    def track(self, conn: socket.socket) -> None:
        with self._lock:
            self._connections.add(conn)

    def untrack(self, conn: socket.socket) -> None:
        with self._lock:
            self._connections.discard(conn)

    def close_connections(self) -> None:
        """Shut down every open client connection (used by ``stop``)."""
        with self._lock:
            conns = list(self._connections)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


# --------------------------------------------------------------------------
# HTTP plumbing
# --------------------------------------------------------------------------


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 1024
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], state: _StubState) -> None:
        self.state = state
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # Skip HTTPServer.server_bind's socket.getfqdn(), which may hit DNS.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], OSError):
            return  # client went away; nothing worth reporting
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "aivvm-stub/1"
    sys_version = ""
    disable_nagle_algorithm = True
    server: _HTTPServer

    # -- lifecycle -------------------------------------------------------

    def setup(self) -> None:
        super().setup()
        self.server.state.track(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:
            pass
        finally:
            self.server.state.untrack(self.connection)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        return  # silent: the stub must sustain thousands of requests/s

    # -- routing ---------------------------------------------------------

    def do_GET(self) -> None:  # noqa: N802
        path = self.path.split("?", 1)[0]
        try:
            if path == HEALTH_PATH:
                self._send_body(200, "text/plain; charset=utf-8", b"ok")
            elif path == STATS_PATH:
                stats = json.dumps(self.server.state.snapshot()).encode("utf-8")
                self._send_body(200, "application/json", stats)
            elif path == AIVVM_PATH or path in OPENAI_PATHS:
                self._send_body(405, "text/plain; charset=utf-8", b"Method not allowed", (("Allow", "POST"),))
            else:
                self._send_body(404, "text/plain; charset=utf-8", b"Not found")
        except OSError:
            self.close_connection = True

    def do_POST(self) -> None:  # noqa: N802
        path = self.path.split("?", 1)[0]
        try:
            raw = self._read_body()
            if raw is None:
                self.close_connection = True
                self._send_body(400, "text/plain; charset=utf-8", b"Bad request: unreadable body")
            elif path == AIVVM_PATH or path in OPENAI_PATHS:
                self._chat(raw, openai=path != AIVVM_PATH)
            elif path == RESET_PATH:
                self.server.state.reset()
                self._send_body(204, None, b"")
            else:
                self._send_body(404, "text/plain; charset=utf-8", b"Not found")
        except OSError:
            self.close_connection = True

    # -- request body ----------------------------------------------------

    def _read_body(self) -> bytes | None:
        """Exactly the request body (Content-Length or chunked); None if unreadable."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked_body()
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            return None
        if length < 0 or length > MAX_BODY_BYTES:
            return None
        data = self.rfile.read(length)
        return data if len(data) == length else None

    def _read_chunked_body(self) -> bytes | None:
        parts: list[bytes] = []
        total = 0
        while True:
            line = self.rfile.readline(1024)
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                return None
            total += size
            if size < 0 or total > MAX_BODY_BYTES:
                return None
            if size == 0:
                break
            data = self.rfile.read(size + 2)
            if len(data) != size + 2:
                return None
            parts.append(data[:size])
        while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
            pass  # trailers
        return b"".join(parts)

    # -- chat ------------------------------------------------------------

    def _chat(self, raw: bytes, *, openai: bool) -> None:
        state = self.server.state
        state.record_arrival()
        if openai and not self._authorized():
            self._send_error_reply(401, "Incorrect API key provided.", openai=True)
            return
        try:
            request = parse_chat_request(raw, latency=state.latency, chunks=state.chunks)
        except ValueError as exc:
            self._send_error_reply(400, f"Bad request: {exc}", openai=openai)
            return
        state.record_prompt(request.prompt)
        plan = request.plan
        if plan.fault and plan.times is not None and not state.consume_fault(request.key, plan.times):
            plan = replace(plan, fault=None)
        if plan.fault == "reset":
            self._reset()
        elif plan.error_status is not None:
            message = f"Stand-in fault injected (status {plan.error_status})" if openai else "Error"
            self._send_error_reply(plan.error_status, message, openai=openai, retry_after=plan.retry_after)
        elif openai:
            self._reply_openai(request, plan)
        else:
            self._reply_aivvm(request, plan)

    def _authorized(self) -> bool:
        key = self.server.state.api_key
        if key is None:
            return True
        given = self.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
        return hmac.compare_digest(given, f"Bearer {key}".encode("utf-8"))

    def _reply_aivvm(self, request: ChatRequest, plan: FaultPlan) -> None:
        text = reply_text(request.prompt, words=plan.words, split=plan.fault == "split")
        chunks = [] if plan.fault == "empty" else aivvm_chunks(text, plan.chunks, plan.fault)
        self._stream("text/plain; charset=utf-8", [], chunks, [], plan)

    def _reply_openai(self, request: ChatRequest, plan: FaultPlan) -> None:
        state = self.server.state
        text = reply_text(request.prompt, words=plan.words, split=plan.fault == "split")
        completion_id, created = state.next_id(), int(time.time())
        usage = usage_for(request.messages, text)
        if request.stream:
            if plan.fault == "empty":
                self._stream("text/event-stream", [], [], [DONE_EVENT], plan)
                return
            head, body, tail = openai_stream_parts(
                text,
                plan.chunks,
                completion_id=completion_id,
                created=created,
                model=request.model,
                usage=usage if request.include_usage else None,
            )
            self._stream("text/event-stream", head, body, tail, plan)
        elif plan.fault == "empty":
            self._pause(plan.latency)
            self._send_body(200, "application/json", b"")
        else:
            payload = openai_completion(
                text, completion_id=completion_id, created=created, model=request.model, usage=usage
            )
            self._send_fixed(json.dumps(payload, ensure_ascii=False).encode("utf-8"), plan)

    # -- responses -------------------------------------------------------

    def _send_error_reply(self, status: int, message: str, *, openai: bool, retry_after: int = 1) -> None:
        """Aivvm: ``message`` as text/plain; OpenAI: the JSON error form."""
        headers = [("Retry-After", str(retry_after))] if status == 429 else []
        if not openai:
            self._send_body(status, "text/plain; charset=utf-8", message.encode("utf-8"), headers)
        else:
            body = json.dumps(openai_error(status, message)).encode("utf-8")
            self._send_body(status, "application/json", body, headers)

    def _send_body(
        self,
        status: int,
        content_type: str | None,
        body: bytes,
        headers: Iterable[tuple[str, str]] = (),
    ) -> None:
        """A complete response with Content-Length (the connection stays usable)."""
        self.send_response(status)
        if content_type is not None:
            self.send_header("Content-Type", content_type)
        for name, value in headers:
            self.send_header(name, value)
        if status != 204:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body:
            self._write(body)

    def _send_fixed(self, body: bytes, plan: FaultPlan) -> None:
        """Non-streamed body after ``latency``; ``cut``/``stall`` act half-way."""
        self._pause(plan.latency)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if plan.fault not in ("cut", "stall"):
            self._write(body)
            return
        half = len(body) // 2
        if not self._write(body[:half]):
            return
        if plan.fault == "cut":
            self._cut()
            return
        self._stall(plan.stall)
        self._write(body[half:])

    def _stream(
        self,
        content_type: str,
        head: list[bytes],
        body: list[bytes],
        tail: list[bytes],
        plan: FaultPlan,
    ) -> None:
        """Chunked response: ``head`` at once, ``body`` paced over ``latency``, then ``tail``.

        Each piece is its own HTTP chunk, written (and so flushed) separately.
        """
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        if head and not self._write(b"".join(chunk_frame(p) for p in head)):
            return
        cut_after = max(1, len(body) // 2) if body else 0
        if plan.fault == "cut" and not body:
            self._cut()
            return
        delay = plan.latency / len(body) if body else plan.latency
        started = time.monotonic()
        for index, piece in enumerate(body, 1):
            # pace to a schedule, so sleep overshoots do not add up over the chunks
            self._pause(started + index * delay - time.monotonic())
            if not self._write(chunk_frame(piece)):
                return
            if plan.fault == "cut" and index == cut_after:
                self._cut()
                return
            if plan.fault == "stall" and index == 1:
                self._stall(plan.stall)
        if not body:
            if plan.fault == "stall":
                self._stall(plan.stall)
            self._pause(delay)
        self._write(b"".join(chunk_frame(p) for p in tail) + b"0\r\n\r\n")

    # -- low level -------------------------------------------------------

    def _write(self, data: bytes) -> bool:
        """Write and flush ``data``; False (and close) if the client has gone."""
        try:
            self.wfile.write(data)
            return True
        except OSError:  # BrokenPipeError, ConnectionResetError, ...
            self.close_connection = True
            return False

    def _pause(self, seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds)

    def _stall(self, seconds: float) -> None:
        self.server.state.stop_event.wait(seconds)  # ends early on stop()

    def _cut(self) -> None:
        """Close abruptly, without the terminating zero-length chunk."""
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.connection.close()

    def _reset(self) -> None:
        """Drop the connection without any response (RST where possible)."""
        self.close_connection = True
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        self.connection.close()


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------


class StubServer:
    """Stand-in chat provider for tries and tests; deterministic, not a model.

    Binds on construction (``port=0`` picks a free port); :meth:`start`
    serves in a daemon thread.  Usable as a context manager.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        latency: float = 0.0,
        chunks: int = 4,
        api_key: str | None = None,
    ) -> None:
        if not math.isfinite(latency) or latency < 0:
            raise ValueError("latency must be a finite number >= 0")
        if chunks < 1:
            raise ValueError("chunks must be >= 1")
        self._state = _StubState(latency=latency, chunks=chunks, api_key=api_key)
        self._httpd = _HTTPServer((host, port), self._state)
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._lock = threading.Lock()

    @property
    def host(self) -> str:
        return str(self._httpd.server_address[0])

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def base_url(self) -> str:
        """Aivvm base URL; the OpenAI base is ``base_url + "/v1"``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> StubServer:
        """Serve in a daemon thread (no-op if already started)."""
        with self._lock:
            if self._stopped:
                raise RuntimeError("StubServer was stopped; create a new one")
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._httpd.serve_forever,
                    kwargs={"poll_interval": 0.1},
                    name=f"aivvm-stub-{self.port}",
                    daemon=True,
                )
                self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, end stalls, drop open connections; idempotent."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            thread = self._thread
        self._state.stop_event.set()
        if thread is not None:
            self._httpd.shutdown()
            thread.join(timeout=5)
        self._state.close_connections()
        self._httpd.server_close()

    def stats(self) -> dict[str, Any]:
        """Same as ``GET /__stub/stats``."""
        return self._state.snapshot()

    def reset(self) -> None:
        """Same as ``POST /__stub/reset``."""
        self._state.reset()

    def __enter__(self) -> StubServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _install_sigterm(stop: threading.Event) -> Callable[[], None]:
    """Make SIGTERM set ``stop`` (main thread only); returns the undo function."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = signal.signal(signal.SIGTERM, on_sigterm)

    def restore() -> None:
        signal.signal(signal.SIGTERM, previous)

    return restore


def serve(
    host: str,
    port: int,
    *,
    latency: float,
    chunks: int,
    api_key: str | None,
    ready: Callable[[str], None] | None = None,
) -> None:
    """Run the stand-in provider until KeyboardInterrupt or SIGTERM (blocking).

    ``ready(base_url)`` is called once the server is listening.
    """
    stop = threading.Event()
    restore = _install_sigterm(stop)
    try:
        with StubServer(host, port, latency=latency, chunks=chunks, api_key=api_key) as server:
            if ready is not None:
                ready(server.base_url)
            while not stop.wait(0.5):
                pass
    except KeyboardInterrupt:
        pass
    finally:
        restore()
