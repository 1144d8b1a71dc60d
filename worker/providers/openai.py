"""An OpenAI-compatible provider: every endpoint a line may name, at ``{base}{endpoint.path}``.

Works with OpenAI, vLLM, llama.cpp's server, Ollama, LiteLLM and the stand-in.
The base URL includes the version path, as ``OPENAI_BASE_URL`` does.

Chat completions, legacy completions and the Responses API are streamed (server-sent
events); the text of choice 0 is handed out as it comes, and the reply ends with a
:class:`StreamEnd` whose ``body`` is what the server would have answered without
streaming (joined by :mod:`.joining`). Embeddings are one JSON body, parsed at the end.

What a 200 must be: :meth:`OpenAI.check_type` (all that :class:`~.reply.ReplyReader`
is given) accepts an event stream (``text/event-stream``, ``text/plain`` or no type) and
``application/json`` (the embeddings' answer); each parser says exactly what its endpoint
accepts with its own ``check_type`` and, whatever the header said, a streamed endpoint
whose body is JSON or a web page fails as ``malformed_reply`` at its first bytes, and an
embeddings body that is not a JSON object with a ``data`` list fails so at its end.
"""

from __future__ import annotations

import codecs
import json
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, Union

from jobs.endpoints import Endpoint

from ..errors import EmptyReply, IncompleteReply, MalformedReply, ProviderHTTPError
from .base import AbstractProvider
from .call import CompletionCall, Item
from .credentials import redact
from .exchange import HTTPRequest
from .joining import (ChatJoiner, CompletionsJoiner, Containers, NonFiniteNumber, ResponsesJoiner, embeddings_body,
                      embeddings_count, strict_json)
from .sse import SSEParser, sse_data

DEFAULT_MODEL = "gpt-3.5-turbo"
# media types of a 200 answer read as an event stream (some servers send text/plain or none)
EVENT_STREAM_TYPES = frozenset({"text/event-stream", "text/plain", ""})
# media types of a 200 answer read as one JSON body (embeddings)
JSON_TYPES = frozenset({"application/json", ""})
# what a 200 of some endpoint may be: OpenAI.check_type knows no endpoint


class OpenAI(AbstractProvider):
    url = "https://api.openai.com/v1"
    name = "openai"
    path = Endpoint.CHAT.path  # the default endpoint's; a call's endpoint says its own
    base_url_variable = "OPENAI_BASE_URL"
    api_key_variable = "OPENAI_API_KEY"
    supports_gpt_35_turbo = True
    supports_gpt_4 = True

    @classmethod
    def check_model(cls, model: str) -> str:
        return model or DEFAULT_MODEL

    @classmethod
    def request_body(cls, call: CompletionCall) -> dict[str, Any]:
        """The JSON body of ``call`` at its endpoint: the line's fields, then what the worker needs.

        Chat: ``messages`` (the system message put first), streamed with usage. Completions:
        streamed with usage. Responses: streamed (the Responses API has no include_usage:
        its last event carries the usage). Embeddings: not streamed.
        """
        endpoint = call.endpoint
        body: dict[str, Any] = dict(call.params)
        if endpoint is Endpoint.CHAT:
            messages = [dict(m) for m in call.messages]
            if call.system_message is not None:
                if messages and messages[0].get("role") in ("system", "developer"):
                    messages = messages[1:]
                messages.insert(0, {"role": "system", "content": call.system_message})
            body.update(model=cls.check_model(call.model), messages=messages, stream=True,
                        stream_options=_with_usage(body.get("stream_options")))
        elif endpoint is Endpoint.EMBEDDINGS:
            body.pop("stream", None)
            body.pop("stream_options", None)
            if call.model:
                body["model"] = call.model
            return body
        else:
            if call.model:
                body["model"] = call.model
            body["stream"] = True
            if endpoint is Endpoint.COMPLETIONS:
                body["stream_options"] = _with_usage(body.get("stream_options"))
        if call.temperature is not None:
            body["temperature"] = call.temperature
        return body

    @classmethod
    def http_request(cls, call: CompletionCall) -> HTTPRequest:
        accept = "text/event-stream" if call.endpoint.streamed else "application/json"
        headers = {"accept": accept, "content-type": "application/json"}
        if call.api_key:
            headers["authorization"] = f"Bearer {call.api_key}"
        url = cls.base_url(call.base_url) + call.endpoint.path
        return HTTPRequest(url, cls.request_body(call), headers)

    @classmethod
    def reply_parser(cls, call: CompletionCall) -> OpenAIParser:
        endpoint = call.endpoint
        if endpoint is Endpoint.CHAT:
            return ChatReply(call.max_reply_bytes, call.api_key)
        if endpoint is Endpoint.COMPLETIONS:
            return CompletionsReply(call.max_reply_bytes, call.api_key)
        if endpoint is Endpoint.RESPONSES:
            return ResponsesReply(call.max_reply_bytes, call.api_key)
        return EmbeddingsReply(call.api_key, embeddings_count(call.params.get("input")))

    @classmethod
    def check_type(cls, media: str) -> None:
        """A 200 of a chat stream; each endpoint's parser has its own (``reply_check``)."""
        if media not in EVENT_STREAM_TYPES:
            raise MalformedReply(f"the server answered 200 with {media}, not an event stream "
                                 "(text/event-stream): is the base URL right?")

    @classmethod
    def parse_error(cls, status: int, text: str, retry_after: float | None) -> ProviderHTTPError:
        kind = None
        message = text
        try:
            error = json.loads(text).get("error")
        except (json.JSONDecodeError, AttributeError, RecursionError):
            error = None
        if isinstance(error, dict):
            message = str(error.get("message") or text)
            kind = error.get("type") or error.get("code")
        return ProviderHTTPError(status, message[:300], kind=str(kind) if kind else None,
                                 retry_after=retry_after)


