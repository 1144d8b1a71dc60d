"""Joining a chat completions stream: ``chat.completion.chunk`` events -> a ``ChatCompletion``.

The plain-text chat stream is the hot path (thousands of small events a second): an event
whose only choice is choice 0 with a text delta costs a few dictionary lookups and two
appends; anything else takes the general path.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ...errors import EmptyReply, MalformedReply
from ..call import Item
from .bounds import MAX_TOOL_CALLS, Budget
from .choices import ChoicesJoiner, keep_fields
from .deltas import final_value, merge_delta
from .json_values import Event


class _ToolCall:
    __slots__ = ("acc",)

    def __init__(self) -> None:
        self.acc: dict[str, Any] = {}

    @property
    def id(self) -> Any:
        return self.acc.get("id")

    def final(self) -> dict[str, Any]:
        """The call as answered; one without an id, or a function call without a name, is malformed
        (the SDK's ``ChatCompletionMessageToolCall`` requires both, and no one could answer it)."""
        acc = final_value(self.acc)
        acc.pop("index", None)
        call: dict[str, Any] = {"id": acc.pop("id", None), "type": acc.pop("type", None) or "function"}
        call.update(acc)
        if not call["id"] or type(call["id"]) is not str:
            raise MalformedReply("a tool call of the reply has no id")
        function = call.get("function")
        if call["type"] == "function" and (type(function) is not dict or not function.get("name")
                                           or type(function["name"]) is not str):
            raise MalformedReply("a function call of the reply has no name")
        return call


class _ChatChoice:
    """One choice of a chat stream, as it accumulates (containers made when first needed)."""

    __slots__ = ("content", "refusal", "refusal_sent", "calls", "by_index", "extra", "logprobs",
                 "finish_reason", "fields", "budget")

    def __init__(self, budget: Budget) -> None:
        self.content: list[str] = []
        self.refusal: list[str] | None = None
        self.refusal_sent = False  # a delta had the key (OpenAI sends "refusal": null; others none)
        self.calls: list[_ToolCall] | None = None
        self.by_index: dict[int, _ToolCall] | None = None
        self.extra: dict[str, Any] | None = None  # other delta fields (function_call, audio, reasoning_content...)
        self.logprobs: dict[str, list[Any] | None] | None = None
        self.finish_reason: Any = None
        self.fields: dict[str, Any] | None = None  # the choice's own other keys (vLLM's stop_reason...)
        self.budget = budget  # shared by the reply's choices

    @property
    def has_output(self) -> bool:
        extra = self.extra or {}
        return bool(self.content or self.refusal or self.calls or extra.get("function_call") or extra.get("audio"))

    def add_delta(self, delta: Mapping[str, Any], out: list[Item] | None) -> None:
        for key, value in delta.items():
            if value is None:
                if key == "refusal":
                    self.refusal_sent = True
                continue
            if key == "content":
                if type(value) is str and value:
                    self.content.append(value)
                    if out is not None:
                        out.append(value)
            elif key == "refusal":
                self.refusal_sent = True
                if type(value) is str and value:
                    if self.refusal is None:
                        self.refusal = []
                    self.refusal.append(value)
            elif key == "role":
                pass  # the answer's role is "assistant"
            elif key == "tool_calls":
                if type(value) is list:
                    for fragment in value:
                        if type(fragment) is dict:
                            self._tool_call(fragment)
            else:
                if self.extra is None:
                    self.extra = {}
                merge_delta(self.extra, {key: value}, self.budget)

    def _tool_call(self, fragment: dict[str, Any]) -> None:
        """One fragment: the first of its call carries id, type and name, the rest arguments.

        Fragments are matched by ``index``; a fragment whose ``id`` differs from its index's
        call starts another call (servers that number every call 0), and a server that sends
        no index continues the last call until a new id comes.
        """
        if self.calls is None or self.by_index is None:
            self.calls, self.by_index = [], {}
        index = fragment.get("index")
        ident = fragment.get("id")
        call: _ToolCall | None
        if type(index) is int:
            call = self.by_index.get(index)
            if call is not None and ident and call.id and ident != call.id:
                call = None
            if call is None:
                call = self.by_index[index] = self._new_call()
        else:
            call = self.calls[-1] if self.calls else None
            if call is None or (ident and call.id and ident != call.id):
                call = self._new_call()
        merge_delta(call.acc, fragment, self.budget)

    def _new_call(self) -> _ToolCall:
        if self.budget.calls <= 0:
            raise MalformedReply(f"the stream starts more than {MAX_TOOL_CALLS} tool calls")
        self.budget.calls -= 1
        call = _ToolCall()
        assert self.calls is not None
        self.calls.append(call)
        return call

    def add_logprobs(self, logprobs: Mapping[str, Any]) -> None:
        if self.logprobs is None:
            self.logprobs = {"content": None, "refusal": None}
        for key in ("content", "refusal"):
            value = logprobs.get(key)
            if type(value) is list:
                kept = self.logprobs[key]
                if kept is None:
                    self.logprobs[key] = list(value)
                else:
                    kept.extend(value)

    def final(self, index: int) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": "".join(self.content) if self.content else None}
        if self.refusal_sent:
            message["refusal"] = "".join(self.refusal) if self.refusal else None
        if self.calls:
            message["tool_calls"] = [call.final() for call in self.calls]
        if self.extra:
            for key, value in final_value(self.extra).items():
                message.setdefault(key, value)
        choice = {"index": index, "message": message, "logprobs": self.logprobs,
                  "finish_reason": self.finish_reason}
        if self.fields:
            choice.update(self.fields)
        return choice


def _only_text(delta: dict[str, Any]) -> bool:
    """The delta has text, a role and nulls only (LiteLLM sends ``"tool_calls": null``...); a
    ``refusal`` key, even null, is for the general path (the answer has the key when it came)."""
    for key, value in delta.items():
        if (value is not None or key == "refusal") and key != "content" and key != "role":
            return False
    return True


class ChatJoiner(ChoicesJoiner[_ChatChoice]):
    """``chat.completion.chunk`` objects -> the ``ChatCompletion`` the server would have answered.

    :meth:`add` appends choice 0's text pieces to ``out`` as they come; :meth:`end` is the
    :class:`StreamEnd` with the joined body. Error events are the caller's business.
    """

    __slots__ = ()
    OBJECT = "chat.completion"
    META_KEYS = ("system_fingerprint", "service_tier", "prompt_filter_results")

    def __init__(self) -> None:
        budget = Budget()  # shared by the reply's choices
        super().__init__(lambda: _ChatChoice(budget))

    def add(self, event: Event, out: list[Item]) -> bool:
        """Take one event; True if it kept more than text (the caller charges its containers)."""
        self._take_envelope(event)
        # The fast path: one choice, choice 0, whose delta is text (beside a role and nulls),
        # without logprobs. Any other shape (or a server's odd types) fails a test or a lookup
        # here and takes the general path.
        try:
            (choice,) = event["choices"]
            delta = choice["delta"]
            content = delta["content"]
            if (type(content) is str and choice.get("index", 0) == 0 and choice.get("logprobs") is None
                    and (len(delta) == 1 or _only_text(delta))):
                state = self._zero or self._choice(0)
                if content:
                    state.content.append(content)
                    out.append(content)
                reason = choice.get("finish_reason")
                if reason:
                    state.finish_reason = reason
                if len(choice) <= 4:  # index, delta, logprobs, finish_reason
                    return False
                state.fields = keep_fields(state.fields, choice, state.budget)
                return True
        except (KeyError, TypeError, ValueError, AttributeError):
            pass
        choices = event.get("choices")
        if type(choices) is list:
            try:
                self._general(choices, out)
            except RecursionError:
                raise MalformedReply("an event of the stream is nested too deeply") from None
        return True

    def _general(self, choices: list[Any], out: list[Item]) -> None:
        for choice in choices:
            if type(choice) is not dict:
                continue
            index = self._index(choice)
            state = self._choices.get(index) or self._choice(index)
            delta = choice.get("delta")
            if type(delta) is dict:
                state.add_delta(delta, out if index == 0 else None)
            logprobs = choice.get("logprobs")
            if type(logprobs) is dict:
                state.add_logprobs(logprobs)
            reason = choice.get("finish_reason")
            if reason:
                state.finish_reason = reason
            if len(choice) > 4:
                state.fields = keep_fields(state.fields, choice, state.budget)

    def check_not_empty(self) -> None:
        """Raise :class:`EmptyReply` when no choice said anything and none ran out of tokens."""
        for state in self._choices.values():
            if state.content or state.has_output or state.finish_reason == "length":
                return
        raise EmptyReply("the server streamed no text, refusal or tool call")
