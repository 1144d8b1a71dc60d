"""The richer chat answers: tool calls, logprobs, ``n`` choices, JSON replies and refusals.

Built only when a request asks for one of them (:class:`.chat.ChatOptions`) or
for ``fault=refusal``; streamed and non-streamed answers to the same request
carry the same choices, so a streamed answer accumulated chunk by chunk equals
the non-streamed one (ids and ``created`` aside).
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass
from typing import Any, Sequence

from .chat import ChatOptions, JsonFormat, ToolSpec
from .openai_wire import DONE_EVENT, chat_object, sse_event, usage_chunk, usage_counts
from .schema import compact, example_json, not_json, violating_json
from .text import VOCABULARY, even_cuts, split_evenly, tokens, word_count

REFUSAL_TEXT = "Stand-in refusal: I can't help with that."


@dataclass(frozen=True)
class ToolCall:
    """One function call of a choice."""

    id: str
    name: str
    arguments: str

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class ChoiceReply:
    """What one choice says: text (``content``), a ``refusal``, or ``tool_calls``."""

    content: str | None = None
    refusal: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()

    @property
    def finish_reason(self) -> str:
        return "tool_calls" if self.tool_calls else "stop"

    @property
    def completion_tokens(self) -> int:
        said = word_count(self.content or "") + word_count(self.refusal or "")
        return said + sum(word_count(call.arguments) for call in self.tool_calls)


def call_id(key: str, choice: int, index: int, name: str) -> str:
    """``call_`` and a short hash of the request's messages, the choice, the call's index and name."""
    digest = hashlib.sha1(f"{key}\0{choice}\0{index}\0{name}".encode("utf-8")).hexdigest()
    return f"call_{digest[:24]}"


def json_reply(text: str, json_format: JsonFormat | None, fault: str | None) -> str:
    """The content for ``text`` under ``response_format`` (and ``fault=badjson|notjson``)."""
    if json_format is None:
        return text
    if fault == "notjson":
        return not_json(text)
    if json_format.schema is not None:
        return violating_json(json_format.schema) if fault == "badjson" else example_json(json_format.schema)
    return "{}" if fault == "badjson" else compact({"reply": text})


def tool_arguments(spec: ToolSpec, fault: str | None, size: int | None = None) -> str:
    """Arguments built from the function's ``parameters`` (broken by ``fault=badjson|notjson``),
    padded to about ``size`` characters (``bytes=N``) with a ``padding`` string."""
    if fault == "notjson":
        return not_json(spec.name)
    arguments = violating_json(spec.parameters) if fault == "badjson" else example_json(spec.parameters)
    if size is None or size <= len(arguments) or not arguments.endswith("}"):
        return arguments
    filler = ("," if arguments != "{}" else "") + '"padding":"' + "x" * (size - len(arguments) - 14) + '"}'
    return arguments[:-1] + filler


def chat_choices(text: str, options: ChatOptions, fault: str | None, key: str,
                 size: int | None = None) -> list[ChoiceReply]:
    """The ``options.n`` choices for the reply ``text``; choice ``i > 0`` says ``(choice i) `` first.
    ``size`` (``bytes=N``) pads tool-call arguments as the reply's text is padded."""
    replies = []
    for index in range(options.n):
        prefix = f"(choice {index}) " if index else ""
        if fault == "refusal":
            replies.append(ChoiceReply(refusal=prefix + REFUSAL_TEXT))
        elif options.calls:
            calls = tuple(
                ToolCall(call_id(key, index, i, spec.name), spec.name, tool_arguments(spec, fault, size))
                for i, spec in enumerate(options.calls)
            )
            replies.append(ChoiceReply(tool_calls=calls))
        else:
            replies.append(ChoiceReply(content=json_reply(prefix + text, options.json_format, fault)))
    return replies


def chat_usage(prompt: int, choices: Sequence[ChoiceReply]) -> dict[str, int]:
    """``usage``: ``prompt`` tokens, and the words of every choice's text and tool-call arguments."""
    return usage_counts(prompt, sum(choice.completion_tokens for choice in choices))


# -- logprobs -----------------------------------------------------------------


def _logprob(index: int) -> float:
    return -round(0.1 * (index % 7), 4)


