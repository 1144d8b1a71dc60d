"""What a request asks, checked: query parameters, headers and the JSON body of a new batch.

Each check raises :class:`BadRequest` (or :class:`TooLarge`) naming the parameter at fault,
before anything is written.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request

from jobs.files import BATCH_FILE_TTL, MAX_TTL, MIN_TTL
from jobs.records import MAX_PRIORITY

from .errors import BadRequest, TooLarge

MAX_METADATA_PAIRS, MAX_METADATA_KEY, MAX_METADATA_VALUE = 16, 64, 512
MAX_IDEMPOTENCY_KEY = 255


def digits_value(raw: str, high: int) -> int | None:
    """The whole number ``raw`` writes in ASCII digits, None if it is not one (int() also takes "１０"
    and " 10_0 "). One with more digits than ``high`` is ``high + 1``, whatever its size: int()
    raises ValueError past 4,300 digits (a 500)."""
    if not (raw.isascii() and raw.isdigit()):
        return None
    digits = raw.lstrip("0") or "0"
    return int(digits) if len(digits) <= len(str(high)) else high + 1


def shown(value: Any, most: int = 60) -> str:
    """A client's value as an error message quotes it: its start, if it is long."""
    text = repr(value)
    return text if len(text) <= most else f"{text[:most]}... ({len(text)} characters)"


def int_param(raw: str | None, name: str, low: int, high: int, default: int) -> int:
    if raw is None or raw == "":
        return default
    value = digits_value(raw, high)
    if value is None:
        raise BadRequest(f"{name} must be an integer, got {shown(raw)}", param=name)
    if not low <= value <= high:
        raise BadRequest(f"{name} must be between {low} and {high}, got {shown(raw)}", param=name)
    return value


def declared_over(content_length: str | None, limit: int) -> bool:
    """Whether the request's Content-Length says its body is over ``limit`` bytes."""
    declared = None if content_length is None else digits_value(content_length, limit)
    return declared is not None and declared > limit


def newest_first(raw: str | None) -> bool:
    """The ``order`` of a list: ``desc`` (the default) or ``asc``."""
    order = raw or "desc"
    if order not in ("asc", "desc"):
        raise BadRequest("order must be 'asc' or 'desc'", param="order")
    return order == "desc"


def idempotency_key(request: Request) -> str | None:
    key = request.headers.get("idempotency-key")
    if key is not None and not (0 < len(key) <= MAX_IDEMPOTENCY_KEY and key.isascii() and key.isprintable()):
        raise BadRequest(f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} printable ASCII characters",
                         param="Idempotency-Key")
    return key


def output_ttl(value: Any) -> int:
    """Seconds the output and error files live: ``output_expires_after`` (OpenAI's bounds), by
    default 30 days."""
    if value is None:
        return BATCH_FILE_TTL
    seconds = value.get("seconds") if isinstance(value, dict) else None
    if isinstance(seconds, float) and seconds.is_integer():  # 7200.0: JSON has one kind of number
        seconds = int(seconds)
    if not isinstance(value, dict) or value.get("anchor") != "created_at":
        raise BadRequest("output_expires_after must be {\"anchor\": \"created_at\", \"seconds\": N}",
                         param="output_expires_after")
    if isinstance(seconds, bool) or not isinstance(seconds, int) or not MIN_TTL <= seconds <= MAX_TTL:
        raise BadRequest(f"output_expires_after.seconds must be a whole number from {MIN_TTL} to {MAX_TTL}",
                         param="output_expires_after.seconds")
    return seconds


def metadata(value: Any) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or len(value) > MAX_METADATA_PAIRS:
        raise BadRequest(f"metadata must be an object of at most {MAX_METADATA_PAIRS} pairs", param="metadata")
    for key, item in value.items():
        if not isinstance(item, str) or len(key) > MAX_METADATA_KEY or len(item) > MAX_METADATA_VALUE:
            raise BadRequest(f"metadata keys are strings of at most {MAX_METADATA_KEY} characters and values "
                             f"strings of at most {MAX_METADATA_VALUE}", param="metadata")
    priority = value.get("priority")
    if priority is not None and not (priority.isascii() and priority.isdigit() and 1 <= int(priority) <= MAX_PRIORITY):
        raise BadRequest(f"metadata.priority is the batch's share of the workers: a whole number from 1 to "
                         f"{MAX_PRIORITY}, got {shown(priority)}", param="metadata.priority")
    return dict(value)


async def json_body(request: Request, limit: int) -> dict[str, Any]:
    if declared_over(request.headers.get("content-length"), limit):
        raise TooLarge(f"the request body is larger than {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise TooLarge(f"the request body is larger than {limit} bytes")
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BadRequest("the request body must be a JSON object")
    where = _lone_surrogate(data, "")
    if where is not None:  # before anything is written: the text could not be stored or answered
        raise BadRequest(f"the request body holds a lone surrogate (text that is not Unicode) at {where or 'a key'}",
                         param=where or None)
    return data


def _lone_surrogate(value: Any, path: str) -> str | None:
    """The path of the first string (or key) in ``value`` that UTF-8 cannot encode, else None."""
    if isinstance(value, str):
        return None if value.isascii() or _encodes(value) else path
    if isinstance(value, dict):
        for key, item in value.items():
            where = path + "." + key if path else key
            if not _encodes(key):
                return (path + "." if path else "") + ascii(key)
            found = _lone_surrogate(item, where)
            if found is not None:
                return found
    if isinstance(value, list):
        for index, item in enumerate(value):
            found = _lone_surrogate(item, f"{path}[{index}]")
            if found is not None:
                return found
    return None


def _encodes(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
