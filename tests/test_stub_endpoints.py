"""The stand-in's OpenAI API beyond plain chat, over real HTTP, validated with the ``openai`` SDK's own types.

Chat features (tools, logprobs, ``n``, ``response_format``, refusals), embeddings, the
Responses API and legacy completions; a streamed chat answer accumulated with the SDK's
``ChatCompletionStreamState`` must equal the non-streamed answer to the same request.
"""

from __future__ import annotations

import base64
import json
import math
import re
import struct
import time
from pathlib import Path
from typing import Any, Callable

import openai
import pytest
import requests
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types import Completion, CreateEmbeddingResponse
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from aivvm_batch import stub as stub_module
from aivvm_batch.stub import StubServer, example_value, violating_value

STREAM_EVENT = TypeAdapter(ResponseStreamEvent)
REQUEST_ID = re.compile(r"req_\d+")

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "days": {"type": "integer"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "where": {"type": "object", "properties": {"lat": {"type": "number"}, "exact": {"type": "boolean"}}},
                "tags": {"type": "array", "items": {"type": "string"}},
            },
            "required": ["city", "days"],
        },
    },
}
WEATHER_ARGUMENTS = {
    "city": "stand-in", "days": 1, "unit": "celsius", "where": {"lat": 1.5, "exact": True}, "tags": [],
}


def tool(name: str, **properties: Any) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "parameters": {"type": "object", "properties": properties}}}


SEARCH = tool("search", query={"type": "string"})
CLOCK = tool("clock")
ADD = tool("add", a={"type": "integer"}, b={"type": "integer"})

PERSON_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "address": {"$ref": "#/$defs/address"},
        "nickname": {"anyOf": [{"type": "string"}, {"type": "null"}]},
    },
    "required": ["name", "age", "address", "nickname"],
    "additionalProperties": False,
    "$defs": {"address": {"type": "object", "properties": {"street": {"type": "string"}}, "required": ["street"]}},
}
PERSON = {"name": "stand-in", "age": 1, "address": {"street": "stand-in"}, "nickname": "stand-in"}


@pytest.fixture
def server(stub_factory: Callable[..., StubServer]) -> StubServer:
    """A stand-in of each test's own: its counters and ``times=`` faults start from nothing."""
    return stub_factory()


@pytest.fixture
def client(server: StubServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="sk-stub", max_retries=0, timeout=10)


def post(srv: StubServer, path: str, body: dict[str, Any], **kwargs: Any) -> requests.Response:
    kwargs.setdefault("timeout", 10)
    return requests.post(srv.base_url + path, json=body, **kwargs)


def chat_body(content: Any, **extra: Any) -> dict[str, Any]:
    return {"model": "gpt-4o", "messages": [{"role": "user", "content": content}], **extra}


def data_events(resp: requests.Response) -> tuple[list[dict[str, Any]], bool]:
    """The JSON of every ``data:`` event, and whether ``data: [DONE]`` ended the stream."""
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/event-stream")
    blocks = resp.content.decode("utf-8").split("\n\n")
    assert blocks[-1] == ""
    payloads = [b.removeprefix("data: ") for b in blocks[:-1]]
    done = bool(payloads) and payloads[-1] == "[DONE]"
    return [json.loads(p) for p in payloads[: len(payloads) - done]], done


