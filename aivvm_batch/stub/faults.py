"""The directive language: ``[[stub k=v ...]]`` inside a message, and the :class:`FaultPlan` it makes.

A message may carry one directive; it is removed from the prompt text and
either injects a fault (``fault=status|429|cut|stall|badbytes|split|empty|reset``,
and for the OpenAI endpoints ``badjson|notjson|refusal|failed``) or changes the
reply (``latency=``, ``chunks=``, ``words=``, ``bytes=``).  ``times=N`` limits a
fault to the first N requests with the same messages.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Sequence

from .text import message_text

FAULTS = frozenset(
    {
        "status", "429", "cut", "stall", "badbytes", "split", "empty", "reset",
        # OpenAI endpoints only (the Aivvm protocol answers as without a fault)
        "badjson", "notjson", "refusal", "failed",
    }
)
DIRECTIVE_KEYS = frozenset(
    {"fault", "code", "retry_after", "stall", "times", "latency", "chunks", "words", "bytes"}
)
DEFAULT_STALL = 30.0

_DIRECTIVE_RE = re.compile(r"[ \t]*\[\[stub(?P<body>(?:\s+[^\s\[\]]+)*)\s*\]\][ \t]*")


def parse_directive(text: str) -> tuple[dict[str, str], str]:
    """Find the first ``[[stub k=v ...]]`` in ``text``.

    Returns ``(options, text_without_directive)``; the remaining text is
    stripped, and words on both sides of a removed inline directive are kept
    one space apart.  Without a directive: ``({}, text.strip())``.  A token
    without ``=`` maps to an empty value; a repeated key keeps the last value.
    """
    match = _DIRECTIVE_RE.search(text)
    if match is None:
        return {}, text.strip()
    options: dict[str, str] = {}
    for token in match.group("body").split():
        key, _, value = token.partition("=")
        options[key] = value
    before, after = text[: match.start()], text[match.end() :]
    glue = " " if before[-1:].strip() and after[:1].strip() else ""
    return options, (before + glue + after).strip()


def has_directive(text: str) -> bool:
    """Whether ``text`` carries a directive."""
    return _DIRECTIVE_RE.search(text) is not None


def find_directive(messages: Sequence[dict[str, Any]]) -> dict[str, str]:
    """Options of the directive in the latest message that carries one."""
    for message in reversed(messages):
        text = message_text(message.get("content"))
        if _DIRECTIVE_RE.search(text):
            return parse_directive(text)[0]
    return {}


@dataclass(frozen=True)
class FaultPlan:
    """What to do for one request, after merging its directive with server knobs."""

    fault: str | None = None
    code: int = 500
    retry_after: int = 1
    stall: float = DEFAULT_STALL
    times: int | None = None
    latency: float = 0.0
    chunks: int = 4
    words: int | None = None
    reply_bytes: int | None = None

    @property
    def error_status(self) -> int | None:
        """HTTP error status this plan answers with, if any."""
        if self.fault == "status":
            return self.code
        if self.fault == "429":
            return 429
        return None


def _int_option(options: dict[str, str], key: str, default: int, lo: int, hi: int | None = None) -> int:
    if key not in options:
        return default
    try:
        value = int(options[key])
    except ValueError:
        raise ValueError(f"stub directive: {key}={options[key]!r} is not an integer") from None
    if value < lo or (hi is not None and value > hi):
        bounds = f">= {lo}" if hi is None else f"in {lo}..{hi}"
        raise ValueError(f"stub directive: {key} must be {bounds}")
    return value


def _float_option(options: dict[str, str], key: str, default: float) -> float:
    if key not in options:
        return default
    try:
        value = float(options[key])
    except ValueError:
        raise ValueError(f"stub directive: {key}={options[key]!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"stub directive: {key} must be a finite number >= 0")
    return value


def build_plan(
    options: dict[str, str], *, latency: float = 0.0, chunks: int = 4, reply_bytes: int | None = None
) -> FaultPlan:
    """Validate directive ``options`` into a :class:`FaultPlan`.

    ``latency``/``chunks``/``reply_bytes`` are the server-wide defaults the
    directive may override (``bytes=N``).  Raises ``ValueError`` for unknown keys, unknown faults or bad
    numbers (the server answers those with 400).
    """
    unknown = sorted(set(options) - DIRECTIVE_KEYS)
    if unknown:
        raise ValueError(f"stub directive: unknown key(s) {', '.join(unknown)}")
    fault = options.get("fault")
    if fault is not None and fault not in FAULTS:
        raise ValueError(f"stub directive: unknown fault {fault!r}")
    return FaultPlan(
        fault=fault,
        code=_int_option(options, "code", 500, 400, 599),
        retry_after=_int_option(options, "retry_after", 1, 0),
        stall=_float_option(options, "stall", DEFAULT_STALL),
        times=_int_option(options, "times", 0, 0) if "times" in options else None,
        latency=_float_option(options, "latency", latency),
        chunks=_int_option(options, "chunks", chunks, 1),
        words=_int_option(options, "words", 0, 0) if "words" in options else None,
        reply_bytes=_int_option(options, "bytes", 0, 0) if "bytes" in options else reply_bytes,
    )