def _with_usage(given: Any) -> dict[str, Any]:
    """The line's stream_options with include_usage on (the worker counts tokens)."""
    options = dict(given) if isinstance(given, Mapping) else {}
    options["include_usage"] = True
    return options


# -- the reply parsers ------------------------------------------------------------------------


class EventStreamReply(ABC):
    """The server-sent events of one streamed reply, each a JSON object, handed to :meth:`_event`.

    Decodes UTF-8 incrementally, reads events bounded by ``max_chars`` (one event), and
    refuses a body that is JSON or a web page rather than an event stream.
    """

    def __init__(self, max_chars: int | None, api_key: str | None) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._events = SSEParser(max_chars)
        self._api_key = api_key
        self._sniffed = False
        self.complete = False

    def check_type(self, media: str) -> None:
        """Raise ``MalformedReply`` if a 200 of this media type is no event stream."""
        if media not in EVENT_STREAM_TYPES:
            raise MalformedReply(f"the server answered 200 with {media}, not an event stream "
                                 "(text/event-stream): is the base URL right?")

    def feed(self, data: bytes, out: list[Item]) -> None:
        text = self._utf8.decode(data)
        if text:
            if not self._sniffed:
                self._sniff(text)
            for event in self._events.feed(text):
                self._event(event, out)
                if self.complete:
                    return

    def finish(self, out: list[Item]) -> None:
        if not self.complete:
            tail = self._utf8.decode(b"", final=True)
            if tail and not self._sniffed:
                self._sniff(tail)
            for event in self._events.feed(tail):
                self._event(event, out)
                if self.complete:
                    break
        if not self.complete:
            for event in self._events.finish():  # the last event, no blank line after it
                if event != "[DONE]" and not _is_json(event):
                    if self._finished:
                        break  # cut after the reply said why it ended: what came is whole
                    raise IncompleteReply("the event stream was cut inside an event")
                self._event(event, out)
        self._end(out)

    @property
    def _finished(self) -> bool:
        """The reply said why it ended (a finish_reason), with or without the stream's end."""
        return self.complete

    def _sniff(self, text: str) -> None:
        start = text.lstrip("\ufeff \t\r\n")
        if not start:
            return
        self._sniffed = True
        if start[0] in "{[<":
            what = "a web page" if start[0] == "<" else "JSON"
            raise MalformedReply(f"the server answered 200 with {what}, not an event stream: "
                                 f"{redact(start, [self._api_key])[:100]!r}")

    @abstractmethod
    def _event(self, data: str, out: list[Item]) -> None:
        """One event's data."""

    @abstractmethod
    def _end(self, out: list[Item]) -> None:
        """At the stream's end: its StreamEnd, or the error of a reply that did not end right."""

    def _error(self, error: Any) -> ProviderHTTPError:
        """An error event's error (``{"error": {"message", "type"}}``), cleared of the key."""
        if not isinstance(error, dict):
            error = {"message": error}
        return ProviderHTTPError(500, redact(str(error.get("message", "")), [self._api_key])[:300],
                                 kind=str(error.get("type") or error.get("code") or "server_error"))


