"""``aivvm-batch run``: check, submit, work and collect in one process, resumable.

It uses the same store, queue and Celery worker as the distributed mode: a
private Redis (or the one given), worker processes, and the collector.

Each run makes a new batch. The file it reads (its absolute path; for standard
input or a pipe, a digest of what was read) maps to the batch of the previous run,
whose ``ok`` results are carried over for every line whose request, provider and
base URL are unchanged; then the previous batch is deleted.
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs import keys
from jobs.collect import views
from jobs.config import Settings
from jobs.connection import connect
from jobs.errors import ConfigError
from jobs.formats import ResultFormat, render
from jobs.output import write_atomically
from jobs.queue import Publisher
from jobs.queue import app as celery_app
from jobs.queue import configure
from jobs.records import BatchInfo, BatchOptions, BatchState, Status
from jobs.store import BatchStore
from jobs.submit import SubmitReport, new_batch_id, submit_file

from .failure_signs import attempts_warning, systematic_failure
from .options import counted, masked_url, stub_knobs
from .plan import RunPlan
from .preflight import Checked, preflight, prune_spool
from .private_redis import EmbeddedRedis
from .progress import Progress, summary
from .signals import Interrupts
from .workers import WorkerProcesses, trusting

POLL_SECONDS = 0.05  # the end of a batch is seen at once; a view costs one pipelined read
# once no more items are left than the workers have slots (the last wave is out) and items still end
# from one view to the next, the batch's end is looked for this often (quick replies end it within a
# few polls); a wave that ends nothing (slow replies, a wait) is polled as before
LAST_WAVE_POLL_SECONDS = 0.01
RECONNECT_SECONDS = 120.0


@dataclass(frozen=True)
class RunResult:
    info: BatchInfo
    # why the batch was stopped before every item was tried, if it was
    stopped: str | None = None


class Interrupted(Exception):
    """``run`` stopped on Ctrl-C/SIGTERM once its in-flight items were recorded."""

    def __init__(self, info: BatchInfo | None, abandoned: int = 0) -> None:
        super().__init__("interrupted")
        self.info = info
        self.abandoned = abandoned


@dataclass
class _Supervision:
    """What :func:`_supervise` knows, kept where an abandoning Ctrl-C can still read it."""

    info: BatchInfo | None = None
    stopped: str | None = None
    interrupted: bool = False
    warned: bool = False
    in_flight: int = 0


def run(plan: RunPlan, progress: Progress, interrupts: Interrupts, workers: WorkerProcesses) -> RunResult:
    """Everything that can be checked is checked before Redis starts or anything is paid.

    ``workers``: the run's worker processes, not started yet or prestarted, waiting for their
    Redis (:meth:`WorkerProcesses.prestart`); once they work they are stopped before Redis, on
    every way out; before that, stopping them is the caller's.
    """
    state = _Supervision()
    with ExitStack() as stack:
        try:
            checked = preflight(plan, progress)
            stack.enter_context(_state_lock(plan.state_dir))
            options = plan.options
            if plan.use_stub:
                options = _with_stub(stack, plan)
            private = plan.redis_url is None
            if private:
                embedded = stack.enter_context(EmbeddedRedis(plan.state_dir / "redis"))
                redis_url = embedded.url
            else:
                assert plan.redis_url is not None
                redis_url = plan.redis_url
            settings = Settings.from_env(redis_url=redis_url)
            store = BatchStore(connect(redis_url, connect_timeout=5), settings.result_ttl)
            configure(celery_app, settings)
            publisher = Publisher(store.redis, celery_app)
            if private:
                _forget_unfinished_work(store, publisher)
                options = _pin_base_url(options)
            # the workers (booted already, when prestarted) take the file's first chunks as they are submitted
            stack.callback(workers.stop)
            workers.start(redis_url, env=trusting(options.base_url))
            # from here a first Ctrl-C stops the batch gracefully: the workers are taking items
            interrupts.arm()
            report = _submit(store, publisher, checked, plan, options, settings, progress,
                             redis_url if private else None, _holding(interrupts, progress),
                             # on its private Redis, only this run's workers take the messages
                             min(workers.concurrencies) if private else None)
            if private:
                prune_spool(plan.state_dir, {b.source for b in store.list_batches(limit=1000)})
            info = store.info(report.batch_id)
            if not info.finished:
                try:
                    info = _supervise(store, report.batch_id, workers, progress, interrupts, state)
                finally:
                    progress.close()
            if info.finished:
                workers.terminate()  # nothing left to take: they stop while the results are written
            if state.interrupted:
                raise Interrupted(info)
            try:
                write_atomically(plan.output, _rendered(store, report.batch_id, info, plan.fmt))
            except OSError as exc:
                again = ("run the same command with another -o: the ok results are kept" if private else
                         f"aivvm-batch collect {report.batch_id} --redis-url {masked_url(redis_url)} -o ...")
                raise ConfigError(f"cannot write {plan.output}: {exc.strerror or exc}; the results stay in "
                                  f"batch {report.batch_id} ({again})") from exc
            return RunResult(info, state.stopped)
        except KeyboardInterrupt:
            interrupts.ignore()
            progress.close()
            workers.kill()
            raise Interrupted(state.info, state.in_flight) from None
    raise AssertionError("unreachable")


def _holding(interrupts: Interrupts, progress: Progress) -> Callable[[], bool]:
    """Whether the submission should enqueue nothing more: run was interrupted while submitting
    (the rest of the input is recorded, to be cancelled now and resumed by the next run)."""
    said = False

    def hold() -> bool:
        nonlocal said
        if interrupts.requested and not said:
            said = True
            progress.note("aivvm-batch: interrupted while submitting: the rest of the input is recorded "
                          "without being sent; Ctrl-C again to abandon")
        return interrupts.requested

    return hold


def _submit(store: BatchStore, publisher: Publisher, checked: Checked, plan: RunPlan,
            options: BatchOptions, settings: Settings, progress: Progress,
            private_url: str | None, hold: Callable[[], bool], worker_slots: int | None) -> SubmitReport:
    """A new batch for this run, carrying over what the previous run of this input got right."""
    previous = store.run_batch(checked.source_key)
    earlier = store.info(previous) if previous is not None else None
    batch_id = new_batch_id()
    report = submit_file(store, publisher, checked.path, options, settings, batch_id=batch_id,
                         reuse_from=None if plan.fresh else previous, defaults=plan.defaults, hold=hold,
                         worker_slots=worker_slots)
    store.set_run_batch(checked.source_key, batch_id)
    if previous is not None:
        store.delete(previous)
    where = (f" on the private Redis {private_url} (while this run lasts: "
             f"aivvm-batch status {batch_id} --redis-url {private_url}; afterwards it is kept in "
             f"{plan.state_dir}, where the next run of this input resumes it)") if private_url else ""
    progress.note(f"aivvm-batch: batch {batch_id}: {report.total} lines from {checked.display}{where}")
    if earlier is not None:
        progress.note(f"aivvm-batch: {resume_message(earlier, report, options, plan.fresh)}")
    for note in (report.invalid_note(), report.cache_note()):
        if note:
            progress.note(f"aivvm-batch: {note}")
    return report


def resume_message(earlier: BatchInfo, report: SubmitReport, options: BatchOptions, fresh: bool) -> str:
    """What a run did with the previous run's results for the same input."""
    valid = report.total - report.invalid
    if fresh:
        return f"--fresh: batch {earlier.id} of the previous run is dropped; all {valid} items run again"
    if (earlier.options.provider, earlier.options.base_url) != (options.provider, options.base_url):
        return (f"batch {earlier.id} of the previous run used provider {earlier.options.provider} at "
                f"{earlier.options.base_url or 'its default URL'}; now {options.provider} at "
                f"{options.base_url or 'its default URL'}: nothing kept, all {valid} items run again")
    to_run = valid - report.kept - report.cached
    earlier_all_ok = earlier.finished and earlier.counts.get(Status.OK.value, 0) + earlier.counts.get(
        Status.INVALID.value, 0) == earlier.total
    if earlier_all_ok:
        detail = f"{counted(report.changed, 'line')} changed"
        if to_run > report.changed:
            detail += f", {to_run - report.changed} new"
    else:
        detail = f"{to_run} to run"
    return f"resuming batch {earlier.id}: {report.kept} of {valid} results kept, {detail}"


