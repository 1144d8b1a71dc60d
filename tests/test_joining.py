"""Joining streamed replies into the unstreamed answer, with literal bytes: no I/O.

Each reply is fed through :class:`ReplyReader` as the transports feed it (cut at several
sizes) with the endpoint's parser; chat bodies are checked against the ``openai``
package's own accumulator (``ChatCompletionStreamState``), and every body against the
SDK's type of the unstreamed answer.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types import Completion, CreateEmbeddingResponse
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.responses import Response

from jobs.endpoints import Endpoint
from worker.errors import (
    EmptyReply,
    IncompleteReply,
    MalformedReply,
    ProviderError,
    ProviderHTTPError,
    ReplyTooLarge,
)
from worker.providers import OpenAI
from worker.providers.call import CompletionCall, Item, StreamEnd
from worker.providers.exchange import Head
from worker.providers.joining import ChatJoiner, ResponseFailed
from worker.providers.joining.bounds import MAX_CHOICES, MAX_TOOL_CALLS
from worker.providers.reply import ReplyReader

MiB = 1024 * 1024
SIZES = (1, 3, 17, 1 << 20)  # bytes per read: every cut, a few, everything at once


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def sse(*events: Any, named: bool = False) -> bytes:
    """An event stream: each event a JSON object (or a literal string such as [DONE])."""
    out = []
    for event in events:
        data = event if isinstance(event, str) else json.dumps(event)
        name = f"event: {event['type']}\n" if named and isinstance(event, dict) and "type" in event else ""
        out.append(f"{name}data: {data}\n\n")
    return "".join(out).encode()


def split_every(data: bytes, size: int) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


def read(endpoint: Endpoint, data: bytes, size: int = 1 << 20, media: str = "text/event-stream",
         api_key: str | None = None, max_bytes: int = MiB) -> tuple[list[Item], ProviderError | None]:
    """Drive a reader as the transports do: the items, and the error raised after them."""
    call = CompletionCall("gpt-4o", (), endpoint=endpoint, api_key=api_key, max_reply_bytes=max_bytes)
    parser = OpenAI.reply_parser(call)
    reader = ReplyReader(call, parser, parser.check_type)
    items: list[Item] = []
    try:
        reader.start(Head(200, content_type=media))
        for chunk in split_every(data, size):
            items.extend(reader.feed(chunk))
            if reader.stopped:
                break
        items.extend(reader.finish())
    except ProviderError as exc:
        return items, exc
    return items, None


def joined(endpoint: Endpoint, data: bytes, media: str = "text/event-stream") -> tuple[list[str], StreamEnd]:
    """The texts and the end, the same whatever the reads' sizes."""
    results = []
    for size in SIZES:
        items, error = read(endpoint, data, size, media)
        assert error is None, (size, error)
        texts = [i for i in items if isinstance(i, str)]
        ends = [i for i in items if isinstance(i, StreamEnd)]
        assert len(ends) == 1 and items[-1] is ends[0]
        results.append(("".join(texts), ends[0]))
    assert all(r[0] == results[0][0] and r[1].body == results[0][1].body for r in results)
    items, _ = read(endpoint, data)
    return [i for i in items if isinstance(i, str)], results[0][1]


def chat_body(events: list[Any]) -> dict[str, Any]:
    _, end = joined(Endpoint.CHAT, sse(*events))
    assert end.body is not None
    return end.body


def _prune(value: Any) -> Any:
    """Nulls dropped, the SDK's snapshot-only fields (parsed, a tool call's index) dropped."""
    if isinstance(value, dict):
        return {k: _prune(v) for k, v in value.items() if v is not None and k != "parsed"}
    if isinstance(value, list):
        return [_prune(v) for v in value]
    return value


def reference(events: list[dict[str, Any]]) -> dict[str, Any]:
    """What the openai package's accumulator joins the same chunks into."""
    state = ChatCompletionStreamState()
    for event in events:
        state.handle_chunk(ChatCompletionChunk.model_validate(event))
    snapshot = state.current_completion_snapshot.model_dump(exclude_unset=True)
    for choice in snapshot["choices"]:
        for call in choice["message"].get("tool_calls") or []:
            call.pop("index", None)
    return dict(_prune(snapshot))


def assert_like_reference(events: list[dict[str, Any]], body: dict[str, Any]) -> None:
    ChatCompletion.model_validate(body)
    ours, theirs = dict(_prune(body)), reference(events)
    # the accumulator keeps the last chunk's usage (None after a usage chunk); the server's is ours
    if "usage" not in theirs:
        ours.pop("usage", None)
    assert ours == theirs


META = {"id": "chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT", "object": "chat.completion.chunk",
        "created": 1741569952, "model": "gpt-4o-2024-08-06", "service_tier": "default",
        "system_fingerprint": "fp_eb9dce56a8"}
USAGE = {"prompt_tokens": 19, "completion_tokens": 10, "total_tokens": 29,
         "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
         "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                       "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}}


def chunk(delta: dict[str, Any] | None = None, finish: str | None = None, index: int = 0,
          logprobs: Any = None, **top: Any) -> dict[str, Any]:
    choice = {"index": index, "delta": delta or {}, "logprobs": logprobs, "finish_reason": finish}
    return {**META, "choices": [choice], "usage": None, "obfuscation": "aBc", **top}


