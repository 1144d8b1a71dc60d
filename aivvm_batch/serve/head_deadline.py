"""A request head must come whole in time: uvicorn's HTTP protocol with a deadline on it.

uvicorn times out an idle keep-alive connection, but not one that never finishes a request head:
a socket that sends nothing, or a header line every 10 s, stayed open as long as its client liked
(and held one of the connections ``--max-connections`` allows). Here a connection whose request
head has not come whole within ``seconds`` of the connection (or of the next request's first
byte) is closed, with one log line. The body has its own idle limit (:mod:`.clients`).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

log = logging.getLogger("aivvm_batch.serve")


def head_limited_protocol(seconds: float, base: type[Any] | None = None) -> type[asyncio.Protocol]:
    """``base`` (by default uvicorn's own choice: httptools' protocol if installed, else h11's)
    with the deadline."""
    if base is None:
        try:
            import httptools  # noqa: F401 - uvicorn's choice follows this import
            from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as base
        except ImportError:
            from uvicorn.protocols.http.h11_impl import H11Protocol as base

    class HeadLimited(base):  # type: ignore[valid-type, misc]
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._head_timer: asyncio.TimerHandle | None = None
            self._arm()

        def data_received(self, data: bytes) -> None:
            between = self.cycle is None or self.cycle.response_complete
            if between and (self._head_timer is None or self._head_after is not self.cycle):
                self._arm()  # the first bytes of another request on a kept-alive connection
            super().data_received(data)

        def connection_lost(self, exc: Exception | None) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            before = self._head_after = self.cycle  # a head that comes whole makes a new cycle

            def expire() -> None:
                self._head_timer = None
                if self.cycle is before and not self.transport.is_closing():
                    client = "%s:%d" % self.client if self.client else "a client"
                    log.warning("%s sent no whole request head in %g s: its connection is closed", client, seconds)
                    self.transport.close()

            self._head_timer = self.loop.call_later(seconds, expire)

    return HeadLimited
