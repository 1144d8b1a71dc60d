"""Reading a reply's JSON: strictly (RFC 8259 has no NaN or Infinity), and its token counts."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

Event = dict[str, Any]  # one parsed event of a stream


class NonFiniteNumber(ValueError):
    """JSON has no NaN or Infinity (Python's json reads them; nothing reading our results would)."""


def _no_constant(name: str) -> Any:
    raise NonFiniteNumber(f"holds {name}, which JSON does not allow")


_STRICT = json.JSONDecoder(parse_constant=_no_constant)


def strict_json(text: str) -> Any:
    """``json.loads`` without NaN, Infinity and -Infinity (ValueError), as RFC 8259 has it."""
    return _STRICT.decode(text)


def token_count(usage: Mapping[str, Any] | None, key: str) -> int | None:
    """``usage[key]`` when it is an integer, else None (a server's null or string counts nothing)."""
    value = usage.get(key) if usage is not None else None
    return value if type(value) is int else None
