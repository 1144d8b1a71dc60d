"""A line's whole request: every field passes through, endpoints, capabilities per provider (pure)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from jobs.endpoints import Endpoint, cannot_carry, endpoint_of
from jobs.errors import InvalidLine
from jobs.lines import RawLine, parse_line, validate_lines
from jobs.records import ItemRequest, RequestDefaults
from worker.providers import Aivvm, CompletionCall

SAMPLE = Path(__file__).resolve().parent.parent / "samples" / "openai-breadth.jsonl"
WEATHER = {"type": "function", "function": {"name": "get_weather",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}}}}}


def parse(obj: Any, number: int = 1, providers: tuple[str, ...] = (),
          defaults: RequestDefaults = RequestDefaults()) -> ItemRequest:
    return parse_line(RawLine(number, json.dumps(obj).encode()), defaults=defaults, providers=providers)


def invalid(obj: Any, providers: tuple[str, ...] = (), defaults: RequestDefaults = RequestDefaults()
            ) -> InvalidLine:
    with pytest.raises(InvalidLine) as info:
        parse(obj, providers=providers, defaults=defaults)
    return info.value


def sample_lines() -> list[dict[str, Any]]:
    return [json.loads(line) for line in SAMPLE.read_text().splitlines()]


@pytest.mark.parametrize("data", sample_lines(), ids=lambda d: d.get("custom_id", d.get("id")))
def test_every_field_of_a_realistic_line_reaches_the_request_as_written(data: dict[str, Any]) -> None:
    request = parse(data, providers=("openai",))
    body = data.get("body", {k: v for k, v in data.items() if k not in ("id", "url")})
    assert request.endpoint is endpoint_of(data.get("url", "/v1/chat/completions"))
    sent = dict(request.params)
    if request.messages:
        sent["messages"] = [m.to_dict() for m in request.messages]
    if request.model:
        sent["model"] = request.model
    assert sent == body
    assert ItemRequest.from_json(request.to_json()) == request
    assert json.loads(request.to_json())["params"] == dict(request.params)


def test_the_sample_is_valid_for_openai_and_refused_line_by_line_for_aivvm() -> None:
    with SAMPLE.open("rb") as stream:
        assert validate_lines(stream, providers=("openai",)).invalid == 0
    with SAMPLE.open("rb") as stream:
        found = validate_lines(stream, providers=("aivvm",), keep=100)
    assert found.invalid == found.total == 14
    fields = [problem.field for problem in found.problems]
    assert fields[:7] == ["body.messages[0]", "body.tools", "body.logprobs", "body.tools",
                          "body.response_format", "url", "url"]
    assert all("the aivvm provider" in str(p) and "use --provider openai" in str(p) for p in found.problems)


def test_a_fallback_chain_takes_a_line_one_of_its_providers_can_send() -> None:
    line = {"prompt": "weather?", "tools": [WEATHER]}
    assert parse(line, providers=("aivvm", "openai")).params == (("tools", [WEATHER]),)
    assert invalid(line, providers=("aivvm",)).field == "tools"


def test_aivvm_carries_text_parts_joined_and_nothing_else() -> None:
    request = parse({"messages": [{"role": "user", "content": [{"type": "text", "text": "Hello, "},
                                                               {"type": "text", "text": "world"}]}]},
                    providers=("aivvm",))
    call = CompletionCall(model="", messages=tuple(m.to_dict() for m in request.messages))
    assert Aivvm.request_body(call)["messages"] == [{"role": "user", "content": "Hello, world"}]
    refusal = cannot_carry("aivvm", Endpoint.CHAT, [{"role": "tool", "content": "18", "tool_call_id": "c"}], ())
    assert refusal is not None and refusal.field == "messages[0]" and "tool message" in refusal.reason
    assert cannot_carry("aivvm", Endpoint.CHAT, [{"role": "user", "content": "x"}],
                        (("max_tokens", 5), ("logprobs", False), ("parallel_tool_calls", True))) is None


@pytest.mark.parametrize(("message", "field"), [
    ({"role": "user", "content": None}, "messages[0].content"),
    ({"role": "assistant", "content": None}, "messages[0].content"),
    ({"role": "user", "content": [{"text": "no type"}]}, "messages[0].content[0]"),
    ({"role": "user", "content": ["a string part"]}, "messages[0].content[0]"),
    ({"role": "user", "content": {"type": "text"}}, "messages[0].content"),
])
def test_the_shape_of_messages_is_checked(message: dict[str, Any], field: str) -> None:
    assert invalid({"messages": [message]}).field == field


def test_a_tool_call_history_is_kept_whole() -> None:
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "18 C", "name": "get_weather"}]
    request = parse({"messages": messages})
    assert [m.to_dict() for m in request.messages] == messages
    assert ItemRequest.from_json(request.to_json()) == request


@pytest.mark.parametrize("value", [None, "", [], [""], [1, "a"], [[]], {"text": "x"}, 7])
def test_embeddings_input_must_be_text_or_tokens(value: Any) -> None:
    exc = invalid({"custom_id": "e", "url": "/v1/embeddings", "body": {"input": value}})
    assert exc.field == "body.input"


@pytest.mark.parametrize("value", ["text", ["a", "b"], [1, 2, 3], [[1, 2], [3]]])
def test_embeddings_inputs_accepted(value: Any) -> None:
    request = parse({"id": "e", "url": "/embeddings", "input": value, "dimensions": 4})
    assert request.endpoint is Endpoint.EMBEDDINGS
    assert dict(request.params) == {"input": value, "dimensions": 4}
    assert request.temperature is None and request.messages == ()


def test_defaults_fill_each_endpoint_in_its_own_words() -> None:
    defaults = RequestDefaults(model="m", temperature=0.1, max_tokens=9)
    responses = parse({"id": "r", "url": "/v1/responses", "input": "hi"}, defaults=defaults)
    assert (responses.model, responses.temperature, dict(responses.params)) == (
        "m", 0.1, {"input": "hi", "max_output_tokens": 9})
    completions = parse({"id": "c", "url": "/v1/completions", "prompt": "Once"}, defaults=defaults)
    assert dict(completions.params) == {"prompt": "Once", "max_tokens": 9}
    embeddings = parse({"id": "e", "url": "/v1/embeddings", "input": "x"}, defaults=defaults)
    assert (embeddings.temperature, dict(embeddings.params)) == (None, {"input": "x"})


def test_a_batch_endpoint_is_every_line_s_endpoint() -> None:
    batch = RequestDefaults(endpoint=Endpoint.EMBEDDINGS)
    assert parse({"id": "e", "input": "x"}, defaults=batch).endpoint is Endpoint.EMBEDDINGS
    exc = invalid({"custom_id": "c", "url": "/v1/chat/completions", "body": {"messages": []}}, defaults=batch)
    assert exc.field == "url" and "the batch's endpoint is /v1/embeddings" in str(exc)
    assert invalid({"prompt": "plain chat"}, defaults=batch).field == "input"


def test_responses_and_completions_need_their_input() -> None:
    assert invalid({"custom_id": "r", "url": "/v1/responses", "body": {"model": "m"}}).field == "body.input"
    assert invalid({"custom_id": "c", "url": "/v1/completions", "body": {"prompt": 3}}).field == "body.prompt"


def test_a_simple_line_refuses_what_is_no_field_of_the_chat_api() -> None:
    exc = invalid({"prompt": "x", "tool": [WEATHER]})
    assert exc.field == "tool" and "a field of the chat completions API" in str(exc)
    assert dict(parse({"prompt": "x", "grammar": "root ::= \"a\"", "seed": 1}).params) == {
        "grammar": "root ::= \"a\"", "seed": 1}


def test_body_metadata_is_sent_where_the_api_takes_it_and_always_kept() -> None:
    note = {"run": "7"}
    messages = [{"role": "user", "content": "Hi"}]

    def line(url: str, **body: Any) -> dict[str, Any]:
        return {"custom_id": "m", "method": "POST", "url": url, "body": {"metadata": note, **body}}

    stored = parse(line("/v1/chat/completions", messages=messages, store=True))
    plain = parse(line("/v1/chat/completions", messages=messages))
    responses = parse(line("/v1/responses", input="Hi"))
    simple = parse({"id": "s", "prompt": "Hi", "store": True, "metadata": note})
    assert dict(stored.params)["metadata"] == note and dict(responses.params)["metadata"] == note
    assert "metadata" not in dict(plain.params)  # OpenAI refuses metadata without store
    assert "metadata" not in dict(simple.params)  # the simple form's metadata is ours alone
    assert all(dict(r.metadata) == note for r in (stored, plain, responses, simple))


def test_a_responses_line_may_name_a_stored_prompt_instead_of_an_input() -> None:
    request = parse({"custom_id": "p", "method": "POST", "url": "/v1/responses",
                     "body": {"model": "gpt-4o", "prompt": {"id": "pmpt_1", "variables": {"x": "y"}}}})
    assert dict(request.params)["prompt"] == {"id": "pmpt_1", "variables": {"x": "y"}}
    assert invalid({"custom_id": "p", "method": "POST", "url": "/v1/responses",
                    "body": {"model": "gpt-4o", "prompt": "text"}}).field == "body.input"
