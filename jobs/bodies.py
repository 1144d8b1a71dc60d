"""A line's request body, per endpoint: what we interpret is checked, the rest passes through.

We check only the fields we read ourselves: the id, ``url``, the shape of ``messages``,
``stream``, ``n``, ``temperature`` and the token limits (the rate limiter reads them), and
``metadata`` (kept with the result; sent too where the API takes it: an OpenAI Batch line's
``body.metadata`` on ``/v1/responses``, or with ``"store": true`` on chat, as OpenAI requires).
Every other field of the body reaches the server as the
line wrote it: ``tools``, ``response_format``, ``logprobs``, a vendor's ``grammar``... The
server is the judge of those; a field a provider cannot send is refused per provider
(:func:`jobs.endpoints.cannot_carry`).
"""

from __future__ import annotations

import json
from typing import Any

from .endpoints import Endpoint, cannot_carry
from .errors import InvalidLine
from .records import ChatMessage, ItemRequest, RequestDefaults

ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
SYSTEM_ROLES = frozenset({"system", "developer"})
# Ours, in either form: never sent
OWN_FIELDS = frozenset({"system_message", "metadata"})
# Fields of the chat completions API (openai.types.chat.CompletionCreateParams) and the vendor
# extensions OpenAI-compatible servers document (vLLM, llama.cpp): a simple line may carry any
# of them; another field there is taken for a typo. An OpenAI Batch line's body may carry anything.
CHAT_FIELDS = frozenset({
    "messages", "model", "audio", "frequency_penalty", "function_call", "functions", "logit_bias",
    "logprobs", "max_completion_tokens", "max_tokens", "modalities", "n", "parallel_tool_calls",
    "prediction", "presence_penalty", "prompt_cache_key", "reasoning_effort", "response_format",
    "safety_identifier", "seed", "service_tier", "stop", "store", "stream", "stream_options",
    "temperature", "tool_choice", "tools", "top_logprobs", "top_p", "user", "verbosity",
    "web_search_options",
    # vLLM
    "guided_json", "guided_regex", "guided_choice", "guided_grammar", "guided_decoding_backend",
    "guided_whitespace_pattern", "top_k", "min_p", "repetition_penalty", "chat_template_kwargs",
    "skip_special_tokens", "structured_outputs",
    # llama.cpp
    "grammar", "json_schema", "repeat_penalty", "mirostat", "mirostat_tau", "mirostat_eta",
})
TOKEN_LIMITS = ("max_tokens", "max_completion_tokens", "max_output_tokens")
MAX_CHOICES = 128
# what each endpoint requires besides ``model``
REQUIRED = {Endpoint.EMBEDDINGS: "input", Endpoint.RESPONSES: "input", Endpoint.COMPLETIONS: "prompt"}
# what stands for a Responses request's input: a stored prompt (its template carries the input)
RESPONSES_INPUT_BESIDES = ("prompt",)


def build_request(n: int, item_id: str, endpoint: Endpoint, data: dict[str, Any], prefix: str,
                  defaults: RequestDefaults, providers: tuple[str, ...]) -> ItemRequest:
    """The request of a line's body ``data`` (``prefix`` names where it sits: ``"body."`` or ``""``).

    ``providers``: the batch's provider chain; a line none of them can send is refused.
    """
    if endpoint is Endpoint.CHAT:
        request = _chat(n, item_id, data, prefix, defaults)
    else:
        request = _other(n, item_id, endpoint, data, prefix, defaults)
    _check_carried(n, request, providers, prefix)
    return request


def _chat(n: int, item_id: str, data: dict[str, Any], prefix: str, defaults: RequestDefaults) -> ItemRequest:
    if "prompt" in data:
        if "messages" in data:
            raise InvalidLine(n, "give either 'messages' or 'prompt', not both", prefix + "prompt")
        prompt = data["prompt"]
        if not isinstance(prompt, str) or not prompt.strip():
            raise InvalidLine(n, "must be a non-empty string", prefix + "prompt")
        messages: tuple[ChatMessage, ...] = (ChatMessage("user", prompt),)
    elif "messages" in data:
        messages = parse_messages(n, data["messages"], prefix + "messages")
    elif prefix:
        raise InvalidLine(n, "missing: must be a non-empty list of messages", prefix + "messages")
    else:
        raise InvalidLine(n, "missing: give 'messages' (a list) or 'prompt' (a string)", "messages")
    system_message = data.get("system_message")
    if system_message is not None and not isinstance(system_message, str):
        raise InvalidLine(n, f"must be a string, got {kind(system_message)}", prefix + "system_message")
    if system_message is None and not any(m.role in SYSTEM_ROLES for m in messages):
        system_message = defaults.system_message
    _check_choices(n, data.get("n"), prefix + "n")
    _check_stream(n, data, prefix)
    params = _params(n, data, prefix, ("messages", "prompt", "model", "temperature", "stream"))
    _send_metadata(params, data, prefix, Endpoint.CHAT)
    if defaults.max_tokens is not None and not any(name in params for name in TOKEN_LIMITS):
        params["max_tokens"] = defaults.max_tokens
    return _request(n, item_id, Endpoint.CHAT, messages, data, prefix, defaults, system_message, params)