def usage_chunk(**top: Any) -> dict[str, Any]:
    return {**META, "choices": [], "usage": USAGE, **top}


TEXT_EVENTS = [
    chunk({"role": "assistant", "content": "", "refusal": None}),
    *[chunk({"content": w}) for w in ["Hello", "!", " How", " can", " I", " help", " ✓", "?"]],
    chunk({}, "stop"),
    usage_chunk(),
]

CALL_A_ARGS = '{"location": "Paris, France", "unit": "celsius"}'
CALL_B_ARGS = '{"location": "Tōkyō"}'


def pieces(text: str, size: int) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), size)]


def tool_call_events(repeat_ids: bool = False) -> list[dict[str, Any]]:
    """Two parallel calls whose argument fragments interleave (as vLLM's and others' do)."""
    def fragment(index: int, ident: str, name: str, arguments: str, first: bool) -> dict[str, Any]:
        frag: dict[str, Any] = {"index": index, "function": {"arguments": arguments}}
        if first or repeat_ids:
            frag.update(id=ident, type="function")
            frag["function"]["name"] = name
        return frag

    a, b = pieces(CALL_A_ARGS, 7), pieces(CALL_B_ARGS, 5)
    events = [chunk({"role": "assistant", "content": None, "refusal": None,
                     "tool_calls": [fragment(0, "call_A", "get_weather", "", True)]})]
    events.append(chunk({"tool_calls": [fragment(1, "call_B", "get_time", "", True)]}))
    for i in range(max(len(a), len(b))):
        fragments = []
        if i < len(a):
            fragments.append(fragment(0, "call_A", "get_weather", a[i], False))
        if i < len(b):
            fragments.append(fragment(1, "call_B", "get_time", b[i], False))
        if i % 2:  # sometimes one event carries both, sometimes one each
            events.append(chunk({"tool_calls": fragments}))
        else:
            events += [chunk({"tool_calls": [f]}) for f in fragments]
    events += [chunk({}, "tool_calls"), usage_chunk()]
    return events


# --------------------------------------------------------------------------
# Chat completions
# --------------------------------------------------------------------------


def test_chat_text_is_handed_out_and_joined() -> None:
    texts, end = joined(Endpoint.CHAT, sse(*TEXT_EVENTS, "[DONE]"))
    assert texts == ["Hello", "!", " How", " can", " I", " help", " ✓", "?"]
    assert end.finish_reason == "stop" and end.prompt_tokens == 19 and end.completion_tokens == 10
    assert end.body == {
        "id": META["id"], "object": "chat.completion", "created": META["created"], "model": META["model"],
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello! How can I help ✓?",
                                             "refusal": None},
                     "logprobs": None, "finish_reason": "stop"}],
        "usage": USAGE, "system_fingerprint": META["system_fingerprint"], "service_tier": "default",
    }
    assert_like_reference(TEXT_EVENTS, end.body)


def test_chat_tool_calls_split_across_many_events() -> None:
    events = tool_call_events()
    texts, end = joined(Endpoint.CHAT, sse(*events, "[DONE]"))
    assert texts == []
    assert end.finish_reason == "tool_calls"
    assert end.body is not None
    message = end.body["choices"][0]["message"]
    assert message["content"] is None
    assert message["tool_calls"] == [
        {"id": "call_A", "type": "function", "function": {"name": "get_weather", "arguments": CALL_A_ARGS}},
        {"id": "call_B", "type": "function", "function": {"name": "get_time", "arguments": CALL_B_ARGS}},
    ]
    assert json.loads(message["tool_calls"][1]["function"]["arguments"]) == {"location": "Tōkyō"}
    assert_like_reference(events, end.body)


def test_chat_tool_calls_with_id_and_name_repeated_on_every_fragment_keep_the_first() -> None:
    body = chat_body([*tool_call_events(repeat_ids=True), "[DONE]"])
    calls = body["choices"][0]["message"]["tool_calls"]
    assert [(c["id"], c["function"]["name"], c["function"]["arguments"]) for c in calls] == [
        ("call_A", "get_weather", CALL_A_ARGS), ("call_B", "get_time", CALL_B_ARGS)]
    ChatCompletion.model_validate(body)


def test_chat_tool_calls_without_index_or_all_numbered_zero() -> None:
    # some servers send no index; others number every call 0: a new id is a new call
    for index in (None, 0):
        def frag(**fields: Any) -> dict[str, Any]:
            return fields if index is None else {"index": index, **fields}
        events = [
            chunk({"role": "assistant", "tool_calls": [frag(id="call_1", type="function",
                                                            function={"name": "f", "arguments": '{"a":'})]}),
            chunk({"tool_calls": [frag(function={"arguments": " 1}"})]}),
            chunk({"tool_calls": [frag(id="call_2", type="function", function={"name": "g", "arguments": "{}"})]}),
            chunk({}, "tool_calls"), "[DONE]",
        ]
        calls = chat_body(events)["choices"][0]["message"]["tool_calls"]
        assert calls == [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}},
                         {"id": "call_2", "type": "function", "function": {"name": "g", "arguments": "{}"}}]


