"""A warm shutdown that ends: bounded by ``AIVVM_BATCH_SHUTDOWN_TIMEOUT``.

A warm shutdown (SIGTERM, or the first Ctrl-C) lets the chunks in flight finish and
acknowledges their messages. With Redis gone it could do neither, and a worker waited for
ever. Past the timeout the process exits; its items come back through their leases (the
claims lapse and the sweep puts its messages back), as a dead worker's do.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from celery import signals

from jobs.config import Settings
from jobs.queue import app

logger = logging.getLogger(__name__)
EXIT_STATUS = 1  # the shutdown did not end by itself
_armed = threading.Event()


def exit_after(seconds: float) -> None:
    """Exit the process in ``seconds`` unless it has exited by then."""
    if _armed.is_set():
        return
    _armed.set()

    def expire() -> None:
        logger.warning("the warm shutdown did not end within %g s (AIVVM_BATCH_SHUTDOWN_TIMEOUT): exiting; "
                       "the items in flight come back through their leases", seconds)
        logging.shutdown()
        os._exit(EXIT_STATUS)

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()


@signals.worker_shutting_down.connect  # type: ignore[untyped-decorator]
def _on_shutting_down(sig: Any = None, how: Any = None, **_: Any) -> None:
    """Only a warm shutdown waits for work; a cold one ends at once."""
    if how == "Warm":
        try:
            seconds = Settings.from_env(redis_url=app.conf.broker_url).shutdown_timeout
        except Exception:  # noqa: BLE001 - settings were read at start; a default is safe here
            seconds = Settings.shutdown_timeout
        exit_after(seconds)


__all__ = ["exit_after"]
