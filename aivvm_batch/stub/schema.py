"""Deterministic JSON documents from a JSON schema: tool-call arguments and ``response_format`` replies.

:func:`example_value` fills every property (string ``"stand-in"``, integer ``1``,
number ``1.5``, boolean ``true``, array ``[]``, object built recursively, ``enum``
its first value, ``const`` its value); local ``$ref`` (``#/$defs/...``), ``anyOf``,
``oneOf`` and ``allOf`` (first branch) are followed.  :func:`violating_value` gives
a document that does not match the schema (``fault=badjson``).
"""

from __future__ import annotations

import json
from typing import Any

MAX_DEPTH = 32
NOT_JSON_PREFIX = "Stand-in reply (not JSON): "

_EXAMPLES: dict[str, Any] = {"string": "stand-in", "integer": 1, "number": 1.5, "boolean": True, "null": None}


def compact(value: Any) -> str:
    """Compact JSON text (no spaces, UTF-8 kept)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _resolve(schema: Any, root: Any, depth: int) -> Any:
    """``schema`` with local ``$ref`` and the first ``anyOf``/``oneOf``/``allOf`` branch followed."""
    for _ in range(MAX_DEPTH - depth):
        if not isinstance(schema, dict):
            return schema
        ref = schema.get("$ref")
        if isinstance(ref, str) and ref.startswith("#"):
            target: Any = root
            for part in ref[1:].split("/"):
                if not part:
                    continue
                part = part.replace("~1", "/").replace("~0", "~")
                target = target.get(part) if isinstance(target, dict) else None
            schema = target
            continue
        for key in ("anyOf", "oneOf", "allOf"):
            branches = schema.get(key)
            if isinstance(branches, list) and branches and "type" not in schema and "properties" not in schema:
                usable = [b for b in branches if not (isinstance(b, dict) and b.get("type") == "null")]
                schema = (usable or branches)[0]
                break
        else:
            return schema
    return {}


def _kind(schema: dict[str, Any]) -> str:
    kind = schema.get("type")
    if isinstance(kind, list):
        kinds = [k for k in kind if isinstance(k, str)]
        kind = next((k for k in kinds if k != "null"), kinds[0] if kinds else None)
    if isinstance(kind, str):
        return kind
    if "properties" in schema:
        return "object"
    if "items" in schema:
        return "array"
    return "string"


def example_value(schema: Any, root: Any = None, depth: int = 0) -> Any:
    """The deterministic value the stand-in fills ``schema`` with (``root`` resolves ``$ref``)."""
    root = schema if root is None else root
    schema = _resolve(schema, root, depth)
    if depth >= MAX_DEPTH or not isinstance(schema, dict):
        return "stand-in"
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return enum[0]
    if "const" in schema:
        return schema["const"]
    kind = _kind(schema)
    if kind == "object":
        properties = schema.get("properties")
        if not isinstance(properties, dict):
            return {}
        return {name: example_value(sub, root, depth + 1) for name, sub in properties.items()}
    if kind == "array":
        return []
    return _EXAMPLES.get(kind, "stand-in")


def _wrong_type(value: Any) -> Any:
    """A value of another JSON type than ``value``."""
    if isinstance(value, str):
        return 1
    if isinstance(value, dict):
        return []
    return "stand-in"


def violating_value(schema: Any) -> Any:
    """A document that breaks ``schema``: its first required property dropped, else a wrong type."""
    resolved = _resolve(schema, schema, 0)
    value = example_value(schema)
    if isinstance(value, dict) and isinstance(resolved, dict):
        required = resolved.get("required")
        if isinstance(required, list):
            present = [name for name in required if isinstance(name, str) and name in value]
            if present:
                del value[present[0]]
                return value
        if value:
            first = next(iter(value))
            value[first] = _wrong_type(value[first])
            return value
    return _wrong_type(value)


def example_json(schema: Any) -> str:
    """:func:`example_value` as compact JSON."""
    return compact(example_value(schema))


def violating_json(schema: Any) -> str:
    """:func:`violating_value` as compact JSON."""
    return compact(violating_value(schema))


def not_json(text: str) -> str:
    """Reply text that no JSON parser accepts (``fault=notjson``)."""
    return NOT_JSON_PREFIX + text
