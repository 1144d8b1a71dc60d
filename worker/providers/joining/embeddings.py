"""The one JSON body of ``/embeddings``, checked: one vector per input, numbered as the inputs are."""

from __future__ import annotations

from typing import Any

from ...errors import MalformedReply, ProviderHTTPError
from ..call import StreamEnd
from ..credentials import redact
from .json_values import NonFiniteNumber, strict_json, token_count


def embeddings_count(value: Any) -> int | None:
    """How many vectors an embeddings ``input`` asks for: one per string or token list."""
    if type(value) is str:
        return 1
    if type(value) is list and value:
        return 1 if all(type(v) is int for v in value) else len(value)
    return None


def embeddings_body(data: bytes, api_key: str | None = None, expected: int | None = None) -> StreamEnd:
    """The one JSON body of ``/embeddings``: an object with a ``data`` list, kept as parsed.

    Each entry must hold an ``embedding`` (a list of numbers, or base64 text), one per input
    (``expected``), numbered from 0 as the inputs are: anything else answers no line.
    """
    try:
        body = strict_json(data.decode("utf-8-sig"))
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        start = redact(data[:100].decode("utf-8", errors="replace"), [api_key])
        why = str(exc) if isinstance(exc, NonFiniteNumber) else "is not JSON"
        raise MalformedReply(f"the embeddings reply {why}: {start!r}") from None
    if type(body) is dict and type(body.get("data")) is not list and "error" in body:
        error = body["error"] if type(body["error"]) is dict else {"message": body["error"]}
        raise ProviderHTTPError(500, redact(str(error.get("message", "")), [api_key])[:300],
                                kind=str(error.get("type") or error.get("code") or "server_error"))
    if type(body) is not dict or type(body.get("data")) is not list:
        raise MalformedReply("the embeddings reply is not an object with a data list")
    entries = body["data"]
    if expected is not None and len(entries) != expected:
        raise MalformedReply(f"the embeddings reply has {len(entries)} vectors for {expected} inputs")
    for position, entry in enumerate(entries):
        vector = entry.get("embedding") if type(entry) is dict else None
        if type(vector) is not list and type(vector) is not str:
            raise MalformedReply(f"the embeddings reply's entry {position} holds no embedding")
        if type(vector) is list and not all(type(x) is float or type(x) is int for x in vector):
            raise MalformedReply(f"the embeddings reply's entry {position} is not a list of numbers")
    usage = body.get("usage")
    usage = usage if type(usage) is dict else None
    return StreamEnd(None, token_count(usage, "prompt_tokens"), 0, body=body)
