"""What the chat and the text completions joiners share: the envelope of the events, the
choices by index (each one's other keys kept as last sent), the answer's body and the end."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from ...errors import MalformedReply
from ..call import StreamEnd
from .bounds import MAX_CHOICES, Budget
from .json_values import Event, token_count

# the keys of a chat chunk's choice the joiner reads; any other (vLLM's stop_reason, Azure's
# content_filter_results...) is kept on the answer's choice as last sent
CHOICE_KEYS = frozenset({"index", "delta", "logprobs", "finish_reason", "text"})
# the top-level keys of a stream that every event repeats
META_KEYS = ("id", "created", "model", "system_fingerprint", "service_tier", "prompt_filter_results")


def _take_meta(meta: dict[str, Any], event: Event) -> bool:
    """The stream's top-level fields (the same on every chunk): those ``event`` has and ``meta``
    lacks or has empty (Azure's first event has ``"id": ""``). True once ``meta`` has an id."""
    for key in META_KEYS:
        if key in event and not meta.get(key):
            meta[key] = event[key]
    return bool(meta.get("id"))


def _check_choices(choices: Mapping[int, Any]) -> None:
    if len(choices) >= MAX_CHOICES:
        raise MalformedReply(f"the stream has more than {MAX_CHOICES} choices")


def keep_fields(fields: dict[str, Any] | None, choice: Mapping[str, Any], budget: Budget) -> dict[str, Any] | None:
    """A choice's keys beyond those joined, as last sent (nulls add nothing)."""
    for key, value in choice.items():
        if value is not None and key not in CHOICE_KEYS:
            if fields is None:
                fields = {}
            if key not in fields:
                budget.spend_field()
            fields[key] = value
    return fields


class Choice(Protocol):
    finish_reason: Any

    def final(self, index: int) -> dict[str, Any]: ...


C = TypeVar("C", bound=Choice)


class ChoicesJoiner(Generic[C]):
    """What the chat and the text completions joiners share: the envelope taken from the events
    (the first until one has an id, and the usage event), choices by index, the end."""

    __slots__ = ("_new_choice", "_choices", "_zero", "_meta", "_meta_open", "_usage")
    OBJECT: ClassVar[str]
    META_KEYS: ClassVar[tuple[str, ...]]  # top-level keys kept when the server sends them

    def __init__(self, new_choice: Callable[[], C]) -> None:
        self._new_choice = new_choice
        self._choices: dict[int, C] = {}
        self._zero: C | None = None
        self._meta: dict[str, Any] = {}
        self._meta_open = True
        self._usage: dict[str, Any] | None = None

    def _take_envelope(self, event: Event) -> None:
        if self._meta_open:
            self._meta_open = not _take_meta(self._meta, event)
        usage = event.get("usage")
        if usage is not None and type(usage) is dict:
            self._usage = usage
            _take_meta(self._meta, event)

    @staticmethod
    def _index(choice: dict[str, Any]) -> int:
        index = choice.get("index")
        if index is None:
            return 0
        if type(index) is not int:
            raise MalformedReply(f"a choice's index is not an integer: {str(index)[:40]!r}")
        return index

    def _choice(self, index: int) -> C:
        _check_choices(self._choices)
        state = self._choices[index] = self._new_choice()
        if index == 0:
            self._zero = state
        return state

    @property
    def finished(self) -> bool:
        """Some choice said why it ended."""
        return any(state.finish_reason for state in self._choices.values())

    @property
    def finish_reason(self) -> Any:
        """Choice 0's (else the first choice's) finish_reason."""
        state = self._zero or (self._choices[min(self._choices)] if self._choices else None)
        return state.finish_reason if state is not None else None

    def body(self) -> dict[str, Any]:
        """The answer; choices must be numbered from 0 without a gap, as the server's own answer's are."""
        indexes = sorted(self._choices)
        if indexes and indexes[-1] != len(indexes) - 1:
            raise MalformedReply(f"the reply's choices are numbered {indexes[:3]}..., not from 0 without gaps")
        meta = self._meta
        body: dict[str, Any] = {
            "id": meta.get("id"),
            "object": self.OBJECT,
            "created": meta.get("created"),
            "model": meta.get("model"),
            "choices": [self._choices[i].final(i) for i in indexes],
            "usage": self._usage,
        }
        for key in self.META_KEYS:
            if key in meta:
                body[key] = meta[key]
        return body

    def end(self) -> StreamEnd:
        return StreamEnd(self.finish_reason, token_count(self._usage, "prompt_tokens"),
                         token_count(self._usage, "completion_tokens"), body=self.body())