def _other(n: int, item_id: str, endpoint: Endpoint, data: dict[str, Any], prefix: str,
           defaults: RequestDefaults) -> ItemRequest:
    """An embeddings, Responses or text completions request: its body passes through."""
    required = REQUIRED[endpoint]
    value = data.get(required)
    if endpoint is Endpoint.RESPONSES and value is None and any(
            isinstance(data.get(name), dict) for name in RESPONSES_INPUT_BESIDES):
        pass
    elif endpoint is Endpoint.EMBEDDINGS:
        _check_embedding_input(n, value, prefix + required)
    elif value is None or (isinstance(value, (str, list)) and not value):
        raise InvalidLine(n, "missing: must be a non-empty string or list", prefix + required)
    elif not isinstance(value, (str, list)):
        raise InvalidLine(n, f"must be a string or a list, got {kind(value)}", prefix + required)
    if endpoint is not Endpoint.EMBEDDINGS:
        _check_stream(n, data, prefix)
    if endpoint is Endpoint.COMPLETIONS:
        _check_choices(n, data.get("n"), prefix + "n")
    params = _params(n, data, prefix, ("model", "temperature", "stream"))
    _send_metadata(params, data, prefix, endpoint)
    if defaults.max_tokens is not None and endpoint is not Endpoint.EMBEDDINGS \
            and not any(name in params for name in TOKEN_LIMITS):
        params["max_output_tokens" if endpoint is Endpoint.RESPONSES else "max_tokens"] = defaults.max_tokens
    return _request(n, item_id, endpoint, (), data, prefix, defaults, None, params)


def _request(n: int, item_id: str, endpoint: Endpoint, messages: tuple[ChatMessage, ...],
             data: dict[str, Any], prefix: str, defaults: RequestDefaults, system_message: str | None,
             params: dict[str, Any]) -> ItemRequest:
    model = data.get("model")
    if model is not None and not isinstance(model, str):
        raise InvalidLine(n, f"must be a string, got {kind(model)}", prefix + "model")
    temperature = parse_temperature(n, data.get("temperature"), prefix + "temperature")
    if temperature is None and endpoint is not Endpoint.EMBEDDINGS:
        temperature = defaults.temperature
    return ItemRequest(
        id=item_id, line=n, messages=messages, model=model or defaults.model or None,
        temperature=temperature, system_message=system_message, params=tuple(sorted(params.items())),
        metadata=parse_metadata(n, data.get("metadata"), prefix + "metadata"), endpoint=endpoint)


def _params(n: int, data: dict[str, Any], prefix: str, taken: tuple[str, ...]) -> dict[str, Any]:
    """Every field but ours and those ``taken`` apart; the token limits must be positive integers."""
    params = {k: v for k, v in data.items() if k not in OWN_FIELDS and k not in taken and v is not None}
    for name in TOKEN_LIMITS:
        if name in params:
            _check_token_limit(n, params[name], prefix + name)
    return params


def _send_metadata(params: dict[str, Any], data: dict[str, Any], prefix: str, endpoint: Endpoint) -> None:
    """An OpenAI Batch line's ``body.metadata`` is the API's too where the API takes it: the
    Responses API always, chat with ``store`` (OpenAI refuses metadata without it)."""
    metadata = data.get("metadata")
    if prefix and isinstance(metadata, dict) and (
            endpoint is Endpoint.RESPONSES or (endpoint is Endpoint.CHAT and data.get("store") is True)):
        params["metadata"] = metadata


