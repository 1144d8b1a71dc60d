"""Structured output checked: a reply asked to follow a JSON schema must parse and follow it.

Pure: no I/O. The schema is the request's ``response_format`` (``json_schema``, or the
``schema`` of a ``json_object`` as llama.cpp and vLLM accept); a ``json_object`` without
one must still be a JSON object. Validation is `jsonschema`'s, for the dialect the schema
names (2020-12 when it names none); a schema it cannot read is the server's to judge.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Mapping
from typing import Any

from jsonschema import exceptions, validators

Validator = Any  # a jsonschema validator instance
ANY_OBJECT: dict[str, Any] = {"type": "object"}
SHOWN = 200  # characters of a violation's message kept


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


def violation(texts: Iterable[str | None], schema: dict[str, Any]) -> str | None:
    """The first way a reply's text breaks ``schema`` (one line), or None if every text follows it."""
    validator = _validator(json.dumps(schema, sort_keys=True))
    if validator is None:
        return None
    for text in texts:
        if text is None:
            continue
        try:
            document = json.loads(text)
        except json.JSONDecodeError as exc:
            return f"the reply is not JSON ({exc.msg} at character {exc.pos})"
        except (ValueError, RecursionError):
            return "the reply is not JSON"
        error = exceptions.best_match(validator.iter_errors(document))
        if error is not None:
            where = "/".join(str(p) for p in error.absolute_path) or "the top"
            return f"the reply does not follow the schema at {where}: {error.message}"[:SHOWN]
    return None


@functools.lru_cache(maxsize=64)
def _validator(schema_text: str) -> Validator | None:
    """One validator per schema (a batch's lines usually share theirs)."""
    schema = json.loads(schema_text)
    cls = validators.validator_for(schema, default=validators.Draft202012Validator)
    try:
        cls.check_schema(schema)
    except exceptions.SchemaError:
        return None
    return cls(schema)