def test_chat_tool_call_only_reply_is_not_empty() -> None:
    events = [chunk({"role": "assistant", "content": "", "tool_calls": [
        {"index": 0, "id": "call_1", "type": "function", "function": {"name": "ping", "arguments": "{}"}}]}),
        chunk({}, "tool_calls"), "[DONE]"]
    items, error = read(Endpoint.CHAT, sse(*events))
    assert error is None
    assert len(items) == 1 and isinstance(items[0], StreamEnd)
    assert items[0].finish_reason == "tool_calls"
    assert items[0].body is not None and items[0].body["choices"][0]["message"]["content"] is None


def test_chat_logprobs_are_concatenated() -> None:
    def lp(token: str, value: float) -> dict[str, Any]:
        return {"token": token, "logprob": value, "bytes": list(token.encode()),
                "top_logprobs": [{"token": token, "logprob": value, "bytes": list(token.encode())}]}
    events = [
        chunk({"role": "assistant", "content": ""}, logprobs={"content": [], "refusal": None}),
        chunk({"content": "Hi"}, logprobs={"content": [lp("Hi", -0.01)], "refusal": None}),
        chunk({"content": " there"}, logprobs={"content": [lp(" there", -0.2)], "refusal": None}),
        chunk({}, "stop"),
        usage_chunk(),
    ]
    texts, end = joined(Endpoint.CHAT, sse(*events, "[DONE]"))
    assert texts == ["Hi", " there"]
    assert end.body is not None
    choice = end.body["choices"][0]
    assert choice["logprobs"] == {"content": [lp("Hi", -0.01), lp(" there", -0.2)], "refusal": None}
    assert_like_reference(events, end.body)


def test_chat_without_logprobs_has_null_logprobs() -> None:
    assert chat_body([*TEXT_EVENTS, "[DONE]"])["choices"][0]["logprobs"] is None


def test_chat_refusal_is_joined_and_is_a_reply() -> None:
    events = [
        chunk({"role": "assistant", "content": None, "refusal": ""}),
        chunk({"refusal": "I'm sorry, "}), chunk({"refusal": "I can't help with that."}),
        chunk({}, "stop"), usage_chunk(),
    ]
    texts, end = joined(Endpoint.CHAT, sse(*events, "[DONE]"))
    assert texts == []
    assert end.body is not None
    message = end.body["choices"][0]["message"]
    assert message == {"role": "assistant", "content": None, "refusal": "I'm sorry, I can't help with that."}
    assert_like_reference(events, end.body)


def test_chat_two_choices_interleaved() -> None:
    events = [
        chunk({"role": "assistant", "content": ""}, index=0),
        chunk({"role": "assistant", "content": ""}, index=1),
        chunk({"content": "Red"}, index=1), chunk({"content": "Blue"}, index=0),
        chunk({"content": " sky"}, index=0), chunk({"content": " rose"}, index=1),
        chunk({}, "length", index=1), chunk({}, "stop", index=0),
        usage_chunk(),
    ]
    texts, end = joined(Endpoint.CHAT, sse(*events, "[DONE]"))
    assert texts == ["Blue", " sky"]  # choice 0's only
    assert end.finish_reason == "stop"
    assert end.body is not None
    assert [(c["index"], c["message"]["content"], c["finish_reason"]) for c in end.body["choices"]] == [
        (0, "Blue sky", "stop"), (1, "Red rose", "length")]
    assert_like_reference(events, end.body)


def test_chat_two_choices_in_one_event() -> None:
    event = {**META, "choices": [
        {"index": 1, "delta": {"content": "b"}, "finish_reason": "stop"},
        {"index": 0, "delta": {"content": "a"}, "finish_reason": "stop"}]}
    texts, end = joined(Endpoint.CHAT, sse(event, "[DONE]"))
    assert texts == ["a"]
    assert end.body is not None
    assert [c["message"]["content"] for c in end.body["choices"]] == ["a", "b"]


def test_chat_usage_chunk_with_empty_choices() -> None:
    _, end = joined(Endpoint.CHAT, sse(*TEXT_EVENTS, "[DONE]"))
    assert end.body is not None and end.body["usage"] == USAGE
    assert (end.prompt_tokens, end.completion_tokens) == (19, 10)


def test_chat_usage_chunk_in_litellms_form() -> None:
    usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    events = [
        {"id": "chatcmpl-l", "created": 1, "model": "gpt-4o", "object": "chat.completion.chunk",
         "choices": [{"index": 0, "delta": {"content": "ok", "role": "assistant", "tool_calls": None,
                                            "function_call": None, "audio": None}}]},
        {"id": "chatcmpl-l", "created": 1, "model": "gpt-4o", "object": "chat.completion.chunk",
         "choices": [{"finish_reason": "stop", "index": 0, "delta": {}}]},
        {"id": "chatcmpl-l", "created": 1, "model": "gpt-4o", "object": "chat.completion.chunk",
         "choices": [{"index": 0, "delta": {}}], "usage": usage},
    ]
    texts, end = joined(Endpoint.CHAT, sse(*events, "[DONE]"))
    assert texts == ["ok"]
    assert end == StreamEnd("stop", 3, 2, body=end.body)
    assert end.body is not None
    assert end.body["usage"] == usage and end.body["choices"][0]["finish_reason"] == "stop"
    assert end.body["choices"][0]["message"] == {"role": "assistant", "content": "ok"}  # no refusal key: none came
    assert "system_fingerprint" not in end.body
    ChatCompletion.model_validate(end.body)


