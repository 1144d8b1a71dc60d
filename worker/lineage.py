"""Who a process dies with and who waits for it (Linux ``prctl``; elsewhere, nothing is promised).

``run`` starts its worker processes from one forking process (``python -m worker
--fork-from-stdin``) that exits once it has forked them: as a child subreaper,
``run`` then adopts them and waits for them as for its own children, and each,
once adopted, dies with ``run``.
"""

from __future__ import annotations

import ctypes
import os
import signal
import time

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
ADOPTION_SECONDS = 5.0


def _prctl(option: int, value: int) -> bool:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return False
    return int(libc.prctl(option, value, 0, 0, 0)) == 0


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Receive ``sig`` when the parent dies (in a child before exec, or once adopted)."""
    _prctl(_PR_SET_PDEATHSIG, sig)


def adopt_orphans() -> bool:
    """Become the parent of this process's orphaned descendants; False where that is not possible."""
    return _prctl(_PR_SET_CHILD_SUBREAPER, 1)


def adopted_by(parent: int, forker: int, timeout: float = ADOPTION_SECONDS) -> bool:
    """In a child forked by ``forker``: wait until ``parent`` has adopted this process (``forker``
    exits), then die with it. False if it never will: the child went to another reaper
    (``parent`` has ended), or ``forker`` outlived ``timeout``."""
    deadline = time.monotonic() + timeout
    while (now := os.getppid()) != parent:
        if now != forker or time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    die_with_parent(signal.SIGKILL)
    return os.getppid() == parent  # it may have ended before the signal was asked for
