"""The private servers that tests and benchmarks start: a redis-server, and the stand-in provider
in a process of its own. Plain functions, so that code outside pytest (bench/, the many-hosts
tier) starts them as the fixtures of tests/conftest.py do."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import requests

from aivvm_batch.private_redis import EmbeddedRedis, free_port

ROOT = Path(__file__).resolve().parent.parent


def private_redis(data_dir: Path, *, persistent: bool = False, maxmemory: str | None = None,
                  policy: str | None = None, password: str | None = None) -> EmbeddedRedis:
    """A redis-server on a free loopback port with its data in ``data_dir``, not yet started: use it
    as a context manager, or call ``start()`` and ``stop()``.

    Without persistence unless asked (a test's Redis need not outlive it); ``maxmemory`` and
    ``policy`` for the tests of a full or evicting Redis; ``password`` sets ``requirepass``."""
    options: list[str] = []
    if maxmemory is not None:
        options += ["--maxmemory", maxmemory]
    if policy is not None:
        options += ["--maxmemory-policy", policy]
    if password is not None:
        options += ["--requirepass", password]
    return EmbeddedRedis(data_dir, persistent=persistent, extra_args=tuple(options))


def stub_argv(port: int, *options: str, host: str = "127.0.0.1") -> list[str]:
    """The command line of ``aivvm-batch stub`` on ``host:port`` with ``options`` (``--latency 1`` ...)."""
    return [sys.executable, "-m", "aivvm_batch", "stub", "--host", host, "--port", str(port), *options]


@contextmanager
def stub_process(log: Path, *options: str, env: Mapping[str, str] | None = None,
                 start_timeout: float = 30.0) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """``aivvm-batch stub --port <free> OPTIONS`` in a process of its own, output to ``log``, once it
    answers /health; yields the process and its base URL. SIGTERM at the end (SIGKILL 15 s later)."""
    port = free_port()
    with open(log, "ab") as out:
        process = subprocess.Popen(stub_argv(port, *options), stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                   cwd=ROOT, env=dict(os.environ if env is None else env))
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + start_timeout
        while not _answers(base):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the stand-in did not start (see {log})")
            time.sleep(0.1)
        yield process, base
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _answers(base: str) -> bool:
    try:
        return requests.get(base + "/health", timeout=1).ok
    except requests.RequestException:
        return False