def test_chat_without_usage_has_null_usage() -> None:
    events = [chunk({"content": "hi"}), chunk({}, "stop"), "[DONE]"]
    _, end = joined(Endpoint.CHAT, sse(*events))
    assert end.body is not None and end.body["usage"] is None
    assert end.prompt_tokens is None and end.completion_tokens is None


def test_chat_without_done_but_with_finish_reason_is_whole() -> None:
    texts, end = joined(Endpoint.CHAT, sse(chunk({"content": "hi"}), chunk({}, "stop"), usage_chunk()))
    assert texts == ["hi"] and end.finish_reason == "stop" and end.prompt_tokens == 19


@pytest.mark.parametrize("size", SIZES)
def test_chat_cut_stream_is_incomplete_after_its_text(size: int) -> None:
    data = sse(*TEXT_EVENTS[:4])
    items, error = read(Endpoint.CHAT, data[:-7], size)
    assert isinstance(error, IncompleteReply)
    assert all(isinstance(i, str) for i in items) and "".join(map(str, items)) in ("Hello!", "Hello! How")


def test_chat_error_event_raises_after_the_text_and_redacts_the_key() -> None:
    data = sse(chunk({"content": "partial"}),
               {"error": {"message": "overloaded for sk-secret-key", "type": "server_error", "code": None}})
    items, error = read(Endpoint.CHAT, data, api_key="sk-secret-key")
    assert items == ["partial"]
    assert isinstance(error, ProviderHTTPError) and error.kind == "server_error" and error.transient
    assert "sk-secret-key" not in str(error) and "overloaded" in str(error)


def test_chat_nothing_said_is_an_empty_reply_unless_cut_by_length() -> None:
    empty = sse(chunk({"role": "assistant", "content": ""}), chunk({}, "stop"), "[DONE]")
    assert isinstance(read(Endpoint.CHAT, empty)[1], EmptyReply)
    cut = sse(chunk({"role": "assistant", "content": ""}), chunk({}, "length"), "[DONE]")
    items, error = read(Endpoint.CHAT, cut)
    assert error is None and isinstance(items[-1], StreamEnd) and items[-1].finish_reason == "length"


def test_chat_other_delta_fields_are_joined_too() -> None:
    events = [chunk({"role": "assistant", "reasoning_content": "Think"}), chunk({"reasoning_content": "ing."}),
              chunk({"content": "Done"}), chunk({}, "stop"), "[DONE]"]
    message = chat_body(events)["choices"][0]["message"]
    assert message == {"role": "assistant", "content": "Done", "reasoning_content": "Thinking."}


@pytest.mark.parametrize("body", [b'{"id": "chatcmpl-1", "object": "chat.completion", "choices": []}',
                                  b"\n <!doctype html><html>Sign in</html>"])
def test_chat_body_that_is_no_event_stream_is_malformed(body: bytes) -> None:
    items, error = read(Endpoint.CHAT, body, media="")
    assert items == [] and isinstance(error, MalformedReply)


def test_chat_parser_refuses_json_and_web_pages_by_media_type() -> None:
    for media in ("application/json", "text/html"):
        items, error = read(Endpoint.CHAT, sse(*TEXT_EVENTS), media=media)
        assert isinstance(error, MalformedReply), media


def test_chat_event_nested_too_deeply_is_malformed() -> None:
    data = b"data: " + b'{"choices": [{"delta": {"x": ' + b"[" * 5000 + b"]" * 5000 + b"}}]}\n\n"
    assert isinstance(read(Endpoint.CHAT, data)[1], MalformedReply)


def test_chat_joiner_holds_about_what_it_was_fed() -> None:
    """A huge index allocates nothing; pieces are joined once (no quadratic copying); choices not
    numbered from 0 answer nothing the request asked."""
    joiner = ChatJoiner()
    out: list[Item] = []
    joiner.add({"choices": [{"index": 10**12, "delta": {"tool_calls": [
        {"index": 10**12, "id": "c", "type": "function", "function": {"name": "f", "arguments": ""}}]}}]}, out)
    for _ in range(20000):
        joiner.add({"choices": [{"index": 10**12, "delta": {"tool_calls": [
            {"index": 10**12, "function": {"arguments": "xy"}}]}}]}, out)
    joiner.add({"choices": [{"index": 10**12, "delta": {}, "finish_reason": "tool_calls"}]}, out)
    assert len(joiner._choices) == 1  # noqa: SLF001
    calls = joiner._choices[10**12].calls  # noqa: SLF001
    assert calls is not None and calls[0].final()["function"]["arguments"] == "xy" * 20000
    with pytest.raises(MalformedReply, match="numbered"):
        joiner.body()


