"""Worker processes started by ``aivvm-batch run``: the same Celery worker as distributed mode."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from .embedded import die_with_parent


def _die_with_parent() -> None:
    die_with_parent(signal.SIGKILL)


class WorkerProcesses:
    """``count`` Celery worker processes on ``redis_url`` (passed by environment, not argv)."""

    def __init__(self, redis_url: str, *, count: int = 1, concurrency: int = 64,
                 log_dir: Path, env: dict[str, str] | None = None, loglevel: str = "WARNING",
                 pool: str = "threads") -> None:
        self.redis_url = redis_url
        self.count = count
        self.concurrency = concurrency
        self.log_dir = log_dir
        self.env = env or {}
        self.loglevel = loglevel
        self.pool = pool
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(self) -> WorkerProcesses:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.env, "AIVVM_BATCH_REDIS_URL": self.redis_url}
        for i in range(self.count):
            log = open(self.log_dir / f"worker-{i}.log", "ab")
            args = [sys.executable, "-m", "aivvm_batch", "worker",
                    "--concurrency", str(self.concurrency), "--loglevel", self.loglevel, "--pool", self.pool,
                    "--name", f"run{os.getpid()}-{i}@%h"]
            self.processes.append(subprocess.Popen(
                args, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                preexec_fn=_die_with_parent,
            ))
            log.close()
        return self

    def alive(self) -> int:
        return sum(p.poll() is None for p in self.processes)

    def stop(self, timeout: float = 30.0) -> None:
        """Warm shutdown (SIGTERM): in-flight items finish; then SIGKILL what is left."""
        for p in self.processes:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.processes:
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.processes = []
