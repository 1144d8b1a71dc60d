"""The JSON schema a request's reply must follow (its ``response_format``), read without jsonschema:
most requests name none, and the worker imports the validator (:mod:`worker.schema`) only for
those that do."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

ANY_OBJECT: dict[str, Any] = {"type": "object"}


def response_schema(params: Mapping[str, Any]) -> dict[str, Any] | None:
    """The JSON schema a request's reply must follow, or None."""
    response_format = params.get("response_format")
    if not isinstance(response_format, dict):
        return None
    kind = response_format.get("type")
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        return schema if isinstance(schema, dict) else ANY_OBJECT
    if kind == "json_object":
        schema = response_format.get("schema")
        return schema if isinstance(schema, dict) else ANY_OBJECT
    return None
