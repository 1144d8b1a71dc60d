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

import asyncio
import collections
import email.utils
import hashlib
import hmac
import itertools
import json
import math
import re
import resource
import signal
import socket
import struct
import threading
import time
from dataclasses import dataclass, replace
from http import HTTPStatus
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
    "pad_reply",
    "RequestHead",
    "parse_request_head",
    "body_length",
    "parse_chunk_size",
    "response_head",
    "raise_open_file_limit",
]

AIVVM_PATH = "/api/chat"
OPENAI_PATHS = frozenset({"/v1/chat/completions", "/chat/completions"})
STATS_PATH = "/__stub/stats"
RESET_PATH = "/__stub/reset"
HEALTH_PATH = "/health"

FAULTS = frozenset({"status", "429", "cut", "stall", "badbytes", "split", "empty", "reset"})
DIRECTIVE_KEYS = frozenset(
    {"fault", "code", "retry_after", "stall", "times", "latency", "chunks", "words", "bytes"}
)
SPLIT_TEXT = "Stand-in reply: héllo wörld — 日本語 ✓ 🎉"
VOCABULARY = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel")
BAD_BYTES = b"\xff\xfe"
DONE_EVENT = b"data: [DONE]\n\n"
TIMES_WINDOW = 100_000
MAX_BODY_BYTES = 32 * 1024 * 1024
DEFAULT_STALL = 30.0
MAX_HEAD_BYTES = 64 * 1024
DEFAULT_BACKLOG = 4096
SERVER_NAME = "aivvm-stub/1"

_DIRECTIVE_RE = re.compile(r"[ \t]*\[\[stub(?P<body>(?:\s+[^\s\[\]]+)*)\s*\]\][ \t]*")
_OPENAI_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_api_key",
    404: "not_found_error",
    429: "rate_limit_exceeded",
}

_FILLER = " " + " ".join(VOCABULARY)

_REASONS = {status.value: status.phrase for status in HTTPStatus}

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
    reply_bytes: int | None = None

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


