"""Joining a legacy completions stream: ``text_completion`` events -> a ``Completion``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ...errors import EmptyReply
from ..call import Item
from .bounds import Budget
from .choices import ChoicesJoiner, keep_fields
from .json_values import Event


LEGACY_LOGPROBS = ("tokens", "token_logprobs", "top_logprobs", "text_offset")


class _TextChoice:
    __slots__ = ("text", "logprobs", "finish_reason", "fields", "budget")

    def __init__(self, budget: Budget) -> None:
        self.text: list[str] = []
        self.logprobs: dict[str, Any] | None = None
        self.finish_reason: Any = None
        self.fields: dict[str, Any] | None = None
        self.budget = budget

    def add_logprobs(self, logprobs: Mapping[str, Any]) -> None:
        """The legacy form: lists (tokens, token_logprobs, top_logprobs, text_offset) to concatenate."""
        if self.logprobs is None:
            self.logprobs = {key: None for key in LEGACY_LOGPROBS}
        for key in LEGACY_LOGPROBS:
            value = logprobs.get(key)
            if type(value) is list:
                kept = self.logprobs[key]
                if type(kept) is list:
                    kept.extend(value)
                else:
                    self.logprobs[key] = list(value)

    def final(self, index: int) -> dict[str, Any]:
        choice = {"index": index, "text": "".join(self.text), "logprobs": self.logprobs,
                  "finish_reason": self.finish_reason}
        if self.fields:
            choice.update(self.fields)
        return choice


class CompletionsJoiner(ChoicesJoiner[_TextChoice]):
    """``text_completion`` events -> the ``Completion`` the server would have answered."""

    __slots__ = ()
    OBJECT = "text_completion"
    META_KEYS = ("system_fingerprint", "prompt_filter_results")

    def __init__(self) -> None:
        budget = Budget()
        super().__init__(lambda: _TextChoice(budget))

    def add(self, event: Event, out: list[Item]) -> bool:
        """Take one event; True if it kept more than text (logprobs, other keys)."""
        self._take_envelope(event)
        choices = event.get("choices")
        kept = False
        if type(choices) is not list:
            return kept
        for choice in choices:
            if type(choice) is not dict:
                continue
            index = self._index(choice)
            state = self._choices.get(index) or self._choice(index)
            text = choice.get("text")
            if text and type(text) is str:
                state.text.append(text)
                if index == 0:
                    out.append(text)
            logprobs = choice.get("logprobs")
            if type(logprobs) is dict:
                state.add_logprobs(logprobs)
                kept = True
            reason = choice.get("finish_reason")
            if reason:
                state.finish_reason = reason
            if len(choice) > 4:
                state.fields = keep_fields(state.fields, choice, state.budget)
                kept = True
        return kept

    def check_not_empty(self) -> None:
        states = self._choices.values()
        if not any(s.text for s in states) and not any(s.finish_reason == "length" for s in states):
            raise EmptyReply("the server streamed no text")
