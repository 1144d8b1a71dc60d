"""Ctrl-C and SIGTERM for ``run``: the first stops taking new items, the second abandons.

A terminal sends SIGINT to its whole foreground process group; ``run`` starts its
Redis and workers in sessions of their own, so the signal reaches ``run`` only, and
``run`` decides the order: no new items, the ones in flight finish and are recorded,
then the workers stop, and Redis last.
"""

from __future__ import annotations

import signal
from types import FrameType
from typing import Any

HANDLED = (signal.SIGINT, signal.SIGTERM)


class Interrupts:
    """Counts SIGINT/SIGTERM; raises ``KeyboardInterrupt`` when there is nothing to wait for.

    Until :meth:`arm` (nothing in flight yet) and from the second signal on, a
    signal raises ``KeyboardInterrupt`` at once; after :meth:`arm` the first one
    only sets :attr:`requested`, for the caller to stop gracefully.
    """

    def __init__(self) -> None:
        self.count = 0
        self.armed = False
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.count > 0

    def install(self) -> Interrupts:
        """Handle SIGINT and SIGTERM, except one ignored by whoever started us (``nohup``, ``&``)."""
        for sig in HANDLED:
            if signal.getsignal(sig) is not signal.SIG_IGN:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def arm(self) -> None:
        """From now on the first signal asks for a graceful stop instead of raising."""
        self.armed = True

    def ignore(self) -> None:
        """While abandoning: further signals change nothing (the cleanup is already quick)."""
        for sig in self._previous:
            signal.signal(sig, signal.SIG_IGN)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.count += 1
        if not self.armed or self.count > 1:
            raise KeyboardInterrupt

    def __enter__(self) -> Interrupts:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.restore()
