"""Joining a streamed reply into what the server would have answered without streaming: pure.

Fed the parsed events of one reply (JSON objects, in order), a joiner hands out the text
of the first choice as it comes and, at the end, builds the body of the unstreamed answer:

* :class:`ChatJoiner`: ``chat.completion.chunk`` events -> a ``ChatCompletion``;
* :class:`CompletionsJoiner`: ``text_completion`` events -> a ``Completion``;
* :class:`ResponsesJoiner`: Responses API events -> the final ``Response`` as sent;
* :func:`embeddings_body`: the one JSON body of ``/embeddings`` -> a ``CreateEmbeddingResponse``.

The plain-text chat stream is the hot path (thousands of small events a second): an event
whose only choice is choice 0 with a text delta costs a few dictionary lookups and two
appends; anything else takes the general path. Strings are kept as lists of pieces and
joined once at the end, so what a joiner holds is a small multiple of the bytes it was
fed, never quadratic in them; indexed entries are kept by index in dictionaries (a
server's ``index`` of 10**9 allocates nothing).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from ..errors import EmptyReply, MalformedReply, ProviderError, ProviderHTTPError
from .call import Item, StreamEnd
from .credentials import redact

Event = dict[str, Any]
# Bounds on what a reply may start, so that a joiner holds a small multiple of what it was fed:
# a choice or a tool call costs some hundred bytes held, and is named by a dozen sent.
MAX_CHOICES = 1024  # distinct choice indexes (OpenAI's n is at most 128)
MAX_TOOL_CALLS = 1024  # tool calls of all choices
MAX_FIELDS = 16384  # fields and indexed entries made by joining deltas other than text (all choices)
MAX_DEPTH = 32  # objects within objects in a delta (a real one nests four or five deep)
BYTES_PER_CONTAINER = 16  # a reply may keep one JSON object or list per this many bytes it may send
# keys whose first value is kept when a server repeats them on every fragment (a name that
# differs from the one kept is the rest of it: a few servers split a tool's name too)
_KEEP_FIRST = frozenset({"id", "type", "name", "role", "index", "object"})
# the keys of a chat chunk's choice the joiner reads; any other (vLLM's stop_reason, Azure's
# content_filter_results...) is kept on the answer's choice as last sent
CHOICE_KEYS = frozenset({"index", "delta", "logprobs", "finish_reason", "text"})
# Responses API error codes that blame the request: another attempt would fail (and pay) again.
# The others (server_error, rate_limit_exceeded, vector_store_timeout, unknown ones) are transient.
PERMANENT_RESPONSE_CODES = frozenset({
    "invalid_prompt", "data_residency_mismatch", "bio_policy", "misalignment_policy_violation",
    "invalid_image", "invalid_image_format", "invalid_base64_image", "invalid_image_url", "image_too_large",
    "image_too_small", "image_parse_error", "image_content_policy_violation", "invalid_image_mode",
    "image_file_too_large", "unsupported_image_media_type", "empty_image_file", "failed_to_download_image",
    "image_file_not_found",
})


class ResponseFailed(ProviderError):
    """A Responses API stream ended with ``response.failed``: the server's error code is the kind.

    Transient for server-side codes (``server_error``, ``rate_limit_exceeded``,
    ``vector_store_timeout``) and for codes this worker does not know, as a 500 is;
    permanent for the documented ones that blame the request (``invalid_prompt``,
    ``invalid_image``...), which another attempt would only pay for again.
    """

    def __init__(self, message: str, code: str | None) -> None:
        super().__init__(message)
        self.kind = code or "server_error"
        self.transient = code not in PERMANENT_RESPONSE_CODES


class NonFiniteNumber(ValueError):
    """JSON has no NaN or Infinity (Python's json reads them; nothing reading our results would)."""


def _no_constant(name: str) -> Any:
    raise NonFiniteNumber(f"holds {name}, which JSON does not allow")


_STRICT = json.JSONDecoder(parse_constant=_no_constant)


def strict_json(text: str) -> Any:
    """``json.loads`` without NaN, Infinity and -Infinity (ValueError), as RFC 8259 has it."""
    return _STRICT.decode(text)


# -- generic accumulation of deltas ---------------------------------------------------------


class _Text(list[str]):
    """A string arriving in pieces, joined once by :func:`_final`."""


class _Indexed(dict[int, dict[str, Any]]):
    """A list whose entries arrive as fragments keyed by their ``index``."""


def _indexed(value: list[Any]) -> bool:
    return bool(value) and all(type(v) is dict and type(v.get("index")) is int for v in value)


class _Budget:
    """What one reply may still start: tool calls, and fields made by :func:`_merge`."""

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


def _keep_fields(fields: dict[str, Any] | None, choice: Mapping[str, Any], budget: _Budget) -> dict[str, Any] | None:
    """A choice's keys beyond those joined, as last sent (nulls add nothing)."""
    for key, value in choice.items():
        if value is not None and key not in CHOICE_KEYS:
            if fields is None:
                fields = {}
            if key not in fields:
                budget.spend_field()
            fields[key] = value
    return fields


def _merge(acc: dict[str, Any], delta: Mapping[str, Any], budget: _Budget, depth: int = 0) -> None:
    """Accumulate ``delta`` into ``acc`` as the streaming APIs define it.

    Strings are concatenated (but ids, types and names keep their first value), objects
    merged, lists of indexed fragments merged by index, other lists extended, numbers and
    booleans replaced; nulls add nothing. Each field or indexed entry made is spent from
    ``budget``; a delta nested deeper than :data:`MAX_DEPTH` is malformed.
    """
    if depth > MAX_DEPTH:
        raise MalformedReply("an event of the stream is nested too deeply")
    for key, value in delta.items():
        if value is None:
            continue
        if key not in acc:
            budget.spend_field()
        old = acc.get(key)
        kind = type(value)
        if key in _KEEP_FIRST:
            if old is None or old == "":
                acc[key] = value
            elif key == "name" and kind is str and type(old) is str and value != old:
                acc[key] = old + value
        elif kind is str:
            if type(old) is _Text:
                old.append(value)
            else:
                acc[key] = _Text([value])
        elif kind is dict:
            if type(old) is not dict:
                acc[key] = old = {}
            _merge(old, value, budget, depth + 1)
        elif kind is list:
            if type(old) is _Indexed or (old is None and _indexed(value)):
                if type(old) is not _Indexed:
                    acc[key] = old = _Indexed()
                for entry in value:
                    if type(entry) is dict and type(entry.get("index")) is int:
                        fragment = old.get(entry["index"])
                        if fragment is None:
                            budget.spend_field()
                            fragment = old[entry["index"]] = {}
                        _merge(fragment, entry, budget, depth + 1)
            elif type(old) is list:
                old.extend(value)
            else:
                acc[key] = list(value)
        else:
            acc[key] = value


def _final(value: Any) -> Any:
    """The accumulated value as JSON: pieces joined, indexed fragments listed by index."""
    kind = type(value)
    if kind is _Text:
        return "".join(value)
    if kind is _Indexed:
        return [_final(value[i]) for i in sorted(value)]
    if kind is dict:
        return {k: _final(v) for k, v in value.items()}
    return value


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


def _tokens(usage: Mapping[str, Any] | None, key: str) -> int | None:
    value = usage.get(key) if usage is not None else None
    return value if type(value) is int else None


# -- chat completions -----------------------------------------------------------------------


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
        acc = _final(self.acc)
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

    def __init__(self, budget: _Budget) -> None:
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
                _merge(self.extra, {key: value}, self.budget)

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
        _merge(call.acc, fragment, self.budget)

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
            for key, value in _final(self.extra).items():
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


class _Choice(Protocol):
    finish_reason: Any

    def final(self, index: int) -> dict[str, Any]: ...


C = TypeVar("C", bound=_Choice)


class _ChoicesJoiner(Generic[C]):
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
        return StreamEnd(self.finish_reason, _tokens(self._usage, "prompt_tokens"),
                         _tokens(self._usage, "completion_tokens"), body=self.body())


class ChatJoiner(_ChoicesJoiner[_ChatChoice]):
    """``chat.completion.chunk`` objects -> the ``ChatCompletion`` the server would have answered.

    :meth:`add` appends choice 0's text pieces to ``out`` as they come; :meth:`end` is the
    :class:`StreamEnd` with the joined body. Error events are the caller's business.
    """

    __slots__ = ()
    OBJECT = "chat.completion"
    META_KEYS = ("system_fingerprint", "service_tier", "prompt_filter_results")

    def __init__(self) -> None:
        budget = _Budget()  # shared by the reply's choices
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
                state.fields = _keep_fields(state.fields, choice, state.budget)
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
                state.fields = _keep_fields(state.fields, choice, state.budget)

    def check_not_empty(self) -> None:
        """Raise :class:`EmptyReply` when no choice said anything and none ran out of tokens."""
        for state in self._choices.values():
            if state.content or state.has_output or state.finish_reason == "length":
                return
        raise EmptyReply("the server streamed no text, refusal or tool call")


# -- legacy completions ---------------------------------------------------------------------


LEGACY_LOGPROBS = ("tokens", "token_logprobs", "top_logprobs", "text_offset")


class _TextChoice:
    __slots__ = ("text", "logprobs", "finish_reason", "fields", "budget")

    def __init__(self, budget: _Budget) -> None:
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


class CompletionsJoiner(_ChoicesJoiner[_TextChoice]):
    """``text_completion`` events -> the ``Completion`` the server would have answered."""

    __slots__ = ()
    OBJECT = "text_completion"
    META_KEYS = ("system_fingerprint", "prompt_filter_results")

    def __init__(self) -> None:
        budget = _Budget()
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
                state.fields = _keep_fields(state.fields, choice, state.budget)
                kept = True
        return kept

    def check_not_empty(self) -> None:
        states = self._choices.values()
        if not any(s.text for s in states) and not any(s.finish_reason == "length" for s in states):
            raise EmptyReply("the server streamed no text")


# -- the Responses API ----------------------------------------------------------------------


class ResponsesJoiner:
    """Responses API events: the text deltas as they come; the final ``Response`` as sent.

    ``response.completed`` and ``response.incomplete`` end the reply with their
    ``response``; ``response.failed`` raises :class:`ResponseFailed`; an ``error`` event
    raises :class:`ProviderHTTPError` (as a chat stream's error event does).
    """

    __slots__ = ("response", "_incomplete", "_api_key")

    def __init__(self, api_key: str | None = None) -> None:
        self.response: dict[str, Any] | None = None  # set when the reply is complete
        self._incomplete = False
        self._api_key = api_key

    @property
    def complete(self) -> bool:
        return self.response is not None

    def add(self, event: Event, out: list[Item]) -> None:
        kind = event.get("type")
        if kind == "response.output_text.delta":
            delta = event.get("delta")
            if delta and type(delta) is str:
                out.append(delta)
        elif kind in ("response.completed", "response.incomplete"):
            response = event.get("response")
            if type(response) is not dict or type(response.get("output")) is not list:
                raise MalformedReply(f"a {kind} event has no response object with an output list")
            status = response.get("status")
            if status in ("failed", "cancelled"):
                raise ResponseFailed(f"{kind} with status {status}", None)
            if not response["output"] and kind == "response.completed":
                raise EmptyReply("the response has no output")
            self.response = response
            self._incomplete = kind == "response.incomplete" or response.get("status") == "incomplete"
        elif kind == "response.failed":
            response = event.get("response")
            error = response.get("error") if type(response) is dict else None
            if type(error) is not dict:
                error = {}
            code = error.get("code")
            message = self._clean(error.get("message") or "the response failed")
            raise ResponseFailed(f"response.failed: {message}", str(code) if code else None)
        elif kind == "error":
            raise ProviderHTTPError(500, self._clean(event.get("message", "")),
                                    kind=str(event.get("code") or "server_error"))

    def _clean(self, message: Any) -> str:
        return redact(str(message), [self._api_key])[:300]

    def end(self) -> StreamEnd:
        response = self.response or {}
        reason: str | None = "stop"
        if self._incomplete:
            details = response.get("incomplete_details")
            why = details.get("reason") if type(details) is dict else None
            reason = "length" if why == "max_output_tokens" else (str(why) if why else "incomplete")
        usage = response.get("usage")
        usage = usage if type(usage) is dict else None
        return StreamEnd(reason, _tokens(usage, "input_tokens"), _tokens(usage, "output_tokens"),
                         body=self.response)


# -- embeddings -----------------------------------------------------------------------------


def embeddings_count(value: Any) -> int | None:
    """How many vectors an embeddings ``input`` asks for: one per string or token list."""
    if type(value) is str:
        return 1
    if type(value) is list and value:
        return 1 if all(type(v) is int for v in value) else len(value)
    return None


def embeddings_body(data: bytes, api_key: str | None = None, expected: int | None = None) -> StreamEnd:
    """The one JSON body of ``/embeddings``: an object with a ``data`` list, kept as parsed.

    Each entry must hold an ``embedding`` (a list of numbers, or base64 text), one per input
    (``expected``), numbered from 0 as the inputs are: anything else answers no line.
    """
    try:
        body = strict_json(data.decode("utf-8-sig"))
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        start = redact(data[:100].decode("utf-8", errors="replace"), [api_key])
        why = str(exc) if isinstance(exc, NonFiniteNumber) else "is not JSON"
        raise MalformedReply(f"the embeddings reply {why}: {start!r}") from None
    if type(body) is dict and type(body.get("data")) is not list and "error" in body:
        error = body["error"] if type(body["error"]) is dict else {"message": body["error"]}
        raise ProviderHTTPError(500, redact(str(error.get("message", "")), [api_key])[:300],
                                kind=str(error.get("type") or error.get("code") or "server_error"))
    if type(body) is not dict or type(body.get("data")) is not list:
        raise MalformedReply("the embeddings reply is not an object with a data list")
    entries = body["data"]
    if expected is not None and len(entries) != expected:
        raise MalformedReply(f"the embeddings reply has {len(entries)} vectors for {expected} inputs")
    for position, entry in enumerate(entries):
        vector = entry.get("embedding") if type(entry) is dict else None
        if type(vector) is not list and type(vector) is not str:
            raise MalformedReply(f"the embeddings reply's entry {position} holds no embedding")
        if type(vector) is list and not all(type(x) is float or type(x) is int for x in vector):
            raise MalformedReply(f"the embeddings reply's entry {position} is not a list of numbers")
    usage = body.get("usage")
    usage = usage if type(usage) is dict else None
    return StreamEnd(None, _tokens(usage, "prompt_tokens"), 0, body=body)


__all__ = ["ChatJoiner", "CompletionsJoiner", "Containers", "NonFiniteNumber", "ResponseFailed", "ResponsesJoiner",
           "embeddings_body", "embeddings_count", "strict_json"]
