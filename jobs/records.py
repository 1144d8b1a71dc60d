"""Records of a batch: requests, results and batch metadata, with their JSON forms."""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from .answers import Answer
from .endpoints import Endpoint

# What ``json.dumps(value, ensure_ascii=False, separators=(",", ":"))`` does, built once:
# the encoder of a whole value, and the one of a string (the one that encoder uses itself).
_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_encode_str = json.encoder.encode_basestring
_encode_ascii = json.JSONEncoder(ensure_ascii=True, separators=(",", ":")).encode


def json_text(value: Any) -> str:
    """``value`` as compact JSON that UTF-8 can carry: a server's text may hold a lone surrogate
    (``"\\ud83d"`` in its JSON, which Python reads), which no UTF-8 encoder takes; then every
    non-ASCII character is escaped (JSON's own form, read back the same), so nothing is lost."""
    text = _encode(value)
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return _encode_ascii(value)
    return text


class Status(str, Enum):
    OK = "ok"
    FAILED = "failed"
    INVALID = "invalid"
    CANCELLED = "cancelled"


class BatchState(str, Enum):
    SUBMITTING = "submitting"
    RUNNING = "running"
    CANCELLED = "cancelled"
    FINISHED = "finished"


@dataclass(frozen=True)
class ChatMessage:
    """A chat message as the API defines it: ``content`` a string, a list of parts, or null
    (an assistant turn that calls tools); ``extra`` its other fields as given (``tool_calls``,
    ``tool_call_id``, ``name``...)."""

    role: str
    content: Any
    extra: tuple[tuple[str, Any], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        if not self.extra:
            return {"role": self.role, "content": self.content}
        return {"role": self.role, "content": self.content, **dict(self.extra)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ChatMessage:
        extra = tuple(sorted((k, v) for k, v in data.items() if k not in ("role", "content")))
        return cls(data["role"], data.get("content"), extra)


@dataclass(frozen=True)
class ItemRequest:
    """One valid input line, normalised from either input form.

    ``messages`` are kept as written; ``system_message`` is the line's explicit
    one. A provider decides how to send them (Aivvm lifts a leading system message).
    ``params`` holds extra generation parameters (max_tokens, top_p...) that
    providers which understand them pass on. ``metadata`` is the line's own
    ``metadata`` object: kept with the result, never sent to a provider. ``endpoint`` is the
    line's ``url``; for one other than chat, ``messages`` is empty and ``params`` is the whole
    body but ``model``.
    """

    id: str
    line: int
    messages: tuple[ChatMessage, ...]
    model: str | None = None
    temperature: float | None = None
    system_message: str | None = None
    params: tuple[tuple[str, Any], ...] = ()
    metadata: tuple[tuple[str, Any], ...] = ()
    endpoint: Endpoint = Endpoint.CHAT

    def to_json(self) -> str:
        """``json.dumps`` of the request's dict (compact, UTF-8 kept), written out field by field.

        The same text as ``json.dumps({"id": ..., "line": ..., "messages": [m.to_dict() ...]
        [, "model": ...][, "temperature": ...][, "system_message": ...][, "params": dict(params)]
        [, "metadata": dict(metadata)][, "endpoint": endpoint]}, ensure_ascii=False, separators=(",", ":"))``, character
        for character (tests/test_submit_equivalence.py holds it to that), at a fraction of the
        cost: submit writes one per line. A field at its default is left out (63 bytes of Redis an
        item: ``null`` three times and an empty ``params``); :meth:`from_json` reads either form.
        """
        value, string = _json_value, _encode_str
        messages = ",".join([
            f'{{"role":{value(m.role)},"content":{string(m.content) if type(m.content) is str else value(m.content)}}}'
            if type(m) is ChatMessage and not m.extra else _encode(m.to_dict())
            for m in self.messages
        ])
        model, temperature, system_message = self.model, self.temperature, self.system_message
        text = (f'{{"id":{string(self.id) if type(self.id) is str else value(self.id)},'
                f'"line":{value(self.line)},"messages":[{messages}]')
        if model is not None:
            text += ',"model":' + value(model)
        if temperature is not None:
            text += ',"temperature":' + value(temperature)
        if system_message is not None:
            text += ',"system_message":' + value(system_message)
        if self.params:
            text += ',"params":' + _encode(dict(self.params))
        if self.metadata:
            text += ',"metadata":' + _encode(dict(self.metadata))
        if self.endpoint is not Endpoint.CHAT:
            text += ',"endpoint":' + _encode_str(self.endpoint.value)
        return text + "}"

    @classmethod
    def from_json(cls, text: str | bytes) -> ItemRequest:
        data = json.loads(text)
        request = new_item_request(
            data["id"], data["line"], tuple(ChatMessage.from_dict(m) for m in data["messages"]),
            data.get("model"), data.get("temperature"), data.get("system_message"),
            tuple(sorted(data.get("params", {}).items())), tuple(sorted((data.get("metadata") or {}).items())),
        )
        if "endpoint" in data:
            request.__dict__["endpoint"] = Endpoint(data["endpoint"])
        return request


def _json_value(value: Any) -> str:
    """``json.dumps(value, ensure_ascii=False)`` for one value, with shortcuts for the usual types."""
    kind = type(value)
    if kind is str:
        return _encode_str(value)
    if value is None:
        return "null"
    if kind is int:
        return int.__repr__(value)
    if kind is float and math.isfinite(value):
        return float.__repr__(value)
    return _encode(value)


def new_item_request(id: str, line: int, messages: tuple[ChatMessage, ...], model: str | None,
                     temperature: float | None, system_message: str | None,
                     params: tuple[tuple[str, Any], ...], metadata: tuple[tuple[str, Any], ...]
                     ) -> ItemRequest:
    """``ItemRequest(...)`` with every field given, without the frozen dataclass's ``__init__``.

    The same object (fields, equality, hash, repr); a frozen ``__init__`` sets each field through
    ``object.__setattr__``, which costs more than the rest of parsing a short line.
    """
    request = _new(ItemRequest)
    fields = request.__dict__
    fields["id"] = id
    fields["line"] = line
    fields["messages"] = messages
    fields["model"] = model
    fields["temperature"] = temperature
    fields["system_message"] = system_message
    fields["params"] = params
    fields["metadata"] = metadata
    fields["endpoint"] = Endpoint.CHAT
    return request


def new_chat_message(role: str, content: str) -> ChatMessage:
    """``ChatMessage(role, content)``, as :func:`new_item_request` builds a request."""
    message = _new(ChatMessage)
    fields = message.__dict__
    fields["role"] = role
    fields["content"] = content
    fields["extra"] = ()
    return message


_new = object.__new__


@dataclass(frozen=True)
class ItemError:
    type: str
    message: str
    # the HTTP status of the provider's answer, when there was one (for OpenAI's output form)
    http_status: int | None = None
    # that answer's body as the server sent it (parsed JSON, else its text; bounded), and its
    # x-request-id: OpenAI's output form keeps both verbatim
    body: Any = None
    request_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"type": self.type, "message": self.message}
        if self.http_status is not None:
            d["http_status"] = self.http_status
        if self.body is not None:
            d["body"] = self.body
        if self.request_id is not None:
            d["request_id"] = self.request_id
        return d


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    estimated: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "estimated": self.estimated,
        }