def named_events(resp: requests.Response) -> list[tuple[str, dict[str, Any]]]:
    """``(event name, data)`` of a Responses stream."""
    assert resp.status_code == 200, resp.text
    blocks = resp.content.decode("utf-8").split("\n\n")
    assert blocks[-1] == ""
    events = []
    for block in blocks[:-1]:
        event, data = block.split("\n")
        events.append((event.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
    return events


def without(value: Any, keys: frozenset[str]) -> Any:
    """``value`` without the given keys (at any depth) and without ``None`` values."""
    if isinstance(value, dict):
        return {k: without(v, keys) for k, v in value.items() if k not in keys and v is not None}
    if isinstance(value, list):
        return [without(v, keys) for v in value]
    return value


IDENTITY = frozenset({"id", "created", "created_at", "parsed", "parsed_arguments", "index"})


def streamed_and_whole(srv: StubServer, body: dict[str, Any]) -> tuple[ChatCompletion, ChatCompletion, list[Any]]:
    """The streamed answer accumulated by the SDK, the non-streamed answer, and the chunks."""
    whole = post(srv, "/v1/chat/completions", body)
    assert whole.status_code == 200, whole.text
    completion = ChatCompletion.model_validate(whole.json())
    events, done = data_events(post(srv, "/v1/chat/completions",
                                    {**body, "stream": True, "stream_options": {"include_usage": True}}))
    assert done
    chunks = [ChatCompletionChunk.model_validate(e) for e in events]
    state: ChatCompletionStreamState[Any] = ChatCompletionStreamState()
    for chunk in chunks:
        state.handle_chunk(chunk)
    accumulated = ChatCompletion.model_validate(state.get_final_completion().model_dump())
    return accumulated, completion, events


def assert_same_answer(streamed: ChatCompletion, whole: ChatCompletion) -> None:
    # tool-call ids are deterministic (a hash of the request), so they are compared: dropped only at the top
    assert streamed.id != whole.id
    for a, b in zip(streamed.choices, whole.choices):
        assert [c.id for c in a.message.tool_calls or []] == [c.id for c in b.message.tool_calls or []]
    assert without(streamed.model_dump(), IDENTITY) == without(whole.model_dump(), IDENTITY)


# -- chat: the stream accumulated equals the whole answer ------------------------------------------

CASES: dict[str, dict[str, Any]] = {
    "plain": chat_body("plain words here"),
    "plain-parts": chat_body([{"type": "text", "text": "in "}, {"type": "image_url", "image_url": {"url": "x"}},
                              {"type": "text", "text": "parts"}]),
    "tools-auto": chat_body("weather?", tools=[WEATHER, SEARCH]),
    "tools-required-parallel": chat_body("all of them", tools=[WEATHER, SEARCH, CLOCK, ADD], tool_choice="required"),
    "tools-named": chat_body("add", tools=[WEATHER, ADD],
                             tool_choice={"type": "function", "function": {"name": "add"}}),
    "logprobs": chat_body("with log probabilities [[stub chunks=3]]", logprobs=True, top_logprobs=3),
    "n2": chat_body("two of them", n=2),
    "n2-logprobs": chat_body("two with logprobs", n=2, logprobs=True, top_logprobs=1),
    "n2-tools": chat_body("two calls", n=2, tools=[WEATHER]),
    "json-schema": chat_body("a person", response_format={"type": "json_schema",
                                                          "json_schema": {"name": "person", "schema": PERSON_SCHEMA}}),
    "json-object": chat_body("an object", response_format={"type": "json_object"}),
    "refusal": chat_body("[[stub fault=refusal]] do it"),
    "refusal-logprobs-n2": chat_body("[[stub fault=refusal]] no", logprobs=True, n=2),
    "long-logprobs": chat_body("[[stub words=40 chunks=7]] many", logprobs=True, top_logprobs=20),
}


@pytest.mark.parametrize("case", list(CASES))
def test_streamed_chat_accumulates_to_the_whole_answer(server: StubServer, case: str) -> None:
    streamed, whole, events = streamed_and_whole(server, CASES[case])
    assert_same_answer(streamed, whole)
    assert whole.system_fingerprint == "fp_stub"
    assert all(e["system_fingerprint"] == "fp_stub" for e in events)
    assert streamed.usage == whole.usage and whole.usage is not None
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens


def test_sdk_client_streams_and_parses(server: StubServer, client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "sdk"}],
                                           tools=[WEATHER], n=2, logprobs=True)
    assert [c.finish_reason for c in whole.choices] == ["tool_calls", "tool_calls"]
    stream = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "sdk"}],
                                            stream=True, logprobs=True, top_logprobs=2)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == "Stand-in reply to: sdk"


# -- chat: shapes ------------------------------------------------------------------------------------


def test_every_answer_has_a_request_id(server: StubServer) -> None:
    answers = [
        post(server, "/v1/chat/completions", chat_body("hi")),
        post(server, "/v1/chat/completions", chat_body("hi"), stream=False),
        post(server, "/v1/chat/completions", chat_body("[[stub fault=429]] hi")),
        post(server, "/v1/chat/completions", chat_body("[[stub fault=status code=503]] hi")),
        post(server, "/v1/embeddings", {"input": []}),
        post(server, "/v1/responses", {"input": "hi", "stream": True}),
        post(server, "/api/chat", chat_body("aivvm")),
        requests.get(server.base_url + "/health", timeout=5),
        requests.get(server.base_url + "/nope", timeout=5),
        requests.get(server.base_url + "/v1/embeddings", timeout=5),
    ]
    ids = [a.headers["x-request-id"] for a in answers]
    assert all(REQUEST_ID.fullmatch(i) for i in ids)
    assert len(set(ids)) == len(ids)
    assert [a.status_code for a in answers] == [200, 200, 429, 503, 400, 200, 200, 200, 404, 405]
    with StubServer(api_key="k") as keyed:
        assert post(keyed, "/v1/chat/completions", chat_body("hi")).headers["x-request-id"] == "req_1"


def test_plain_chat_shapes_carry_the_fingerprint(server: StubServer) -> None:
    whole = post(server, "/v1/chat/completions", chat_body("plain")).json()
    assert whole["system_fingerprint"] == "fp_stub"
    assert whole["choices"][0] == {"index": 0, "message": {"role": "assistant", "content": "Stand-in reply to: plain",
                                                           "refusal": None},
                                   "logprobs": None, "finish_reason": "stop"}
    events, done = data_events(post(server, "/v1/chat/completions", chat_body("plain", stream=True)))
    assert done and {e["system_fingerprint"] for e in events} == {"fp_stub"}
    assert all("logprobs" not in e["choices"][0] for e in events)


