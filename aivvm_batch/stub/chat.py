"""Chat requests of both protocols: parsing, the prompt, the ``times=`` key, and the OpenAI options asked for.

:func:`parse_chat_request` reads the body of ``POST /api/chat`` and ``POST
/v1/chat/completions``.  :func:`parse_chat_options` reads ``tools``/``tool_choice``/
``parallel_tool_calls``, ``logprobs``/``top_logprobs``, ``n`` and ``response_format``;
it gives ``None`` when none of them changes the answer, so the plain path stays plain.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Sequence

from .faults import FaultPlan, build_plan, find_directive, parse_directive
from .text import message_text

MAX_CHOICES = 8
MAX_TOP_LOGPROBS = 20
MAX_PARALLEL_CALLS = 3

_OPTION_KEYS = ("tools", "logprobs", "n", "response_format")
_EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


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
class ToolSpec:
    """A function the reply calls: its name and its ``parameters`` JSON schema."""

    name: str
    parameters: dict[str, Any]


@dataclass(frozen=True)
class JsonFormat:
    """``response_format`` asking for JSON: ``schema`` given (json_schema, or json_object with a schema) or not."""

    schema: dict[str, Any] | None


@dataclass(frozen=True)
class ChatOptions:
    """The OpenAI chat options that change the answer (defaults: the plain answer)."""

    calls: tuple[ToolSpec, ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0
    n: int = 1
    json_format: JsonFormat | None = None


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
    options: ChatOptions | None = field(default=None)


def _bounded_int(body: dict[str, Any], name: str, default: int, lo: int, hi: int) -> int:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"'{name}' must be an integer in {lo}..{hi}")
    return value


def _tool_specs(tools: Any) -> list[ToolSpec]:
    if not isinstance(tools, list):
        raise ValueError("'tools' must be a list")
    specs = []
    for tool in tools:
        if not isinstance(tool, dict):
            raise ValueError("each tool must be an object")
        if tool.get("type", "function") != "function":
            continue
        function = tool.get("function")
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ValueError("a function tool needs 'function.name'")
        parameters = function.get("parameters")
        specs.append(ToolSpec(function["name"], parameters if isinstance(parameters, dict) else _EMPTY_PARAMETERS))
    return specs


def _calls(body: dict[str, Any]) -> tuple[ToolSpec, ...]:
    tools = body.get("tools")
    if tools is None:
        return ()
    specs = _tool_specs(tools)
    choice = body.get("tool_choice", "auto")
    if choice == "none" or not specs:
        return ()
    if isinstance(choice, dict):
        function = choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        named = [spec for spec in specs if spec.name == name]
        if not named:
            raise ValueError(f"tool_choice names a function not in 'tools': {name!r}")
        return (named[0],)
    if choice == "required":
        if body.get("parallel_tool_calls") is not False and len(specs) > 1:
            return tuple(specs[:MAX_PARALLEL_CALLS])
        return (specs[0],)
    if choice == "auto":
        return (specs[0],)
    raise ValueError("'tool_choice' must be 'none', 'auto', 'required' or a named function")


def _json_format(value: Any) -> JsonFormat | None:
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        schema = value.get("schema")
        return JsonFormat(schema if isinstance(schema, dict) else None)
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict):
            raise ValueError("response_format 'json_schema' needs a 'json_schema' object")
        schema = spec.get("schema", {"type": "object"})
        if not isinstance(schema, dict):
            raise ValueError("response_format 'json_schema.schema' must be an object")
        return JsonFormat(schema)
    raise ValueError("response_format 'type' must be 'text', 'json_object' or 'json_schema'")


def parse_chat_options(body: dict[str, Any]) -> ChatOptions | None:
    """The options of an OpenAI chat ``body``; ``None`` when the plain answer is asked for."""
    if not any(key in body for key in _OPTION_KEYS):
        return None
    options = ChatOptions(
        calls=_calls(body),
        logprobs=body.get("logprobs") is True,
        top_logprobs=_bounded_int(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS),
        n=_bounded_int(body, "n", 1, 1, MAX_CHOICES),
        json_format=_json_format(body.get("response_format")),
    )
    return None if options == ChatOptions(top_logprobs=options.top_logprobs) else options


def parse_chat_request(
    raw: bytes,
    *,
    latency: float = 0.0,
    chunks: int = 4,
    reply_bytes: int | None = None,
    openai: bool = False,
) -> ChatRequest:
    """Parse a chat request body of either protocol; ``ValueError`` if invalid.

    With ``openai`` the OpenAI options are read too (:func:`parse_chat_options`).
    """
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
        options=parse_chat_options(body) if openai else None,
    )
