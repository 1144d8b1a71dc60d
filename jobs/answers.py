"""What an OpenAI-compatible server answered beyond the text, and its body given back whole.

A result keeps choice 0's text as ``output``; :class:`Answer` keeps the rest of what the server
answered so that OpenAI's output form gives back the very body the server would have sent
without streaming (:func:`chat_body`): for chat, the completion less that one text (its ``id``,
``created``, ``model``, ``usage``, every choice with its ``tool_calls``, ``refusal``,
``logprobs``, every key as the server sent it); for another endpoint, the body as it came.
Choice 0's ``tool_calls``, ``refusal`` and ``logprobs`` are also shown beside ``output`` in our
own result form. Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .endpoints import Endpoint

SHOWN = ("tool_calls", "refusal")  # choice 0's message fields shown beside the text


@dataclass(frozen=True)
class Answer:
    endpoint: Endpoint = Endpoint.CHAT
    # chat: the completion, choice 0's text left out (it is the result's ``output``)
    completion: dict[str, Any] | None = None
    # another endpoint: the body as the server sent it (a Response, an embeddings list...)
    body: dict[str, Any] | None = None
    # the server's x-request-id
    request_id: str | None = None

    def to_fields(self) -> dict[str, Any]:
        """The keys added to a result line."""
        fields: dict[str, Any] = {}
        if self.completion is not None:
            first = _first_choice(self.completion)
            message = first.get("message")
            if not isinstance(message, dict):
                message = {}
            for name in SHOWN:
                if message.get(name) is not None:
                    fields[name] = message[name]
            if first.get("logprobs") is not None:
                fields["logprobs"] = first["logprobs"]
            fields["completion"] = self.completion
        if self.body is not None:
            fields["body"] = self.body
        if self.request_id is not None:
            fields["request_id"] = self.request_id
        if self.endpoint is not Endpoint.CHAT:
            fields["endpoint"] = self.endpoint.value
        return fields

    @classmethod
    def from_fields(cls, data: dict[str, Any]) -> Answer | None:
        if not any(name in data for name in ("completion", "body", "request_id", "endpoint")):
            return None
        return cls(endpoint=Endpoint(data.get("endpoint", Endpoint.CHAT.value)),
                   completion=data.get("completion"), body=data.get("body"), request_id=data.get("request_id"))


def answer_of(endpoint: Endpoint, body: dict[str, Any] | None, request_id: str | None) -> Answer | None:
    """The :class:`Answer` of a server's ``body`` (None when there is neither body nor id)."""
    if body is None:
        return Answer(endpoint, request_id=request_id) if request_id else None
    if endpoint is not Endpoint.CHAT:
        return Answer(endpoint, body=body, request_id=request_id)
    return Answer(endpoint, completion=_with_first_text(body, None), request_id=request_id)


def chat_body(answer: Answer, output: str | None) -> dict[str, Any] | None:
    """The ChatCompletion the server answered, choice 0's text put back from ``output``; None
    without a completion (a provider that sends none, such as Aivvm)."""
    if answer.completion is None:
        return None
    return _with_first_text(answer.completion, output)


def _first_choice(completion: dict[str, Any]) -> dict[str, Any]:
    for choice in completion.get("choices") or ():
        if isinstance(choice, dict) and choice.get("index", 0) == 0:
            return choice
    return {}


def _with_first_text(completion: dict[str, Any], text: str | None) -> dict[str, Any]:
    """``completion`` with choice 0's text taken out (``text`` None: a string content is left out;
    a null one stays) or put back (``text`` given, where it was left out). Copies what it changes."""
    choices = completion.get("choices")
    if not isinstance(choices, list):
        return completion
    changed = []
    for choice in choices:
        message = choice.get("message") if isinstance(choice, dict) and choice.get("index", 0) == 0 else None
        if isinstance(message, dict):
            if text is None and isinstance(message.get("content"), str):
                message = {k: v for k, v in message.items() if k != "content"}
            elif text is not None and "content" not in message:
                message = {"role": message.get("role", "assistant"), "content": text,
                           **{k: v for k, v in message.items() if k != "role"}}
            choice = {**choice, "message": message}
        changed.append(choice)
    return {**completion, "choices": changed}