def test_messages_of_every_kind_do_not_crash(server: StubServer) -> None:
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "be brief"}]},
        {"role": "user", "content": [{"type": "text", "text": "look at"},
                                     {"type": "image_url", "image_url": {"url": "u"}},
                                     {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}},
                                     {"type": "text", "text": " this"}, "stray", {"type": "text", "text": 3}]},
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "tool said this"},
        {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "in parts"}]},
        {"role": "user", "content": [{"type": "text", "text": "now answer"}]},
        {"role": "developer"},
    ]
    for extra in ({}, {"tools": [ADD]}, {"n": 2, "logprobs": True}, {"response_format": {"type": "json_object"}}):
        for stream in (False, True):
            resp = post(server, "/v1/chat/completions", {"model": "m", "messages": messages, "stream": stream,
                                                        "stream_options": {"include_usage": True}, **extra})
            assert resp.status_code == 200, resp.text
    resp = post(server, "/v1/chat/completions", {"model": "m", "messages": messages})
    whole = ChatCompletion.model_validate(resp.json())
    assert whole.choices[0].message.content == "Stand-in reply to: now answer"
    # words: "be brief" 2, "look at this" 3, "tool said this" 3, "in parts" 2, "now answer" 2
    assert whole.usage is not None and whole.usage.prompt_tokens == 12
    two_parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    parts = post(server, "/v1/chat/completions", chat_body(two_parts))
    assert parts.json()["choices"][0]["message"]["content"] == "Stand-in reply to: ab"


def test_tool_calls_whole(server: StubServer) -> None:
    whole = ChatCompletion.model_validate(post(server, "/v1/chat/completions",
                                               chat_body("weather?", tools=[WEATHER, SEARCH])).json())
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    calls = choice.message.tool_calls or []
    assert len(calls) == 1 and calls[0].type == "function"
    assert calls[0].function.name == "get_weather"
    assert json.loads(calls[0].function.arguments) == WEATHER_ARGUMENTS
    assert calls[0].function.arguments == json.dumps(WEATHER_ARGUMENTS, separators=(",", ":"))
    assert re.fullmatch(r"call_[0-9a-f]{24}", calls[0].id)
    again = post(server, "/v1/chat/completions", chat_body("weather?", tools=[WEATHER, SEARCH])).json()
    assert again["choices"][0]["message"]["tool_calls"][0]["id"] == calls[0].id  # deterministic
    # completion tokens: the arguments' words (compact JSON: one word)
    assert whole.usage is not None and whole.usage.completion_tokens == 1


def test_tool_calls_streamed_deltas(server: StubServer) -> None:
    body = chat_body("[[stub chunks=3]] all", tools=[WEATHER, SEARCH, CLOCK, ADD], tool_choice="required", stream=True)
    events, done = data_events(post(server, "/v1/chat/completions", body))
    assert done
    deltas = [e["choices"][0]["delta"] for e in events]
    assert deltas[0] == {"role": "assistant", "content": None, "refusal": None}
    calls = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    names = ["get_weather", "search", "clock"]
    starts = [c for c in calls if "id" in c]
    assert [(c["index"], c["function"]["name"], c["function"]["arguments"], c["type"]) for c in starts] == [
        (i, n, "", "function") for i, n in enumerate(names)
    ]
    for index, name in enumerate(names):
        pieces = [c for c in calls if c["index"] == index and "id" not in c]
        assert all(set(c) == {"index", "function"} and set(c["function"]) == {"arguments"} for c in pieces)
        arguments = "".join(c["function"]["arguments"] for c in pieces)
        assert len(pieces) == min(3, len(arguments))
        expected = {"get_weather": WEATHER_ARGUMENTS, "search": {"query": "stand-in"}, "clock": {}}[name]
        assert json.loads(arguments) == expected
    assert events[-1]["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "tool_calls"}


@pytest.mark.parametrize(("extra", "names"), [
    ({"tool_choice": "none"}, []),
    ({}, ["get_weather"]),
    ({"tool_choice": "auto"}, ["get_weather"]),
    ({"tool_choice": "required"}, ["get_weather", "search", "add"]),
    ({"tool_choice": "required", "parallel_tool_calls": False}, ["get_weather"]),
    ({"tool_choice": "required", "parallel_tool_calls": True}, ["get_weather", "search", "add"]),
    ({"tool_choice": {"type": "function", "function": {"name": "add"}}}, ["add"]),
])
def test_tool_choice(server: StubServer, extra: dict[str, Any], names: list[str]) -> None:
    resp = post(server, "/v1/chat/completions", chat_body("which", tools=[WEATHER, SEARCH, ADD], **extra))
    message = ChatCompletion.model_validate(resp.json()).choices[0].message
    assert [c.function.name for c in message.tool_calls or []] == names
    if not names:
        assert message.content == "Stand-in reply to: which"


def test_one_tool_required_is_one_call(server: StubServer) -> None:
    resp = post(server, "/v1/chat/completions", chat_body("one", tools=[ADD], tool_choice="required"))
    assert [c["function"]["arguments"] for c in resp.json()["choices"][0]["message"]["tool_calls"]] == ['{"a":1,"b":1}']


@pytest.mark.parametrize("extra", [
    {"tools": "nope"},
    {"tools": [{"type": "function", "function": {}}]},
    {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "missing"}}},
    {"tools": [WEATHER], "tool_choice": "sometimes"},
    {"n": 9}, {"n": 0}, {"n": True},
    {"logprobs": True, "top_logprobs": 21},
    {"response_format": {"type": "yaml"}},
    {"response_format": {"type": "json_schema"}},
    {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": "no"}}},
])
def test_bad_chat_options_are_400(server: StubServer, extra: dict[str, Any]) -> None:
    resp = post(server, "/v1/chat/completions", chat_body("bad", **extra))
    assert resp.status_code == 400
    assert resp.json()["error"]["type"] == "invalid_request_error"