@dataclass(frozen=True)
class RequestDefaults:
    """Values for lines that lack them (``--model``, ``--temperature``, ``--max-tokens``, ``--system``).

    Applied when a line is parsed, so the stored request is the one sent.
    """

    model: str | None = None
    temperature: float | None = None
    max_tokens: int | None = None
    system_message: str | None = None
    # the batch's endpoint (serve's ``batches.create(endpoint=...)``): a line without ``url``
    # takes it, a line with another is invalid, as OpenAI checks
    endpoint: Endpoint | None = None


@dataclass(frozen=True)
class ItemResult:
    id: str
    line: int
    status: Status
    model: str | None = None
    output: str | None = None
    error: ItemError | None = None
    attempts: int = 0
    latency_ms: int | None = None
    first_chunk_ms: int | None = None
    usage: Usage | None = None
    finish_reason: str | None = None
    provider: str | None = None
    # Unix seconds when the result was made (the OpenAI form's ``created``); None in older results
    created: int | None = None
    # the request's ``metadata``, carried over as given
    metadata: tuple[tuple[str, Any], ...] = ()
    # the rest of what an OpenAI-compatible server answered (tool calls, logprobs, its ids, the
    # body of another endpoint): its keys are added to the line (jobs/answers.py)
    answer: Answer | None = None
    # an answer asked and paid for before, reused from the cache (jobs/cache.py)
    cached: bool = False

    def to_dict(self) -> dict[str, Any]:
        """The stored result; ``created``, ``metadata``, ``body``... only when there are some."""
        d: dict[str, Any] = {
            "id": self.id,
            "line": self.line,
            "status": self.status.value,
            "model": self.model,
            "output": self.output,
            "error": self.error.to_dict() if self.error else None,
            "attempts": self.attempts,
            "latency_ms": self.latency_ms,
            "first_chunk_ms": self.first_chunk_ms,
            "usage": self.usage.to_dict() if self.usage else None,
            "finish_reason": self.finish_reason,
            "provider": self.provider,
        }
        if self.created is not None:
            d["created"] = self.created
        if self.metadata:
            d["metadata"] = dict(self.metadata)
        if self.answer is not None:
            d.update(self.answer.to_fields())
        if self.cached:
            d["cached"] = True
        return d

    def to_json(self) -> str:
        """``json.dumps(self.to_dict(), ensure_ascii=False, separators=(",", ":"))``, UTF-8-safe (:func:`json_text`)."""
        return json_text(self.to_dict())

    @classmethod
    def from_json(cls, text: str | bytes) -> ItemResult:
        d = json.loads(text)
        error = ItemError(**d["error"]) if d.get("error") else None
        usage_d = d.get("usage")
        usage = (
            Usage(usage_d["prompt_tokens"], usage_d["completion_tokens"], usage_d["estimated"])
            if usage_d
            else None
        )
        return cls(
            id=d["id"],
            line=d["line"],
            status=Status(d["status"]),
            model=d.get("model"),
            output=d.get("output"),
            error=error,
            attempts=d.get("attempts", 0),
            latency_ms=d.get("latency_ms"),
            first_chunk_ms=d.get("first_chunk_ms"),
            usage=usage,
            finish_reason=d.get("finish_reason"),
            provider=d.get("provider"),
            created=d.get("created"),
            metadata=tuple(sorted((d.get("metadata") or {}).items())),
            answer=Answer.from_fields(d),
            cached=bool(d.get("cached")),
        )


