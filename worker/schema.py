"""Structured output checked: a reply asked to follow a JSON schema must parse and follow it.

Pure: no I/O. The schema is the request's ``response_format`` (``json_schema``, or the
``schema`` of a ``json_object`` as llama.cpp and vLLM accept); a ``json_object`` without
one must still be a JSON object. Validation is `jsonschema`'s, for the dialect the schema
names (2020-12 when it names none); a schema it cannot read or resolve is the server's to judge.

The schema comes from a submitter: its regular expressions (``pattern``,
``patternProperties``) are matched with `regex`'s timeout, within a budget per reply, so that
no pattern can hold a worker (a pattern past its time is not judged).
"""

from __future__ import annotations

import contextvars
import functools
import json
import logging
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import regex
from jsonschema import exceptions, validators
from jsonschema.exceptions import ValidationError
from referencing.exceptions import Unresolvable

from .response_format import response_schema

Validator = Any  # a jsonschema validator instance
SHOWN = 200  # characters of a violation's message kept
PATTERN_SECONDS = 0.05  # one pattern on one string at most
PATTERNS_BUDGET = 0.5  # every pattern of one reply at most
MAX_UNIQUE_ITEMS = 2000  # uniqueItems compares objects pairwise: a longer array is not judged
logger = logging.getLogger(__name__)
__all__ = ["response_schema", "violation"]
_pattern_deadline = contextvars.ContextVar("pattern_deadline", default=0.0)


def violation(texts: Iterable[str | None], schema: dict[str, Any]) -> str | None:
    """The first way a reply's text breaks ``schema`` (one line), or None if every text follows it."""
    validator = _validator(json.dumps(schema, sort_keys=True))
    if validator is None:
        return None
    _pattern_deadline.set(time.monotonic() + PATTERNS_BUDGET)
    for text in texts:
        if text is None:
            continue
        try:
            document = json.loads(text)
        except json.JSONDecodeError as exc:
            return f"the reply is not JSON ({exc.msg} at character {exc.pos})"
        except (ValueError, RecursionError):
            return "the reply is not JSON"
        try:
            error = exceptions.best_match(validator.iter_errors(document))
        except (RecursionError, Unresolvable, exceptions.SchemaError) as exc:  # a schema that cannot be applied
            logger.info("a reply's JSON schema cannot be applied (%s): not checked", type(exc).__name__)
            return None
        if error is not None:
            where = "/".join(str(p) for p in error.absolute_path) or "the top"
            return f"the reply does not follow the schema at {where}: {error.message}"[:SHOWN]
    return None


@functools.lru_cache(maxsize=64)
def _validator(schema_text: str) -> Validator | None:
    """One validator per schema (a batch's lines usually share theirs)."""
    schema = json.loads(schema_text)
    try:
        base = validators.validator_for(schema, default=validators.Draft202012Validator)
        base.check_schema(schema)
    except (exceptions.SchemaError, TypeError, AttributeError, Unresolvable):  # e.g. "$schema": 5
        return None
    keywords = {"pattern": _pattern, "patternProperties": _pattern_properties,
                "additionalProperties": _additional_properties,
                "uniqueItems": functools.partial(_unique_items, base.VALIDATORS.get("uniqueItems"))}
    return validators.extend(base, {k: v for k, v in keywords.items() if k in base.VALIDATORS})(schema)


def _matches(pattern: str, text: str, unjudged: bool = True) -> bool:
    """``regex.search`` bounded in time. A pattern past its time (or with none left) or one we
    cannot read is not judged: the answer is ``unjudged``, chosen by the caller so that it can
    only spare a reply a violation, never make one."""
    left = _pattern_deadline.get() - time.monotonic()
    if left <= 0:
        return unjudged
    try:
        return regex.search(pattern, text, timeout=min(PATTERN_SECONDS, left)) is not None
    except TimeoutError:
        logger.info("a schema's pattern took too long on a reply: not judged")
        return unjudged
    except regex.error:
        return unjudged  # the server's to judge


# jsonschema's own keywords of the same names, with their regular expressions bounded


def _pattern(validator: Validator, pattern: str, instance: Any, schema: Mapping[str, Any]) -> Iterator[ValidationError]:
    if validator.is_type(instance, "string") and not _matches(pattern, instance):
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


def _pattern_properties(validator: Validator, patterns: Mapping[str, Any], instance: Any,
                        schema: Mapping[str, Any]) -> Iterator[ValidationError]:
    if not validator.is_type(instance, "object"):
        return
    for pattern, subschema in patterns.items():
        for key, value in instance.items():
            if _matches(pattern, key, unjudged=False):  # an unjudged key's value is not held to the subschema
                yield from validator.descend(value, subschema, path=key, schema_path=pattern)


def _additional_properties(validator: Validator, additional: Any, instance: Any,
                           schema: Mapping[str, Any]) -> Iterator[ValidationError]:
    if not validator.is_type(instance, "object"):
        return
    known = schema.get("properties", {})
    patterns = schema.get("patternProperties", {})
    extras = sorted((key for key in instance
                     if key not in known and not any(_matches(p, key) for p in patterns)), key=str)
    if validator.is_type(additional, "object"):
        for extra in extras:
            yield from validator.descend(instance[extra], additional, path=extra)
    elif not additional and extras:
        shown = ", ".join(repr(extra) for extra in extras)
        yield ValidationError(f"Additional properties are not allowed ({shown} "
                              f"{'was' if len(extras) == 1 else 'were'} unexpected)")


def _unique_items(original: Any, validator: Validator, unique: Any, instance: Any,
                  schema: Mapping[str, Any]) -> Iterator[ValidationError]:
    if original is None or (validator.is_type(instance, "array") and len(instance) > MAX_UNIQUE_ITEMS):
        return
    yield from original(validator, unique, instance, schema)
