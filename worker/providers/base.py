"""The provider interface, in the manner of gpt4free's ``AbstractProvider``."""

from __future__ import annotations

import os
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from jobs.config import Settings

from .credentials import choose_key

_DEFAULTS = Settings()
Messages = Sequence[Mapping[str, str]]


@dataclass(frozen=True)
class StreamEnd:
    """The last thing a provider's stream yields, when the server said more than text."""

    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


@dataclass(frozen=True)
class CompletionCall:
    """Everything one request needs.

    ``api_key`` is sent as it is: it comes from the worker's environment only, through
    :func:`credentials.choose_key`, which withholds it from base URLs not allowed.
    """

    model: str
    messages: tuple[Mapping[str, str], ...]
    system_message: str | None = None
    temperature: float | None = None
    params: Mapping[str, Any] = field(default_factory=dict)
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


class AbstractProvider(ABC):
    """A streaming chat provider.

    Subclasses implement :meth:`stream`; :meth:`create_completion` is the seed's
    signature over it, yielding text chunks only.
    """

    url: ClassVar[str]
    name: ClassVar[str]
    # the worker's environment variables beside each other: where to call, and the key for it
    base_url_variable: ClassVar[str]
    api_key_variable: ClassVar[str]
    working: ClassVar[bool] = True
    supports_stream: ClassVar[bool] = True
    supports_gpt_35_turbo: ClassVar[bool] = False
    supports_gpt_4: ClassVar[bool] = False

    @classmethod
    @abstractmethod
    def stream(cls, call: CompletionCall) -> Iterator[str | StreamEnd]:
        """Yield the reply's text chunks, then a :class:`StreamEnd` if the server said more."""

    @classmethod
    def base_url(cls, given: str | None) -> str:
        """The given base URL, else the worker's ``base_url_variable``, else ``url``."""
        return (given or os.environ.get(cls.base_url_variable) or cls.url).rstrip("/")

    @classmethod
    def scope(cls, given_base_url: str | None) -> str:
        """What a rate limit applies to: this provider at this base URL."""
        return f"{cls.name}|{cls.base_url(given_base_url)}"

    @classmethod
    def check_model(cls, model: str) -> str:
        """The model id to send, or raise ``UnsupportedModel`` before any request."""
        return model

    @classmethod
    def create_completion(cls, model: str, messages: Messages, stream: bool = True,
                          **kwargs: Any) -> Iterator[str]:
        """Yield the reply's text chunks (one chunk when ``stream`` is false).

        kwargs: ``system_message``, ``temperature``, and ``base_url``, ``api_key``,
        ``connect_timeout``, ``read_timeout``, ``deadline``, ``max_reply_bytes`` as in
        :class:`CompletionCall`. Without ``api_key``, the worker's key is used where its
        environment allows it (``AIVVM_BATCH_ALLOWED_BASE_URLS``, the provider's variables).
        """
        settings = Settings.from_env()
        kwargs.setdefault("max_reply_bytes", settings.max_reply_bytes)
        kwargs.setdefault("max_decompression_ratio", settings.max_decompression_ratio)
        if "api_key" not in kwargs:
            choice = choose_key(cls, cls.base_url(kwargs.get("base_url")), settings.allowed_base_urls)
            kwargs.update(api_key=choice.key, key_withheld=choice.withheld)
        call = CompletionCall(model=cls.check_model(model),
                              messages=tuple(messages), **kwargs)
        chunks = (c for c in cls.stream(call) if isinstance(c, str))
        if stream:
            return chunks
        return iter(["".join(chunks)])
