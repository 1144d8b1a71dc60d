"""Worker processes started by ``aivvm-batch run``: the same Celery worker as distributed mode.

Each runs in a session of its own, so that a terminal's Ctrl-C (sent to the
foreground process group) reaches ``run`` only, which stops them in order; each
still dies with ``run`` (``PR_SET_PDEATHSIG``).

``run`` starts them first of all (:meth:`WorkerProcesses.prestart`): while it imports,
checks its input and starts Redis, they import theirs (half a second each), then wait on
their standard input for the Redis URL and settings (:meth:`WorkerProcesses.start`).
This module stays light (no Celery, no redis-py) for that reason.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from jobs import keys

_PR_SET_PDEATHSIG = 1
REDIS_URL_VARIABLE = "AIVVM_BATCH_REDIS_URL"


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """In a child before exec: receive ``sig`` when the parent dies (Linux; a no-op elsewhere)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, sig)
    except OSError:
        pass


def _die_with_parent() -> None:
    die_with_parent(signal.SIGKILL)


def celery_worker_argv(concurrency: int, *, pool: str = "threads", loglevel: str = "INFO",
                       name: str | None = None) -> list[str]:
    """``celery -A worker.tasks worker`` for ``concurrency`` requests in flight (set, with the
    Redis URL, in the environment: AIVVM_BATCH_CONCURRENCY, AIVVM_BATCH_REDIS_URL)."""
    from jobs.queue import celery_threads

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
    """Celery worker processes on ``redis_url`` (passed by environment or standard input, not argv).

    ``count`` processes of ``concurrency`` slots each, or one process per entry of
    ``concurrencies``.
    """

    def __init__(self, redis_url: str | None = None, *, count: int = 1, concurrency: int = 64,
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
        self.waiting = False  # prestarted: waiting on standard input for start()

    @property
    def count(self) -> int:
        return len(self.concurrencies)

    @property
    def names(self) -> list[str]:
        """The Celery node names, ``%h`` unexpanded."""
        return [f"run{os.getpid()}-{i}@%h" for i in range(self.count)]

    def prestart(self) -> WorkerProcesses:
        """Start the processes before their Redis is known: each imports its modules, then waits
        for :meth:`start` (``python -m worker --settings-from-stdin``; the threads pool only)."""
        if self.pool != "threads":
            return self
        self._spawn(dict(os.environ), ["--settings-from-stdin"], subprocess.PIPE)
        self.waiting = True
        return self

    def start(self, redis_url: str | None = None, env: dict[str, str] | None = None) -> WorkerProcesses:
        """Set the processes to work on ``redis_url`` with ``env`` beside the environment."""
        self.redis_url = redis_url or self.redis_url
        self.env = self.env if env is None else env
        if self.redis_url is None:
            raise ValueError("no Redis URL for the worker processes")
        settings = {**self.env, REDIS_URL_VARIABLE: self.redis_url}
        if not self.waiting:
            self._spawn({**os.environ, **settings}, [], subprocess.DEVNULL)
            return self
        self.waiting = False
        for p in self.processes:
            assert p.stdin is not None
            try:
                p.stdin.write(json.dumps(settings).encode() + b"\n")
                p.stdin.close()
            except OSError:  # it died meanwhile: the watch sees it among those not alive
                pass
        return self

    def _spawn(self, env: dict[str, str], extra: list[str], stdin: int) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for i, (concurrency, name) in enumerate(zip(self.concurrencies, self.names)):
            log = open(self.log_dir / f"worker-{i}.log", "ab")
            args = worker_argv(concurrency, pool=self.pool, loglevel=self.loglevel, name=name) + extra
            self.processes.append(subprocess.Popen(
                args, env={**env, "AIVVM_BATCH_CONCURRENCY": str(concurrency)}, stdin=stdin,
                stdout=log, stderr=log,
                start_new_session=True, preexec_fn=_die_with_parent,
            ))
            log.close()

    def alive(self) -> int:
        return sum(p.poll() is None for p in self.processes)

    def terminate(self) -> None:
        """Ask for a warm shutdown (SIGTERM): no new task; those running finish and are recorded.
        Processes still waiting for :meth:`start` see their input end instead, and exit."""
        if self.waiting:
            self.waiting = False
            for p in self.processes:
                if p.stdin is not None:
                    try:
                        p.stdin.close()
                    except OSError:
                        pass
            return
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
