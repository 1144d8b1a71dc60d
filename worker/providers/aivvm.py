"""The Aivvm provider of gpt4free (also the protocol of the legacy chatbot-ui app).

``POST {base}/api/chat`` with the model entry, messages, key, prompt and
temperature; the reply is plain UTF-8 text streamed in arbitrary chunks.

chatbot-ui answers ``text/plain`` (the stand-in: ``text/plain; charset=utf-8``) or no
content type; a 200 web page (``text/html``: a login or error page of a proxy) is not a
reply and fails as ``malformed_reply``.
"""

from __future__ import annotations

import codecs
from typing import Any

from jobs.endpoints import text_of

from ..errors import EmptyReply, MalformedReply, UnsupportedModel
from .base import AbstractProvider
from .call import CompletionCall, Item
from .exchange import HTTPRequest

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
    path = "/api/chat"
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
        """The JSON body; a leading system message becomes ``prompt`` and is not repeated.

        Messages are sent as role and text (text parts joined): what the protocol carries.
        """
        messages = [{"role": m["role"], "content": text_of(m.get("content"))} for m in call.messages]
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
    def http_request(cls, call: CompletionCall) -> HTTPRequest:
        base = cls.base_url(call.base_url)
        headers = {
            "accept": "text/event-stream",
            "content-type": "application/json",
            "origin": base,
            "referer": base + "/",
            "user-agent": "aivvm-batch",
        }
        return HTTPRequest(base + cls.path, cls.request_body(call), headers)

    @classmethod
    def reply_parser(cls, call: CompletionCall) -> AivvmReply:
        return AivvmReply()

    @classmethod
    def check_type(cls, media: str) -> None:
        if media in WEB_PAGES:
            raise MalformedReply(f"the server answered 200 with {media}, a web page, not an Aivvm reply "
                                 "(plain text): is the base URL right?")


class AivvmReply:
    """The reply is the text: UTF-8, decoded so that no character is split across chunks.

    Bytes that are not UTF-8 become U+FFFD, one per invalid sequence.
    """

    complete = False  # the body's end is the reply's end

    def __init__(self) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._received = False

    def feed(self, data: bytes, out: list[Item]) -> None:
        text = self._utf8.decode(data)
        if text:
            self._received = True
            out.append(text)

    def finish(self, out: list[Item]) -> None:
        tail = self._utf8.decode(b"", final=True)
        if tail:
            self._received = True
            out.append(tail)
        if not self._received:
            raise EmptyReply("the server answered 200 with an empty body")
