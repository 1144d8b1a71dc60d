"""Accumulating the deltas of a stream as the streaming APIs define them: pure.

Strings are kept as lists of pieces and joined once at the end, so what a joiner holds is a
small multiple of the bytes it was fed, never quadratic in them; indexed entries are kept by
index in dictionaries (a server's ``index`` of 10**9 allocates nothing).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ...errors import MalformedReply
from .bounds import MAX_DEPTH, Budget

# keys whose first value is kept when a server repeats them on every fragment (a name that
# differs from the one kept is the rest of it: a few servers split a tool's name too)
_KEEP_FIRST = frozenset({"id", "type", "name", "role", "index", "object"})


class _Text(list[str]):
    """A string arriving in pieces, joined once by :func:`final_value`."""


class _Indexed(dict[int, dict[str, Any]]):
    """A list whose entries arrive as fragments keyed by their ``index``."""


def _indexed(value: list[Any]) -> bool:
    return bool(value) and all(type(v) is dict and type(v.get("index")) is int for v in value)


def merge_delta(acc: dict[str, Any], delta: Mapping[str, Any], budget: Budget, depth: int = 0) -> None:
    """Accumulate ``delta`` into ``acc`` as the streaming APIs define it.

    Strings are concatenated (but ids, types and names keep their first value), objects
    merged, lists of indexed fragments merged by index, other lists extended, numbers and
    booleans replaced; nulls add nothing. Each field or indexed entry made is spent from
    ``budget``; a delta nested deeper than :data:`MAX_DEPTH` is malformed.
    """
    if depth > MAX_DEPTH:
        raise MalformedReply("an event of the stream is nested too deeply")
    for key, value in delta.items():
        if value is None:
            continue
        if key not in acc:
            budget.spend_field()
        old = acc.get(key)
        kind = type(value)
        if key in _KEEP_FIRST:
            if old is None or old == "":
                acc[key] = value
            elif key == "name" and kind is str and type(old) is str and value != old:
                acc[key] = old + value
        elif kind is str:
            if type(old) is _Text:
                old.append(value)
            else:
                acc[key] = _Text([value])
        elif kind is dict:
            if type(old) is not dict:
                acc[key] = old = {}
            merge_delta(old, value, budget, depth + 1)
        elif kind is list:
            if type(old) is _Indexed or (old is None and _indexed(value)):
                if type(old) is not _Indexed:
                    acc[key] = old = _Indexed()
                for entry in value:
                    if type(entry) is dict and type(entry.get("index")) is int:
                        fragment = old.get(entry["index"])
                        if fragment is None:
                            budget.spend_field()
                            fragment = old[entry["index"]] = {}
                        merge_delta(fragment, entry, budget, depth + 1)
            elif type(old) is list:
                old.extend(value)
            else:
                acc[key] = list(value)
        else:
            acc[key] = value


def final_value(value: Any) -> Any:
    """The accumulated value as JSON: pieces joined, indexed fragments listed by index."""
    kind = type(value)
    if kind is _Text:
        return "".join(value)
    if kind is _Indexed:
        return [final_value(value[i]) for i in sorted(value)]
    if kind is dict:
        return {k: final_value(v) for k, v in value.items()}
    return value
