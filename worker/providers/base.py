"""The provider interface, in the manner of gpt4free's ``AbstractProvider``."""

from __future__ import annotations

import os
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

Messages = Sequence[Mapping[str, str]]


@dataclass(frozen=True)
class StreamEnd:
    """The last thing a provider's stream yields, when the server said more than text."""

    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


@dataclass(frozen=True)
class CompletionCall:
    """Everything one request needs. ``api_key`` comes from the worker's environment only."""

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

    def remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()


class AbstractProvider(ABC):
    """A streaming chat provider.

    Subclasses implement :meth:`stream`; :meth:`create_completion` is the seed's
    signature over it, yielding text chunks only.
    """

    url: ClassVar[str]
    name: ClassVar[str]
    base_url_variable: ClassVar[str]
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
        ``connect_timeout``, ``read_timeout``, ``deadline`` as in :class:`CompletionCall`.
        """
        call = CompletionCall(model=cls.check_model(model),
                              messages=tuple(messages), **kwargs)
        chunks = (c for c in cls.stream(call) if isinstance(c, str))
        if stream:
            return chunks
        return iter(["".join(chunks)])
