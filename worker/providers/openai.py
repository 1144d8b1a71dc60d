"""An OpenAI-compatible provider: ``POST {base}/chat/completions`` with server-sent events.

Works with OpenAI, vLLM, llama.cpp's server, Ollama, LiteLLM and the stand-in.
The base URL includes the version path, as ``OPENAI_BASE_URL`` does.

Only choice index 0 is kept: a stream whose deltas carry several choices (``n`` > 1)
would otherwise interleave them into one text; the others are ignored. A 200 answer
that is not an event stream (a web page, JSON) fails as ``malformed_reply``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from ..errors import EmptyReply, IncompleteReply, MalformedReply, ProviderHTTPError, ReplyTooLarge
from .base import AbstractProvider, CompletionCall, StreamEnd
from .credentials import redact
from .decoding import decode_utf8
from .http import post_stream

DEFAULT_MODEL = "gpt-3.5-turbo"
# media types of a 200 answer read as an event stream (some servers send text/plain or none)
EVENT_STREAM_TYPES = frozenset({"text/event-stream", "text/plain", ""})


class OpenAI(AbstractProvider):
    url = "https://api.openai.com/v1"
    name = "openai"
    base_url_variable = "OPENAI_BASE_URL"
    api_key_variable = "OPENAI_API_KEY"
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
        if call.api_key:
            headers["authorization"] = f"Bearer {call.api_key}"
        url = f"{cls.base_url(call.base_url)}/chat/completions"
        raw = post_stream(url, cls.request_body(call), headers, call, _error, _check_type)
        finish_reason = None
        usage: dict[str, Any] = {}
        received = done = False
        for data in sse_data(decode_utf8(raw), call.max_reply_bytes):
            if data == "[DONE]":
                done = True
                break
            event = _json(data, call.api_key)
            if "error" in event:
                error = event["error"] if isinstance(event["error"], dict) else {"message": event["error"]}
                raise ProviderHTTPError(500, redact(str(error.get("message", "")), [call.api_key])[:300],
                                        kind=str(error.get("type") or "server_error"))
            usage = event.get("usage") or usage
            for choice in event.get("choices") or []:
                if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                    continue  # only the first choice is the item's reply
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


def sse_data(texts: Iterator[str], max_chars: int | None = None) -> Iterator[str]:
    """The ``data`` payloads of a server-sent event stream, one per event.

    A line, or an event, longer than ``max_chars`` raises :class:`ReplyTooLarge`: a line
    that never ends must not grow without bound.
    """
    pending: list[str] = []  # pieces of the line not ended yet
    pending_chars = 0
    data: list[str] = []
    data_chars = 0
    for text in texts:
        start = 0
        while (end := text.find("\n", start)) >= 0:
            line = "".join(pending) + text[start:end]
            pending, pending_chars, start = [], 0, end + 1
            line = line.rstrip("\r")
            if not line:
                if data:
                    yield "\n".join(data)
                    data, data_chars = [], 0
            elif line.startswith("data:"):
                data.append(line[5:].removeprefix(" "))
                data_chars += len(data[-1])
                _check_size(data_chars, max_chars)
        if start < len(text):
            pending.append(text[start:])
            pending_chars += len(text) - start
            _check_size(pending_chars + data_chars, max_chars)
    line = "".join(pending)
    if line.startswith("data:"):
        data.append(line[5:].removeprefix(" ").rstrip("\r"))
    if data:
        yield "\n".join(data)


def _check_size(chars: int, max_chars: int | None) -> None:
    if max_chars is not None and chars > max_chars:
        raise ReplyTooLarge(f"an event of the stream is longer than {max_chars} characters "
                            "(AIVVM_BATCH_MAX_REPLY_BYTES)")


def _check_type(media: str) -> None:
    if media not in EVENT_STREAM_TYPES:
        raise MalformedReply(f"the server answered 200 with {media}, not an event stream "
                             "(text/event-stream): is the base URL right?")


def _json(data: str, api_key: str | None) -> dict[str, Any]:
    try:
        event = json.loads(data)
    except json.JSONDecodeError as exc:
        raise MalformedReply(f"an event is not JSON: {redact(data, [api_key])[:100]!r}") from exc
    if not isinstance(event, dict):
        raise MalformedReply(f"an event is not a JSON object: {redact(data, [api_key])[:100]!r}")
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