def _check_carried(n: int, request: ItemRequest, providers: tuple[str, ...], prefix: str) -> None:
    """Refuse a line that no provider of the chain can send as asked."""
    if not providers:
        return
    messages = [m.to_dict() for m in request.messages]
    refusals = [cannot_carry(p, request.endpoint, messages, request.params) for p in providers]
    first = refusals[0]
    if first is not None and all(refusals):
        raise InvalidLine(n, first.reason, first.field if first.field == "url" else prefix + first.field)


def parse_messages(n: int, value: Any, name: str) -> tuple[ChatMessage, ...]:
    """Messages as the chat API defines them: a role, and content a string, a list of parts, or
    null on an assistant turn that calls tools; every other field kept as given."""
    if value is None:
        raise InvalidLine(n, "missing: must be a non-empty list of messages", name)
    if not isinstance(value, list):
        raise InvalidLine(n, f"must be a non-empty list, got {kind(value)}", name)
    if not value:
        raise InvalidLine(n, "must be a non-empty list", name)
    return tuple(_message(n, item, f"{name}[{i}]") for i, item in enumerate(value))


def _message(n: int, item: Any, where: str) -> ChatMessage:
    if not isinstance(item, dict):
        raise InvalidLine(n, f"must be an object with 'role' and 'content', got {kind(item)}", where)
    role = item.get("role")
    if not isinstance(role, str) or role not in ROLES:
        raise InvalidLine(n, f"unknown role {role!r} (expected one of: {', '.join(sorted(ROLES))})",
                          where + ".role")
    content = item.get("content")
    if isinstance(content, list):
        for j, part in enumerate(content):
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise InvalidLine(n, "a content part must be an object with a 'type' (text, image_url, "
                                     "input_audio, file)", f"{where}.content[{j}]")
    elif content is None:
        if not (role == "assistant" and any(item.get(k) for k in ("tool_calls", "function_call", "refusal", "audio"))):
            raise InvalidLine(n, "must be a string or a list of parts (null only on an assistant turn "
                                 "with tool_calls)", where + ".content")
    elif not isinstance(content, str):
        raise InvalidLine(n, f"must be a string or a list of parts, got {kind(content)}", where + ".content")
    if len(item) == 2 and "content" in item:
        return ChatMessage(role, content)
    return ChatMessage.from_dict(item)


def _check_embedding_input(n: int, value: Any, name: str) -> None:
    """A string, a list of strings, one token array, or a list of token arrays (all non-empty)."""
    def tokens(v: Any) -> bool:
        return isinstance(v, list) and bool(v) and all(type(t) is int for t in v)

    if isinstance(value, str) and value:
        return
    if isinstance(value, list) and value and (
            all(isinstance(v, str) and v for v in value) or tokens(value) or all(tokens(v) for v in value)):
        return
    raise InvalidLine(n, "must be a non-empty string, a list of strings, a token array or a list of "
                         f"token arrays, got {shown(value)}", name)


def _check_stream(n: int, data: dict[str, Any], prefix: str) -> None:
    if data.get("stream") not in (None, True, False):
        raise InvalidLine(n, "must be a boolean", prefix + "stream")


def _check_choices(n: int, value: Any, name: str) -> None:
    """``n`` choices of one request come back joined by index, in one result."""
    if value is None or (type(value) is int and 1 <= value <= MAX_CHOICES):
        return
    raise InvalidLine(n, f"must be an integer from 1 to {MAX_CHOICES}, got {shown(value)}", name)


def _check_token_limit(n: int, value: Any, name: str) -> None:
    if type(value) is not int or value < 1:
        raise InvalidLine(n, f"must be a positive integer, got {shown(value)}", name)


def parse_temperature(n: int, value: Any, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 2:
        text = repr(value) if len(repr(value)) < 40 else repr(value)[:37] + "..."
        raise InvalidLine(n, f"must be a number from 0 to 2, got {text}", name)
    return float(value)


def parse_metadata(n: int, value: Any, name: str) -> tuple[tuple[str, Any], ...]:
    """Kept with the request and its result; never sent to the provider."""
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise InvalidLine(n, f"must be an object, got {kind(value)}", name)
    for key, item in value.items():
        if not isinstance(item, str):
            raise InvalidLine(n, f"values must be strings (as in OpenAI's metadata), got "
                                 f"{kind(item)} for {key!r}", name)
    return tuple(sorted(value.items()))


def shown(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, float) else repr(value)
    return text if len(text) < 40 else text[:37] + "..."


def kind(value: Any) -> str:
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