def invalid_result(line: int, message: str, item_id: str | None = None) -> ItemResult:
    """The result of a line that is no request; without an id of its own it gets ``line-N``."""
    return ItemResult(
        id=item_id if item_id is not None else f"line-{line}",
        line=line,
        status=Status.INVALID,
        output=None,
        error=ItemError("invalid_line", message),
    )


def cancelled_result(request: ItemRequest, attempts: int = 0) -> ItemResult:
    return ItemResult(
        id=request.id, line=request.line, status=Status.CANCELLED, model=request.model,
        attempts=attempts, metadata=request.metadata,
        error=ItemError("cancelled", "the batch was cancelled before this item started"),
    )


def budget_result(request: ItemRequest, attempts: int = 0) -> ItemResult:
    """An item whose next call did not start: what its batch paid had reached its budget."""
    when = "its next attempt" if attempts else "this item started"
    return ItemResult(
        id=request.id, line=request.line, status=Status.CANCELLED, model=request.model,
        attempts=attempts, metadata=request.metadata,
        error=ItemError("budget_exhausted", "the batch's budget (--max-tokens-total / --max-requests) "
                                            f"was spent before {when}"),
    )


# a batch's priority: its share of the workers beside other batches (1, the default, to this)
MAX_PRIORITY = 10


@dataclass(frozen=True)
class BatchOptions:
    """What a batch was submitted with; never holds a secret."""

    provider: str = "aivvm"
    base_url: str | None = None
    rpm: int | None = None
    tpm: int | None = None
    # its share of the workers beside other batches: a window this many times as large
    priority: int = 1
    # answers asked before (by any batch on this Redis, in this namespace) are reused: jobs/cache.py
    cache: bool = False
    cache_scope: str = ""
    # once what the batch paid reaches one of these, no new item starts: the rest end cancelled
    max_tokens_total: int | None = None
    max_requests: int | None = None

    def providers(self) -> tuple[str, ...]:
        return _provider_names(self.provider)


@functools.lru_cache(maxsize=64)
def _provider_names(provider: str) -> tuple[str, ...]:
    """``"aivvm, openai"`` -> ``("aivvm", "openai")`` (asked for each item a worker runs)."""
    return tuple(p.strip() for p in provider.split(",") if p.strip())


@dataclass(frozen=True)
class BatchInfo:
    id: str
    source: str
    created: float
    state: BatchState
    options: BatchOptions
    total: int | None
    counts: dict[str, int] = field(default_factory=dict)
    usage: dict[str, int] = field(default_factory=dict)
    # "<error type>: <message>" of failed attempts (retried or final) -> count
    errors: dict[str, int] = field(default_factory=dict)

    @property
    def top_error(self) -> tuple[str, int] | None:
        """The most frequent attempt error and how often it happened, if any."""
        if not self.errors:
            return None
        text = max(self.errors, key=lambda k: self.errors[k])
        return text, self.errors[text]

    @property
    def done(self) -> int:
        return sum(self.counts.get(s.value, 0) for s in Status)

    @property
    def finished(self) -> bool:
        return self.total is not None and self.done >= self.total
