"""OpenAI wire basics and the plain chat payloads: SSE events, error bodies, usage, chunks and completions.

The plain path (one choice of text, no tools, logprobs or response format) is
the benchmarked one: its builders stay as small as they were.  The richer chat
answers are built by :mod:`.chat_features`.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

from .text import message_text, split_evenly, word_count

DONE_EVENT = b"data: [DONE]\n\n"
SYSTEM_FINGERPRINT = "fp_stub"

_OPENAI_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_api_key",
    404: "not_found_error",
    429: "rate_limit_exceeded",
}


def sse_event(payload: dict[str, Any]) -> bytes:
    """``data: <json>\\n\\n``."""
    return b"data: %b\n\n" % json.dumps(payload, ensure_ascii=False).encode("utf-8")


def sse_named_event(payload: dict[str, Any]) -> bytes:
    """``event: <payload type>\\ndata: <json>\\n\\n`` (the Responses API's form)."""
    data = json.dumps(payload, ensure_ascii=False).encode("utf-8")
    return b"event: %b\ndata: %b\n\n" % (str(payload["type"]).encode("utf-8"), data)


def openai_error(status: int, message: str) -> dict[str, Any]:
    """OpenAI-style error body for ``status``."""
    default = "server_error" if status >= 500 else "invalid_request_error"
    kind = _OPENAI_ERROR_TYPES.get(status, default)
    return {"error": {"message": message, "type": kind, "code": kind}}


def prompt_tokens(messages: Sequence[dict[str, Any]]) -> int:
    """Words of the text of every message."""
    return sum(word_count(message_text(m.get("content"))) for m in messages)


def usage_counts(prompt: int, completion: int) -> dict[str, int]:
    """OpenAI chat/completions ``usage``."""
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def usage_for(messages: Sequence[dict[str, Any]], reply: str) -> dict[str, int]:
    """OpenAI ``usage`` with whitespace word counts as token counts."""
    return usage_counts(prompt_tokens(messages), word_count(reply))


def chat_object(kind: str, completion_id: str, created: int, model: str, choices: list[dict[str, Any]],
                usage: dict[str, int] | None = None) -> dict[str, Any]:
    """A ``chat.completion`` or ``chat.completion.chunk`` (``kind``) around ``choices``."""
    obj: dict[str, Any] = {"id": completion_id, "object": kind, "created": created, "model": model,
                           "system_fingerprint": SYSTEM_FINGERPRINT, "choices": choices}
    if usage is not None:
        obj["usage"] = usage
    return obj


def usage_chunk(completion_id: str, created: int, model: str, usage: dict[str, int]) -> dict[str, Any]:
    """The last ``chat.completion.chunk`` of a stream asked for ``include_usage``: no choices."""
    return chat_object("chat.completion.chunk", completion_id, created, model, [], usage)


def openai_chunk(
    completion_id: str, created: int, model: str, delta: dict[str, str | None], finish_reason: str | None = None
) -> dict[str, Any]:
    """One ``chat.completion.chunk`` object with a single choice."""
    return chat_object("chat.completion.chunk", completion_id, created, model,
                       [{"index": 0, "delta": delta, "finish_reason": finish_reason}])


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
    head = [sse_event(openai_chunk(completion_id, created, model, {"role": "assistant", "content": "", "refusal": None}))]
    body = [
        sse_event(openai_chunk(completion_id, created, model, {"content": piece}))
        for piece in split_evenly(text, parts)
    ]
    tail = [sse_event(openai_chunk(completion_id, created, model, {}, "stop"))]
    if usage is not None:
        tail.append(sse_event(usage_chunk(completion_id, created, model, usage)))
    tail.append(DONE_EVENT)
    return head, body, tail


def openai_completion(
    text: str, *, completion_id: str, created: int, model: str, usage: dict[str, int]
) -> dict[str, Any]:
    """A non-streamed ``chat.completion`` object."""
    return chat_object("chat.completion", completion_id, created, model,
                       [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                         "logprobs": None, "finish_reason": "stop"}], usage)
