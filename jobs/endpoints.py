"""The OpenAI endpoints a line may name, and what each provider can carry: pure, no I/O.

A line's ``url`` picks its endpoint (chat completions when it names none). Each provider
says which endpoints and which request features it can send as asked; a line it cannot
carry is ``invalid`` before any call, with the provider's name and the field
(:func:`cannot_carry`), and a provider of a fallback chain that cannot carry a line is
skipped for it.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any


class Endpoint(str, Enum):
    CHAT = "/v1/chat/completions"
    EMBEDDINGS = "/v1/embeddings"
    RESPONSES = "/v1/responses"
    COMPLETIONS = "/v1/completions"

    @property
    def path(self) -> str:
        """What an OpenAI-compatible provider appends to its base URL (which holds ``/v1``)."""
        return self.value.removeprefix("/v1")

    @property
    def streamed(self) -> bool:
        return self is not Endpoint.EMBEDDINGS


def endpoint_of(url: str) -> Endpoint | None:
    """``/v1/embeddings`` or ``/embeddings`` -> :attr:`Endpoint.EMBEDDINGS`; None if no endpoint."""
    if not url.startswith("/v1/"):
        url = "/v1" + url
    try:
        return Endpoint(url)
    except ValueError:
        return None


ENDPOINT_URLS = ", ".join(e.value for e in Endpoint)


@dataclass(frozen=True)
class Capability:
    """What a provider's protocol can send as a line asks.

    ``text_only``: messages of text alone (a string, or text parts), roles system, developer,
    user and assistant, and none of ``refused`` among the request's fields.
    """

    endpoints: frozenset[Endpoint]
    text_only: bool = False
    refused: tuple[str, ...] = ()

    @functools.cached_property
    def refused_set(self) -> frozenset[str]:
        """``refused`` to look a request's fields up in (most requests name none of them)."""
        return frozenset(self.refused)


# Fields of a chat request that change what the reply is: a text-only protocol cannot send them,
# and dropping them would record an answer to another question. (Tuning fields such as
# max_tokens, top_p or stop are dropped by such a protocol, as README says.)
# (in the order a refusal names them)
REPLY_SHAPING_FIELDS = (
    "tools", "tool_choice", "functions", "function_call", "response_format", "logprobs", "top_logprobs",
    "modalities", "audio", "prediction", "web_search_options", "guided_json", "guided_regex",
    "guided_choice", "guided_grammar", "grammar", "json_schema",
)
TEXT_ROLES = frozenset({"system", "developer", "user", "assistant"})

CAPABILITIES: dict[str, Capability] = {
    "aivvm": Capability(frozenset({Endpoint.CHAT}), text_only=True, refused=REPLY_SHAPING_FIELDS),
    "openai": Capability(frozenset(Endpoint)),
}


@dataclass(frozen=True)
class Refusal:
    """Why a provider cannot send a request as asked: the field (of the body) and the reason."""

    field: str
    reason: str


def cannot_carry(provider: str, endpoint: Endpoint, messages: Iterable[Mapping[str, Any]],
                 params: Iterable[tuple[str, Any]]) -> Refusal | None:
    """Why ``provider`` cannot send this request as asked, or None."""
    capability = CAPABILITIES.get(provider)
    if capability is None:
        return None
    if endpoint not in capability.endpoints:
        return Refusal("url", f"the {provider} provider has no {endpoint.value} endpoint; "
                              "use --provider openai")
    given = dict(params)
    if given and not capability.refused_set.isdisjoint(given):
        for name in capability.refused:
            if given.get(name) not in (None, False):
                return Refusal(name, f"the {provider} provider cannot send {name}; use --provider openai")
    if capability.text_only and given.get("n", 1) != 1:
        return Refusal("n", f"the {provider} provider cannot send n > 1 (one reply a request); "
                            "use --provider openai")
    if capability.text_only:
        messages = list(messages)
        if messages and all(m.get("role") in ("system", "developer") for m in messages):
            return Refusal("messages", f"has only a system message: the {provider} provider needs a "
                                       "user message; add one")
        for i, message in enumerate(messages):
            problem = _not_text(message)
            if problem:
                return Refusal(f"messages[{i}]", f"the {provider} provider cannot send {problem}; "
                                                 "use --provider openai")
    return None


def _not_text(message: Mapping[str, Any]) -> str | None:
    role = message.get("role")
    if role not in TEXT_ROLES:
        return f"a {role} message"
    if message.get("tool_calls") or message.get("function_call"):
        return "tool calls"
    content = message.get("content")
    if isinstance(content, list):
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text":
                return f"{kind or 'non-text'} content parts"
    elif not isinstance(content, str):
        return "a message without text content"
    return None


def text_of(content: Any) -> str:
    """The text of a message's content: the string, or its text parts joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) for p in content
                       if isinstance(p, dict) and p.get("type") == "text")
    return ""
