"""Bounds on what a reply may start, so that a joiner holds a small multiple of what it was fed:
a choice or a tool call costs some hundred bytes held, and is named by a dozen sent."""

from __future__ import annotations

from ...errors import MalformedReply

MAX_CHOICES = 1024  # distinct choice indexes (OpenAI's n is at most 128)
MAX_TOOL_CALLS = 1024  # tool calls of all choices
MAX_FIELDS = 16384  # fields and indexed entries made by joining deltas other than text (all choices)
MAX_DEPTH = 32  # objects within objects in a delta (a real one nests four or five deep)
BYTES_PER_CONTAINER = 16  # a reply may keep one JSON object or list per this many bytes it may send


class Budget:
    """What one reply may still start: tool calls, and fields made by :func:`merge_delta`."""

    __slots__ = ("calls", "fields")

    def __init__(self) -> None:
        self.calls = MAX_TOOL_CALLS
        self.fields = MAX_FIELDS

    def spend_field(self) -> None:
        self.fields -= 1
        if self.fields < 0:
            raise MalformedReply(f"the stream's deltas make more than {MAX_FIELDS} fields")


class Containers:
    """The JSON objects and lists a reply's kept events may hold: parsed, an empty object costs some
    60 bytes for its 3 sent, so a budget in bytes alone would let a reply hold 20 times its size."""

    __slots__ = ("left", "limit")

    def __init__(self, max_bytes: int | None) -> None:
        self.limit = max(MAX_FIELDS, (max_bytes or 0) // BYTES_PER_CONTAINER)
        self.left = self.limit

    def spend(self, data: str) -> None:
        """Charge an event kept (beyond its text): every ``{`` and ``[`` in it (a bound from above)."""
        self.left -= data.count("{") + data.count("[")
        if self.left < 0:
            raise MalformedReply(f"the reply holds more than {self.limit} JSON objects and lists")
