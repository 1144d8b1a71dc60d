"""Reading the input file and turning each line into an :class:`ItemRequest`.

Both line forms of README.md's Input are accepted, mixed freely. Parsing is pure: a bad
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

from .bodies import CHAT_FIELDS, build_request, kind, shown
from .endpoints import ENDPOINT_URLS, Endpoint, endpoint_of
from .errors import InputFileError, InvalidLine
from .records import ChatMessage, ItemRequest, RequestDefaults, new_chat_message, new_item_request

DEFAULT_MAX_LINE_BYTES = 1024 * 1024
LINE_COUNT_LIMIT = 64 << 20  # bytes of a file scanned for its newlines at most (lines_expected)
SIMPLE_FIELDS = frozenset(
    {"id", "url", "messages", "prompt", "system_message", "model", "temperature", "metadata"}
)
BATCH_FIELDS = frozenset({"custom_id", "method", "url", "body"})
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
               defaults: RequestDefaults = RequestDefaults(), providers: tuple[str, ...] = ()) -> ItemRequest:
    """Turn one raw line into a request, or raise :class:`InvalidLine`.

    ``defaults`` fill what the line lacks (its own values win). ``providers``: the batch's
    provider chain; a line none of them can send as asked is invalid (none given: not checked).
    """
    return parse_data(raw.number, raw.data, raw.oversized, max_line_bytes, defaults, providers)


def parse_data(number: int, data: bytes, oversized: bool = False,
               max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
               defaults: RequestDefaults = RequestDefaults(), providers: tuple[str, ...] = ()) -> ItemRequest:
    """:func:`parse_line` of ``RawLine(number, data, oversized)`` (what :func:`numbered_lines` yields)."""
    if not oversized and (defaults.endpoint is None or defaults.endpoint is Endpoint.CHAT):
        request = _parse_usual(number, data, defaults)
        if request is not None:
            return request  # plain text chat: every provider carries it
    return _parse_any(RawLine(number, data, oversized), max_line_bytes, defaults, providers)


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
            if len(item) != 2 or type(role) is not str or role not in _TEXT_ROLES or type(content) is not str:
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


# deeper, a line is refused whatever the stack of the thread that reads it (json.loads's own limit
# is the interpreter's recursion limit less the frames already on the stack: serve's check of a
# file and its submission disagreed about a line 980 levels deep)
MAX_NESTING = 512
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')


def nesting_depth(text: str) -> int:
    """How deep the arrays and objects of a JSON text go (its strings skipped)."""
    depth = deepest = 0
    for char in _JSON_STRING.sub("", text):
        if char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def _parse_any(raw: RawLine, max_line_bytes: int, defaults: RequestDefaults,
               providers: tuple[str, ...] = ()) -> ItemRequest:
    """:func:`parse_line` for any line: every check, and the message that names the fault."""
    n = raw.number
    if raw.oversized:
        raise InvalidLine(n, f"line is longer than the limit of {max_line_bytes} bytes "
                             "(AIVVM_BATCH_MAX_LINE_BYTES)")
    try:
        text = raw.data.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as exc:
        raise InvalidLine(n, f"not valid UTF-8 (byte {exc.start + 1} of the line)") from None
    if text.count("[") + text.count("{") > MAX_NESTING and nesting_depth(text) > MAX_NESTING:
        raise InvalidLine(n, f"JSON nested too deeply (over {MAX_NESTING} levels)")
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
        raise InvalidLine(n, f"expected a JSON object, got {kind(data)}")
    try:
        if "body" in data or "custom_id" in data:
            return _parse_batch_form(n, data, defaults, providers)
        return _parse_simple_form(n, data, defaults, providers)
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
_TEXT_ROLES = frozenset({"system", "developer", "user", "assistant"})


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
        names = ", ".join(repr(prefix + name) for name in unknown[:5])
        more = f" and {len(unknown) - 5:,} more" if len(unknown) > 5 else ""
        raise InvalidLine(n, f"unknown fields {names}{more} ({expected})")


def _parse_simple_form(n: int, data: dict[str, Any], defaults: RequestDefaults,
                       providers: tuple[str, ...]) -> ItemRequest:
    endpoint = _parse_url(n, data.get("url"), "url", defaults.endpoint)
    if endpoint is Endpoint.CHAT:
        _refuse_unknown(n, data, SIMPLE_FIELDS | CHAT_FIELDS, "",
                        f"expected one of: {', '.join(sorted(SIMPLE_FIELDS))}, or a field of the chat "
                        "completions API such as max_tokens or tools")
    item_id = _parse_id(n, data.get("id"), "id")
    body = {k: v for k, v in data.items() if k not in ("id", "url")}
    return build_request(n, item_id, endpoint, body, "", defaults, providers)


def _parse_batch_form(n: int, data: dict[str, Any], defaults: RequestDefaults,
                      providers: tuple[str, ...]) -> ItemRequest:
    _refuse_unknown(n, data, BATCH_FIELDS, "",
                    f"an OpenAI Batch line has only {', '.join(sorted(BATCH_FIELDS))}")
    if "custom_id" not in data:
        raise InvalidLine(n, "missing (required in the OpenAI Batch form)", "custom_id")
    item_id = _parse_id(n, data["custom_id"], "custom_id")
    method = data.get("method", "POST")
    if method != "POST":
        raise InvalidLine(n, f"must be \"POST\", got {method!r}", "method")
    endpoint = _parse_url(n, data.get("url"), "url", defaults.endpoint)
    body = data.get("body")
    if not isinstance(body, dict):
        raise InvalidLine(n, f"must be an object, got {kind(body)}", "body")
    return build_request(n, item_id, endpoint, body, "body.", defaults, providers)


def _parse_url(n: int, url: Any, name: str, batch_endpoint: Endpoint | None) -> Endpoint:
    """The line's endpoint; with a batch's own, the line must name that one or none."""
    if url is None:
        return batch_endpoint or Endpoint.CHAT
    endpoint = endpoint_of(url) if isinstance(url, str) else None
    if endpoint is None:
        raise InvalidLine(n, f"must be one of {ENDPOINT_URLS}, got {shown(url)}", name)
    if batch_endpoint is not None and endpoint is not batch_endpoint:
        raise InvalidLine(n, f"is {endpoint.value}, but the batch's endpoint is {batch_endpoint.value} "
                             "(every line of a batch goes to its endpoint)", name)
    return endpoint


def _parse_id(n: int, value: Any, name: str) -> str:
    if value is None:
        if name == "custom_id":
            raise InvalidLine(n, "must not be null", name)
        return default_id(n)
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise InvalidLine(n, f"must be a string or an integer, got {kind(value)}", name)
    text = str(value)
    if not text.strip():
        raise InvalidLine(n, "must not be empty", name)
    if len(text) > 512:
        raise InvalidLine(n, "is longer than 512 characters", name)
    return text


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
                   keep: int = 10, providers: tuple[str, ...] = ()) -> Validation:
    """Check every line as ``submit`` would for ``providers``, duplicate ids included, calling nothing.

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
                request = parse_line(raw, max_line_bytes, defaults, providers)
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
