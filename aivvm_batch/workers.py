"""Worker processes started by ``aivvm-batch run``: the same Celery worker as distributed mode.

Each runs in a session of its own, so that a terminal's Ctrl-C (sent to the
foreground process group) reaches ``run`` only, which stops them in order; each
still dies with ``run`` (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from jobs import keys
from jobs.queue import celery_threads

from .embedded import die_with_parent


def _die_with_parent() -> None:
    die_with_parent(signal.SIGKILL)


def celery_worker_argv(concurrency: int, *, pool: str = "threads", loglevel: str = "INFO",
                       name: str | None = None) -> list[str]:
    """``celery -A worker.tasks worker`` for ``concurrency`` requests in flight (set, with the
    Redis URL, in the environment: AIVVM_BATCH_CONCURRENCY, AIVVM_BATCH_REDIS_URL)."""
    argv = [sys.executable, "-m", "celery", "-A", "worker.tasks", "worker", f"--pool={pool}",
            f"--concurrency={celery_threads(concurrency)}", f"--loglevel={loglevel}", f"--queues={keys.QUEUE}",
            "--without-gossip", "--without-mingle"]
    if name:
        argv.append(f"--hostname={name}")
    return argv


def worker_argv(concurrency: int, *, pool: str = "threads", loglevel: str = "INFO",
                name: str | None = None) -> list[str]:
    """The same worker, started quicker: ``python -m worker`` for the threads pool (gevent
    needs Celery's own entry point, which patches the process before anything is imported)."""
    if pool != "threads":
        return celery_worker_argv(concurrency, pool=pool, loglevel=loglevel, name=name)
    return [sys.executable, "-m", "worker", "--concurrency", str(concurrency), f"--loglevel={loglevel}",
            *([f"--hostname={name}"] if name else [])]


def trusting(base_url: str | None) -> dict[str, str]:
    """Environment for workers started by the owner of the keys (``run``, a private ``serve``):
    their own ``--base-url`` may receive the keys, as if it were in AIVVM_BATCH_ALLOWED_BASE_URLS."""
    if not base_url:
        return {}
    given = os.environ.get("AIVVM_BATCH_ALLOWED_BASE_URLS", "")
    return {"AIVVM_BATCH_ALLOWED_BASE_URLS": ",".join(u for u in (given, base_url) if u)}


class WorkerProcesses:
    """Celery worker processes on ``redis_url`` (passed by environment, not argv).

    ``count`` processes of ``concurrency`` slots each, or one process per entry of
    ``concurrencies``.
    """

    def __init__(self, redis_url: str, *, count: int = 1, concurrency: int = 64,
                 concurrencies: Sequence[int] | None = None, log_dir: Path,
                 env: dict[str, str] | None = None, loglevel: str = "WARNING",
                 pool: str = "threads") -> None:
        self.redis_url = redis_url
        self.concurrencies = list(concurrencies) if concurrencies is not None else [concurrency] * count
        self.log_dir = log_dir
        self.env = env or {}
        self.loglevel = loglevel
        self.pool = pool
        self.processes: list[subprocess.Popen[bytes]] = []

    @property
    def count(self) -> int:
        return len(self.concurrencies)

    @property
    def names(self) -> list[str]:
        """The Celery node names, ``%h`` unexpanded."""
        return [f"run{os.getpid()}-{i}@%h" for i in range(self.count)]

    def start(self) -> WorkerProcesses:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.env, "AIVVM_BATCH_REDIS_URL": self.redis_url}
        for i, (concurrency, name) in enumerate(zip(self.concurrencies, self.names)):
            log = open(self.log_dir / f"worker-{i}.log", "ab")
            args = worker_argv(concurrency, pool=self.pool, loglevel=self.loglevel, name=name)
            self.processes.append(subprocess.Popen(
                args, env={**env, "AIVVM_BATCH_CONCURRENCY": str(concurrency)}, stdin=subprocess.DEVNULL,
                stdout=log, stderr=log,
                start_new_session=True, preexec_fn=_die_with_parent,
            ))
            log.close()
        return self

    def alive(self) -> int:
        return sum(p.poll() is None for p in self.processes)

    def terminate(self) -> None:
        """Ask for a warm shutdown (SIGTERM): no new task; those running finish and are recorded."""
        for p in self.processes:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 30.0) -> None:
        """Warm shutdown, waited for ``timeout`` seconds in all; then SIGKILL what is left."""
        self.terminate()
        deadline = time.monotonic() + timeout
        for p in self.processes:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def kill(self) -> None:
        """SIGKILL every worker still running, and wait for it."""
        for p in self.processes:
            if p.poll() is None:
                p.kill()
        for p in self.processes:
            p.wait()
        self.processes = []
