"""The one process-level holder of state: this process's :class:`~worker.runtime.Runtime`.

Everything else a worker process keeps is its runtime's, handed over explicitly. Celery,
though, calls the task, its bootsteps and its signal handlers, and kombu instantiates the
transport (:mod:`worker.transport`), without a way to hand them anything: they look the
runtime up here. It is held per process id: a child forked from a process that built one
builds its own.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .runtime import Runtime


class ProcessRuntime:
    """Holds the runtime of the process that built it; built once, on first use."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: tuple[int, Runtime] | None = None  # (process id, its runtime)

    def get(self) -> Runtime | None:
        """This process's runtime, if it was built."""
        held = self._held
        return held[1] if held is not None and held[0] == os.getpid() else None

    def get_or_build(self, build: Callable[[], Runtime]) -> Runtime:
        """This process's runtime, built by ``build`` on first use."""
        found = self.get()
        if found is not None:
            return found
        with self._lock:
            found = self.get()
            if found is None:
                found = build()
                self._held = (os.getpid(), found)
            return found


THIS_PROCESS = ProcessRuntime()