def test_chat_event_past_the_cap_is_too_large() -> None:
    data = sse(chunk({"content": "x" * 5000}))
    assert isinstance(read(Endpoint.CHAT, data, max_bytes=1000)[1], ReplyTooLarge)


# --------------------------------------------------------------------------
# Legacy completions
# --------------------------------------------------------------------------

COMPLETION_META = {"id": "cmpl-8mZ6", "object": "text_completion", "created": 1706000000,
                   "model": "gpt-3.5-turbo-instruct", "system_fingerprint": None}


def text_chunk(text: str, finish: str | None = None, index: int = 0, logprobs: Any = None) -> dict[str, Any]:
    return {**COMPLETION_META, "choices": [{"text": text, "index": index, "logprobs": logprobs,
                                             "finish_reason": finish}]}


def test_completions_text_and_logprobs_joined() -> None:
    def lp(tokens: list[str], offset: int) -> dict[str, Any]:
        return {"tokens": tokens, "token_logprobs": [-0.5] * len(tokens),
                "top_logprobs": [{t: -0.5} for t in tokens],
                "text_offset": list(range(offset, offset + len(tokens)))}
    usage = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
    events = [text_chunk("\n\n", logprobs=lp(["\n\n"], 10)), text_chunk("Once", logprobs=lp(["Once"], 11)),
              text_chunk(" upon", "length", logprobs=lp([" upon"], 12)),
              {**COMPLETION_META, "choices": [], "usage": usage}, "[DONE]"]
    texts, end = joined(Endpoint.COMPLETIONS, sse(*events))
    assert texts == ["\n\n", "Once", " upon"]
    assert end.finish_reason == "length" and (end.prompt_tokens, end.completion_tokens) == (5, 3)
    assert end.body == {
        "id": "cmpl-8mZ6", "object": "text_completion", "created": 1706000000, "model": "gpt-3.5-turbo-instruct",
        "choices": [{"index": 0, "text": "\n\nOnce upon", "finish_reason": "length",
                     "logprobs": {"tokens": ["\n\n", "Once", " upon"], "token_logprobs": [-0.5] * 3,
                                  "top_logprobs": [{"\n\n": -0.5}, {"Once": -0.5}, {" upon": -0.5}],
                                  "text_offset": [10, 11, 12]}}],
        "usage": usage, "system_fingerprint": None,
    }
    Completion.model_validate(end.body)


def test_completions_two_choices_and_null_logprobs() -> None:
    events = [text_chunk("a", index=0), text_chunk("b", index=1), text_chunk("c", "stop", index=1),
              text_chunk("d", "stop", index=0), "[DONE]"]
    texts, end = joined(Endpoint.COMPLETIONS, sse(*events))
    assert texts == ["a", "d"]
    assert end.body is not None
    assert [(c["text"], c["logprobs"], c["finish_reason"]) for c in end.body["choices"]] == [
        ("ad", None, "stop"), ("bc", None, "stop")]
    assert end.body["usage"] is None
    Completion.model_validate(end.body)


def test_completions_cut_and_error() -> None:
    assert isinstance(read(Endpoint.COMPLETIONS, sse(text_chunk("a")))[1], IncompleteReply)
    items, error = read(Endpoint.COMPLETIONS, sse(text_chunk("a"), {"error": {"message": "x", "type": "y"}}))
    assert items == ["a"] and isinstance(error, ProviderHTTPError) and error.kind == "y"


# --------------------------------------------------------------------------
# The Responses API
# --------------------------------------------------------------------------