def test_logprobs_whole(server: StubServer) -> None:
    whole = ChatCompletion.model_validate(post(server, "/v1/chat/completions",
                                               chat_body("héllo 🎉 you", logprobs=True, top_logprobs=3)).json())
    logprobs = whole.choices[0].logprobs
    assert logprobs is not None and logprobs.refusal is None and logprobs.content is not None
    tokens = [t.token for t in logprobs.content]
    assert tokens == ["Stand-in", " reply", " to:", " héllo", " 🎉", " you"]
    for i, entry in enumerate(logprobs.content):
        assert entry.logprob == -round(0.1 * (i % 7), 4)
        assert entry.bytes == list(entry.token.encode("utf-8"))
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].token == entry.token and entry.top_logprobs[0].logprob == entry.logprob
        assert len({t.token for t in entry.top_logprobs}) == 3
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)
        assert all(t.bytes == list(t.token.encode("utf-8")) for t in entry.top_logprobs)
    no_top = post(server, "/v1/chat/completions", chat_body("x", logprobs=True)).json()
    assert all(e["top_logprobs"] == [] for e in no_top["choices"][0]["logprobs"]["content"])
    asked_not = post(server, "/v1/chat/completions", chat_body("x", logprobs=False, n=2)).json()
    assert [c["logprobs"] for c in asked_not["choices"]] == [None, None]


def test_logprobs_streamed_deltas_match_their_text(server: StubServer) -> None:
    body = chat_body("[[stub chunks=4]] one two three four five six seven", logprobs=True, top_logprobs=2, stream=True)
    events, _ = data_events(post(server, "/v1/chat/completions", body))
    content = [e["choices"][0] for e in events if e["choices"][0]["delta"].get("content")]
    assert len(content) == 4
    for choice in content:
        assert choice["logprobs"]["refusal"] is None
        assert "".join(t["token"] for t in choice["logprobs"]["content"]) == choice["delta"]["content"]
    assert "".join(c["delta"]["content"] for c in content) == "Stand-in reply to: one two three four five six seven"


def test_n_choices(server: StubServer) -> None:
    whole = ChatCompletion.model_validate(post(server, "/v1/chat/completions", chat_body("many", n=3)).json())
    assert [c.index for c in whole.choices] == [0, 1, 2]
    assert [c.message.content for c in whole.choices] == [
        "Stand-in reply to: many", "(choice 1) Stand-in reply to: many", "(choice 2) Stand-in reply to: many"]
    assert whole.usage is not None and whole.usage.completion_tokens == 4 + 6 + 6
    streamed = post(server, "/v1/chat/completions", chat_body("[[stub chunks=2]] many", n=3, stream=True))
    events, done = data_events(streamed)
    assert done and all(len(e["choices"]) == 1 for e in events)
    indexes = [e["choices"][0]["index"] for e in events]
    assert indexes == [0, 1, 2] * 4  # roles, two content rounds interleaved, finishes
    finishes = [e["choices"][0] for e in events if e["choices"][0]["finish_reason"]]
    assert [(f["index"], f["finish_reason"]) for f in finishes] == [(0, "stop"), (1, "stop"), (2, "stop")]


def test_response_format_json_schema(server: StubServer) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    form = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON_SCHEMA, "strict": True}}
    for n in (1, 2):
        whole = post(server, "/v1/chat/completions", chat_body("who", response_format=form, n=n)).json()
        for choice in whole["choices"]:
            document = json.loads(choice["message"]["content"])
            assert document == PERSON
            jsonschema.validate(document, PERSON_SCHEMA)
    bad = post(server, "/v1/chat/completions", chat_body("[[stub fault=badjson]] who", response_format=form)).json()
    document = json.loads(bad["choices"][0]["message"]["content"])
    assert "name" not in document
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(document, PERSON_SCHEMA)
    notjson = post(server, "/v1/chat/completions", chat_body("[[stub fault=notjson]] who", response_format=form))
    with pytest.raises(json.JSONDecodeError):
        json.loads(notjson.json()["choices"][0]["message"]["content"])
    once = chat_body("[[stub fault=badjson times=1]] once", response_format=form)
    first, second = (json.loads(post(server, "/v1/chat/completions", once).json()["choices"][0]["message"]["content"])
                     for _ in range(2))
    assert first != PERSON and second == PERSON


def test_response_format_json_object(server: StubServer) -> None:
    form = {"type": "json_object"}
    whole = post(server, "/v1/chat/completions", chat_body("obj", response_format=form)).json()
    assert json.loads(whole["choices"][0]["message"]["content"]) == {"reply": "Stand-in reply to: obj"}
    two = post(server, "/v1/chat/completions", chat_body("obj", response_format=form, n=2)).json()
    assert json.loads(two["choices"][1]["message"]["content"]) == {"reply": "(choice 1) Stand-in reply to: obj"}
    llama = {"type": "json_object", "schema": {"type": "object", "properties": {"ok": {"type": "boolean"}},
                                               "required": ["ok"]}}
    whole = post(server, "/v1/chat/completions", chat_body("obj", response_format=llama)).json()
    assert json.loads(whole["choices"][0]["message"]["content"]) == {"ok": True}
    bad = post(server, "/v1/chat/completions", chat_body("[[stub fault=badjson]]", response_format=llama)).json()
    assert json.loads(bad["choices"][0]["message"]["content"]) == {}
    text = post(server, "/v1/chat/completions", chat_body("obj", response_format={"type": "text"})).json()
    assert text["choices"][0]["message"]["content"] == "Stand-in reply to: obj"