def _supervise(store: BatchStore, batch_id: str, workers: WorkerProcesses, progress: Progress,
               interrupts: Interrupts, state: _Supervision) -> BatchInfo:
    """Show progress until the batch finishes; stop taking items on Ctrl-C or a systematic failure."""
    slots = sum(workers.concurrencies)
    last_done: int | None = None

    def poll_seconds(info: BatchInfo | None) -> float:
        nonlocal last_done
        if info is None:
            return POLL_SECONDS
        ending = info.total is not None and 0 < info.total - info.done <= slots and info.done != last_done
        last_done = info.done
        return LAST_WAVE_POLL_SECONDS if ending else POLL_SECONDS

    for info in views(store, batch_id, poll_seconds, RECONNECT_SECONDS):
        state.info = info
        state.in_flight = (info.total or 0) - info.done
        if interrupts.requested and not state.interrupted:
            state.interrupted = True
            state.in_flight = _claimed(store, batch_id)
            progress.note(f"aivvm-batch: interrupted: no new item starts; waiting for {state.in_flight} items "
                          "in flight to finish and be recorded; Ctrl-C again to abandon them")
            store.cancel(batch_id)
            info = state.info = store.info(batch_id)
            state.in_flight = (info.total or 0) - info.done
        if not state.warned and (warning := attempts_warning(info)):
            state.warned = True
            progress.note(f"aivvm-batch: {warning}{_key_hint(warning, info.options)}")
        if state.stopped is None and not state.interrupted and (reason := systematic_failure(info)):
            left = (info.total or 0) - info.done
            state.stopped = reason = reason + _key_hint(reason, info.options)
            progress.note(f"aivvm-batch: stopping: {reason}; the {left} items not finished are cancelled "
                          "(those in flight finish first)")
            store.cancel(batch_id)
            info = state.info = store.info(batch_id)
        progress.update(info, in_flight=state.in_flight if state.interrupted else None)
        if info.finished:
            return info
        if workers.alive() == 0:
            raise ConfigError(f"the worker processes exited; see their logs in {workers.log_dir} "
                              f"({summary(info)})")
    raise AssertionError("unreachable")


