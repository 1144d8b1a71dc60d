"""``aivvm-batch run``: submit, work and collect in one process, resumable.

It uses the same store, queue and Celery worker as the distributed mode: a
private Redis (or the one given), worker processes, and the collector.
"""

from __future__ import annotations

import fcntl
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from jobs.collect import wait_until_finished, write_results
from jobs.config import Settings
from jobs.errors import ConfigError
from jobs.formats import ResultFormat
from jobs.queue import Publisher
from jobs.queue import app as celery_app
from jobs.queue import configure
from jobs.records import BatchInfo, BatchOptions, Status
from jobs.store import BatchStore
from jobs.submit import file_batch_id, submit_file

from .embedded import EmbeddedRedis
from .progress import Progress, summary
from .workers import WorkerProcesses


@dataclass(frozen=True)
class RunPlan:
    file: Path
    output: Path
    options: BatchOptions
    concurrency: int = 64
    worker_count: int = 1
    redis_url: str | None = None
    state_dir: Path = Path(".aivvm-batch")
    use_stub: bool = False
    fmt: ResultFormat = ResultFormat.NATIVE


def run(plan: RunPlan, progress: Progress) -> BatchInfo:
    with ExitStack() as stack:
        plan.state_dir.mkdir(parents=True, exist_ok=True)
        stack.enter_context(_state_lock(plan.state_dir))
        options = plan.options
        if plan.use_stub:
            from .stub import StubServer

            stub = stack.enter_context(StubServer())
            options = BatchOptions(provider=options.provider, rpm=options.rpm, tpm=options.tpm,
                                   base_url=stub.base_url + ("/v1" if options.provider.startswith("openai") else ""))
        private = plan.redis_url is None
        if private:
            embedded = stack.enter_context(EmbeddedRedis(plan.state_dir / "redis"))
            redis_url = embedded.url
        else:
            assert plan.redis_url is not None
            redis_url = plan.redis_url
        settings = Settings.from_env(redis_url=redis_url)
        store = BatchStore(redis.Redis.from_url(redis_url, socket_connect_timeout=5), settings.result_ttl)
        configure(celery_app, settings)
        batch_id = file_batch_id(plan.file, options)
        resume = store.exists(batch_id)
        if resume and private:
            Publisher(store.redis, celery_app).purge()
            store.clear_claims(batch_id)
        if not (resume and store.info(batch_id).finished):
            workers = WorkerProcesses(redis_url, count=plan.worker_count, concurrency=plan.concurrency,
                                      log_dir=plan.state_dir / "logs").start()
            stack.callback(workers.stop)
            submit_file(store, Publisher(store.redis, celery_app), plan.file, options, settings,
                        batch_id=batch_id, resume=resume)
            try:
                wait_until_finished(store, batch_id, lambda info: _watch(info, progress, workers))
            finally:
                progress.close()
        return write_results(store, batch_id, plan.output, plan.fmt)
    raise AssertionError("unreachable")


def _watch(info: BatchInfo, progress: Progress, workers: WorkerProcesses) -> None:
    progress.update(info)
    if not info.finished and workers.alive() == 0:
        raise ConfigError(f"the worker processes exited; see their logs ({summary(info)})")


class _state_lock:
    """One ``run`` at a time per state folder."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "run.lock"
        self.file: Any = None

    def __enter__(self) -> None:
        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.close()
            raise ConfigError(f"another `aivvm-batch run` is using {self.path.parent}; "
                              "wait for it or pass another --state-dir") from None

    def __exit__(self, *exc: object) -> None:
        self.file.close()


def info_dict(info: BatchInfo) -> dict[str, Any]:
    return {
        "id": info.id,
        "state": info.state.value,
        "source": info.source,
        "created": info.created,
        "provider": info.options.provider,
        "base_url": info.options.base_url,
        "total": info.total,
        "done": info.done,
        "counts": {s.value: info.counts.get(s.value, 0) for s in Status},
        "usage": {
            "prompt_tokens": info.usage.get("prompt_tokens", 0),
            "completion_tokens": info.usage.get("completion_tokens", 0),
            "items_estimated": info.usage.get("estimated", 0),
        },
    }


def info_table(info: BatchInfo) -> str:
    total = info.total
    percent = f"{100 * info.done / total:.1f}%" if total else "-"
    rows = [("batch", info.id), ("state", info.state.value), ("source", info.source),
            ("provider", info.options.provider), ("created", time.strftime(
                "%Y-%m-%d %H:%M:%S", time.localtime(info.created))),
            ("progress", f"{info.done}/{total if total is not None else '?'} ({percent})")]
    rows += [(s.value, str(info.counts.get(s.value, 0))) for s in Status]
    estimated = info.usage.get("estimated", 0)
    rows += [("prompt tokens", str(info.usage.get("prompt_tokens", 0))),
             ("completion tokens", str(info.usage.get("completion_tokens", 0))
              + (f" ({estimated} items estimated)" if estimated else ""))]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
