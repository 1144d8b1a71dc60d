"""What an item's request costs in tokens: as the server reported it, else an estimate.

Estimates count about 4 characters a token; they size a tokens-per-minute limit
(:func:`request_tokens`) and the usage of a reply whose server did not say.
"""

from __future__ import annotations

import math
from typing import Any

from jobs.endpoints import Endpoint, text_of
from jobs.records import ItemRequest, Usage

from .attempt import Attempt


def usage(request: ItemRequest, outcome: Attempt) -> Usage:
    """Token counts as the server reported them, else an estimate (about 4 characters a token)."""
    end = outcome.end
    if end is not None and end.prompt_tokens is not None and end.completion_tokens is not None:
        return Usage(end.prompt_tokens, end.completion_tokens, estimated=False)
    return Usage(estimate_tokens(prompt_text(request)), estimate_tokens(outcome.text), estimated=True)


def prompt_text(request: ItemRequest) -> str:
    """The text a request sends (for token estimates): its messages' text, or its input."""
    if request.endpoint is not Endpoint.CHAT:
        params = dict(request.params)
        return _texts(params.get("input", params.get("prompt")))
    return (request.system_message or "") + "".join(
        m.content if type(m.content) is str else text_of(m.content) for m in request.messages)


def _texts(value: Any) -> str:
    """The strings inside an ``input`` or ``prompt`` (a string, strings, messages, parts)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "".join(_texts(v) for v in value)
    if isinstance(value, dict):
        return _texts(value.get("content", value.get("text")))
    return ""


def request_tokens(request: ItemRequest) -> int:
    """What a request may cost in tokens, for a tokens-per-minute limit: prompt plus max_tokens."""
    params = dict(request.params)
    max_tokens = params.get("max_tokens", params.get("max_completion_tokens"))
    return estimate_tokens(prompt_text(request)) + (max_tokens if isinstance(max_tokens, int) else 0)


def estimate_tokens(text: str) -> int:
    return math.ceil(len(text) / 4) if text else 0
