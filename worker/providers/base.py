"""The provider interface, in the manner of gpt4free's ``AbstractProvider``.

A provider says what to send (:meth:`~AbstractProvider.http_request`) and how to read
the decoded reply (:meth:`~AbstractProvider.reply_parser`); both are free of I/O.
:meth:`~AbstractProvider.stream` (``requests``) and :meth:`~AbstractProvider.acomplete`
(the worker's event loop) are thin shells that move bytes between a transport and the
same :class:`~.reply.ReplyReader`.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import closing
from typing import TYPE_CHECKING, Any, ClassVar

from jobs.config import Settings

from ..errors import ProviderHTTPError
from .call import CompletionCall, Item, StreamEnd
from .credentials import choose_key
from .exchange import HTTPRequest, check_streaming_deadline
from .reply import ReplyParser, ReplyReader, TypeCheck

if TYPE_CHECKING:
    from .aio import AsyncHTTP

Messages = Sequence[Mapping[str, str]]


class AbstractProvider(ABC):
    """A streaming chat provider.

    Subclasses implement :meth:`http_request` and :meth:`reply_parser`;
    :meth:`create_completion` is the seed's signature over :meth:`stream`, yielding
    text chunks only.
    """

    url: ClassVar[str]
    name: ClassVar[str]
    path: ClassVar[str]  # what the protocol appends to the base URL
    # the worker's environment variables beside each other: where to call, and the key for it
    base_url_variable: ClassVar[str]
    api_key_variable: ClassVar[str]
    working: ClassVar[bool] = True
    supports_stream: ClassVar[bool] = True
    supports_gpt_35_turbo: ClassVar[bool] = False
    supports_gpt_4: ClassVar[bool] = False

    # -- the protocol (pure) -------------------------------------------------------

    @classmethod
    @abstractmethod
    def http_request(cls, call: CompletionCall) -> HTTPRequest:
        """The URL, JSON body and headers of ``call``."""

    @classmethod
    @abstractmethod
    def reply_parser(cls, call: CompletionCall) -> ReplyParser:
        """A fresh parser of the decoded bytes of one 200 answer."""

    @classmethod
    def check_type(cls, media: str) -> None:
        """Raise ``MalformedReply`` if a 200 of this media type is no reply of the protocol."""

    @classmethod
    def reply_reader(cls, call: CompletionCall) -> ReplyReader:
        """The reader of one 200 answer: the parser's own media-type check if it has one (each
        endpoint answers in its own type), else the protocol's."""
        parser = cls.reply_parser(call)
        check: TypeCheck = getattr(parser, "check_type", cls.check_type)
        return ReplyReader(call, parser, check)

    @classmethod
    def parse_error(cls, status: int, text: str, retry_after: float | None) -> ProviderHTTPError:
        """The error of a non-2xx answer from the start of its body."""
        return ProviderHTTPError(status, text[:300], retry_after=retry_after)

    # -- the I/O shells --------------------------------------------------------------

    @classmethod
    def stream(cls, call: CompletionCall) -> Iterator[Item]:
        """Yield the reply's text chunks, then a :class:`StreamEnd` if the server said more."""
        from .http import post_stream  # requests: the synchronous path only (not the workers')

        request = cls.http_request(call)
        reader = cls.reply_reader(call)
        with closing(post_stream(request.url, request.body, request.headers, call, cls.parse_error,
                                 reader.start)) as raw:
            for data in raw:
                yield from reader.feed(data)
                if reader.stopped:
                    break
        yield from reader.finish()

    @classmethod
    async def acomplete(cls, call: CompletionCall, http: AsyncHTTP, add: Callable[[Item], None]) -> None:
        """:meth:`stream` on the event loop, through ``http``'s connection pool: each item is
        handed to ``add`` as it is decoded (a callback, not an async generator: each wake-up
        of the call resumes one frame here instead of two generators and their consumer)."""
        request = cls.http_request(call)
        reader = cls.reply_reader(call)
        response = await http.open_stream(request.url, request.body, request.headers, call, cls.parse_error,
                                          on_reply=reader.start, scope=cls.scope(call.base_url))
        try:
            while data := await response.read():
                for item in reader.feed(data):
                    add(item)
                if reader.stopped:
                    break
                check_streaming_deadline(call)
        finally:
            await response.close()
        for item in reader.finish():
            add(item)

    # -- configuration ---------------------------------------------------------------

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


__all__ = ["AbstractProvider", "CompletionCall", "Messages", "StreamEnd"]
