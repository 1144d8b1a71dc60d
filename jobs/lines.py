"""Reading the input file and turning each line into an :class:`ItemRequest`.

Both line forms of DESIGN.md are accepted, mixed freely. Parsing is pure: a bad
line raises :class:`InvalidLine` with a message naming the line and the field.
A line without an id gets ``line-N`` (its line number), a form no given id is
expected to take, so it cannot collide with an id such as ``"3"`` given elsewhere.
"""

from __future__ import annotations

import json
import json.scanner
import math
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from .errors import InputFileError, InvalidLine
from .records import ChatMessage, ItemRequest, RequestDefaults, new_chat_message, new_item_request

DEFAULT_MAX_LINE_BYTES = 1024 * 1024
LINE_COUNT_LIMIT = 64 << 20  # bytes of a file scanned for its newlines at most (lines_expected)
ROLES = frozenset({"system", "developer", "user", "assistant"})
SIMPLE_FIELDS = frozenset(
    {"id", "messages", "prompt", "system_message", "model", "temperature", "metadata"}
)
PASSTHROUGH_PARAMS = frozenset(
    {"max_tokens", "max_completion_tokens", "top_p", "stop", "presence_penalty",
     "frequency_penalty", "seed", "n", "user", "logit_bias", "response_format"}
)
BATCH_FIELDS = frozenset({"custom_id", "method", "url", "body"})
BODY_FIELDS = frozenset({"messages", "model", "temperature", "system_message", "metadata", "stream"})
TOKEN_LIMITS = ("max_tokens", "max_completion_tokens")
BATCH_URLS = frozenset({"/v1/chat/completions", "/chat/completions"})
UTF8_BOM = b"\xef\xbb\xbf"
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


@dataclass(frozen=True)
class RawLine:
    number: int
    data: bytes
    oversized: bool = False


