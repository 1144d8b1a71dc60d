"""The Aivvm provider of gpt4free (also the protocol of the legacy chatbot-ui app).

``POST {base}/api/chat`` with the model entry, messages, key, prompt and
temperature; the reply is plain UTF-8 text streamed in arbitrary chunks.

chatbot-ui answers ``text/plain`` (the stand-in: ``text/plain; charset=utf-8``) or no
content type; a 200 web page (``text/html``: a login or error page of a proxy) is not a
reply and fails as ``malformed_reply``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from ..errors import EmptyReply, MalformedReply, ProviderHTTPError, UnsupportedModel
from .base import AbstractProvider, CompletionCall, StreamEnd
from .decoding import decode_utf8
from .http import post_stream

DEFAULT_SYSTEM_MESSAGE = (
    "You are ChatGPT, a large language model trained by OpenAI. "
    "Follow the user's instructions carefully. Respond using markdown."
)
DEFAULT_MODEL = "gpt-3.5-turbo"
WEB_PAGES = frozenset({"text/html", "application/xhtml+xml"})
DEFAULT_TEMPERATURE = 0.7

models: dict[str, dict[str, str]] = {
    "gpt-3.5-turbo": {"id": "gpt-3.5-turbo", "name": "GPT-3.5"},
    "gpt-3.5-turbo-0613": {"id": "gpt-3.5-turbo-0613", "name": "GPT-3.5-0613"},
    "gpt-3.5-turbo-16k": {"id": "gpt-3.5-turbo-16k", "name": "GPT-3.5-16K"},
    "gpt-3.5-turbo-16k-0613": {"id": "gpt-3.5-turbo-16k-0613", "name": "GPT-3.5-16K-0613"},
    "gpt-4": {"id": "gpt-4", "name": "GPT-4"},
    "gpt-4-0613": {"id": "gpt-4-0613", "name": "GPT-4-0613"},
    "gpt-4-32k": {"id": "gpt-4-32k", "name": "GPT-4-32K"},
    "gpt-4-32k-0613": {"id": "gpt-4-32k-0613", "name": "GPT-4-32K-0613"},
}


class Aivvm(AbstractProvider):
    url = "https://chat.aivvm.com"
    name = "aivvm"
    base_url_variable = "AIVVM_BASE_URL"
    api_key_variable = "AIVVM_API_KEY"
    working = True
    supports_stream = True
    supports_gpt_35_turbo = True
    supports_gpt_4 = True
    models = models

    @classmethod
    def check_model(cls, model: str) -> str:
        model = model or DEFAULT_MODEL
        if model not in cls.models:
            raise UnsupportedModel(model)
        return model

    @classmethod
    def request_body(cls, call: CompletionCall) -> dict[str, Any]:
        """The JSON body; a leading system message becomes ``prompt`` and is not repeated."""
        messages = [dict(m) for m in call.messages]
        leading_system = None
        if messages and messages[0].get("role") == "system":
            leading_system = messages.pop(0)["content"]
        prompt = call.system_message or leading_system or DEFAULT_SYSTEM_MESSAGE
        return {
            "model": cls.models[cls.check_model(call.model)],
            "messages": messages,
            "key": call.api_key or "",
            "prompt": prompt,
            "temperature": DEFAULT_TEMPERATURE if call.temperature is None else call.temperature,
        }

    @classmethod
    def stream(cls, call: CompletionCall) -> Iterator[str | StreamEnd]:
        body = cls.request_body(call)
        base = cls.base_url(call.base_url)
        headers = {
            "accept": "text/event-stream",
            "content-type": "application/json",
            "origin": base,
            "referer": base + "/",
            "user-agent": "aivvm-batch",
        }
        received = False
        for text in decode_utf8(post_stream(f"{base}/api/chat", body, headers, call, _error, _check_type)):
            received = True
            yield text
        if not received:
            raise EmptyReply("the server answered 200 with an empty body")


def _check_type(media: str) -> None:
    if media in WEB_PAGES:
        raise MalformedReply(f"the server answered 200 with {media}, a web page, not an Aivvm reply "
                             "(plain text): is the base URL right?")


def _error(status: int, text: str, retry_after: float | None) -> ProviderHTTPError:
    return ProviderHTTPError(status, text[:300], retry_after=retry_after)
