"""One attempt at an item, from the event loop.

With the asynchronous HTTP client (:func:`worker.completion.attempt_async` over one
:class:`~worker.providers.aio.AsyncHTTP` pool per process) an attempt is a coroutine; without
it, the synchronous :func:`~worker.completion.attempt` runs in a thread of a pool as large as
the concurrency, and its rate-limit wait is still made on the loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from jobs.config import Settings
from jobs.records import BatchOptions, ItemRequest

from . import completion
from .completion import Attempt, Guard
from .providers import AbstractProvider, CompletionCall
from .providers.credentials import KeyChooser
from .providers.exchange import OnHead

AsyncBeforeCall = Callable[[type[AbstractProvider], CompletionCall], Coroutine[Any, Any, None]]


def _async_http() -> Any:
    """The asynchronous HTTP client class, when this install has it."""
    if not hasattr(completion, "attempt_async"):
        return None
    try:
        from .providers.aio import AsyncHTTP
    except ImportError:
        return None
    return AsyncHTTP


class ProviderCalls:
    """Attempts at items, at most ``concurrency`` at once (the runtime's slots bound them)."""

    def __init__(self, settings: Settings, concurrency: int, on_head: OnHead | None = None) -> None:
        self.settings = settings
        self.concurrency = concurrency
        self.on_head = on_head
        self._http_class = _async_http()
        self._http: Any = None
        self._keys = KeyChooser(settings.allowed_base_urls)
        self._threads: ThreadPoolExecutor | None = None

    @property
    def asynchronous(self) -> bool:
        return self._http_class is not None

    def attempt(self, request: ItemRequest, options: BatchOptions,
                before_call: AsyncBeforeCall | None, guard: Guard | None = None) -> Awaitable[Attempt]:
        """The attempt to await (the coroutine of the call itself, not one wrapping it: one
        frame less at each of its wake-ups); ``guard`` may give its stream up (:class:`Abandoned`)."""
        if self._http_class is not None:
            if self._http is None:
                self._http = self._http_class(max_connections=self.concurrency, on_head=self.on_head)
            return completion.attempt_async(
                request, options.providers(), options.base_url, self.settings, self._http, before_call, self._keys,
                guard)
        if self._threads is None:
            self._threads = ThreadPoolExecutor(self.concurrency, thread_name_prefix="aivvm-call")
        loop = asyncio.get_running_loop()
        sync_before = None
        if before_call is not None:
            gate = before_call

            def sync_before(provider: type[AbstractProvider], call: CompletionCall) -> None:
                asyncio.run_coroutine_threadsafe(gate(provider, call), loop).result()

        return loop.run_in_executor(
            self._threads, completion.attempt, request, options.providers(), options.base_url,
            self.settings, sync_before, guard)

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None
        if self._threads is not None:
            self._threads.shutdown(wait=False)
            self._threads = None
