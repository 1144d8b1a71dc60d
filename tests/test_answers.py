"""The server's answer kept in a result and given back: bodies, refusals, schema checks (pure)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from openai.types import CreateEmbeddingResponse
from openai.types.chat import ChatCompletion

from jobs.answers import answer_of, chat_body
from jobs.config import Settings
from jobs.endpoints import Endpoint
from jobs.formats import ResultFormat, openai_line, render
from jobs.records import ChatMessage, ItemRequest, ItemResult, Status
from worker.attempt import Attempt, checked
from worker.decision import ItemState, decide, to_result
from worker.errors import SchemaMismatch
from worker.providers.call import StreamEnd
from worker.providers.exchange import Head, http_error, verbatim
from worker.providers.openai import OpenAI
from worker.providers import CompletionCall
from worker.schema import response_schema, violation

ENVELOPE = {"id": "chatcmpl-server-7", "object": "chat.completion", "created": 1764900000, "model": "qwen",
            "system_fingerprint": "fp_1", "usage": {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}}
TOOL_CALL = {"id": "call_x", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}
LOGPROBS = {"content": [{"token": "Hi", "logprob": -0.1, "bytes": [72, 105], "top_logprobs": []}], "refusal": None}


def completion(*choices: dict[str, Any]) -> dict[str, Any]:
    return {**ENVELOPE, "choices": list(choices)}


def choice(index: int = 0, content: str | None = "Hi", finish: str = "stop", **message: Any) -> dict[str, Any]:
    return {"index": index, "message": {"role": "assistant", "content": content, "refusal": None, **message},
            "logprobs": message.pop("logprobs", None), "finish_reason": finish}


BODIES = {
    "text": completion(choice()),
    "tool calls only": completion(choice(content=None, finish="tool_calls", tool_calls=[TOOL_CALL])),
    "refusal": completion({"index": 0, "message": {"role": "assistant", "content": None, "refusal": "No."},
                           "logprobs": None, "finish_reason": "stop"}),
    "logprobs": completion({"index": 0, "message": {"role": "assistant", "content": "Hi", "refusal": None},
                            "logprobs": LOGPROBS, "finish_reason": "stop"}),
    "two choices": completion(choice(0, "Hi"), choice(1, "Hello")),
}
REQUEST = ItemRequest("q1", 3, (ChatMessage("user", "hello"),))


def outcome(body: dict[str, Any] | None, text: str = "Hi", request_id: str | None = "req-abc",
            error: Any = None) -> Attempt:
    usage = (body or {}).get("usage") or {}
    finish = ((body or {}).get("choices") or [{"finish_reason": None}])[0]["finish_reason"]
    completion_tokens = usage.get("completion_tokens", 0 if "prompt_tokens" in usage else None)
    end = StreamEnd(finish, usage.get("prompt_tokens"), completion_tokens, body, request_id)
    return Attempt("openai", "qwen", text, error, 120, 30, end)


@pytest.mark.parametrize("name", list(BODIES))
def test_the_openai_form_gives_back_the_server_s_body(name: str) -> None:
    body = BODIES[name]
    text = (body["choices"][0]["message"]["content"] or "")
    result = to_result(REQUEST, outcome(body, text), attempts=1)
    stored = ItemResult.from_json(result.to_json())
    assert stored == result
    line = openai_line(stored)
    assert line["response"]["body"] == body
    assert line["response"]["request_id"] == "req-abc"
    ChatCompletion.model_validate(line["response"]["body"])


def test_the_native_form_shows_tool_calls_refusal_and_logprobs_beside_the_text() -> None:
    native = json.loads(render(to_result(REQUEST, outcome(BODIES["tool calls only"], ""), 1).to_json().encode(),
                               ResultFormat.NATIVE))
    assert (native["status"], native["output"], native["tool_calls"]) == ("ok", "", [TOOL_CALL])
    assert native["completion"]["id"] == "chatcmpl-server-7"
    assert native["completion"]["choices"][0]["message"]["content"] is None  # as the server sent it
    with_logprobs = to_result(REQUEST, outcome(BODIES["logprobs"]), 1).to_dict()
    assert with_logprobs["logprobs"] == LOGPROBS and "tool_calls" not in with_logprobs
    refused = to_result(REQUEST, outcome(BODIES["refusal"], ""), 1).to_dict()
    assert refused["refusal"] == "No."
    two = to_result(REQUEST, outcome(BODIES["two choices"]), 1).to_dict()
    assert two["output"] == "Hi" and two["completion"]["choices"][1]["message"]["content"] == "Hello"
    assert "content" not in two["completion"]["choices"][0]["message"]  # it is the output, kept once


def test_a_result_without_a_server_body_still_renders_a_chat_completion() -> None:
    result = ItemResult("a", 1, Status.OK, model="gpt-4", output="Hello", attempts=1, created=5)
    body = openai_line(result)["response"]["body"]
    ChatCompletion.model_validate(body)
    assert body["choices"][0]["message"]["content"] == "Hello"
    answer = answer_of(Endpoint.CHAT, None, "rid")
    assert answer is not None and chat_body(answer, "x") is None
    assert answer_of(Endpoint.CHAT, None, None) is None


def test_an_embeddings_body_is_kept_as_the_server_sent_it() -> None:
    body = {"object": "list", "model": "e5", "usage": {"prompt_tokens": 2, "total_tokens": 2},
            "data": [{"object": "embedding", "index": 0, "embedding": [0.5, -0.25]}]}
    request = ItemRequest("e", 1, (), params=(("input", "hi"),), endpoint=Endpoint.EMBEDDINGS)
    result = to_result(request, outcome(body, ""), 1)
    assert result.output is None
    assert result.usage is not None and result.usage.prompt_tokens == 2
    line = openai_line(ItemResult.from_json(result.to_json()))
    assert line["response"]["body"] == body
    CreateEmbeddingResponse.model_validate(line["response"]["body"])
    assert json.loads(result.to_json())["endpoint"] == "/v1/embeddings"


@pytest.mark.parametrize(("raw", "kept"), [
    ('{"error": {"message": "Rate limit reached", "type": "requests", "code": "rate_limit_exceeded"}}',
     {"error": {"message": "Rate limit reached", "type": "requests", "code": "rate_limit_exceeded"}}),
    ("upstream failed\n", "upstream failed\n"),
    ("", None),
])
def test_an_http_refusal_keeps_the_server_s_body_and_request_id(raw: str, kept: Any) -> None:
    head = Head(429, "Too Many Requests", "application/json", request_id="req-429")
    error = http_error(head, raw, CompletionCall(model="m", messages=()), OpenAI.parse_error)
    assert error.body == kept == verbatim(raw)
    result = to_result(REQUEST, Attempt("openai", "m", "", error, 5, None), 1)
    line = openai_line(ItemResult.from_json(result.to_json()))
    assert line["response"]["status_code"] == 429
    assert line["response"]["request_id"] == "req-429"
    assert line["error"] is None
    if kept is not None:
        assert line["response"]["body"] == kept
    else:
        assert line["response"]["body"]["error"]["type"] == "rate_limited"


def test_an_error_body_is_cleared_of_the_key() -> None:
    call = CompletionCall(model="m", messages=(), api_key="sk-secret-123456")
    error = http_error(Head(401, "Unauthorized"), '{"error": {"message": "bad key sk-secret-123456"}}', call,
                       OpenAI.parse_error)
    assert "sk-secret" not in json.dumps(error.body) and "sk-secret" not in str(error)


SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"]}


@pytest.mark.parametrize(("params", "schema"), [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}}}, SCHEMA),
    ({"response_format": {"type": "json_object", "schema": SCHEMA}}, SCHEMA),
    ({"response_format": {"type": "json_object"}}, {"type": "object"}),
    ({"response_format": {"type": "text"}}, None),
    ({}, None),
])
def test_the_schema_a_reply_must_follow(params: dict[str, Any], schema: Any) -> None:
    assert response_schema(params) == schema


@pytest.mark.parametrize(("text", "problem"), [
    ('{"name": "Ada", "age": 36}', None),
    ('{"name": "Ada"}', "the reply does not follow the schema at the top: 'age' is a required property"),
    ('{"name": "Ada", "age": "old"}', "the reply does not follow the schema at age: 'old' is not of type 'integer'"),
    ("Sure! Here it is", "the reply is not JSON (Expecting value at character 0)"),
])
def test_a_reply_is_held_to_its_schema(text: str, problem: str | None) -> None:
    assert violation([text], SCHEMA) == problem


def test_a_schema_mismatch_is_asked_again_then_fails_with_every_attempt_paid() -> None:
    request = ItemRequest("s", 1, (ChatMessage("user", "person"),), params=(
        ("response_format", {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}}),))
    body = completion(choice(content='{"name": "Ada"}'))
    first = checked(request, outcome(body, '{"name": "Ada"}'))
    assert isinstance(first.error, SchemaMismatch)
    settings = Settings()
    again = decide(request, first, ItemState(), settings, now=100.0).again
    assert again is not None and again.state.mismatches == 1 and again.state.not_before == 100.0
    final = decide(request, first, again.state, settings, now=101.0).result
    assert final is not None and final.status is Status.FAILED
    assert final.error is not None and final.error.type == "schema_mismatch"
    assert final.usage is not None and final.usage.prompt_tokens == 18  # both attempts were paid
    assert final.output == '{"name": "Ada"}'
    good = checked(request, outcome(body, '{"name": "Ada", "age": 36}'))
    assert good.error is None


def test_a_submitter_s_pattern_cannot_hold_a_worker() -> None:
    import time

    schema = {"type": "object", "properties": {"a": {"type": "string", "pattern": "^(a|a)*$"}},
              "patternProperties": {"^(b|b)*$": {"type": "string"}}, "additionalProperties": False}
    started = time.monotonic()
    texts = [json.dumps({"a": "a" * 40 + "!", "b" * 40 + "!": "x"})] * 50
    assert violation(texts, schema) is None  # a pattern past its time is not judged
    assert time.monotonic() - started < 2  # 50 strings of catastrophic patterns: one budget per reply
    assert violation(['{"a": "aaa"}'], schema) is None
    assert violation(['{"a": "b"}'], schema) == "the reply does not follow the schema at a: 'b' does not match '^(a|a)*$'"


def test_a_schema_that_cannot_be_applied_is_the_server_s_to_judge() -> None:
    assert violation(['{"x": 1}'], {"$ref": "#"}) is None
    assert violation(['{"x": 1}'], {"$ref": "#/$defs/missing"}) is None
    assert violation(['{"x": 1}'], {"type": "no such type"}) is None


def test_a_key_echoed_in_escapes_an_error_kind_or_a_request_id_is_cleared() -> None:
    call = CompletionCall(model="m", messages=(), api_key="sk-adv-secret-123")
    head = Head(400, "Bad Request", "application/json", request_id="req-sk-adv-secret-123")
    echoed = '{"error": {"message": "no", "type": "sk-adv-secret-123", "k": "sk\\u002dadv-secret-123"}}'
    error = http_error(head, echoed, call, OpenAI.parse_error)
    shown = json.dumps([error.body, error.kind, error.request_id, str(error)])
    assert "sk-adv-secret-123" not in shown and "secret" not in json.dumps(error.request_id)
    assert violation(['{"x": 1}'], {"$schema": 5}) is None


def test_a_timed_out_pattern_spares_a_reply_a_violation_and_never_makes_one() -> None:
    # the key's pattern is catastrophic: not judged, so its value is not held to the subschema
    schema = {"type": "object", "patternProperties": {"^(b|b)*$": {"type": "integer"}}}
    assert violation([json.dumps({"b" * 40 + "!": "x"})], schema) is None
    assert violation(['{"bb": "x"}'], schema) == "the reply does not follow the schema at bb: 'x' is not of type 'integer'"


def test_unique_items_of_a_long_array_are_not_judged() -> None:
    import time

    from worker.schema import MAX_UNIQUE_ITEMS

    schema = {"type": "array", "uniqueItems": True}
    assert violation(['[{"a": 1}, {"a": 1}]'], schema) is not None
    long = json.dumps([{"a": i} for i in range(MAX_UNIQUE_ITEMS * 5)] + [{"a": 0}])
    started = time.monotonic()
    assert violation([long], schema) is None
    assert time.monotonic() - started < 5


def test_a_key_a_server_echoes_in_a_200_is_cleared_from_text_body_and_request_id(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from worker.attempt import _Streamed
    from worker.providers import PROVIDERS

    secret = "sk-echoed-secret-0123456789"
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    monkeypatch.setenv("AIVVM_API_KEY", "EMPTY")  # a placeholder: answers may say EMPTY
    request = ItemRequest(id="a", line=1, messages=(ChatMessage("user", "hi"),))
    streamed = _Streamed(PROVIDERS["openai"], request, 0.0)
    streamed.add(f"your key is {secret}. EMPTY")
    body = {"choices": [{"message": {"content": f"your key is {secret}", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": f'{{"k": "{secret}"}}'}}]}}],
        "metadata": {secret: secret}, "vector": [0.5, 1.5]}
    streamed.add(StreamEnd("stop", body=body, request_id=f"req-{secret}"))
    result = streamed.result()
    shown = json.dumps([result.text, result.end.body if result.end else None,
                        result.end.request_id if result.end else None])
    assert secret not in shown and shown.count("[redacted]") == 6
    assert result.text == "your key is [redacted]. EMPTY"
    assert result.end is not None and result.end.body is not None and result.end.body["vector"] == [0.5, 1.5]


def test_an_answer_nested_deeper_than_a_result_can_carry_fails_as_malformed() -> None:
    from worker.errors import MalformedReply
    from worker.providers.credentials import MAX_ANSWER_DEPTH, clear_keys

    nested: Any = "leaf"
    for _ in range(MAX_ANSWER_DEPTH - 1):  # with the object around it: the deepest a result holds
        nested = [nested]
    assert clear_keys({"a": nested}, ["sk-0123456789ab"]) == {"a": nested}
    with pytest.raises(MalformedReply):
        clear_keys({"a": [nested]}, [])
