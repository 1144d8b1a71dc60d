"""Slow and broken clients: a body that stops arriving ends the request, and uploads per key are few.

A client that sends its headers and then a body a byte now and then (or nothing) held a
connection, a task and the upload's buffer for as long as it liked: 100 uploads stalled after
1 MB kept serve 102 MB larger and every connection open. Here each read of the body waits
``idle`` seconds at most (then 408, and the connection closes), and a key has at most
``limit`` uploads under way (its quota: the next is a 429 in OpenAI's form until one ends).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from typing import Any

import anyio

from .errors import TimedOut, TooManyRequests

Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]


def idle_limited(receive: Receive, idle: float) -> Receive:
    """``receive``, that raises :class:`TimedOut` when the client sends nothing for ``idle`` seconds."""

    async def limited() -> MutableMapping[str, Any]:
        try:
            with anyio.fail_after(idle):
                return await receive()
        except TimeoutError:
            raise TimedOut(f"the client sent nothing for {idle:g} s: the request is closed") from None

    return limited


class UploadSlots:
    """Uploads under way, per key (the event loop's: no lock)."""

    def __init__(self) -> None:
        self._under_way: Counter[str] = Counter()

    @asynccontextmanager
    async def hold(self, owner: str, limit: int) -> AsyncIterator[None]:
        if self._under_way[owner] >= limit:
            raise TooManyRequests(f"this key has {limit} uploads under way already (the limit): send this "
                                  "one when one of them has ended", retry_after=5)
        self._under_way[owner] += 1
        try:
            yield
        finally:
            self._under_way[owner] -= 1
            if not self._under_way[owner]:
                del self._under_way[owner]
