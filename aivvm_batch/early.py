"""``run``'s fork server started from the command's first line (:mod:`aivvm_batch.workers`).

The fork server imports the workers' modules for 0.3 to 0.4 s, the longest part of ``run``'s
start-up, and the command line's own imports (click, the project's modules) come before ``run``
can start it: about a tenth of a second more. Started here, before those imports, it is ready
that much sooner. Its log directory is read from the arguments as ``run`` reads them
(``--state-dir``, else ``AIVVM_BATCH_STATE_DIR``, else the default); ``run`` takes it over
(:func:`taken`) when its own options agree, else ends it and starts its own. Nothing starts for
``--help``, ``--dry-run``, or a command line without a file and ``-o``; one that click refuses all
the same leaves the fork server to see its input end (or its parent die), and it exits.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .workers import WorkerProcesses

DEFAULT_STATE_DIR = ".aivvm-batch"
STATE_DIR_VARIABLE = "AIVVM_BATCH_STATE_DIR"
_NOTHING_TO_START = frozenset({"--help", "-h", "--dry-run", "--"})

_started: WorkerProcesses | None = None


def start_for(argv: Sequence[str]) -> None:
    """Start ``run``'s fork server now if ``argv`` (the arguments after the program) is ``run ...``."""
    global _started
    if not argv or argv[0] != "run" or _NOTHING_TO_START.intersection(argv) or os.environ.get("AIVVM_BATCH_DRY_RUN"):
        return
    if len(argv) < 3 or not (_names_output(argv[1:]) or os.environ.get("AIVVM_BATCH_OUTPUT")):
        return  # no file or no -o: click refuses it; nothing started, no log folder made
    try:
        _started = WorkerProcesses(concurrencies=[], log_dir=state_dir_of(argv[1:]) / "logs").prestart()
    except OSError:  # no log folder: run starts its workers itself, after its checks say why
        _started = None


def _names_output(args: Sequence[str]) -> bool:
    return any(arg in ("-o", "--output") or arg.startswith(("-o", "--output=")) for arg in args)


def state_dir_of(args: Sequence[str]) -> Path:
    """The ``--state-dir`` that ``args`` give (the last one, as click takes it; an empty one is the
    current directory, as for click), else the variable's, else the default."""
    found: str | None = None
    for position, arg in enumerate(args):
        if arg == "--state-dir" and position + 1 < len(args):
            found = args[position + 1]
        elif arg.startswith("--state-dir="):
            found = arg.partition("=")[2]
    if found is not None:
        return Path(found)
    return Path(os.environ.get(STATE_DIR_VARIABLE) or DEFAULT_STATE_DIR)


def taken(log_dir: Path) -> WorkerProcesses | None:
    """The fork server started early, if its logs go to ``log_dir`` (else it is ended: none)."""
    global _started
    workers, _started = _started, None
    if workers is None:
        return None
    if workers.log_dir != log_dir:
        workers.kill()
        return None
    return workers


def main() -> None:
    """The ``aivvm-batch`` command: :func:`start_for`, then the command line."""
    start_for(sys.argv[1:])
    from .cli import main as command_line

    command_line()
