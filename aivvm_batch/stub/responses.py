"""``POST /v1/responses``: the Responses API, one message of output text (or a refusal).

``input`` is a string or a list of messages (``content`` a string or parts of
type ``input_text``); ``instructions`` counts as input.  Not streamed: one
``response`` object.  Streamed: named SSE events (``event: <type>``) numbered by
``sequence_number``, ending with ``response.completed`` (no ``[DONE]``), or with
``response.failed`` under ``fault=failed``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .chat import JsonFormat, last_user_prompt, messages_key
from .faults import FaultPlan, build_plan, find_directive
from .openai_wire import sse_named_event
from .text import message_text, split_evenly, word_count

FAILED_MESSAGE = "Stand-in fault injected: the response failed."


@dataclass(frozen=True)
class ResponsesRequest:
    """A parsed Responses request; ``messages`` has the instructions first (role ``system``)."""

    messages: list[dict[str, Any]]
    prompt: str
    plan: FaultPlan
    key: str
    model: str
    stream: bool
    instructions: str | None
    json_format: JsonFormat | None

    @property
    def input_tokens(self) -> int:
        return sum(word_count(message_text(m.get("content"))) for m in self.messages)


def _messages(value: Any) -> list[dict[str, Any]]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise ValueError("'input' must be a string or a list of input items")
    messages = []
    for item in value:
        role = item.get("role")
        if item.get("type", "message") != "message" or not isinstance(role, str):
            continue  # function_call_output, reasoning, ...: no text for the stand-in
        messages.append({"role": role, "content": item.get("content")})
    return messages


def _json_format(text: Any) -> JsonFormat | None:
    form = text.get("format") if isinstance(text, dict) else None
    kind = form.get("type") if isinstance(form, dict) else None
    if not isinstance(form, dict) or kind in (None, "text"):
        return None
    schema = form.get("schema")
    if kind == "json_schema":
        return JsonFormat(schema if isinstance(schema, dict) else {"type": "object"})
    if kind == "json_object":
        return JsonFormat(schema if isinstance(schema, dict) else None)
    raise ValueError("'text.format.type' must be 'text', 'json_object' or 'json_schema'")


def parse_responses_request(
    raw: bytes, *, latency: float = 0.0, chunks: int = 4, reply_bytes: int | None = None
) -> ResponsesRequest:
    """Parse a Responses body; ``ValueError`` if invalid."""
    body = json.loads(raw)
    if not isinstance(body, dict):
        raise ValueError("request body must be a JSON object")
    messages = _messages(body.get("input"))
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise ValueError("'instructions' must be a string")
    if instructions:
        messages = [{"role": "system", "content": instructions}, *messages]
    model = body.get("model")
    return ResponsesRequest(
        messages=messages,
        prompt=last_user_prompt(messages),
        plan=build_plan(find_directive(messages), latency=latency, chunks=chunks, reply_bytes=reply_bytes),
        key=messages_key(messages),
        model=model if isinstance(model, str) else "stub",
        stream=bool(body.get("stream")),
        instructions=instructions,
        json_format=_json_format(body.get("text")),
    )


@dataclass(frozen=True)
class ResponseIds:
    """Identity of one answer: the response id, its message item's id, and ``created_at``."""

    response_id: str
    message_id: str
    created_at: int


def output_part(text: str, refusal: bool) -> dict[str, Any]:
    """An ``output_text`` content part, or a ``refusal`` one."""
    if refusal:
        return {"type": "refusal", "refusal": text}
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def output_message(message_id: str, status: str, parts: list[dict[str, Any]]) -> dict[str, Any]:
    """The assistant ``message`` output item."""
    return {"type": "message", "id": message_id, "status": status, "role": "assistant", "content": parts}


def response_usage(input_tokens: int, output_tokens: int) -> dict[str, Any]:
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": input_tokens + output_tokens,
    }


