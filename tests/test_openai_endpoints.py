"""What the OpenAI-compatible provider sends for each endpoint: pure ``http_request``, no I/O."""

from __future__ import annotations

from typing import Any

import pytest

from jobs.endpoints import Endpoint
from worker.providers import OpenAI
from worker.providers.call import CompletionCall
from worker.providers.exchange import Head, encode_body
from worker.providers.openai import DEFAULT_MODEL, EmbeddingsReply, EventStreamReply

BASE = "http://llm.internal:8000/v1/"


def request(endpoint: Endpoint, model: str = "m-1", **kwargs: Any) -> Any:
    kwargs.setdefault("base_url", BASE)
    return OpenAI.http_request(CompletionCall(model, kwargs.pop("messages", ()), endpoint=endpoint, **kwargs))


@pytest.mark.parametrize("endpoint, path", [(Endpoint.CHAT, "/chat/completions"),
                                            (Endpoint.COMPLETIONS, "/completions"),
                                            (Endpoint.RESPONSES, "/responses"),
                                            (Endpoint.EMBEDDINGS, "/embeddings")])
def test_url_is_the_base_url_and_the_endpoints_path(endpoint: Endpoint, path: str) -> None:
    assert request(endpoint).url == "http://llm.internal:8000/v1" + path


def test_headers_by_endpoint() -> None:
    for endpoint in (Endpoint.CHAT, Endpoint.COMPLETIONS, Endpoint.RESPONSES):
        headers = request(endpoint, api_key="sk-a").headers
        assert headers == {"accept": "text/event-stream", "content-type": "application/json",
                           "authorization": "Bearer sk-a"}
    assert request(Endpoint.EMBEDDINGS).headers == {"accept": "application/json",
                                                    "content-type": "application/json"}


def test_chat_body() -> None:
    messages = (
        {"role": "system", "content": "old system"},
        {"role": "user", "content": [
            {"type": "text", "text": "What is here?"},
            {"type": "image_url", "image_url": {"url": "https://x/y.png", "detail": "low"}}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "look", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "a cat"},
    )
    params = {"max_tokens": 50, "tools": [{"type": "function", "function": {"name": "look"}}],
              "stream": False, "stream_options": {"include_obfuscation": False, "include_usage": False}}
    body = request(Endpoint.CHAT, messages=messages, system_message="new system", temperature=0.2,
                   params=params).body
    assert body == {
        "max_tokens": 50, "tools": params["tools"], "stream": True,
        "stream_options": {"include_obfuscation": False, "include_usage": True},
        "model": "m-1",
        "messages": [{"role": "system", "content": "new system"}, *messages[1:]],
        "temperature": 0.2,
    }
    assert list(body)[:3] == ["max_tokens", "tools", "stream"]  # the line's fields first, as given
    encode_body(body)


def test_chat_body_defaults() -> None:
    body = request(Endpoint.CHAT, model="", messages=({"role": "user", "content": "hi"},)).body
    assert body == {"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True,
                    "stream_options": {"include_usage": True}}


def test_completions_body() -> None:
    body = request(Endpoint.COMPLETIONS, params={"prompt": ["a", "b"], "max_tokens": 5, "logprobs": 2},
                   temperature=0.0).body
    assert body == {"prompt": ["a", "b"], "max_tokens": 5, "logprobs": 2, "model": "m-1", "stream": True,
                    "stream_options": {"include_usage": True}, "temperature": 0.0}


def test_responses_body_has_no_stream_options() -> None:
    params = {"input": [{"role": "user", "content": "hi"}], "instructions": "be brief", "max_output_tokens": 64}
    body = request(Endpoint.RESPONSES, params=params, temperature=0.7).body
    assert body == {**params, "model": "m-1", "stream": True, "temperature": 0.7}
    assert "stream_options" not in request(Endpoint.RESPONSES, params={"input": "hi"}).body


def test_embeddings_body_is_not_streamed() -> None:
    params = {"input": ["one", "two"], "encoding_format": "float", "dimensions": 3, "stream": True}
    body = request(Endpoint.EMBEDDINGS, params=params, temperature=0.5).body
    assert body == {"input": ["one", "two"], "encoding_format": "float", "dimensions": 3, "model": "m-1"}


def test_non_chat_endpoints_send_no_model_when_none_is_given() -> None:
    for endpoint in (Endpoint.COMPLETIONS, Endpoint.RESPONSES, Endpoint.EMBEDDINGS):
        assert "model" not in request(endpoint, model="", params={"input": "x"}).body


def test_the_line_fields_are_not_changed_in_place() -> None:
    params = {"input": "x", "stream_options": {"include_usage": False}}
    request(Endpoint.COMPLETIONS, params=params)
    assert params == {"input": "x", "stream_options": {"include_usage": False}}


def test_each_endpoint_gets_its_parser() -> None:
    for endpoint in Endpoint:
        parser = OpenAI.reply_parser(CompletionCall("m", (), endpoint=endpoint))
        expected = EmbeddingsReply if endpoint is Endpoint.EMBEDDINGS else EventStreamReply
        assert isinstance(parser, expected), endpoint


def test_what_a_200_may_be() -> None:
    """Each endpoint's reader checks the media type its endpoint answers in."""
    from worker.errors import MalformedReply

    embeddings_call = CompletionCall("m", (), endpoint=Endpoint.EMBEDDINGS)
    OpenAI.reply_reader(embeddings_call).start(Head(200, content_type="application/json"))
    for media in ("text/event-stream", "text/html"):
        with pytest.raises(MalformedReply):
            OpenAI.reply_reader(embeddings_call).start(Head(200, content_type=media))
    for endpoint in (Endpoint.CHAT, Endpoint.RESPONSES, Endpoint.COMPLETIONS):
        call = CompletionCall("m", (), endpoint=endpoint)
        OpenAI.reply_reader(call).start(Head(200, content_type="text/event-stream"))
        for media in ("application/json", "text/html", "application/xhtml+xml"):
            with pytest.raises(MalformedReply):
                OpenAI.reply_reader(call).start(Head(200, content_type=media))
    chat = OpenAI.reply_parser(CompletionCall("m", ()))
    embeddings = OpenAI.reply_parser(CompletionCall("m", (), endpoint=Endpoint.EMBEDDINGS))
    chat.check_type("text/event-stream")
    embeddings.check_type("application/json")
    with pytest.raises(MalformedReply):
        chat.check_type("application/json")
    with pytest.raises(MalformedReply):
        embeddings.check_type("text/event-stream")