def read_lines(stream: BinaryIO, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> Iterator[RawLine]:
    """Yield the non-blank lines of ``stream`` with their 1-based numbers.

    Memory stays bounded by ``max_line_bytes``: a longer line is yielded once,
    truncated and flagged ``oversized``, and the rest of it is skipped.
    """
    for number, data, oversized in numbered_lines(stream, max_line_bytes):
        yield RawLine(number, data, oversized)


def numbered_lines(stream: BinaryIO, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES
                   ) -> Iterator[tuple[int, bytes, bool]]:
    """:func:`read_lines` as ``(number, data, oversized)`` tuples (what submit reads, line by line)."""
    number = 0
    readline = stream.readline
    limit = max_line_bytes + 2  # room for a CRLF line end
    while True:
        chunk = readline(limit)
        if not chunk:
            return
        number += 1
        oversized = len(chunk) > max_line_bytes and len(chunk.rstrip(b"\r\n")) > max_line_bytes
        if oversized and not chunk.endswith(b"\n"):
            _skip_rest_of_line(stream)
        if number == 1 and chunk.startswith(UTF8_BOM):
            chunk = chunk[len(UTF8_BOM):]
        if not oversized and (not chunk or chunk.isspace()):  # blank (bytes.strip's whitespace)
            continue
        yield number, chunk, oversized


def _skip_rest_of_line(stream: BinaryIO) -> None:
    while True:
        rest = stream.readline(DEFAULT_MAX_LINE_BYTES)
        if not rest or rest.endswith(b"\n"):
            return


def lines_expected(stream: BinaryIO, count_limit: int = LINE_COUNT_LIMIT) -> int | None:
    """About how many lines a regular file has from its current position (None for a pipe).

    The newlines of its first ``count_limit`` bytes are counted (a fast scan), past them
    extrapolated by its size; the position is kept. What it is for: sizing a batch's
    messages from the start (:func:`jobs.queue.chunk_size`), not any count a user sees.
    """
    try:
        if not stream.seekable():
            return None
        start = stream.tell()
        left = os.fstat(stream.fileno()).st_size - start
    except (OSError, ValueError):
        return None
    newlines = scanned = 0
    last = b"\n"
    try:
        while scanned < count_limit:
            block = stream.read(min(1 << 20, count_limit - scanned))
            if not block:
                break
            newlines += block.count(b"\n")
            scanned += len(block)
            last = block[-1:]
    finally:
        stream.seek(start)
    if 0 < scanned < left:
        return newlines * left // scanned
    return newlines + (last != b"\n")  # a last line without its newline is a line


def open_input(path: str | Path) -> BinaryIO:
    try:
        return open(path, "rb")
    except OSError as exc:
        raise InputFileError(f"cannot read {path}: {exc.strerror or exc}") from exc


def default_id(line: int) -> str:
    """The id of a line that gives none."""
    return f"line-{line}"


def parse_line(raw: RawLine, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
               defaults: RequestDefaults = RequestDefaults()) -> ItemRequest:
    """Turn one raw line into a request, or raise :class:`InvalidLine`.

    ``defaults`` fill what the line lacks (its own values win).
    """
    if not raw.oversized:
        request = _parse_usual(raw.number, raw.data, defaults)
        if request is not None:
            return request
    return _parse_any(raw, max_line_bytes, defaults)


def parse_data(number: int, data: bytes, oversized: bool = False,
               max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
               defaults: RequestDefaults = RequestDefaults()) -> ItemRequest:
    """:func:`parse_line` of ``RawLine(number, data, oversized)`` (what :func:`numbered_lines` yields)."""
    if not oversized:
        request = _parse_usual(number, data, defaults)
        if request is not None:
            return request
    return _parse_any(RawLine(number, data, oversized), max_line_bytes, defaults)


def _parse_usual(n: int, line: bytes, defaults: RequestDefaults) -> ItemRequest | None:
    """The request of a usual line, else None: then :func:`_parse_any` decides, and names the fault.

    Usual: a JSON object in the simple form with no field but ``id``, ``prompt`` or ``messages``,
    ``model``, ``temperature`` and ``system_message``, each valid. For every line it accepts, the
    request is the one :func:`_parse_any` makes (tests/test_submit_equivalence.py holds it to
    that); it only skips that path's general checks, the costliest part of a submit.
    """
    if not line.startswith(b"{"):
        return None
    try:
        text = line.decode("utf-8")
        # json.loads(text) is this scan and a check that only JSON whitespace follows
        data, end = _scan(text, 0)
    except (ValueError, RecursionError, StopIteration):  # UnicodeDecodeError, JSONDecodeError
        return None
    if end != len(text) and text[end:].strip(_JSON_WHITESPACE):
        return None
    if type(data) is not dict or not _USUAL_FIELDS.issuperset(data):
        return None
    if "\\u" in text and _SURROGATE_ESCAPE.search(text):
        return None
    item_id = data.get("id")
    if item_id is None:
        item_id = f"line-{n}"  # default_id
    elif type(item_id) is str:
        if len(item_id) > 512 or not item_id.strip():
            return None
    elif type(item_id) is int:
        item_id = str(item_id)
        if len(item_id) > 512:
            return None
    else:
        return None
    own_system = False
    if "prompt" in data:
        prompt = data["prompt"]
        if "messages" in data or type(prompt) is not str or not prompt.strip():
            return None
        messages: tuple[ChatMessage, ...] = (new_chat_message("user", prompt),)
    else:
        given = data.get("messages")
        if type(given) is not list or not given:
            return None
        only_system = True
        built = []
        for item in given:
            if type(item) is not dict:
                return None
            role = item.get("role")
            content = item.get("content")
            if type(role) is not str or role not in ROLES or type(content) is not str:
                return None
            if role in _SYSTEM_ROLES:
                own_system = True
            else:
                only_system = False
            built.append(new_chat_message(role, content))
        if only_system:
            return None
        messages = tuple(built)
    model = data.get("model")
    if model is not None and type(model) is not str:
        return None
    temperature = data.get("temperature")
    if temperature is None:
        temperature = defaults.temperature
    elif type(temperature) is int or type(temperature) is float:
        if not 0 <= temperature <= 2:
            return None
        temperature = float(temperature)
    else:
        return None
    system_message = data.get("system_message")
    if system_message is None:
        if not own_system:
            system_message = defaults.system_message
    elif type(system_message) is not str:
        return None
    max_tokens = defaults.max_tokens
    return new_item_request(item_id, n, messages, model or defaults.model or None, temperature,
                            system_message, () if max_tokens is None else (("max_tokens", max_tokens),),
                            ())


def _parse_any(raw: RawLine, max_line_bytes: int, defaults: RequestDefaults) -> ItemRequest:
    """:func:`parse_line` for any line: every check, and the message that names the fault."""
    n = raw.number
    if raw.oversized:
        raise InvalidLine(n, f"line is longer than the limit of {max_line_bytes} bytes "
                             "(AIVVM_BATCH_MAX_LINE_BYTES)")
    try:
        text = raw.data.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as exc:
        raise InvalidLine(n, f"not valid UTF-8 (byte {exc.start + 1} of the line)") from None
    try:
        data = json.loads(text, parse_float=_finite_float, parse_constant=_no_constant)
    except RecursionError:
        raise InvalidLine(n, "JSON nested too deeply") from None
    except json.JSONDecodeError as exc:
        raise InvalidLine(n, f"not valid JSON: {exc.msg} (column {exc.colno})") from None
    except ValueError as exc:  # e.g. an integer beyond Python's digit limit
        raise InvalidLine(n, f"not valid JSON: {exc}") from None
    if _SURROGATE_ESCAPE.search(text):
        try:
            json.dumps(data, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidLine(n, "contains a lone UTF-16 surrogate escape (\\ud800-\\udfff): "
                                 "not text") from None
    if not isinstance(data, dict):
        raise InvalidLine(n, f"expected a JSON object, got {_kind(data)}")
    try:
        if "body" in data or "custom_id" in data:
            return _parse_batch_form(n, data, defaults)
        return _parse_simple_form(n, data, defaults)
    except InvalidLine as exc:
        exc.item_id = _best_effort_id(data)
        raise


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text} is out of range")
    return value


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


# The scanner of json.loads(text, parse_float=_finite_float, parse_constant=_no_constant): it
# reads one value at an index, and returns it with the index after it.
# (typeshed types make_scanner's argument as a scanner; it is the decoder, as JSONDecoder passes it)
_scan: Callable[[str, int], tuple[Any, int]] = json.scanner.make_scanner(
    json.JSONDecoder(parse_float=_finite_float, parse_constant=_no_constant))  # type: ignore[arg-type]
_JSON_WHITESPACE = " \t\n\r"
_USUAL_FIELDS = frozenset({"id", "prompt", "messages", "model", "temperature", "system_message"})
_SYSTEM_ROLES = frozenset({"system", "developer"})


def _best_effort_id(data: dict[str, Any]) -> str | None:
    """The id a broken line meant to have, so its result can be matched to it."""
    value = data.get("custom_id", data.get("id"))
    if isinstance(value, (str, int)) and not isinstance(value, bool) and str(value).strip():
        return str(value)[:512]
    return None


def _refuse_unknown(n: int, data: dict[str, Any], known: frozenset[str], prefix: str,
                    expected: str) -> None:
    """Name every unknown field at once, so one fix is enough."""
    unknown = sorted(set(data) - known)
    if len(unknown) == 1:
        raise InvalidLine(n, f"unknown field ({expected})", prefix + unknown[0])
    if unknown:
        names = ", ".join(repr(prefix + name) for name in unknown)
        raise InvalidLine(n, f"unknown fields {names} ({expected})")


def _parse_simple_form(n: int, data: dict[str, Any], defaults: RequestDefaults) -> ItemRequest:
    _refuse_unknown(n, data, SIMPLE_FIELDS | PASSTHROUGH_PARAMS, "",
                    f"expected one of: {', '.join(sorted(SIMPLE_FIELDS))}, or a generation "
                    "parameter such as max_tokens")
    item_id = _parse_id(n, data.get("id"), "id")
    if "messages" in data and "prompt" in data:
        raise InvalidLine(n, "give either 'messages' or 'prompt', not both", "prompt")
    if "prompt" in data:
        prompt = data["prompt"]
        if not isinstance(prompt, str) or not prompt.strip():
            raise InvalidLine(n, "must be a non-empty string", "prompt")
        messages: tuple[ChatMessage, ...] = (ChatMessage("user", prompt),)
    elif "messages" in data:
        messages = _parse_messages(n, data["messages"], "messages")
    else:
        raise InvalidLine(n, "missing: give 'messages' (a list) or 'prompt' (a string)", "messages")
    return _build(n, item_id, messages, data, "", defaults)


def _parse_batch_form(n: int, data: dict[str, Any], defaults: RequestDefaults) -> ItemRequest:
    _refuse_unknown(n, data, BATCH_FIELDS, "",
                    f"an OpenAI Batch line has only {', '.join(sorted(BATCH_FIELDS))}")
    if "custom_id" not in data:
        raise InvalidLine(n, "missing (required in the OpenAI Batch form)", "custom_id")
    item_id = _parse_id(n, data["custom_id"], "custom_id")
    method = data.get("method", "POST")
    if method != "POST":
        raise InvalidLine(n, f"must be \"POST\", got {method!r}", "method")
    url = data.get("url", "/v1/chat/completions")
    if not isinstance(url, str) or url not in BATCH_URLS:
        raise InvalidLine(n, f"only /v1/chat/completions is supported, got {url!r}", "url")
    body = data.get("body")
    if not isinstance(body, dict):
        raise InvalidLine(n, f"must be an object, got {_kind(body)}", "body")
    _refuse_unknown(n, body, BODY_FIELDS | PASSTHROUGH_PARAMS, "body.",
                    "not supported here: it would be dropped, and the reply would not be "
                    "what the line asks for")
    messages = _parse_messages(n, body.get("messages"), "body.messages")
    if body.get("stream") not in (None, True, False):
        raise InvalidLine(n, "must be a boolean", "body.stream")
    return _build(n, item_id, messages, body, "body.", defaults)


def _build(n: int, item_id: str, messages: tuple[ChatMessage, ...], data: dict[str, Any],
           prefix: str, defaults: RequestDefaults) -> ItemRequest:
    model = data.get("model")
    if model is not None and not isinstance(model, str):
        raise InvalidLine(n, f"must be a string, got {_kind(model)}", prefix + "model")
    model = model or defaults.model or None
    temperature = _parse_temperature(n, data.get("temperature"), prefix + "temperature")
    if temperature is None:
        temperature = defaults.temperature
    system_message = data.get("system_message")
    if system_message is not None and not isinstance(system_message, str):
        raise InvalidLine(n, f"must be a string, got {_kind(system_message)}",
                          prefix + "system_message")
    if all(m.role in ("system", "developer") for m in messages):
        raise InvalidLine(n, "has only a system message; add a user message", prefix + "messages")
    has_own_system = system_message is not None or any(
        m.role in ("system", "developer") for m in messages)
    if not has_own_system:
        system_message = defaults.system_message
    _check_choices(n, data.get("n"), prefix + "n")
    params = dict((k, v) for k, v in data.items() if k in PASSTHROUGH_PARAMS and v is not None)
    for name in TOKEN_LIMITS:
        if name in params:
            _check_token_limit(n, params[name], prefix + name)
    if defaults.max_tokens is not None and not any(name in params for name in TOKEN_LIMITS):
        params["max_tokens"] = defaults.max_tokens
    return ItemRequest(
        id=item_id,
        line=n,
        messages=messages,
        model=model,
        temperature=temperature,
        system_message=system_message,
        params=tuple(sorted(params.items())),
        metadata=_parse_metadata(n, data.get("metadata"), prefix + "metadata"),
    )


def _parse_temperature(n: int, value: Any, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 2:
        shown = repr(value) if len(repr(value)) < 40 else repr(value)[:37] + "..."
        raise InvalidLine(n, f"must be a number from 0 to 2, got {shown}", name)
    return float(value)


def _check_choices(n: int, value: Any, name: str) -> None:
    """One line, one completion: ``n`` > 1 would come back as one interleaved text."""
    if value is None or (type(value) is int and value == 1):
        return
    raise InvalidLine(n, f"must be 1, got {_shown(value)}: one line gets one completion "
                         "(repeat the line with other ids for more)", name)


def _check_token_limit(n: int, value: Any, name: str) -> None:
    if type(value) is not int or value < 1:
        raise InvalidLine(n, f"must be a positive integer, got {_shown(value)}", name)


def _parse_metadata(n: int, value: Any, name: str) -> tuple[tuple[str, Any], ...]:
    """Kept with the request and its result; never sent to the provider."""
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise InvalidLine(n, f"must be an object, got {_kind(value)}", name)
    for key, item in value.items():
        if not isinstance(item, str):
            raise InvalidLine(n, f"values must be strings (as in OpenAI's metadata), got "
                                 f"{_kind(item)} for {key!r}", name)
    return tuple(sorted(value.items()))


def _shown(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, float) else repr(value)
    return text if len(text) < 40 else text[:37] + "..."


def _parse_id(n: int, value: Any, name: str) -> str:
    if value is None:
        if name == "custom_id":
            raise InvalidLine(n, "must not be null", name)
        return default_id(n)
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise InvalidLine(n, f"must be a string or an integer, got {_kind(value)}", name)
    text = str(value)
    if not text.strip():
        raise InvalidLine(n, "must not be empty", name)
    if len(text) > 512:
        raise InvalidLine(n, "is longer than 512 characters", name)
    return text


def _parse_messages(n: int, value: Any, name: str) -> tuple[ChatMessage, ...]:
    if value is None:
        raise InvalidLine(n, "missing: must be a non-empty list of messages", name)
    if not isinstance(value, list):
        raise InvalidLine(n, f"must be a non-empty list, got {_kind(value)}", name)
    if not value:
        raise InvalidLine(n, "must be a non-empty list", name)
    messages = []
    for i, item in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(item, dict):
            raise InvalidLine(n, f"must be an object with 'role' and 'content', got {_kind(item)}",
                              where)
        role = item.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise InvalidLine(n, f"unknown role {role!r} (expected one of: "
                                 f"{', '.join(sorted(ROLES))})", where + ".role")
        content = item.get("content")
        if not isinstance(content, str):
            raise InvalidLine(n, f"must be a string, got {_kind(content)}", where + ".content")
        messages.append(ChatMessage(role, content))
    return tuple(messages)


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


@dataclass(frozen=True)
class Validation:
    """What a dry run found: counts, and the first problems (each names its line and field)."""

    total: int
    invalid: int
    problems: tuple[InvalidLine, ...]

    @property
    def valid(self) -> int:
        return self.total - self.invalid


def validate_lines(stream: BinaryIO, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
                   max_items: int | None = None, defaults: RequestDefaults = RequestDefaults(),
                   keep: int = 10) -> Validation:
    """Check every line as ``submit`` would, duplicate ids included, calling nothing.

    It keeps each id seen (memory grows with the number of lines).
    """
    total = invalid = 0
    problems: list[InvalidLine] = []
    first_line_of: dict[str, int] = {}
    for raw in read_lines(stream, max_line_bytes):
        problem: InvalidLine | None = None
        if max_items is not None and total >= max_items:
            problem = InvalidLine(raw.number, f"the file would be cut here: a batch is limited to "
                                              f"{max_items} items (AIVVM_BATCH_MAX_ITEMS)")
        else:
            try:
                request = parse_line(raw, max_line_bytes, defaults)
            except InvalidLine as exc:
                problem = exc
            else:
                first = first_line_of.setdefault(request.id, raw.number)
                if first != raw.number:
                    problem = InvalidLine(raw.number, f"duplicate id {request.id!r} "
                                                      f"(first used on line {first})")
        total += 1
        if problem is not None:
            invalid += 1
            if len(problems) < keep:
                problems.append(problem)
            if max_items is not None and total > max_items:
                break
    return Validation(total, invalid, tuple(problems))