RESP_ID = "resp_67ccd2bed1ec8190b14f964abc0542670bb6a6b452d3795b"
MSG_ID = "msg_67ccd2bf17f0819081ff3bb2cf6508e60bb6a6b452d3795b"
RESPONSE_BASE: dict[str, Any] = {
    "id": RESP_ID, "object": "response", "created_at": 1741476542, "status": "in_progress",
    "error": None, "incomplete_details": None, "instructions": None, "max_output_tokens": None,
    "model": "gpt-4.1-2025-04-14", "output": [], "parallel_tool_calls": True, "previous_response_id": None,
    "reasoning": {"effort": None, "summary": None}, "store": True, "temperature": 1.0,
    "text": {"format": {"type": "text"}}, "tool_choice": "auto", "tools": [], "top_p": 1.0,
    "truncation": "disabled", "usage": None, "user": None, "metadata": {},
}
FINAL_TEXT = "In a peaceful grove beneath a silver moon, a unicorn named Lumina slept."
RESPONSE_DONE: dict[str, Any] = {
    **RESPONSE_BASE, "status": "completed",
    "output": [{"type": "message", "id": MSG_ID, "status": "completed", "role": "assistant",
                "content": [{"type": "output_text", "text": FINAL_TEXT, "annotations": [], "logprobs": []}]}],
    "usage": {"input_tokens": 36, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
              "output_tokens": 87,
              "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 123},
}


def responses_events(final: dict[str, Any] | None = None, kind: str = "response.completed") -> list[Any]:
    deltas = pieces(FINAL_TEXT, 9)
    where = {"item_id": MSG_ID, "output_index": 0, "content_index": 0}
    events: list[Any] = [
        {"type": "response.created", "response": RESPONSE_BASE},
        {"type": "response.in_progress", "response": RESPONSE_BASE},
        {"type": "response.output_item.added", "output_index": 0,
         "item": {"id": MSG_ID, "status": "in_progress", "type": "message", "role": "assistant", "content": []}},
        {"type": "response.content_part.added", **where,
         "part": {"type": "output_text", "text": "", "annotations": []}},
        *[{"type": "response.output_text.delta", **where, "delta": d, "logprobs": []} for d in deltas],
        {"type": "response.output_text.done", **where, "text": FINAL_TEXT, "logprobs": []},
        {"type": "response.content_part.done", **where,
         "part": {"type": "output_text", "text": FINAL_TEXT, "annotations": []}},
        {"type": "response.output_item.done", "output_index": 0, "item": RESPONSE_DONE["output"][0]},
        {"type": kind, "response": final or RESPONSE_DONE},
    ]
    for number, event in enumerate(events):
        event["sequence_number"] = number
    return events


def test_responses_text_and_final_response() -> None:
    texts, end = joined(Endpoint.RESPONSES, sse(*responses_events(), named=True))
    assert "".join(texts) == FINAL_TEXT and texts == pieces(FINAL_TEXT, 9)
    assert end.body == RESPONSE_DONE
    assert (end.finish_reason, end.prompt_tokens, end.completion_tokens) == ("stop", 36, 87)
    assert Response.model_validate(end.body).output_text == FINAL_TEXT


def test_responses_incomplete_for_max_output_tokens_ends_with_length() -> None:
    final = {**RESPONSE_DONE, "status": "incomplete", "incomplete_details": {"reason": "max_output_tokens"}}
    _, end = joined(Endpoint.RESPONSES, sse(*responses_events(final, "response.incomplete"), named=True))
    assert end.finish_reason == "length" and end.body == final
    Response.model_validate(end.body)


def test_responses_failed_raises_the_servers_error_after_the_text() -> None:
    failed = {**RESPONSE_BASE, "status": "failed",
              "error": {"code": "server_error", "message": "The model failed for sk-k."}}
    items, error = read(Endpoint.RESPONSES, sse(*responses_events(failed, "response.failed")), api_key="sk-k")
    assert "".join(map(str, items)) == FINAL_TEXT
    assert isinstance(error, ResponseFailed) and error.kind == "server_error" and error.transient
    assert "sk-k" not in str(error) and "The model failed" in str(error)
    invalid = {**failed, "error": {"code": "invalid_prompt", "message": "no"}}
    _, error = read(Endpoint.RESPONSES, sse(*responses_events(invalid, "response.failed")))
    assert isinstance(error, ResponseFailed) and error.kind == "invalid_prompt" and not error.transient


def test_responses_error_event() -> None:
    events = [{"type": "response.created", "response": RESPONSE_BASE, "sequence_number": 0},
              {"type": "error", "code": "rate_limit_exceeded", "message": "slow down", "param": None,
               "sequence_number": 1}]
    items, error = read(Endpoint.RESPONSES, sse(*events, named=True))
    assert items == [] and isinstance(error, ProviderHTTPError) and error.kind == "rate_limit_exceeded"


def test_responses_cut_before_completed_is_incomplete() -> None:
    items, error = read(Endpoint.RESPONSES, sse(*responses_events()[:-1], "[DONE]", named=True))
    assert "".join(map(str, items)) == FINAL_TEXT and isinstance(error, IncompleteReply)


# --------------------------------------------------------------------------
# Embeddings
# --------------------------------------------------------------------------

EMBEDDINGS = {
    "object": "list",
    "data": [{"object": "embedding", "index": 0, "embedding": [0.0023064255, -0.009327292, 0.015797347]},
             {"object": "embedding", "index": 1, "embedding": [-0.0028842222, 0.014384646, -0.02154331]}],
    "model": "text-embedding-3-small",
    "usage": {"prompt_tokens": 8, "total_tokens": 8},
}


def test_embeddings_body_kept_as_sent() -> None:
    data = json.dumps(EMBEDDINGS, indent=1).encode()
    texts, end = joined(Endpoint.EMBEDDINGS, data, media="application/json")
    assert texts == []
    assert end == StreamEnd(None, 8, 0, body=EMBEDDINGS)
    CreateEmbeddingResponse.model_validate(end.body)


@pytest.mark.parametrize("media, body, error_type", [
    ("text/html", b"<html>hi</html>", MalformedReply),
    ("text/event-stream", b"data: {}\n\n", MalformedReply),
    ("application/json", b"<html>hi</html>", MalformedReply),
    ("application/json", b'{"object": "list", "data": {}}', MalformedReply),
    ("application/json", b"[1, 2]", MalformedReply),
    ("application/json", b'{"data": [' + b"[" * 100000 + b"]", MalformedReply),
    ("application/json", b"", EmptyReply),
])
def test_embeddings_that_are_no_embeddings(media: str, body: bytes, error_type: type[Exception]) -> None:
    items, error = read(Endpoint.EMBEDDINGS, body, media=media)
    assert items == [] and isinstance(error, error_type)


def test_embeddings_error_object_with_200() -> None:
    body = b'{"error": {"message": "bad key sk-z", "type": "invalid_request_error"}}'
    call_error = read(Endpoint.EMBEDDINGS, body, media="application/json", api_key="sk-z")[1]
    assert isinstance(call_error, ProviderHTTPError) and call_error.kind == "invalid_request_error"
    assert "sk-z" not in str(call_error)


def test_embeddings_past_the_cap_is_too_large() -> None:
    data = json.dumps(EMBEDDINGS).encode()
    items, error = read(Endpoint.EMBEDDINGS, data, media="application/json", max_bytes=100)
    assert items == [] and isinstance(error, ReplyTooLarge)


def test_chat_cut_inside_the_usage_event_after_the_finish_reason_is_whole() -> None:
    data = sse(chunk({"content": "hi"}), chunk({}, "stop")) + b'data: {"id": "chatcmpl-B9M'
    for size in SIZES:
        items, error = read(Endpoint.CHAT, data, size)
        assert error is None and items[0] == "hi"
        end = items[-1]
        assert isinstance(end, StreamEnd) and end.finish_reason == "stop" and end.prompt_tokens is None


def test_a_stream_naming_too_many_choices_or_tool_calls_is_malformed() -> None:
    many_choices = {"choices": [{"index": i, "delta": {}} for i in range(MAX_CHOICES + 1)]}
    assert isinstance(read(Endpoint.CHAT, sse(many_choices, "[DONE]"))[1], MalformedReply)
    many_calls = chunk({"tool_calls": [{"index": i, "id": f"c{i}"} for i in range(MAX_TOOL_CALLS + 1)]})
    assert isinstance(read(Endpoint.CHAT, sse(many_calls, "[DONE]"))[1], MalformedReply)
    many_texts = {"choices": [{"index": i, "text": "a"} for i in range(MAX_CHOICES + 1)]}
    assert isinstance(read(Endpoint.COMPLETIONS, sse(many_texts, "[DONE]"))[1], MalformedReply)


def test_chat_top_level_fields_from_the_first_event_with_an_id() -> None:
    """Azure's first event has an empty id and model and no choices; a null index is choice 0."""
    azure_first = {"choices": [], "created": 0, "id": "", "model": "", "object": "",
                   "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": {}}]}
    events = [azure_first, chunk({"content": "hi"}), {**chunk({}, "stop"), "id": "other"},
              {"id": "x", "choices": [{"index": None, "delta": {"content": "!"}}]}, "[DONE]"]
    texts, end = joined(Endpoint.CHAT, sse(*events))
    assert texts == ["hi", "!"]
    assert end.body is not None
    assert (end.body["id"], end.body["created"], end.body["model"]) == (META["id"], META["created"], META["model"])
    ChatCompletion.model_validate(end.body)


