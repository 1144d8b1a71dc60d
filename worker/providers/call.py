"""What one provider call needs and what its stream ends with: plain records, no I/O."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from jobs.config import Settings
from jobs.endpoints import Endpoint

_DEFAULTS = Settings()


@dataclass(frozen=True)
class StreamEnd:
    """The last thing a provider's stream yields, when the server said more than text."""

    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    # what the server would have answered without streaming (a ChatCompletion joined from its
    # chunks, a Completion, the final Response, a CreateEmbeddingResponse); None for Aivvm
    body: dict[str, Any] | None = field(default=None, compare=False)
    # the server's x-request-id, when it sent one
    request_id: str | None = field(default=None, compare=False)


@dataclass(frozen=True)
class CompletionCall:
    """Everything one request needs.

    ``api_key`` is sent as it is: it comes from the worker's environment only, through
    :func:`credentials.choose_key`, which withholds it from base URLs not allowed.
    """

    model: str
    # chat messages as the API defines them (content a string, parts or null; tool_calls...)
    messages: tuple[Mapping[str, Any], ...]
    system_message: str | None = None
    temperature: float | None = None
    # every other field of the request body, as the line gave it (after defaults); for an
    # endpoint other than chat the whole body but ``model`` (``input``, ``prompt``...)
    params: Mapping[str, Any] = field(default_factory=dict)
    endpoint: Endpoint = Endpoint.CHAT
    base_url: str | None = None
    api_key: str | None = None
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    deadline: float | None = None  # time.monotonic() after which the call gives up
    # past this many decoded reply bytes the call fails as reply_too_large
    max_reply_bytes: int = _DEFAULTS.max_reply_bytes
    # decoded bytes per compressed byte beyond which a compressed reply is a bomb
    max_decompression_ratio: float = _DEFAULTS.max_decompression_ratio
    # the key variable whose key was not sent to this base URL (see credentials.choose_key)
    key_withheld: str | None = None

    def remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()


Item = str | StreamEnd  # what a provider's stream yields