def _claimed(store: BatchStore, batch_id: str) -> int:
    """Items an execution is working on now (their live claims)."""
    return sum(1 for _ in store.redis.scan_iter(match=keys.claim_pattern(batch_id), count=1000))


def _key_hint(error: str, options: BatchOptions) -> str:
    """Say so when a server refused us its API and no key is set for the provider."""
    if not any(mark in error for mark in ("401", "403", "unauthorized", "api_key")):
        return ""
    from worker.providers import PROVIDERS

    variable = getattr(PROVIDERS[options.providers()[0]], "api_key_variable", None)
    if variable is None or os.environ.get(variable):
        return ""
    return f" ({variable} is not set in this environment)"


def _rendered(store: BatchStore, batch_id: str, info: BatchInfo, fmt: ResultFormat) -> Iterator[bytes]:
    for seq, raw in store.iter_results(batch_id, info.total or 0):
        if raw is None:
            raise ConfigError(f"batch {batch_id}: item {seq} has no result")
        yield render(raw, fmt) + b"\n"


def _with_stub(stack: ExitStack, plan: RunPlan) -> BatchOptions:
    """Start the stand-in, on the port of the previous run if it is free (same base URL, same batch)."""
    from .stub import StubServer

    port_file = plan.state_dir / "stub.port"
    knobs = stub_knobs()
    try:
        stub = StubServer(port=int(port_file.read_text()), **knobs)
    except (OSError, ValueError):
        stub = StubServer(**knobs)
    stack.enter_context(stub)
    port_file.write_text(str(stub.port))
    options = plan.options
    suffix = "/v1" if options.providers()[0] == "openai" else ""
    return dataclasses.replace(options, base_url=stub.base_url + suffix)


def _pin_base_url(options: BatchOptions) -> BatchOptions:
    """On the private Redis only ``run``'s workers work, with ``run``'s environment: record the
    base URL they will use, so that a changed AIVVM_BASE_URL/OPENAI_BASE_URL is a changed batch."""
    if options.base_url:
        return options
    from worker.providers import PROVIDERS

    first = PROVIDERS[options.providers()[0]]
    return dataclasses.replace(options, base_url=first.base_url(None))


def _forget_unfinished_work(store: BatchStore, publisher: Publisher) -> None:
    """On the private Redis, no worker is alive (the state lock): drop what earlier runs left.

    Their queued and unacknowledged messages are purged; a batch they left unfinished
    is cancelled (its ``ok`` results stay, for its input's next run), so that the
    workers' sweep never enqueues its items again during another input's run.
    """
    publisher.purge()
    for info in store.list_batches(limit=1000):
        if info.state is BatchState.SUBMITTING:
            store.delete(info.id)
        elif info.state is BatchState.RUNNING and not info.finished:
            store.cancel(info.id)


class _state_lock:
    """One ``run`` at a time per state folder."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "run.lock"
        self.file: Any = None

    def __enter__(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.close()
            raise ConfigError(f"another `aivvm-batch run` is using {self.path.parent}; "
                              "wait for it or pass another --state-dir") from None

    def __exit__(self, *exc: object) -> None:
        self.file.close()
