"""An OpenAI-compatible provider: ``POST {base}/chat/completions`` with server-sent events.

Works with OpenAI, vLLM, llama.cpp's server, Ollama, LiteLLM and the stand-in.
The base URL includes the version path, as ``OPENAI_BASE_URL`` does.

Only choice index 0 is kept: a stream whose deltas carry several choices (``n`` > 1)
would otherwise interleave them into one text; the others are ignored. A 200 answer
that is not an event stream (a web page, JSON) fails as ``malformed_reply``.
"""

from __future__ import annotations

import codecs
import json
from typing import Any

from ..errors import EmptyReply, IncompleteReply, MalformedReply, ProviderHTTPError
from .base import AbstractProvider
from .call import CompletionCall, Item, StreamEnd
from .credentials import redact
from .exchange import HTTPRequest
from .sse import SSEParser, sse_data

DEFAULT_MODEL = "gpt-3.5-turbo"
# media types of a 200 answer read as an event stream (some servers send text/plain or none)
EVENT_STREAM_TYPES = frozenset({"text/event-stream", "text/plain", ""})


class OpenAI(AbstractProvider):
    url = "https://api.openai.com/v1"
    name = "openai"
    path = "/chat/completions"
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
    def http_request(cls, call: CompletionCall) -> HTTPRequest:
        headers = {"accept": "text/event-stream", "content-type": "application/json"}
        if call.api_key:
            headers["authorization"] = f"Bearer {call.api_key}"
        url = cls.base_url(call.base_url) + cls.path
        return HTTPRequest(url, cls.request_body(call), headers)

    @classmethod
    def reply_parser(cls, call: CompletionCall) -> OpenAIReply:
        return OpenAIReply(call.max_reply_bytes, call.api_key)

    @classmethod
    def check_type(cls, media: str) -> None:
        if media not in EVENT_STREAM_TYPES:
            raise MalformedReply(f"the server answered 200 with {media}, not an event stream "
                                 "(text/event-stream): is the base URL right?")

    @classmethod
    def parse_error(cls, status: int, text: str, retry_after: float | None) -> ProviderHTTPError:
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


class OpenAIReply:
    """Chat completion chunks as server-sent events: the text of choice 0, then the end.

    ``[DONE]`` completes the reply; a stream that ends without it or a finish_reason is
    cut (``incomplete_reply``); an event that is an error raises it.
    """

    def __init__(self, max_chars: int | None, api_key: str | None) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._events = SSEParser(max_chars)
        self._api_key = api_key
        self._finish_reason: str | None = None
        self._usage: dict[str, Any] = {}
        self._received = False
        self.complete = False

    def feed(self, data: bytes, out: list[Item]) -> None:
        text = self._utf8.decode(data)
        if text:
            for event in self._events.feed(text):
                self._event(event, out)
                if self.complete:
                    return

    def finish(self, out: list[Item]) -> None:
        if not self.complete:
            tail = self._utf8.decode(b"", final=True)
            for event in [*self._events.feed(tail), *self._events.finish()]:
                self._event(event, out)
                if self.complete:
                    break
        if not self.complete and self._finish_reason is None:
            raise IncompleteReply("the event stream ended without [DONE] or a finish_reason")
        if not self._received and self._finish_reason != "length":
            raise EmptyReply("the server streamed no text")
        out.append(StreamEnd(self._finish_reason, self._usage.get("prompt_tokens"),
                             self._usage.get("completion_tokens")))

    def _event(self, data: str, out: list[Item]) -> None:
        if data == "[DONE]":
            self.complete = True
            return
        event = _json(data, self._api_key)
        if "error" in event:
            error = event["error"] if isinstance(event["error"], dict) else {"message": event["error"]}
            raise ProviderHTTPError(500, redact(str(error.get("message", "")), [self._api_key])[:300],
                                    kind=str(error.get("type") or "server_error"))
        self._usage = event.get("usage") or self._usage
        for choice in event.get("choices") or []:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue  # only the first choice is the item's reply
            text = (choice.get("delta") or {}).get("content")
            if text:
                self._received = True
                out.append(text)
            self._finish_reason = choice.get("finish_reason") or self._finish_reason


def _json(data: str, api_key: str | None) -> dict[str, Any]:
    try:
        event = json.loads(data)
    except json.JSONDecodeError as exc:
        raise MalformedReply(f"an event is not JSON: {redact(data, [api_key])[:100]!r}") from exc
    if not isinstance(event, dict):
        raise MalformedReply(f"an event is not a JSON object: {redact(data, [api_key])[:100]!r}")
    return event


__all__ = ["OpenAI", "OpenAIReply", "sse_data"]