def test_badjson_and_notjson_break_tool_arguments(server: StubServer) -> None:
    bad = post(server, "/v1/chat/completions", chat_body("[[stub fault=badjson]] w", tools=[WEATHER])).json()
    assert json.loads(bad["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]) == {
        k: v for k, v in WEATHER_ARGUMENTS.items() if k != "city"}
    notjson = post(server, "/v1/chat/completions", chat_body("[[stub fault=notjson]] w", tools=[WEATHER])).json()
    with pytest.raises(json.JSONDecodeError):
        json.loads(notjson["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"])


def test_refusal(server: StubServer) -> None:
    whole = ChatCompletion.model_validate(post(server, "/v1/chat/completions",
                                               chat_body("[[stub fault=refusal]] nope", tools=[WEATHER])).json())
    message = whole.choices[0].message
    assert message.content is None and message.tool_calls is None
    assert message.refusal == stub_module.REFUSAL_TEXT
    assert whole.choices[0].finish_reason == "stop"
    events, _ = data_events(post(server, "/v1/chat/completions", chat_body("[[stub fault=refusal]] nope", stream=True)))
    deltas = [e["choices"][0]["delta"] for e in events]
    assert all(d.get("content") is None for d in deltas)
    assert "".join(d.get("refusal") or "" for d in deltas) == stub_module.REFUSAL_TEXT
    assert sum(1 for d in deltas if d.get("refusal")) == 4
    assert post(server, "/v1/chat/completions", chat_body("[[stub fault=refusal times=1]] once")).json()[
        "choices"][0]["message"]["refusal"]
    assert post(server, "/v1/chat/completions", chat_body("[[stub fault=refusal times=1]] once")).json()[
        "choices"][0]["message"]["content"] == "Stand-in reply to: once"
    aivvm = post(server, "/api/chat", chat_body("[[stub fault=refusal]] aivvm"))
    assert aivvm.text == "Stand-in reply to: aivvm"


def test_usage_only_when_asked_in_a_stream(server: StubServer) -> None:
    body = chat_body("count", n=2, tools=[ADD])
    events, _ = data_events(post(server, "/v1/chat/completions", {**body, "stream": True}))
    assert all("usage" not in e for e in events)
    events, _ = data_events(post(server, "/v1/chat/completions",
                                 {**body, "stream": True, "stream_options": {"include_usage": True}}))
    assert events[-1]["choices"] == [] and events[-1]["usage"] == {
        "prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}


def test_features_keep_faults(server: StubServer) -> None:
    resp = post(server, "/v1/chat/completions", chat_body("[[stub fault=cut chunks=6]] x", n=2, logprobs=True,
                                                          stream=True), stream=True)
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        for _ in resp.iter_content(chunk_size=None):
            pass
    empty = post(server, "/v1/chat/completions", chat_body("[[stub fault=empty]] x", tools=[ADD], stream=True))
    assert empty.content == b"data: [DONE]\n\n"
    assert post(server, "/v1/chat/completions", chat_body("[[stub fault=empty]] x", n=2)).content == b""
    started = time.monotonic()
    slow = post(server, "/v1/chat/completions", chat_body("[[stub latency=0.3]] x", n=2, stream=True))
    assert time.monotonic() - started >= 0.28 and slow.status_code == 200
    split = post(server, "/v1/chat/completions", chat_body("[[stub fault=split]] x", logprobs=True)).json()
    assert split["choices"][0]["message"]["content"].startswith(stub_module.SPLIT_TEXT)


# -- embeddings ------------------------------------------------------------------------------------


def embeddings(srv: StubServer, path: str = "/v1/embeddings", **body: Any) -> CreateEmbeddingResponse:
    resp = post(srv, path, {"model": "text-embedding-3-small", **body})
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == "application/json"
    return CreateEmbeddingResponse.model_validate(resp.json())


@pytest.mark.parametrize(("given", "count", "tokens"), [
    ("one string here", 1, 3),
    (["a b", "c"], 2, 3),
    ([1, 2, 3, 4], 1, 4),
    ([[1, 2], [3], [4, 5, 6]], 3, 6),
])
def test_embeddings_inputs(server: StubServer, given: Any, count: int, tokens: int) -> None:
    answer = embeddings(server, input=given)
    assert answer.object == "list" and answer.model == "text-embedding-3-small"
    assert [d.index for d in answer.data] == list(range(count))
    assert all(d.object == "embedding" and len(d.embedding) == 8 for d in answer.data)
    assert all(math.isclose(math.fsum(x * x for x in d.embedding), 1.0, rel_tol=1e-9) for d in answer.data)
    assert answer.usage.prompt_tokens == answer.usage.total_tokens == tokens


def test_embeddings_are_deterministic(server: StubServer) -> None:
    first = embeddings(server, input=["same", "other"], dimensions=64)
    second = embeddings(server, "/embeddings", input="same", dimensions=64)
    assert first.data[0].embedding == second.data[0].embedding
    assert first.data[0].embedding != first.data[1].embedding
    assert len(embeddings(server, input="x", dimensions=4096).data[0].embedding) == 4096
    assert embeddings(server, input="[[stub latency=0]] same", dimensions=64).data[0].embedding == \
        first.data[0].embedding


def test_embeddings_base64(server: StubServer, client: openai.OpenAI) -> None:
    floats = embeddings(server, input=["b64", "more"], dimensions=16)
    raw = post(server, "/v1/embeddings", {"input": ["b64", "more"], "dimensions": 16, "encoding_format": "base64"})
    for item, plain in zip(raw.json()["data"], floats.data):
        decoded = struct.unpack("<16f", base64.b64decode(item["embedding"]))
        assert decoded == pytest.approx(plain.embedding, rel=1e-6, abs=1e-7)
    # the SDK asks for base64 itself and decodes it
    via_sdk = client.embeddings.create(model="m", input=["b64", "more"], dimensions=16)
    assert via_sdk.data[1].embedding == pytest.approx(floats.data[1].embedding, rel=1e-6, abs=1e-7)


@pytest.mark.parametrize("body", [
    {}, {"input": ""}, {"input": []}, {"input": [""]}, {"input": ["a", 1]}, {"input": [[1], "a"]},
    {"input": [[]]}, {"input": [True]}, {"input": {"text": "a"}}, {"input": "a", "dimensions": 0},
    {"input": "a", "dimensions": 4097}, {"input": "a", "encoding_format": "hex"}, {"input": "[[stub fault=bogus]] a"},
])
def test_embeddings_invalid_input_is_400(server: StubServer, body: dict[str, Any]) -> None:
    resp = post(server, "/v1/embeddings", body)
    assert resp.status_code == 400
    assert resp.json()["error"]["type"] == "invalid_request_error"


def test_embeddings_faults(server: StubServer) -> None:
    resp = post(server, "/v1/embeddings", {"input": ["fine", "[[stub fault=status code=503 times=1]] x"]})
    assert resp.status_code == 503 and resp.json()["error"]["type"] == "server_error"
    assert post(server, "/v1/embeddings", {"input": ["fine", "[[stub fault=status code=503 times=1]] x"]}).ok
    limited = post(server, "/v1/embeddings", {"input": "[[stub fault=429 retry_after=4]] x"})
    assert limited.status_code == 429 and limited.headers["retry-after"] == "4"
    assert post(server, "/v1/embeddings", {"input": "[[stub fault=empty]] x"}).content == b""
    with pytest.raises(requests.exceptions.ConnectionError):
        post(server, "/v1/embeddings", {"input": "[[stub fault=reset]] x"})
    with pytest.raises(requests.exceptions.RequestException):
        post(server, "/v1/embeddings", {"input": "[[stub fault=cut]] x"}).json()
    with pytest.raises(requests.exceptions.ConnectionError):  # the read timeout, half-way through the body
        post(server, "/v1/embeddings", {"input": "[[stub fault=stall stall=3]] x"}, timeout=0.3)
    started = time.monotonic()
    assert post(server, "/v1/embeddings", {"input": "[[stub latency=0.3]] x"}).ok
    assert time.monotonic() - started >= 0.28
    for size in (2_000, 50_000):
        padded = post(server, "/v1/embeddings", {"input": ["[[stub bytes=%d]] x" % size, "y"]})
        assert size <= len(padded.content) < size * 1.1 + 200
        CreateEmbeddingResponse.model_validate(padded.json())
        b64 = post(server, "/v1/embeddings", {"input": "[[stub bytes=%d]] x" % size, "encoding_format": "base64"})
        assert size <= len(b64.content) < size * 1.1 + 200


# -- Responses API -----------------------------------------------------------------------------------


def test_responses_whole(server: StubServer, client: openai.OpenAI) -> None:
    resp = post(server, "/v1/responses", {"model": "gpt-4.1", "input": "hello there"})
    answer = Response.model_validate(resp.json())
    assert answer.id.startswith("resp_") and answer.object == "response" and answer.status == "completed"
    assert answer.model == "gpt-4.1" and answer.output_text == "Stand-in reply to: hello there"
    item = resp.json()["output"][0]
    assert item["type"] == "message" and item["id"].startswith("msg_") and item["status"] == "completed"
    assert item["role"] == "assistant"
    assert item["content"] == [{"type": "output_text", "text": "Stand-in reply to: hello there", "annotations": [],
                                "logprobs": []}]
    assert resp.json()["usage"] == {"input_tokens": 2,
                                    "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                                    "output_tokens": 5,
                                    "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 7}
    via_sdk = client.responses.create(model="m", instructions="be short and kind", input=[
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": [{"type": "output_text", "text": "said"}]},
        {"type": "function_call_output", "call_id": "c", "output": "42"},
        {"role": "user", "content": [{"type": "input_text", "text": "second"},
                                     {"type": "input_image", "image_url": "https://x/y.png", "detail": "auto"}]},
    ])
    assert via_sdk.output_text == "Stand-in reply to: second"
    assert via_sdk.instructions == "be short and kind"
    assert via_sdk.usage is not None and via_sdk.usage.input_tokens == 4 + 1 + 1 + 1
    assert post(server, "/responses", {"input": "no v1"}).json()["output"][0]["content"][0]["text"] == \
        "Stand-in reply to: no v1"


def test_responses_stream(server: StubServer) -> None:
    events = named_events(post(server, "/v1/responses", {"model": "m", "input": "[[stub chunks=3]] stream it",
                                                         "stream": True}))
    parsed = [STREAM_EVENT.validate_python(data) for _, data in events]
    assert [name for name, _ in events] == [data["type"] for _, data in events]
    assert [e.sequence_number for e in parsed] == list(range(len(parsed)))
    assert [name for name, _ in events] == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        *["response.output_text.delta"] * 3,
        "response.output_text.done", "response.content_part.done", "response.output_item.done", "response.completed",
    ]
    deltas = [data for name, data in events if name == "response.output_text.delta"]
    item_id = events[2][1]["item"]["id"]
    assert all((d["item_id"], d["output_index"], d["content_index"]) == (item_id, 0, 0) for d in deltas)
    assert "".join(d["delta"] for d in deltas) == "Stand-in reply to: stream it"
    assert events[0][1]["response"]["status"] == "in_progress"
    final = events[-1][1]["response"]
    whole = post(server, "/v1/responses", {"model": "m", "input": "[[stub chunks=3]] stream it"}).json()
    assert without(final, IDENTITY) == without(whole, IDENTITY)
    assert b"[DONE]" not in post(server, "/v1/responses", {"input": "x", "stream": True}).content


def test_responses_sdk_stream(client: openai.OpenAI) -> None:
    with client.responses.stream(model="m", input="via the sdk") as stream:
        text = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        final = stream.get_final_response()
    assert text == final.output_text == "Stand-in reply to: via the sdk"


def test_responses_faults(server: StubServer) -> None:
    resp = post(server, "/v1/responses", {"input": "[[stub fault=429 retry_after=2]] x", "stream": True})
    assert resp.status_code == 429 and resp.headers["retry-after"] == "2"
    assert resp.json()["error"]["type"] == "rate_limit_exceeded"
    assert post(server, "/v1/responses", {"input": "[[stub fault=status code=502]] x"}).status_code == 502
    cut = post(server, "/v1/responses", {"input": "[[stub fault=cut chunks=4]] x", "stream": True}, stream=True)
    received = b""
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        for piece in cut.iter_content(chunk_size=None):
            received += piece
    assert b"response.output_text.delta" in received and b"response.completed" not in received
    failed = named_events(post(server, "/v1/responses", {"input": "[[stub fault=failed]] x", "stream": True}))
    assert [n for n, _ in failed] == ["response.created", "response.in_progress", "response.failed"]
    failure = STREAM_EVENT.validate_python(failed[-1][1])
    assert failure.type == "response.failed"
    assert failure.response.status == "failed" and failure.response.error is not None
    assert failure.response.error.code == "server_error" and failure.response.error.message
    whole = Response.model_validate(post(server, "/v1/responses", {"input": "[[stub fault=failed]] x"}).json())
    assert whole.status == "failed" and whole.error is not None and whole.error.code == "server_error"
    refused = named_events(post(server, "/v1/responses", {"input": "[[stub fault=refusal]] x", "stream": True}))
    for _, data in refused:
        STREAM_EVENT.validate_python(data)
    assert "".join(d["delta"] for n, d in refused if n == "response.refusal.delta") == stub_module.REFUSAL_TEXT
    assert refused[-1][1]["response"]["output"][0]["content"] == [{"type": "refusal",
                                                                   "refusal": stub_module.REFUSAL_TEXT}]
    assert post(server, "/v1/responses", {"input": "[[stub fault=empty]] x", "stream": True}).content == b""
    with pytest.raises(requests.exceptions.ConnectionError):
        post(server, "/v1/responses", {"input": "[[stub fault=reset]] x"})


def test_responses_json_format(server: StubServer) -> None:
    body = {"input": "who", "text": {"format": {"type": "json_schema", "name": "p", "schema": PERSON_SCHEMA}}}
    answer = Response.model_validate(post(server, "/v1/responses", body).json())
    assert json.loads(answer.output_text) == PERSON


@pytest.mark.parametrize("body", [{}, {"input": 3}, {"input": ["x"]}, {"input": "x", "instructions": 1},
                                  {"input": "x", "text": {"format": {"type": "xml"}}}])
def test_responses_invalid_is_400(server: StubServer, body: dict[str, Any]) -> None:
    resp = post(server, "/v1/responses", body)
    assert resp.status_code == 400 and resp.json()["error"]["type"] == "invalid_request_error"


# -- legacy completions -------------------------------------------------------------------------------


def test_completions_whole(server: StubServer, client: openai.OpenAI) -> None:
    for prompt in ("complete me", ["complete me"]):
        resp = post(server, "/v1/completions", {"model": "gpt-3.5-turbo-instruct", "prompt": prompt})
        answer = Completion.model_validate(resp.json())
        assert answer.id.startswith("cmpl-") and answer.object == "text_completion"
        assert answer.choices[0].text == "Stand-in reply to: complete me"
        assert answer.choices[0].finish_reason == "stop" and answer.choices[0].logprobs is None
        assert answer.usage is not None and (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (2, 5)
    assert client.completions.create(model="m", prompt="sdk").choices[0].text == "Stand-in reply to: sdk"
    assert post(server, "/completions", {"prompt": "no v1"}).json()["choices"][0]["text"] == "Stand-in reply to: no v1"


def test_completions_stream(server: StubServer) -> None:
    body = {"model": "m", "prompt": "[[stub chunks=3]] stream", "stream": True}
    events, done = data_events(post(server, "/v1/completions", body))
    assert done
    # the SDK's Completion (which it also parses stream chunks into, unvalidated) declares finish_reason
    # non-null, while streamed chunks carry null until the last: validated with "stop" in its place
    chunks = [Completion.model_validate({**e, "choices": [{**c, "finish_reason": c["finish_reason"] or "stop"}
                                                          for c in e["choices"]]}) for e in events]
    assert all(c.object == "text_completion" and c.id == chunks[0].id for c in chunks)
    assert all(e["choices"][0]["logprobs"] is None for e in events)
    assert "".join(c.choices[0].text for c in chunks) == "Stand-in reply to: stream"
    assert [e["choices"][0]["finish_reason"] for e in events] == [None, None, None, "stop"]
    assert all("usage" not in e for e in events)
    events, done = data_events(post(server, "/v1/completions", {**body, "stream_options": {"include_usage": True}}))
    assert done and events[-1]["choices"] == [] and events[-1]["usage"]["total_tokens"] == 1 + 4


def test_completions_faults_and_errors(server: StubServer) -> None:
    limited = post(server, "/v1/completions", {"prompt": "[[stub fault=429]] x", "stream": True})
    assert limited.status_code == 429 and limited.headers["retry-after"] == "1"
    cut = post(server, "/v1/completions", {"prompt": "[[stub fault=cut]] x", "stream": True}, stream=True)
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        for _ in cut.iter_content(chunk_size=None):
            pass
    assert post(server, "/v1/completions", {"prompt": "[[stub fault=empty]] x", "stream": True}).content == \
        b"data: [DONE]\n\n"
    words = post(server, "/v1/completions", {"prompt": "[[stub words=5]]"}).json()
    assert words["choices"][0]["text"] == "alpha bravo charlie delta echo"
    for bad in ({}, {"prompt": 1}, {"prompt": ["a", "b"]}, {"prompt": [[1, 2]]}):
        resp = post(server, "/v1/completions", bad)
        assert resp.status_code == 400 and resp.json()["error"]["type"] == "invalid_request_error"


# -- every OpenAI path: authorization, methods ------------------------------------------------------------

OPENAI_REQUESTS = [
    ("/v1/chat/completions", chat_body("k")),
    ("/v1/chat/completions", chat_body("k", n=2)),
    ("/v1/embeddings", {"input": "k"}),
    ("/embeddings", {"input": "k"}),
    ("/v1/responses", {"input": "k"}),
    ("/responses", {"input": "k"}),
    ("/v1/completions", {"prompt": "k"}),
    ("/completions", {"prompt": "k"}),
]


def test_api_key_applies_to_every_openai_path() -> None:
    with StubServer(api_key="sekrit") as srv:
        for path, body in OPENAI_REQUESTS:
            for headers in ({}, {"Authorization": "Bearer wrong"}):
                denied = post(srv, path, body, headers=headers)
                assert denied.status_code == 401, path
                assert denied.json()["error"]["type"] == "invalid_api_key"
            assert post(srv, path, body, headers={"Authorization": "Bearer sekrit"}).status_code == 200, path
        assert post(srv, "/api/chat", chat_body("aivvm")).status_code == 200


def test_new_paths_refuse_get_and_are_counted(server: StubServer) -> None:
    with StubServer() as srv:
        for path, body in OPENAI_REQUESTS:
            assert requests.get(srv.base_url + path, timeout=5).status_code == 405
            assert post(srv, path, body).status_code == 200
        deadline = time.monotonic() + 5
        while srv.stats()["in_flight"] and time.monotonic() < deadline:
            time.sleep(0.01)
        stats = srv.stats()
    assert stats["requests"] == len(OPENAI_REQUESTS) and stats["by_prompt"] == {"k": len(OPENAI_REQUESTS)}


# -- pure: JSON from a schema -------------------------------------------------------------------------------


def test_example_value_follows_the_schema() -> None:
    assert example_value(PERSON_SCHEMA) == PERSON
    assert example_value(WEATHER["function"]["parameters"]) == WEATHER_ARGUMENTS
    assert example_value({"type": ["null", "number"]}) == 1.5
    assert example_value({"const": "fixed"}) == "fixed"
    assert example_value({"oneOf": [{"type": "boolean"}]}) is True
    assert example_value({"properties": {"x": {"items": {}}}}) == {"x": []}
    node_schema = {"type": "object", "properties": {"next": {"$ref": "#/$defs/node"}}}
    looping = {"$ref": "#/$defs/node", "$defs": {"node": node_schema}}
    depth, node = 0, example_value(looping)
    while isinstance(node, dict) and "next" in node:
        depth, node = depth + 1, node["next"]
    assert 0 < depth <= 40
    assert example_value({}) == "stand-in"


def test_violating_value_breaks_the_schema() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schemas = [PERSON_SCHEMA, WEATHER["function"]["parameters"],
               {"type": "object", "properties": {"a": {"type": "string"}}},
               {"type": "string"}, {"type": "integer"}, {"type": "object"}, {"enum": ["a", "b"]}, {"type": "array"}]
    for schema in schemas:
        jsonschema.validate(example_value(schema), schema)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(violating_value(schema), schema)


def test_package_layout() -> None:
    package = Path(stub_module.__file__).parent
    sizes = {p.name: len(p.read_text().splitlines()) for p in package.glob("*.py")}
    assert {"__init__.py", "faults.py", "text.py", "http.py", "openai_wire.py", "server.py"} <= set(sizes)
    assert max(sizes.values()) < 500, sizes
    for name in stub_module.__all__:
        assert getattr(stub_module, name) is not None