def _format(json_format: JsonFormat | None) -> dict[str, Any]:
    if json_format is None:
        return {"type": "text"}
    if json_format.schema is None:
        return {"type": "json_object"}
    return {"type": "json_schema", "name": "stand_in", "schema": json_format.schema, "strict": False}


def response_object(
    request: ResponsesRequest,
    ids: ResponseIds,
    *,
    status: str,
    output: list[dict[str, Any]],
    usage: dict[str, Any] | None,
    error: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A ``response`` object."""
    return {
        "id": ids.response_id,
        "object": "response",
        "created_at": ids.created_at,
        "status": status,
        "background": False,
        "error": error,
        "incomplete_details": None,
        "instructions": request.instructions,
        "max_output_tokens": None,
        "metadata": {},
        "model": request.model,
        "output": output,
        "parallel_tool_calls": True,
        "previous_response_id": None,
        "reasoning": {"effort": None, "summary": None},
        "service_tier": "default",
        "store": False,
        "temperature": 1.0,
        "text": {"format": _format(request.json_format)},
        "tool_choice": "auto",
        "tools": [],
        "top_p": 1.0,
        "truncation": "disabled",
        "usage": usage,
        "user": None,
    }


def completed_response(request: ResponsesRequest, ids: ResponseIds, text: str, refusal: bool) -> dict[str, Any]:
    """The ``completed`` response saying ``text`` (or refusing with it)."""
    item = output_message(ids.message_id, "completed", [output_part(text, refusal)])
    usage = response_usage(request.input_tokens, word_count(text))
    return response_object(request, ids, status="completed", output=[item], usage=usage)


def failed_response(request: ResponsesRequest, ids: ResponseIds) -> dict[str, Any]:
    """The ``failed`` response of ``fault=failed``."""
    error = {"code": "server_error", "message": FAILED_MESSAGE}
    return response_object(request, ids, status="failed", output=[], usage=None, error=error)


def _numbered(events: list[dict[str, Any]], start: int) -> list[bytes]:
    return [sse_named_event({**event, "sequence_number": start + i}) for i, event in enumerate(events)]


def responses_stream_parts(
    request: ResponsesRequest, ids: ResponseIds, text: str, parts: int, *, refusal: bool = False, failed: bool = False
) -> tuple[list[bytes], list[bytes], list[bytes]]:
    """Named SSE events as ``(head, body, tail)``; ``body`` is the text (or refusal) in ``parts`` deltas."""
    begun = response_object(request, ids, status="in_progress", output=[], usage=None)
    head: list[dict[str, Any]] = [
        {"type": "response.created", "response": begun},
        {"type": "response.in_progress", "response": begun},
    ]
    if failed:
        failure = [{"type": "response.failed", "response": failed_response(request, ids)}]
        return _numbered(head, 0), [], _numbered(failure, len(head))
    at: dict[str, Any] = {"item_id": ids.message_id, "output_index": 0, "content_index": 0}
    head += [
        {"type": "response.output_item.added", "output_index": 0,
         "item": output_message(ids.message_id, "in_progress", [])},
        {"type": "response.content_part.added", **at, "part": output_part("", refusal)},
    ]
    if refusal:
        body = [{"type": "response.refusal.delta", **at, "delta": piece} for piece in split_evenly(text, parts)]
        done: dict[str, Any] = {"type": "response.refusal.done", **at, "refusal": text}
    else:
        body = [
            {"type": "response.output_text.delta", **at, "delta": piece, "logprobs": []}
            for piece in split_evenly(text, parts)
        ]
        done = {"type": "response.output_text.done", **at, "text": text, "logprobs": []}
    final = completed_response(request, ids, text, refusal)
    tail: list[dict[str, Any]] = [
        done,
        {"type": "response.content_part.done", **at, "part": output_part(text, refusal)},
        {"type": "response.output_item.done", "output_index": 0, "item": final["output"][0]},
        {"type": "response.completed", "response": final},
    ]
    return _numbered(head, 0), _numbered(body, len(head)), _numbered(tail, len(head) + len(body))