class ChunkStreamReply(EventStreamReply):
    """Chunks of chat or legacy completions, joined by ``joiner``: the text of choice 0, then the end.

    ``[DONE]`` completes the reply; a stream that ends without it or any finish_reason is
    cut (``incomplete_reply``); an event that is an error raises it; a reply with no text,
    refusal or tool call (and not cut by max_tokens) is an ``empty_reply``.
    """

    def __init__(self, max_chars: int | None, api_key: str | None,
                 joiner: ChatJoiner | CompletionsJoiner) -> None:
        super().__init__(max_chars, api_key)
        self._joiner = joiner
        self._containers = Containers(max_chars)

    def _event(self, data: str, out: list[Item]) -> None:
        if data == "[DONE]":
            self.complete = True
            return
        event = _json(data, self._api_key)
        if "error" in event and event["error"] is not None:
            raise self._error(event["error"])
        if self._joiner.add(event, out):
            self._containers.spend(data)

    def _end(self, out: list[Item]) -> None:
        joiner = self._joiner
        if not self.complete and not joiner.finished:
            raise IncompleteReply("the event stream ended without [DONE] or a finish_reason")
        joiner.check_not_empty()
        out.append(joiner.end())

    @property
    def _finished(self) -> bool:
        return self.complete or self._joiner.finished


class ChatReply(ChunkStreamReply):
    """``chat.completion.chunk`` events; the end's body is the joined ``ChatCompletion``."""

    def __init__(self, max_chars: int | None, api_key: str | None) -> None:
        super().__init__(max_chars, api_key, ChatJoiner())


class CompletionsReply(ChunkStreamReply):
    """Legacy ``text_completion`` events; the end's body is the joined ``Completion``."""

    def __init__(self, max_chars: int | None, api_key: str | None) -> None:
        super().__init__(max_chars, api_key, CompletionsJoiner())


class ResponsesReply(EventStreamReply):
    """Responses API events: the output text deltas, then the end with the final ``Response``.

    ``response.completed`` or ``response.incomplete`` completes the reply; ``response.failed``
    and ``error`` events raise; a stream that ends before is cut (``incomplete_reply``).
    """

    def __init__(self, max_chars: int | None, api_key: str | None) -> None:
        super().__init__(max_chars, api_key)
        self._joiner = ResponsesJoiner(api_key)

    def _event(self, data: str, out: list[Item]) -> None:
        if data == "[DONE]":
            return  # not the Responses API's, but some proxies add it: completed says the end
        event = _json(data, self._api_key)
        error = event.get("error")
        if error is not None and "type" not in event:
            raise self._error(error)  # a proxy's chat-style error event
        self._joiner.add(event, out)
        self.complete = self._joiner.complete

    def _end(self, out: list[Item]) -> None:
        if not self.complete:
            raise IncompleteReply("the event stream ended before response.completed")
        out.append(self._joiner.end())


class EmbeddingsReply:
    """The one JSON body of ``/embeddings``, kept (bounded by the decoder) and parsed at the end."""

    complete = False  # the body's end is the reply's end

    def __init__(self, api_key: str | None, expected: int | None = None) -> None:
        self._api_key = api_key
        self._expected = expected  # vectors the input asks for
        self._parts: list[bytes] = []

    def check_type(self, media: str) -> None:
        """Raise ``MalformedReply`` if a 200 of this media type is no JSON."""
        if media not in JSON_TYPES:
            raise MalformedReply(f"the server answered 200 with {media}, not JSON (application/json): "
                                 "is the base URL right?")

    def feed(self, data: bytes, out: list[Item]) -> None:
        self._parts.append(data)

    def finish(self, out: list[Item]) -> None:
        data = b"".join(self._parts)
        self._parts = []
        if not data.strip():
            raise EmptyReply("the server answered 200 with an empty body")
        if data.count(b"{") + data.count(b"[") > Containers(len(data)).limit:
            raise MalformedReply("the embeddings reply holds more JSON objects and lists than its size allows")
        out.append(embeddings_body(data, self._api_key, self._expected))


OpenAIParser = Union[ChatReply, CompletionsReply, ResponsesReply, EmbeddingsReply]


def _is_json(data: str) -> bool:
    try:
        strict_json(data)
    except (ValueError, RecursionError):
        return False
    return True


def _json(data: str, api_key: str | None) -> dict[str, Any]:
    try:
        event = strict_json(data)
    except NonFiniteNumber as exc:
        raise MalformedReply(f"an event {exc}: {redact(data, [api_key])[:100]!r}") from None
    except (ValueError, RecursionError) as exc:
        raise MalformedReply(f"an event is not JSON: {redact(data, [api_key])[:100]!r}") from exc
    if not isinstance(event, dict):
        raise MalformedReply(f"an event is not a JSON object: {redact(data, [api_key])[:100]!r}")
    return event


__all__ = ["DEFAULT_MODEL", "EVENT_STREAM_TYPES", "JSON_TYPES", "ChatReply", "ChunkStreamReply",
           "CompletionsReply", "EmbeddingsReply", "EventStreamReply", "OpenAI", "OpenAIParser",
           "ResponsesReply", "sse_data"]