def _alternative(token: str, rank: int) -> str:
    lead = token[: len(token) - len(token.lstrip())]
    word = VOCABULARY[(rank - 1) % len(VOCABULARY)] + (str((rank - 1) // len(VOCABULARY)) if rank > 8 else "")
    candidate = lead + word
    return candidate + "_" if candidate == token else candidate


def token_logprob(token: str, index: int, top: int) -> dict[str, Any]:
    """The logprob entry of the ``index``-th token, with ``top`` alternatives (the token itself first)."""
    logprob = _logprob(index)
    alternatives = [token, *(_alternative(token, rank) for rank in range(1, top))][:top]
    return {
        "token": token,
        "logprob": logprob,
        "bytes": list(token.encode("utf-8")),
        "top_logprobs": [
            {"token": alt, "logprob": round(logprob - 0.5 * rank, 4), "bytes": list(alt.encode("utf-8"))}
            for rank, alt in enumerate(alternatives)
        ],
    }


def _token_pieces(text: str, parts: int, top: int) -> list[tuple[str, list[dict[str, Any]]]]:
    """``text`` cut on token boundaries into at most ``parts`` pieces, each with its tokens' logprobs."""
    toks = tokens(text)
    bounds = [0, *even_cuts(len(toks), parts), len(toks)] if toks else [0]
    return [
        ("".join(toks[a:b]), [token_logprob(toks[i], i, top) for i in range(a, b)])
        for a, b in zip(bounds, bounds[1:])
    ]


def choice_logprobs(choice: ChoiceReply, options: ChatOptions) -> dict[str, Any] | None:
    """The whole ``logprobs`` of a non-streamed choice (``None`` unless asked and there is text)."""
    if not options.logprobs:
        return None
    if choice.content:
        pieces = _token_pieces(choice.content, 1, options.top_logprobs)
        return {"content": pieces[0][1], "refusal": None}
    if choice.refusal:
        pieces = _token_pieces(choice.refusal, 1, options.top_logprobs)
        return {"content": None, "refusal": pieces[0][1]}
    return None


# -- non-streamed ---------------------------------------------------------------


def chat_message(choice: ChoiceReply) -> dict[str, Any]:
    """The assistant ``message`` of a choice."""
    message: dict[str, Any] = {"role": "assistant", "content": choice.content, "refusal": choice.refusal}
    if choice.tool_calls:
        message["tool_calls"] = [call.as_dict() for call in choice.tool_calls]
    return message


def chat_completion(
    choices: Sequence[ChoiceReply],
    options: ChatOptions,
    *,
    completion_id: str,
    created: int,
    model: str,
    usage: dict[str, int],
) -> dict[str, Any]:
    """A non-streamed ``chat.completion`` with every choice."""
    return chat_object("chat.completion", completion_id, created, model, [
        {"index": index, "message": chat_message(choice), "logprobs": choice_logprobs(choice, options),
         "finish_reason": choice.finish_reason}
        for index, choice in enumerate(choices)
    ], usage)


# -- streamed -------------------------------------------------------------------

_Delta = tuple[dict[str, Any], dict[str, Any] | None]


def _text_deltas(field: str, text: str, parts: int, options: ChatOptions) -> list[_Delta]:
    if not options.logprobs:
        return [({field: piece}, None) for piece in split_evenly(text, parts)]
    other = "refusal" if field == "content" else "content"
    return [
        ({field: piece}, {field: entries, other: None})
        for piece, entries in _token_pieces(text, parts, options.top_logprobs)
    ]


def _call_deltas(calls: Sequence[ToolCall], parts: int) -> list[_Delta]:
    deltas: list[_Delta] = []
    for index, call in enumerate(calls):
        first = {"index": index, "id": call.id, "type": "function", "function": {"name": call.name, "arguments": ""}}
        deltas.append(({"tool_calls": [first]}, None))
        deltas += [
            ({"tool_calls": [{"index": index, "function": {"arguments": piece}}]}, None)
            for piece in split_evenly(call.arguments, parts)
        ]
    return deltas


def _deltas(choice: ChoiceReply, parts: int, options: ChatOptions) -> tuple[dict[str, Any], list[_Delta]]:
    """The role delta and the content deltas of one choice."""
    if choice.tool_calls:
        return {"role": "assistant", "content": None, "refusal": None}, _call_deltas(choice.tool_calls, parts)
    if choice.refusal is not None:
        return {"role": "assistant", "content": None, "refusal": ""}, _text_deltas(
            "refusal", choice.refusal, parts, options
        )
    return ({"role": "assistant", "content": "", "refusal": None},
            _text_deltas("content", choice.content or "", parts, options))


def chat_stream_parts(
    choices: Sequence[ChoiceReply],
    options: ChatOptions,
    parts: int,
    *,
    completion_id: str,
    created: int,
    model: str,
    usage: dict[str, int] | None = None,
) -> tuple[list[bytes], list[bytes], list[bytes]]:
    """SSE events as ``(head, body, tail)``: every chunk carries one choice.

    ``head`` has each choice's role event, ``body`` the content (or refusal, or
    tool-call) events of the choices interleaved by index, ``tail`` each
    choice's finish event, the usage event (when ``usage`` is given) and
    ``data: [DONE]``.
    """

    def chunk(index: int, delta: dict[str, Any], logprobs: dict[str, Any] | None, finish: str | None) -> bytes:
        choice: dict[str, Any] = {"index": index, "delta": delta}
        if options.logprobs:
            choice["logprobs"] = logprobs
        choice["finish_reason"] = finish
        return sse_event(chat_object("chat.completion.chunk", completion_id, created, model, [choice]))

    planned = [_deltas(choice, parts, options) for choice in choices]
    head = [chunk(index, role, None, None) for index, (role, _) in enumerate(planned)]
    body = [
        chunk(index, step[0], step[1], None)
        for row in itertools.zip_longest(*(deltas for _, deltas in planned))
        for index, step in enumerate(row)
        if step is not None
    ]
    tail = [chunk(index, {}, None, choice.finish_reason) for index, choice in enumerate(choices)]
    if usage is not None:
        tail.append(sse_event(usage_chunk(completion_id, created, model, usage)))
    tail.append(DONE_EVENT)
    return head, body, tail
