"""What an OpenAI-compatible server answered beyond the text, and the body rebuilt from it.

A result keeps choice 0's text as ``output``; :class:`Answer` keeps the rest of the server's
answer so that OpenAI's output form gives back the very body the server would have sent
without streaming (:func:`chat_body`): choice 0's ``tool_calls``, ``refusal`` and ``logprobs``
(also shown in our own result form), every choice when there are several, the completion's
envelope (the server's ``id``, ``created``, ``model``, ``system_fingerprint``, ``usage``...),
and for an endpoint other than chat the whole body as it came. Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .endpoints import Endpoint

# the keys an Answer adds to a result line, in this order
FIELDS = ("tool_calls", "refusal", "logprobs", "choices", "completion", "body", "request_id", "endpoint")


@dataclass(frozen=True)
class Answer:
    endpoint: Endpoint = Endpoint.CHAT
    # chat: the completion without its choices (id, object, created, model, usage...)
    completion: dict[str, Any] | None = None
    tool_calls: list[Any] | None = None
    refusal: str | None = None
    logprobs: dict[str, Any] | None = None
    # chat: every choice, when the request asked for more than one (``n``)
    choices: list[Any] | None = None
    # another endpoint: the body as the server sent it (a Response, an embeddings list...)
    body: dict[str, Any] | None = None
    # the server's x-request-id
    request_id: str | None = None

    def to_fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {}
        for name in FIELDS:
            value = getattr(self, name)
            if name == "endpoint":
                if value is not Endpoint.CHAT:
                    fields[name] = value.value
            elif value is not None:
                fields[name] = value
        return fields

    @classmethod
    def from_fields(cls, data: dict[str, Any]) -> Answer | None:
        if not any(name in data for name in FIELDS):
            return None
        return cls(endpoint=Endpoint(data.get("endpoint", Endpoint.CHAT.value)),
                   completion=data.get("completion"), tool_calls=data.get("tool_calls"),
                   refusal=data.get("refusal"), logprobs=data.get("logprobs"), choices=data.get("choices"),
                   body=data.get("body"), request_id=data.get("request_id"))


def answer_of(endpoint: Endpoint, body: dict[str, Any] | None, request_id: str | None) -> Answer | None:
    """The :class:`Answer` of a server's ``body`` (None when there is neither body nor id)."""
    if body is None:
        return Answer(endpoint, request_id=request_id) if request_id or endpoint is not Endpoint.CHAT else None
    if endpoint is not Endpoint.CHAT:
        return Answer(endpoint, body=body, request_id=request_id)
    choices = body.get("choices")
    if not isinstance(choices, list):
        choices = []
    first = next((c for c in choices if isinstance(c, dict) and c.get("index", 0) == 0), {})
    message = first.get("message")
    if not isinstance(message, dict):
        message = {}
    return Answer(
        endpoint,
        completion={k: v for k, v in body.items() if k != "choices"},
        tool_calls=message.get("tool_calls") or None,
        refusal=message.get("refusal"),
        logprobs=first.get("logprobs"),
        choices=choices if len(choices) > 1 else None,
        request_id=request_id,
    )


def chat_text(body: dict[str, Any] | None) -> str | None:
    """Choice 0's content in a ChatCompletion (None if it has none)."""
    for choice in (body or {}).get("choices") or ():
        if isinstance(choice, dict) and choice.get("index", 0) == 0:
            message = choice.get("message") or {}
            content = message.get("content") if isinstance(message, dict) else None
            return content if isinstance(content, str) else None
    return None


def chat_body(answer: Answer, output: str | None, finish_reason: str | None) -> dict[str, Any] | None:
    """The ChatCompletion the server answered, rebuilt: choice 0's content is ``output`` (null
    when the server sent none: a reply of tool calls or a refusal alone). None without an
    envelope (a provider that sends none, such as Aivvm)."""
    if answer.completion is None:
        return None
    if answer.choices is not None:
        choices = answer.choices
    else:
        content = output if output or not (answer.tool_calls or answer.refusal) else None
        message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": answer.refusal}
        if answer.tool_calls:
            message["tool_calls"] = answer.tool_calls
        choices = [{"index": 0, "message": message, "logprobs": answer.logprobs,
                    "finish_reason": finish_reason}]
    body = dict(answer.completion)
    body["choices"] = choices
    return body
