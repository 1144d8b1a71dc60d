"""Worker processes started by ``aivvm-batch run``: the same Celery worker as distributed mode.

Each runs in a session of its own, so that a terminal's Ctrl-C (sent to the
foreground process group) reaches ``run`` only, which stops them in order; each
still dies with ``run`` (``PR_SET_PDEATHSIG``).

``run`` starts them first of all (:meth:`WorkerProcesses.prestart`): one process
(``python -m worker --fork-from-stdin``) imports theirs while ``run`` imports the rest of
itself, checks its input and starts Redis; given the Redis URL and settings on its standard
input (:meth:`WorkerProcesses.start`), it forks the workers and exits, and ``run``, a child
subreaper, adopts them (:class:`Adopted`). This module stays light (no Celery, no redis-py)
for that reason.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from jobs import keys
from worker.lineage import adopt_orphans, die_with_parent

REDIS_URL_VARIABLE = "AIVVM_BATCH_REDIS_URL"
ADOPT_POLL_SECONDS = 0.005


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


def split_concurrency(total: int, workers: int) -> list[int]:
    """``total`` requests in flight shared by at most ``workers`` processes, summing to ``total``.

    A worker gets at least one slot, so there are never more workers than slots.
    """
    if total < 1 or workers < 1:
        raise ValueError("concurrency and workers must be at least 1")
    count = min(total, workers)
    base, extra = divmod(total, count)
    return [base + (1 if i < extra else 0) for i in range(count)]


def default_workers() -> int:
    """One worker process per core."""
    return max(1, os.cpu_count() or 1)


def trusting(base_url: str | None) -> dict[str, str]:
    """Environment for workers started by the owner of the keys (``run``, a private ``serve``):
    their own ``--base-url`` may receive the keys, as if it were in AIVVM_BATCH_ALLOWED_BASE_URLS."""
    if not base_url:
        return {}
    given = os.environ.get("AIVVM_BATCH_ALLOWED_BASE_URLS", "")
    return {"AIVVM_BATCH_ALLOWED_BASE_URLS": ",".join(u for u in (given, base_url) if u)}


class Adopted:
    """A worker forked by the fork server and adopted by this process: waited for like a child
    (the ``Popen`` calls ``run`` uses)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # never adopted (its reaper was another) or waited for elsewhere
                self.returncode = -signal.SIGKILL
                return self.returncode
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while (code := self.poll()) is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(f"worker process {self.pid}", timeout or 0.0)
            time.sleep(ADOPT_POLL_SECONDS)
        return code

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:  # not waited for yet: the pid is still this process's
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


Process = subprocess.Popen[bytes] | Adopted


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
        self._processes: list[Process] = []
        # prestarted: the fork server, until the workers it forked are adopted
        self._forker: subprocess.Popen[bytes] | None = None
        self.waiting = False  # prestarted: waiting on standard input for start()

    @property
    def count(self) -> int:
        return len(self.concurrencies)

    @property
    def names(self) -> list[str]:
        """The Celery node names, ``%h`` unexpanded."""
        return [f"run{os.getpid()}-{i}@%h" for i in range(self.count)]

    def log(self, i: int) -> Path:
        """Where worker ``i`` writes (the fork server, before it forks, beside worker 0)."""
        return self.log_dir / f"worker-{i}.log"

    @property
    def processes(self) -> list[Process]:
        """The worker processes (while prestarted and waiting: the fork server)."""
        if self._forker is not None and not self.waiting:
            self._adopt()
        return self._processes

    def prestart(self) -> WorkerProcesses:
        """Start the fork server before the Redis is known: it imports the workers' modules, then
        waits for :meth:`start` (the threads pool only, where this process can adopt orphans)."""
        if self.pool != "threads" or not adopt_orphans():
            return self
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log(0), "ab") as log:
            self._forker = subprocess.Popen(
                [sys.executable, "-m", "worker", "--fork-from-stdin", f"--loglevel={self.loglevel}"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                start_new_session=True, preexec_fn=_die_with_parent,
            )
        self._processes = [self._forker]
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
            self._spawn({**os.environ, **settings})
            return self
        self.waiting = False
        order = {"env": settings, "workers": [
            {"concurrency": concurrency, "hostname": name, "log": str(self.log(i))}
            for i, (concurrency, name) in enumerate(zip(self.concurrencies, self.names))]}
        assert self._forker is not None and self._forker.stdin is not None
        try:
            self._forker.stdin.write(json.dumps(order).encode() + b"\n")
            self._forker.stdin.close()
        except OSError:  # it died meanwhile: no worker is adopted, and run says so
            pass
        return self

    def _adopt(self, *, at_once: bool = False) -> None:
        """The fork server's workers, once it has forked them and exited (it may still be importing;
        ``at_once``: it is killed, and only those it had forked already are adopted)."""
        forker, self._forker, self.waiting = self._forker, None, False
        assert forker is not None and forker.stdout is not None
        line = b""
        try:
            if at_once:
                _kill_with_its_forks(forker)
            else:
                line = forker.stdout.readline()
        except BaseException:  # interrupted (Ctrl-C) while it imports: it forks nothing now
            _kill_with_its_forks(forker)
            raise
        finally:
            forker.wait()
            self._processes = _adopted(line or forker.stdout.read())
            forker.stdout.close()

    def _spawn(self, env: dict[str, str]) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for i, (concurrency, name) in enumerate(zip(self.concurrencies, self.names)):
            log = open(self.log(i), "ab")
            args = worker_argv(concurrency, pool=self.pool, loglevel=self.loglevel, name=name)
            self._processes.append(subprocess.Popen(
                args, env={**env, "AIVVM_BATCH_CONCURRENCY": str(concurrency)}, stdin=subprocess.DEVNULL,
                stdout=log, stderr=log,
                start_new_session=True, preexec_fn=_die_with_parent,
            ))
            log.close()

    def alive(self) -> int:
        return sum(p.poll() is None for p in self.processes)

    def terminate(self) -> None:
        """Ask for a warm shutdown (SIGTERM): no new task; those running finish and are recorded.
        A fork server still waiting for :meth:`start` sees its input end instead, and exits."""
        if self.waiting:
            self.waiting = False
            assert self._forker is not None
            if self._forker.stdin is not None:
                try:
                    self._forker.stdin.close()
                except OSError:
                    pass
            self._forker = None  # it forks nothing: it is the only process, and it exits
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
        if self._forker is not None:
            self._adopt(at_once=True)
        for p in self.processes:
            if p.poll() is None:
                p.kill()
        for p in self.processes:
            p.wait()
        self._processes = []


def _kill_with_its_forks(forker: subprocess.Popen[bytes]) -> None:
    """SIGKILL the fork server and any worker it forked already (its process group, which they
    share), before it is waited for: until then its pid, the group's id, is not another's."""
    if forker.returncode is not None:  # waited for already
        return
    for kill in (os.kill, os.killpg):
        try:
            kill(forker.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _adopted(line: bytes) -> list[Process]:
    """Handles on the workers whose pids the fork server printed (none if it died before forking)."""
    try:
        return [Adopted(int(pid)) for pid in json.loads(line.splitlines()[0])] if line.strip() else []
    except (ValueError, TypeError):
        return []