# --------------------------------------------------------------------------
# Answers that answer nothing, or that no result could carry
# --------------------------------------------------------------------------


def test_chat_delta_nested_deeper_than_any_real_one_is_malformed() -> None:
    nested: dict[str, Any] = {"leaf": "x"}
    for _ in range(700):
        nested = {"x": nested}
    items, error = read(Endpoint.CHAT, sse(chunk({"content": "hi", "reasoning": nested}), chunk({}, "stop")))
    assert isinstance(error, MalformedReply) and "nested" in str(error)


def test_chat_reply_only_at_a_far_choice_index_is_malformed() -> None:
    events = [{**chunk({"content": "hi"}), "choices": [{"index": 10**9, "delta": {"content": "hi"},
                                                         "finish_reason": "stop"}]}, "[DONE]"]
    error = read(Endpoint.CHAT, sse(*events))[1]
    assert isinstance(error, MalformedReply) and "numbered" in str(error)


@pytest.mark.parametrize("first, why", [
    ({"index": 0, "type": "function", "function": {"name": "f", "arguments": "{}"}}, "no id"),
    ({"index": 0, "id": "call_1", "type": "function", "function": {"arguments": "{}"}}, "no name"),
])
def test_chat_tool_call_without_id_or_name_is_malformed(first: dict[str, Any], why: str) -> None:
    events = [chunk({"role": "assistant", "tool_calls": [first]}), chunk({}, "tool_calls"), "[DONE]"]
    error = read(Endpoint.CHAT, sse(*events))[1]
    assert isinstance(error, MalformedReply) and why in str(error)


def test_chat_tool_name_split_across_fragments_is_joined() -> None:
    events = [chunk({"role": "assistant", "tool_calls": [
        {"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_", "arguments": ""}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"name": "weather", "arguments": "{}"}}]}),
        chunk({}, "tool_calls"), "[DONE]"]
    calls = chat_body(events)["choices"][0]["message"]["tool_calls"]
    assert calls == [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]


