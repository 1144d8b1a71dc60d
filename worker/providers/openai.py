"""An OpenAI-compatible provider: ``POST {base}/chat/completions`` with server-sent events.

Works with OpenAI, vLLM, llama.cpp's server, Ollama, LiteLLM and the stand-in.
The base URL includes the version path, as ``OPENAI_BASE_URL`` does.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

from ..errors import EmptyReply, IncompleteReply, MalformedReply, ProviderHTTPError
from .base import AbstractProvider, CompletionCall, StreamEnd
from .http import decode_utf8, post_stream

DEFAULT_MODEL = "gpt-3.5-turbo"


class OpenAI(AbstractProvider):
    url = "https://api.openai.com/v1"
    name = "openai"
    base_url_variable = "OPENAI_BASE_URL"
    supports_gpt_35_turbo = True
    supports_gpt_4 = True

    @classmethod
    def check_model(cls, model: str) -> str:
        return model or DEFAULT_MODEL

    @classmethod
    def request_body(cls, call: CompletionCall) -> dict[str, Any]:
        messages = [dict(m) for m in call.messages]
        if call.system_message is not None:
            if messages and messages[0].get("role") in ("system", "developer"):
                messages = messages[1:]
            messages.insert(0, {"role": "system", "content": call.system_message})
        body: dict[str, Any] = dict(call.params)
        body.update(model=cls.check_model(call.model), messages=messages, stream=True,
                    stream_options={"include_usage": True})
        if call.temperature is not None:
            body["temperature"] = call.temperature
        return body

    @classmethod
    def stream(cls, call: CompletionCall) -> Iterator[str | StreamEnd]:
        headers = {"accept": "text/event-stream", "content-type": "application/json"}
        api_key = call.api_key or os.environ.get("OPENAI_API_KEY")
        if api_key:
            headers["authorization"] = f"Bearer {api_key}"
        url = f"{cls.base_url(call.base_url)}/chat/completions"
        raw = post_stream(url, cls.request_body(call), headers, call, _error)
        finish_reason = None
        usage: dict[str, Any] = {}
        received = done = False
        for data in sse_data(decode_utf8(raw)):
            if data == "[DONE]":
                done = True
                break
            event = _json(data)
            if "error" in event:
                error = event["error"] if isinstance(event["error"], dict) else {"message": event["error"]}
                raise ProviderHTTPError(500, str(error.get("message", "")),
                                        kind=str(error.get("type") or "server_error"))
            usage = event.get("usage") or usage
            for choice in event.get("choices") or []:
                text = (choice.get("delta") or {}).get("content")
                if text:
                    received = True
                    yield text
                finish_reason = choice.get("finish_reason") or finish_reason
        if not done and finish_reason is None:
            raise IncompleteReply("the event stream ended without [DONE] or a finish_reason")
        if not received and finish_reason != "length":
            raise EmptyReply("the server streamed no text")
        yield StreamEnd(finish_reason, usage.get("prompt_tokens"), usage.get("completion_tokens"))


def sse_data(texts: Iterator[str]) -> Iterator[str]:
    """The ``data`` payloads of a server-sent event stream, one per event."""
    buffer = ""
    data: list[str] = []
    for text in texts:
        buffer += text
        *lines, buffer = buffer.split("\n")
        for line in lines:
            line = line.rstrip("\r")
            if not line:
                if data:
                    yield "\n".join(data)
                    data = []
            elif line.startswith("data:"):
                data.append(line[5:].removeprefix(" "))
    if buffer.startswith("data:"):
        data.append(buffer[5:].removeprefix(" ").rstrip("\r"))
    if data:
        yield "\n".join(data)


def _json(data: str) -> dict[str, Any]:
    try:
        event = json.loads(data)
    except json.JSONDecodeError as exc:
        raise MalformedReply(f"an event is not JSON: {data[:100]!r}") from exc
    if not isinstance(event, dict):
        raise MalformedReply(f"an event is not a JSON object: {data[:100]!r}")
    return event


def _error(status: int, text: str, retry_after: float | None) -> ProviderHTTPError:
    kind = None
    message = text
    try:
        error = json.loads(text).get("error")
    except (json.JSONDecodeError, AttributeError):
        error = None
    if isinstance(error, dict):
        message = str(error.get("message") or text)
        kind = error.get("type") or error.get("code")
    return ProviderHTTPError(status, message[:300], kind=str(kind) if kind else None,
                             retry_after=retry_after)
