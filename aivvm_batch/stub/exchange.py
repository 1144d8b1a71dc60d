"""One request and its response on a connection: routing, the endpoints, and the paced writing.

The plain chat answers (Aivvm, and OpenAI chat without tools, logprobs, ``n`` or
a response format) take the same short path as ever; the other OpenAI answers
are built only when asked for.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import socket
import struct
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Callable, Iterable, Protocol, TypeVar

from .chat import ChatOptions, ChatRequest, parse_chat_request
from .chat_features import REFUSAL_TEXT, chat_choices, chat_completion, chat_stream_parts, chat_usage, json_reply
from .completions import completion_object, completion_stream_parts, parse_completion_request
from .embeddings import embeddings_body, parse_embedding_request
from .faults import FaultPlan
from .http import MAX_BODY_BYTES, RequestHead, body_length, chunk_frame, parse_chunk_size, response_head
from .ratelimit import go_duration
from .openai_wire import (
    DONE_EVENT,
    openai_completion,
    openai_error,
    openai_stream_parts,
    prompt_tokens,
    usage_counts,
    usage_for,
)
from .responses import (
    ResponseIds,
    completed_response,
    failed_response,
    parse_responses_request,
    responses_stream_parts,
)
from .text import aivvm_chunks, pad_reply, reply_text, word_count

if TYPE_CHECKING:
    from .server import _Core

AIVVM_PATH = "/api/chat"
OPENAI_PATHS = frozenset({"/v1/chat/completions", "/chat/completions"})
EMBEDDINGS_PATHS = frozenset({"/v1/embeddings", "/embeddings"})
RESPONSES_PATHS = frozenset({"/v1/responses", "/responses"})
COMPLETIONS_PATHS = frozenset({"/v1/completions", "/completions"})
STATS_PATH = "/__stub/stats"
RESET_PATH = "/__stub/reset"
HEALTH_PATH = "/health"
SERVER_NAME = "aivvm-stub/1"

_POST_PATHS = frozenset({AIVVM_PATH, *OPENAI_PATHS, *EMBEDDINGS_PATHS, *RESPONSES_PATHS, *COMPLETIONS_PATHS})
_FEATURE_FAULTS = frozenset({"refusal"})  # faults the plain chat path cannot say


class _Planned(Protocol):
    @property
    def plan(self) -> FaultPlan: ...
    @property
    def key(self) -> str: ...
    @property
    def prompt(self) -> str: ...


_Request = TypeVar("_Request", bound=_Planned)


class _Exchange:
    """One request and its response on a connection."""

    def __init__(self, core: _Core, writer: asyncio.StreamWriter, head: RequestHead | None) -> None:
        self.core = core
        self.state = core.state
        self.writer = writer
        self.head = head
        self.close = head is None or not head.keep_alive
        self.limit_headers: list[tuple[str, str]] = []  # the rate limit's, on every answer

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
            elif path in _POST_PATHS:
                self.state.begin_call()
                try:
                    if path in EMBEDDINGS_PATHS:
                        await self._embeddings(raw)
                    elif path in RESPONSES_PATHS:
                        await self._responses(raw)
                    else:
                        await self._completions(raw)
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
        elif path in _POST_PATHS:
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
                raw, latency=state.latency, chunks=state.chunks, reply_bytes=state.reply_bytes, openai=openai
            )
        except ValueError as exc:
            await self._send_error_reply(400, f"Bad request: {exc}", openai=openai)
            return
        state.record_prompt(request.prompt)
        if openai and await self._refused(request.prompt):
            return
        plan = request.plan
        if plan.fault and plan.times is not None and not state.consume_fault(request.key, plan.times):
            plan = replace(plan, fault=None)
        if plan.fault == "reset":
            self._reset()
        elif plan.error_status is not None:
            message = f"Stand-in fault injected (status {plan.error_status})" if openai else "Error"
            await self._send_error_reply(plan.error_status, message, openai=openai, retry_after=plan.retry_after)
        elif not openai:
            await self._reply_aivvm(request, plan)
        elif request.options is None and plan.fault not in _FEATURE_FAULTS:
            await self._reply_openai(request, plan)
        else:
            await self._reply_chat_features(request, plan, request.options or ChatOptions())

    async def _refused(self, prompt: str) -> bool:
        """Beyond the rate limit (when the stand-in has one): a 429 saying when to come back."""
        limiter = self.state.limiter
        if limiter is None:
            return False
        wait, self.limit_headers = limiter.take(math.ceil(len(prompt) / 4) + 1)
        if wait:
            message = f"Rate limit reached for requests. Please try again in {go_duration(wait)}."
            await self._send_error_reply(429, message, openai=True, retry_after=None)
        return bool(wait)

    def _authorized(self) -> bool:
        key = self.state.api_key
        if key is None:
            return True
        assert self.head is not None
        given = self.head.headers.get("authorization", "").encode("latin-1")
        return hmac.compare_digest(given, f"Bearer {key}".encode("utf-8"))

    def _text(self, prompt: str, plan: FaultPlan) -> str:
        text = reply_text(prompt, words=plan.words, split=plan.fault == "split")
        return pad_reply(text, plan.reply_bytes)

    async def _reply_aivvm(self, request: ChatRequest, plan: FaultPlan) -> None:
        text = self._text(request.prompt, plan)
        chunks = [] if plan.fault == "empty" else aivvm_chunks(text, plan.chunks, plan.fault)
        await self._stream("text/plain; charset=utf-8", [], chunks, [], plan)

    async def _reply_openai(self, request: ChatRequest, plan: FaultPlan) -> None:
        text = self._text(request.prompt, plan)
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
            await self._send_empty(plan)
        else:
            payload = openai_completion(
                text, completion_id=completion_id, created=created, model=request.model, usage=usage
            )
            await self._send_json(payload, plan)

    async def _reply_chat_features(self, request: ChatRequest, plan: FaultPlan, options: ChatOptions) -> None:
        """Tools, logprobs, ``n``, ``response_format`` or a refusal (:mod:`.chat_features`)."""
        choices = chat_choices(self._text(request.prompt, plan), options, plan.fault, request.key, plan.reply_bytes)
        completion_id, created, model = self.state.next_id(), int(time.time()), request.model
        usage = chat_usage(prompt_tokens(request.messages), choices)
        if plan.fault == "empty":
            await (self._stream("text/event-stream", [], [], [DONE_EVENT], plan) if request.stream
                   else self._send_empty(plan))
        elif request.stream:
            parts = chat_stream_parts(
                choices, options, plan.chunks, completion_id=completion_id, created=created, model=model,
                usage=usage if request.include_usage else None,
            )
            await self._stream("text/event-stream", *parts, plan)
        else:
            payload = chat_completion(
                choices, options, completion_id=completion_id, created=created, model=model, usage=usage
            )
            await self._send_json(payload, plan)

    # -- the other OpenAI endpoints ---------------------------------------

    async def _admit(self, raw: bytes, parse: Callable[..., _Request]) -> tuple[_Request, FaultPlan] | None:
        """Authorize and parse; answer errors, ``status``/``429`` faults and ``reset`` (then ``None``)."""
        state = self.state
        if not self._authorized():
            await self._send_error_reply(401, "Incorrect API key provided.", openai=True)
            return None
        try:
            request = parse(raw, latency=state.latency, chunks=state.chunks, reply_bytes=state.reply_bytes)
        except ValueError as exc:
            await self._send_error_reply(400, f"Bad request: {exc}", openai=True)
            return None
        state.record_prompt(request.prompt)
        if await self._refused(request.prompt):
            return None
        plan = request.plan
        if plan.fault and plan.times is not None and not state.consume_fault(request.key, plan.times):
            plan = replace(plan, fault=None)
        if plan.fault == "reset":
            self._reset()
            return None
        status = plan.error_status
        if status is not None:
            message = f"Stand-in fault injected (status {status})"
            await self._send_error_reply(status, message, openai=True, retry_after=plan.retry_after)
            return None
        return request, plan

    async def _embeddings(self, raw: bytes) -> None:
        admitted = await self._admit(raw, parse_embedding_request)
        if admitted is None:
            return
        request, plan = admitted
        if plan.fault == "empty":
            await self._send_empty(plan)
            return
        await self._send_fixed(embeddings_body(request, plan.reply_bytes), plan)

    async def _responses(self, raw: bytes) -> None:
        admitted = await self._admit(raw, parse_responses_request)
        if admitted is None:
            return
        request, plan = admitted
        refusal = plan.fault == "refusal"
        if refusal:
            text = REFUSAL_TEXT
        else:
            text = json_reply(self._text(request.prompt, plan), request.json_format, plan.fault)
        ids = ResponseIds(self.state.next_id("resp_stub_"), self.state.next_id("msg_stub_"), int(time.time()))
        if plan.fault == "empty":
            await (self._stream("text/event-stream", [], [], [], plan) if request.stream else self._send_empty(plan))
        elif request.stream:
            parts = responses_stream_parts(
                request, ids, text, plan.chunks, refusal=refusal, failed=plan.fault == "failed"
            )
            await self._stream("text/event-stream", *parts, plan)
        elif plan.fault == "failed":
            await self._send_json(failed_response(request, ids), plan)
        else:
            await self._send_json(completed_response(request, ids, text, refusal), plan)

    async def _completions(self, raw: bytes) -> None:
        admitted = await self._admit(raw, parse_completion_request)
        if admitted is None:
            return
        request, plan = admitted
        text = self._text(request.prompt, plan)
        completion_id, created, model = self.state.next_id("cmpl-stub-"), int(time.time()), request.model
        usage = usage_counts(request.prompt_tokens, word_count(text))
        if plan.fault == "empty":
            await (self._stream("text/event-stream", [], [], [DONE_EVENT], plan) if request.stream
                   else self._send_empty(plan))
        elif request.stream:
            parts = completion_stream_parts(
                text, plan.chunks, completion_id=completion_id, created=created, model=model,
                usage=usage if request.include_usage else None,
            )
            await self._stream("text/event-stream", *parts, plan)
        else:
            payload = completion_object(text, completion_id=completion_id, created=created, model=model, usage=usage)
            await self._send_json(payload, plan)

    # -- responses -------------------------------------------------------

    def _head(self, status: int, headers: Iterable[tuple[str, str]]) -> bytes:
        closing = (("Connection", "close"),) if self.close else ()
        return response_head(
            status,
            (
                ("Server", SERVER_NAME),
                ("Date", self.core.http_date()),
                ("x-request-id", self.state.next_request_id()),
                *headers,
                *self.limit_headers,
                *closing,
            ),
        )

    async def _send_error_reply(self, status: int, message: str, *, openai: bool,
                                retry_after: int | None = 1) -> None:
        """Aivvm: ``message`` as text/plain; OpenAI: the JSON error form."""
        headers = [("Retry-After", str(retry_after))] if status == 429 and retry_after is not None else []
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

    async def _send_empty(self, plan: FaultPlan) -> None:
        """``fault=empty`` of a non-streamed answer: 200 with an empty body, after ``latency``."""
        await self._pause(plan.latency)
        await self.send_body(200, "application/json", b"")

    async def _send_json(self, payload: dict[str, Any], plan: FaultPlan) -> None:
        await self._send_fixed(json.dumps(payload, ensure_ascii=False).encode("utf-8"), plan)

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
        except asyncio.TimeoutError:  # TimeoutError from 3.11 on; its own class in 3.10
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
