"""What an OpenAI-compatible server answered beyond the text, and its body given back whole.

A result keeps choice 0's text as ``output`` and, beside it, choice 0's ``tool_calls``,
``refusal`` and ``logprobs`` where the server sent them; :class:`Answer` keeps the rest of the
completion (its ``id``, ``created``, ``model``, ``usage``, the other choices, every key as the
server sent it), so that OpenAI's output form gives back the very body the server would have
sent without streaming (:func:`chat_body`). Each part is stored once. For another endpoint the
body is kept as it came. Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .endpoints import Endpoint


@dataclass(frozen=True)
class Answer:
    endpoint: Endpoint = Endpoint.CHAT
    # chat: the completion less what is kept beside it (choice 0's text, tool calls, refusal, logprobs)
    completion: dict[str, Any] | None = None
    tool_calls: list[Any] | None = None
    refusal: str | None = None
    logprobs: dict[str, Any] | None = None
    # another endpoint: the body as the server sent it (a Response, an embeddings list...)
    body: dict[str, Any] | None = None
    # the server's x-request-id
    request_id: str | None = None

    def to_fields(self) -> dict[str, Any]:
        """The keys added to a result line."""
        fields = {name: getattr(self, name) for name in ("tool_calls", "refusal", "logprobs", "completion",
                                                          "body", "request_id")}
        fields = {name: value for name, value in fields.items() if value is not None}
        if self.endpoint is not Endpoint.CHAT:
            fields["endpoint"] = self.endpoint.value
        return fields

    @classmethod
    def from_fields(cls, data: dict[str, Any]) -> Answer | None:
        if not any(name in data for name in ("completion", "body", "request_id", "endpoint")):
            return None
        return cls(endpoint=Endpoint(data.get("endpoint", Endpoint.CHAT.value)), completion=data.get("completion"),
                   tool_calls=data.get("tool_calls"), refusal=data.get("refusal"), logprobs=data.get("logprobs"),
                   body=data.get("body"), request_id=data.get("request_id"))


def answer_of(endpoint: Endpoint, body: dict[str, Any] | None, request_id: str | None) -> Answer | None:
    """The :class:`Answer` of a server's ``body`` (None when there is neither body nor id)."""
    if body is None:
        return Answer(endpoint, request_id=request_id) if request_id else None
    if endpoint is not Endpoint.CHAT:
        return Answer(endpoint, body=body, request_id=request_id)
    first = _first(body)
    if first is None:
        return Answer(endpoint, completion=body, request_id=request_id)
    index, choice = first
    choice = dict(choice)
    message = dict(choice["message"]) if isinstance(choice.get("message"), dict) else {}
    if isinstance(message.get("content"), str):
        del message["content"]  # the output
    tool_calls = message.pop("tool_calls", None) if message.get("tool_calls") else None
    refusal = message.pop("refusal") if isinstance(message.get("refusal"), str) else None
    logprobs = choice.pop("logprobs") if isinstance(choice.get("logprobs"), dict) else None
    if "message" in choice:
        choice["message"] = message
    choices = list(body["choices"])
    choices[index] = choice
    return Answer(endpoint, completion={**body, "choices": choices}, tool_calls=tool_calls, refusal=refusal,
                  logprobs=logprobs, request_id=request_id)


def chat_body(answer: Answer, output: str | None) -> dict[str, Any] | None:
    """The ChatCompletion the server answered, choice 0 made whole again; None without a
    completion (a provider that sends none, such as Aivvm)."""
    completion = answer.completion
    if completion is None:
        return None
    first = _first(completion)
    if first is None:
        return completion
    index, choice = first
    choice = dict(choice)
    message = dict(choice["message"]) if isinstance(choice.get("message"), dict) else None
    if message is not None:
        if "content" not in message:
            message["content"] = output
        if answer.refusal is not None:
            message["refusal"] = answer.refusal
        if answer.tool_calls is not None:
            message["tool_calls"] = answer.tool_calls
        choice["message"] = message
    if answer.logprobs is not None:
        choice["logprobs"] = answer.logprobs
    choices = list(completion["choices"])
    choices[index] = choice
    return {**completion, "choices": choices}


def _first(completion: dict[str, Any]) -> tuple[int, dict[str, Any]] | None:
    """Choice 0 and where it sits in ``choices``."""
    choices = completion.get("choices")
    if not isinstance(choices, list):
        return None
    for position, choice in enumerate(choices):
        if isinstance(choice, dict) and choice.get("index", 0) == 0:
            return position, choice
    return None