def build_plan(
    options: dict[str, str], *, latency: float = 0.0, chunks: int = 4, reply_bytes: int | None = None
) -> FaultPlan:
    """Validate directive ``options`` into a :class:`FaultPlan`.

    ``latency``/``chunks``/``reply_bytes`` are the server-wide defaults the
    directive may override (``bytes=N``).  Raises ``ValueError`` for unknown keys, unknown faults or bad
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
        reply_bytes=_int_option(options, "bytes", 0, 0) if "bytes" in options else reply_bytes,
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


def pad_reply(text: str, size: int | None) -> str:
    """``text`` followed by filler words up to exactly ``size`` UTF-8 bytes.

    A long reply for benchmarks: the canned text stays at the front, and a
    ``text`` already ``size`` bytes or longer is returned unchanged.
    """
    if size is None:
        return text
    need = size - len(text.encode("utf-8"))
    if need <= 0:
        return text
    filler = (_FILLER * (need // len(_FILLER) + 1))[:need]
    if filler.endswith(" "):
        filler = filler[:-1] + "."
    return text + filler


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


def parse_chat_request(
    raw: bytes, *, latency: float = 0.0, chunks: int = 4, reply_bytes: int | None = None
) -> ChatRequest:
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
        plan=build_plan(find_directive(messages), latency=latency, chunks=chunks, reply_bytes=reply_bytes),
        key=messages_key(messages),
        model=model if isinstance(model, str) else "stub",
        stream=bool(body.get("stream")),
        include_usage=include_usage,
    )


# --------------------------------------------------------------------------
# HTTP/1.1 framing: pure functions on bytes
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class RequestHead:
    """Request line and headers (names lower-cased; repeated headers joined with ``, ``)."""

    method: str
    path: str
    version: str
    headers: dict[str, str]

    @property
    def keep_alive(self) -> bool:
        """HTTP/1.1 keeps the connection unless ``close``; HTTP/1.0 only with ``keep-alive``."""
        tokens = {t.strip().lower() for t in self.headers.get("connection", "").split(",")}
        if self.version == "HTTP/1.0":
            return "keep-alive" in tokens
        return "close" not in tokens


def parse_request_head(data: bytes) -> RequestHead:
    """Parse ``request-line CRLF *(header CRLF) CRLF``; ``ValueError`` if malformed.

    Empty lines before the request line are skipped (RFC 9112, 2.2); folded
    header lines are refused.
    """
    lines = data.decode("latin-1").split("\r\n")
    while lines and lines[0] == "":
        lines.pop(0)
    if not lines:
        raise ValueError("empty request")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[0].isalpha() or not parts[1]:
        raise ValueError(f"bad request line {lines[0]!r}")
    method, target, version = parts
    if version not in ("HTTP/1.0", "HTTP/1.1"):
        raise ValueError(f"unsupported version {version!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip() or line[0] in " \t":
            raise ValueError(f"bad header line {line!r}")
        key = name.lower()
        value = value.strip()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    return RequestHead(method=method, path=target.split("?", 1)[0], version=version, headers=headers)


def body_length(head: RequestHead) -> int | None:
    """Bytes of body after ``head``: ``None`` for a chunked body; ``ValueError`` if invalid."""
    if "chunked" in head.headers.get("transfer-encoding", "").lower():
        return None
    raw = head.headers.get("content-length", "0") or "0"
    if not raw.isdigit():
        raise ValueError(f"bad Content-Length {raw!r}")
    length = int(raw)
    if length > MAX_BODY_BYTES:
        raise ValueError("body too large")
    return length


def parse_chunk_size(line: bytes) -> int:
    """Size of one chunk of a chunked body from its size line; ``ValueError`` if invalid."""
    digits = line.split(b";", 1)[0].strip()
    if not digits or not all(c in b"0123456789abcdefABCDEF" for c in digits):
        raise ValueError(f"bad chunk size line {line!r}")
    return int(digits, 16)


def response_head(status: int, headers: Iterable[tuple[str, str]]) -> bytes:
    """``HTTP/1.1 <status> <reason>`` and the header lines, ending with the empty line."""
    reason = _REASONS.get(status, "Unknown")
    lines = [f"HTTP/1.1 {status} {reason}", *(f"{name}: {value}" for name, value in headers), "", ""]
    return "\r\n".join(lines).encode("latin-1")


# --------------------------------------------------------------------------
# Shared server state
# --------------------------------------------------------------------------


class _StubState:
    """Knobs, counters and fault bookkeeping; read by other threads through :meth:`snapshot`."""

    def __init__(self, *, latency: float, chunks: int, api_key: str | None, reply_bytes: int | None) -> None:
        self.latency = latency
        self.chunks = chunks
        self.api_key = api_key
        self.reply_bytes = reply_bytes
        self._lock = threading.Lock()
        self._requests = 0
        self._in_flight = 0
        self._peak = 0
        self._by_prompt: dict[str, int] = {}
        self._times: collections.deque[float] = collections.deque(maxlen=TIMES_WINDOW)
        self._fault_uses: dict[str, int] = {}
        self._ids = itertools.count(1)

    def begin_call(self) -> None:
        """A chat request arrived: count it and its concurrency."""
        now = time.time()
        with self._lock:
            self._requests += 1
            self._times.append(now)
            self._in_flight += 1
            self._peak = max(self._peak, self._in_flight)

    def end_call(self) -> None:
        """Its response is written (or the connection is gone)."""
        with self._lock:
            self._in_flight -= 1

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
                "in_flight": self._in_flight,
                "peak_in_flight": self._peak,
            }

    def reset(self) -> None:
        """Forget counts and fault uses; the peak restarts from what is in flight now."""
        with self._lock:
            self._requests = 0
            self._by_prompt.clear()
            self._times.clear()
            self._fault_uses.clear()
            self._peak = self._in_flight


# --------------------------------------------------------------------------
# Serving core: one asyncio loop, one task per connection
# --------------------------------------------------------------------------


class _Core:
    """The listening socket's server, run inside the loop of :class:`StubServer`'s thread."""

    def __init__(self, state: _StubState, sock: socket.socket, backlog: int) -> None:
        self.state = state
        self.sock = sock
        self.backlog = backlog
        self.stopping = asyncio.Event()
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[Any]] = set()
        self.writers: set[asyncio.StreamWriter] = set()
        self._date_second = -1
        self._date = ""

    async def start(self) -> None:
        self.server = await asyncio.start_server(
            self.connection, sock=self.sock, backlog=self.backlog, limit=MAX_HEAD_BYTES
        )

    async def shutdown(self) -> None:
        """Stop accepting, end stalls, drop every open connection."""
        self.stopping.set()
        if self.server is not None:
            self.server.close()
        for writer in list(self.writers):
            writer.transport.abort()
        tasks = list(self.tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=3)

    def http_date(self) -> str:
        now = time.time()
        if int(now) != self._date_second:
            self._date_second = int(now)
            self._date = email.utils.formatdate(now, usegmt=True)
        return self._date

    async def connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self.tasks.add(task)
        self.writers.add(writer)
        sock = writer.get_extra_info("socket")
        try:
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while not self.stopping.is_set():
                try:
                    raw_head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    return  # the client closed between requests
                except asyncio.LimitOverrunError:
                    await _Exchange(self, writer, None).send_text(431, "Request header fields too large")
                    return
                try:
                    head = parse_request_head(raw_head)
                except ValueError as exc:
                    await _Exchange(self, writer, None).send_text(400, f"Bad request: {exc}")
                    return
                exchange = _Exchange(self, writer, head)
                await exchange.handle(reader)
                if exchange.close:
                    return
        except OSError:
            return  # the client went away
        finally:
            self.writers.discard(writer)
            if task is not None:
                self.tasks.discard(task)
            writer.close()


class _Exchange:
    """One request and its response on a connection."""

    def __init__(self, core: _Core, writer: asyncio.StreamWriter, head: RequestHead | None) -> None:
        self.core = core
        self.state = core.state
        self.writer = writer
        self.head = head
        self.close = head is None or not head.keep_alive

    # -- routing ---------------------------------------------------------

    async def handle(self, reader: asyncio.StreamReader) -> None:
        assert self.head is not None
        method, path = self.head.method, self.head.path
        if method == "GET":
            await self._get(path)
        elif method == "POST":
            raw = await self._read_body(reader)
            if raw is None:
                self.close = True
                await self.send_text(400, "Bad request: unreadable body")
            elif path == AIVVM_PATH or path in OPENAI_PATHS:
                self.state.begin_call()
                try:
                    await self._chat(raw, openai=path != AIVVM_PATH)
                finally:
                    self.state.end_call()
            elif path == RESET_PATH:
                self.state.reset()
                await self.send_body(204, None, b"")
            else:
                await self.send_text(404, "Not found")
        else:
            self.close = True  # its body, if any, was not read
            await self.send_text(501, f"Unsupported method ({method!r})")

    async def _get(self, path: str) -> None:
        if path == HEALTH_PATH:
            await self.send_text(200, "ok")
        elif path == STATS_PATH:
            await self.send_body(200, "application/json", json.dumps(self.state.snapshot()).encode("utf-8"))
        elif path == AIVVM_PATH or path in OPENAI_PATHS:
            await self.send_text(405, "Method not allowed", (("Allow", "POST"),))
        else:
            await self.send_text(404, "Not found")

    async def _read_body(self, reader: asyncio.StreamReader) -> bytes | None:
        """Exactly the request body (Content-Length or chunked); None if unreadable."""
        assert self.head is not None
        try:
            length = body_length(self.head)
            if length is not None:
                return await reader.readexactly(length)
            parts: list[bytes] = []
            total = 0
            while True:
                size = parse_chunk_size(await reader.readuntil(b"\n"))
                total += size
                if total > MAX_BODY_BYTES:
                    return None
                if size == 0:
                    break
                data = await reader.readexactly(size + 2)
                parts.append(data[:size])
            while await reader.readuntil(b"\n") not in (b"\r\n", b"\n"):
                pass  # trailers
            return b"".join(parts)
        except (ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            return None

    # -- chat ------------------------------------------------------------

    async def _chat(self, raw: bytes, *, openai: bool) -> None:
        state = self.state
        if openai and not self._authorized():
            await self._send_error_reply(401, "Incorrect API key provided.", openai=True)
            return
        try:
            request = parse_chat_request(
                raw, latency=state.latency, chunks=state.chunks, reply_bytes=state.reply_bytes
            )
        except ValueError as exc:
            await self._send_error_reply(400, f"Bad request: {exc}", openai=openai)
            return
        state.record_prompt(request.prompt)
        plan = request.plan
        if plan.fault and plan.times is not None and not state.consume_fault(request.key, plan.times):
            plan = replace(plan, fault=None)
        if plan.fault == "reset":
            self._reset()
        elif plan.error_status is not None:
            message = f"Stand-in fault injected (status {plan.error_status})" if openai else "Error"
            await self._send_error_reply(plan.error_status, message, openai=openai, retry_after=plan.retry_after)
        elif openai:
            await self._reply_openai(request, plan)
        else:
            await self._reply_aivvm(request, plan)

    def _authorized(self) -> bool:
        key = self.state.api_key
        if key is None:
            return True
        assert self.head is not None
        given = self.head.headers.get("authorization", "").encode("latin-1")
        return hmac.compare_digest(given, f"Bearer {key}".encode("utf-8"))

    def _text(self, request: ChatRequest, plan: FaultPlan) -> str:
        text = reply_text(request.prompt, words=plan.words, split=plan.fault == "split")
        return pad_reply(text, plan.reply_bytes)

    async def _reply_aivvm(self, request: ChatRequest, plan: FaultPlan) -> None:
        text = self._text(request, plan)
        chunks = [] if plan.fault == "empty" else aivvm_chunks(text, plan.chunks, plan.fault)
        await self._stream("text/plain; charset=utf-8", [], chunks, [], plan)

    async def _reply_openai(self, request: ChatRequest, plan: FaultPlan) -> None:
        text = self._text(request, plan)
        completion_id, created = self.state.next_id(), int(time.time())
        usage = usage_for(request.messages, text)
        if request.stream:
            if plan.fault == "empty":
                await self._stream("text/event-stream", [], [], [DONE_EVENT], plan)
                return
            head, body, tail = openai_stream_parts(
                text,
                plan.chunks,
                completion_id=completion_id,
                created=created,
                model=request.model,
                usage=usage if request.include_usage else None,
            )
            await self._stream("text/event-stream", head, body, tail, plan)
        elif plan.fault == "empty":
            await self._pause(plan.latency)
            await self.send_body(200, "application/json", b"")
        else:
            payload = openai_completion(
                text, completion_id=completion_id, created=created, model=request.model, usage=usage
            )
            await self._send_fixed(json.dumps(payload, ensure_ascii=False).encode("utf-8"), plan)

    # -- responses -------------------------------------------------------

    def _head(self, status: int, headers: Iterable[tuple[str, str]]) -> bytes:
        closing = (("Connection", "close"),) if self.close else ()
        return response_head(
            status, (("Server", SERVER_NAME), ("Date", self.core.http_date()), *headers, *closing)
        )

    async def _send_error_reply(self, status: int, message: str, *, openai: bool, retry_after: int = 1) -> None:
        """Aivvm: ``message`` as text/plain; OpenAI: the JSON error form."""
        headers = [("Retry-After", str(retry_after))] if status == 429 else []
        if not openai:
            await self.send_text(status, message, headers)
        else:
            body = json.dumps(openai_error(status, message)).encode("utf-8")
            await self.send_body(status, "application/json", body, headers)

    async def send_text(self, status: int, text: str, headers: Iterable[tuple[str, str]] = ()) -> None:
        await self.send_body(status, "text/plain; charset=utf-8", text.encode("utf-8"), headers)

    async def send_body(
        self,
        status: int,
        content_type: str | None,
        body: bytes,
        headers: Iterable[tuple[str, str]] = (),
    ) -> None:
        """A complete response with Content-Length (the connection stays usable)."""
        fields = [("Content-Type", content_type)] if content_type is not None else []
        fields += list(headers)
        if status != 204:
            fields.append(("Content-Length", str(len(body))))
        await self._write(self._head(status, fields) + body)

    async def _send_fixed(self, body: bytes, plan: FaultPlan) -> None:
        """Non-streamed body after ``latency``; ``cut``/``stall`` act half-way."""
        await self._pause(plan.latency)
        head = self._head(200, (("Content-Type", "application/json"), ("Content-Length", str(len(body)))))
        if plan.fault not in ("cut", "stall"):
            await self._write(head + body)
            return
        half = len(body) // 2
        if not await self._write(head + body[:half]):
            return
        if plan.fault == "cut":
            self._cut()
            return
        await self._stall(plan.stall)
        await self._write(body[half:])

    async def _stream(
        self,
        content_type: str,
        head: list[bytes],
        body: list[bytes],
        tail: list[bytes],
        plan: FaultPlan,
    ) -> None:
        """Chunked response: ``head`` at once, ``body`` paced over ``latency``, then ``tail``.

        Each piece is its own HTTP chunk, written separately.
        """
        fields = (("Content-Type", content_type), ("Cache-Control", "no-cache"), ("Transfer-Encoding", "chunked"))
        if not await self._write(self._head(200, fields) + b"".join(chunk_frame(p) for p in head)):
            return
        cut_after = max(1, len(body) // 2) if body else 0
        if plan.fault == "cut" and not body:
            self._cut()
            return
        delay = plan.latency / len(body) if body else plan.latency
        loop = asyncio.get_running_loop()
        started = loop.time()
        for index, piece in enumerate(body, 1):
            # pace to a schedule, so sleep overshoots do not add up over the chunks
            await self._pause(started + index * delay - loop.time())
            if not await self._write(chunk_frame(piece)):
                return
            if plan.fault == "cut" and index == cut_after:
                self._cut()
                return
            if plan.fault == "stall" and index == 1:
                await self._stall(plan.stall)
        if not body:
            if plan.fault == "stall":
                await self._stall(plan.stall)
            await self._pause(delay)
        await self._write(b"".join(chunk_frame(p) for p in tail) + b"0\r\n\r\n")

    # -- low level -------------------------------------------------------

    async def _write(self, data: bytes) -> bool:
        """Write ``data``; False (and close) if the client has gone."""
        if self.writer.transport.is_closing():
            self.close = True
            return False
        self.writer.write(data)
        try:
            await self.writer.drain()
        except OSError:  # ConnectionResetError, BrokenPipeError, ...
            self.close = True
            return False
        return True

    async def _pause(self, seconds: float) -> None:
        if seconds > 0:
            await asyncio.sleep(seconds)

    async def _stall(self, seconds: float) -> None:
        """Wait ``seconds``, or less if the server stops."""
        try:
            await asyncio.wait_for(self.core.stopping.wait(), seconds)
        except TimeoutError:
            pass

    def _cut(self) -> None:
        """Close after what was written, without the terminating zero-length chunk."""
        self.close = True
        self.writer.transport.close()

    def _reset(self) -> None:
        """Drop the connection without any response (RST where possible)."""
        self.close = True
        sock = self.writer.get_extra_info("socket")
        try:
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        self.writer.transport.abort()


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------


def _listening_socket(host: str, port: int, backlog: int) -> socket.socket:
    """A bound, listening TCP socket (``port=0`` picks a free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


class StubServer:
    """Stand-in chat provider for tries and tests; deterministic, not a model.

    Binds on construction (``port=0`` picks a free port); :meth:`start`
    serves in a daemon thread running one asyncio loop: a connection costs a
    task, not a thread, so thousands of streams can be open at once.  Usable
    as a context manager.  ``reply_bytes`` pads every reply to that many
    bytes; ``backlog`` is the listen queue (capped by the kernel's somaxconn).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        latency: float = 0.0,
        chunks: int = 4,
        api_key: str | None = None,
        reply_bytes: int | None = None,
        backlog: int = DEFAULT_BACKLOG,
    ) -> None:
        if not math.isfinite(latency) or latency < 0:
            raise ValueError("latency must be a finite number >= 0")
        if chunks < 1:
            raise ValueError("chunks must be >= 1")
        if reply_bytes is not None and reply_bytes < 0:
            raise ValueError("reply_bytes must be >= 0")
        if backlog < 1:
            raise ValueError("backlog must be >= 1")
        self._state = _StubState(latency=latency, chunks=chunks, api_key=api_key, reply_bytes=reply_bytes)
        self._sock = _listening_socket(host, port, backlog)
        self._address: tuple[str, int] = self._sock.getsockname()[:2]
        self._backlog = backlog
        self._loop: asyncio.AbstractEventLoop | None = None
        self._core: _Core | None = None
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._lock = threading.Lock()

    @property
    def host(self) -> str:
        return str(self._address[0])

    @property
    def port(self) -> int:
        return int(self._address[1])

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
                ready = threading.Event()
                self._thread = threading.Thread(
                    target=self._serve, args=(ready,), name=f"aivvm-stub-{self.port}", daemon=True
                )
                self._thread.start()
                ready.wait(10)
        return self

    def _serve(self, ready: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            self._core = _Core(self._state, self._sock, self._backlog)
            loop.run_until_complete(self._core.start())
            self._loop = loop
            ready.set()
            loop.run_forever()
        finally:
            ready.set()
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def stop(self) -> None:
        """Stop serving, end stalls, drop open connections; idempotent."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            thread, loop, core = self._thread, self._loop, self._core
        if thread is not None and loop is not None and core is not None:
            future = asyncio.run_coroutine_threadsafe(core.shutdown(), loop)
            try:
                future.result(timeout=5)
            except (TimeoutError, RuntimeError):
                pass
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=5)
        self._sock.close()

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


def raise_open_file_limit() -> int:
    """Raise this process's soft limit on open files to its hard limit; returns the new limit.

    Each connection is a file descriptor: a stand-in holding thousands of streams needs more
    than the common soft limit of 1,024.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = 1 << 20 if hard == resource.RLIM_INFINITY else hard
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            return target
        except (ValueError, OSError):
            return soft
    return soft


def serve(
    host: str,
    port: int,
    *,
    latency: float,
    chunks: int,
    api_key: str | None,
    reply_bytes: int | None = None,
    backlog: int = DEFAULT_BACKLOG,
    ready: Callable[[str], None] | None = None,
) -> None:
    """Run the stand-in provider until KeyboardInterrupt or SIGTERM (blocking).

    ``ready(base_url)`` is called once the server is listening.
    """
    raise_open_file_limit()
    stop = threading.Event()
    restore = _install_sigterm(stop)
    try:
        with StubServer(
            host, port, latency=latency, chunks=chunks, api_key=api_key, reply_bytes=reply_bytes, backlog=backlog
        ) as server:
            if ready is not None:
                ready(server.base_url)
            while not stop.wait(0.5):
                pass
    except KeyboardInterrupt:
        pass
    finally:
        restore()
