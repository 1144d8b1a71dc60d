"""``POST /v1/completions``: the legacy text completions API (``text_completion`` objects).

``prompt`` is a string (or a list of one string); the text is the chat reply to
it.  Streamed: one ``text_completion`` chunk per piece, a final chunk with
``finish_reason: "stop"``, the usage chunk when ``stream_options.include_usage``,
then ``data: [DONE]``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .chat import messages_key
from .faults import FaultPlan, build_plan, parse_directive
from .openai_wire import DONE_EVENT, SYSTEM_FINGERPRINT, sse_event
from .text import split_evenly


@dataclass(frozen=True)
class CompletionRequest:
    """A parsed legacy completions request; ``prompt`` has its directive removed."""

    prompt: str
    prompt_tokens: int
    plan: FaultPlan
    key: str
    model: str
    stream: bool
    include_usage: bool


def parse_completion_request(
    raw: bytes, *, latency: float = 0.0, chunks: int = 4, reply_bytes: int | None = None
) -> CompletionRequest:
    """Parse a legacy completions body; ``ValueError`` if invalid."""
    body = json.loads(raw)
    if not isinstance(body, dict):
        raise ValueError("request body must be a JSON object")
    given = body.get("prompt")
    if isinstance(given, list) and len(given) == 1:
        given = given[0]
    if not isinstance(given, str):
        raise ValueError("'prompt' must be a string or a list of one string")
    options, prompt = parse_directive(given)
    model = body.get("model")
    stream_options = body.get("stream_options")
    return CompletionRequest(
        prompt=prompt,
        prompt_tokens=len(prompt.split()),
        plan=build_plan(options, latency=latency, chunks=chunks, reply_bytes=reply_bytes),
        key=messages_key([{"prompt": given}]),
        model=model if isinstance(model, str) else "stub",
        stream=bool(body.get("stream")),
        include_usage=isinstance(stream_options, dict) and stream_options.get("include_usage") is True,
    )


def text_completion(
    completion_id: str,
    created: int,
    model: str,
    choices: list[dict[str, Any]],
    usage: dict[str, int] | None = None,
) -> dict[str, Any]:
    """A ``text_completion`` object (a whole completion, or one chunk of a stream)."""
    payload: dict[str, Any] = {
        "id": completion_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "system_fingerprint": SYSTEM_FINGERPRINT,
        "choices": choices,
    }
    if usage is not None:
        payload["usage"] = usage
    return payload


def _choice(text: str, finish_reason: str | None) -> dict[str, Any]:
    return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}


def completion_object(
    text: str, *, completion_id: str, created: int, model: str, usage: dict[str, int]
) -> dict[str, Any]:
    """A non-streamed ``text_completion``."""
    return text_completion(completion_id, created, model, [_choice(text, "stop")], usage)


def completion_stream_parts(
    text: str,
    parts: int,
    *,
    completion_id: str,
    created: int,
    model: str,
    usage: dict[str, int] | None = None,
) -> tuple[list[bytes], list[bytes], list[bytes]]:
    """SSE events as ``(head, body, tail)``: no head, one chunk per text piece, then finish, usage, [DONE]."""
    body = [
        sse_event(text_completion(completion_id, created, model, [_choice(piece, None)]))
        for piece in split_evenly(text, parts)
    ]
    tail = [sse_event(text_completion(completion_id, created, model, [_choice("", "stop")]))]
    if usage is not None:
        tail.append(sse_event(text_completion(completion_id, created, model, [], usage)))
    tail.append(DONE_EVENT)
    return [], body, tail