def test_chat_choice_fields_of_vllm_and_azure_are_kept_as_last_sent() -> None:
    """vLLM's stop_reason and Azure's content filter results sit on the answer's choice, as in
    their unstreamed answers; Azure's prompt_filter_results on the answer."""
    azure_first = {"choices": [], "created": 0, "id": "", "model": "", "object": "",
                   "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": {}}]}
    filters = {"hate": {"filtered": False, "severity": "safe"}}

    def with_fields(event: dict[str, Any], **fields: Any) -> dict[str, Any]:
        event["choices"][0].update(fields)
        return event

    events = [azure_first,
              with_fields(chunk({"content": "Hi"}), stop_reason=None, content_filter_results=filters),
              with_fields(chunk({"content": "!"}), stop_reason=None, content_filter_results=filters),
              with_fields(chunk({}, "stop"), stop_reason="###"), "[DONE]"]
    body = chat_body(events)
    choice = body["choices"][0]
    assert choice["message"]["content"] == "Hi!"
    assert choice["stop_reason"] == "###" and choice["content_filter_results"] == filters
    assert body["prompt_filter_results"] == azure_first["prompt_filter_results"]
    ChatCompletion.model_validate(body)


def test_completions_choice_fields_are_kept() -> None:
    first = text_chunk("Hi")
    first["choices"][0]["stop_reason"] = 13
    _, end = joined(Endpoint.COMPLETIONS, sse(first, text_chunk("", "stop"), "[DONE]"))
    assert end.body is not None and end.body["choices"][0]["stop_reason"] == 13


@pytest.mark.parametrize("constant", [b"NaN", b"Infinity", b"-Infinity"])
def test_non_finite_numbers_are_no_json(constant: bytes) -> None:
    event = b'data: {"choices": [{"index": 0, "delta": {"content": "hi"}, "logprobs": {"content": [' \
            b'{"token": "hi", "logprob": ' + constant + b', "top_logprobs": []}]}, "finish_reason": "stop"}]}\n\n'
    error = read(Endpoint.CHAT, event)[1]
    assert isinstance(error, MalformedReply) and constant.decode() in str(error)
    vectors = b'{"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": [0.5, ' + constant + b']}]}'
    error = read(Endpoint.EMBEDDINGS, vectors, media="application/json")[1]
    assert isinstance(error, MalformedReply) and constant.decode() in str(error)


def test_a_reply_of_empty_objects_is_refused_before_it_is_held() -> None:
    """Parsed, ``{}`` costs some 60 bytes for 3 sent: a reply may keep one object or list per 16 bytes."""
    burst = json.dumps({"choices": [{"index": 0, "delta": {"x": [{}] * 5000}}]})
    data = b"".join(f"data: {burst}\n\n".encode() for _ in range(40))  # 200,000 objects in 600 kB
    error = read(Endpoint.CHAT, data, max_bytes=1 << 20)[1]
    assert isinstance(error, MalformedReply) and "JSON objects and lists" in str(error)
    vectors = b'{"data": [' + b",".join([b"{}"] * 200000) + b"]}"
    error = read(Endpoint.EMBEDDINGS, vectors, media="application/json", max_bytes=1 << 20)[1]
    assert isinstance(error, MalformedReply)


def read_embeddings(body: dict[str, Any], given: Any) -> ProviderError | None:
    call = CompletionCall("m", (), endpoint=Endpoint.EMBEDDINGS, params={"input": given})
    parser = OpenAI.reply_parser(call)
    reader = ReplyReader(call, parser, parser.check_type)
    try:
        reader.start(Head(200, content_type="application/json"))
        list(reader.feed(json.dumps(body).encode()))
        list(reader.finish())
    except ProviderError as exc:
        return exc
    return None


@pytest.mark.parametrize("body, given, problem", [
    (EMBEDDINGS, ["a", "b"], None),
    (EMBEDDINGS, [[1, 2], [3]], None),
    ({**EMBEDDINGS, "data": EMBEDDINGS["data"][:1]}, "a", None),
    ({**EMBEDDINGS, "data": EMBEDDINGS["data"][:1]}, [1, 2, 3], None),  # one token list
    ({**EMBEDDINGS, "data": []}, "a", "0 vectors for 1 inputs"),
    (EMBEDDINGS, ["a", "b", "c"], "2 vectors for 3 inputs"),
    ({**EMBEDDINGS, "data": [{"object": "embedding", "index": 0}]}, "a", "holds no embedding"),
    ({**EMBEDDINGS, "data": [{"index": 0, "embedding": ["x"]}]}, "a", "not a list of numbers"),
    ({**EMBEDDINGS, "data": [{"index": 0, "embedding": "AAAAAA=="}]}, "a", None),  # base64
])
def test_embeddings_one_vector_per_input(body: dict[str, Any], given: Any, problem: str | None) -> None:
    error = read_embeddings(body, given)
    if problem is None:
        assert error is None
    else:
        assert isinstance(error, MalformedReply) and problem in str(error)


@pytest.mark.parametrize("response, error_type", [
    ({}, MalformedReply),
    ({"id": "resp_1", "status": "completed"}, MalformedReply),
    ({"id": "resp_1", "status": "failed", "output": []}, ResponseFailed),
    ({"id": "resp_1", "status": "completed", "output": []}, EmptyReply),
])
def test_responses_completed_without_an_answer(response: dict[str, Any], error_type: type[Exception]) -> None:
    event = {"type": "response.completed", "sequence_number": 1, "response": response}
    error = read(Endpoint.RESPONSES, sse(event, named=True))[1]
    assert isinstance(error, error_type), error
