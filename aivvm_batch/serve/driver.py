"""Advances API batches: validating → in_progress → finalizing → completed (or failed,
cancelling → cancelled, expired).

Every ``serve`` replica runs a driver; a lease per batch lets one replica at a
time take a step, and every step is idempotent, so a replica that dies mid-way
is simply followed by another. Submitting streams the input file from Redis
(:mod:`.content`: no copy on disk) and resumes if a previous attempt stopped half
way. Finishing writes the output and error files into the file store, in input
order, a chunk at a time.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

from jobs.config import Settings
from jobs.endpoints import endpoint_of
from jobs.errors import BatchError, BatchNotFound, StoreUnavailable
from jobs.files import FileNotFound, FileStore, FileWriter, StoredFile
from jobs.keys import api_lease
from jobs.queue import Publisher
from jobs.records import MAX_PRIORITY, BatchInfo, BatchOptions, ItemResult, RequestDefaults
from jobs.store import BatchStore
from jobs.submit import submit_stream

from .content import expected_lines, open_content
from .lease import Lease
from .output import AnswerTotals, api_line
from .records import ApiBatch, ApiStatus, BatchRecords, final_snapshot
from .validation import without_request
from .webhooks import Webhooks

log = logging.getLogger("aivvm_batch.serve")


@dataclass(frozen=True)
class DriverConfig:
    options: BatchOptions
    settings: Settings
    interval: float = 0.5
    threads: int = 4


class OwnerShares:
    """Steps under way per owner, at most ``per_owner`` at once: validating or finalizing one
    tenant's big files never holds every thread of the driver while another's batch waits."""

    def __init__(self, per_owner: int) -> None:
        self.per_owner = per_owner
        self._under_way: Counter[str] = Counter()
        self._lock = threading.Lock()

    def take(self, owner: str) -> bool:
        with self._lock:
            if self._under_way[owner] >= self.per_owner:
                return False
            self._under_way[owner] += 1
            return True

    def give_back(self, owner: str) -> None:
        with self._lock:
            self._under_way[owner] -= 1
            if self._under_way[owner] <= 0:
                del self._under_way[owner]


class Driver:
    def __init__(self, store: BatchStore, files: FileStore, records: BatchRecords,
                 publisher: Publisher, config: DriverConfig, webhooks: Webhooks | None = None) -> None:
        self.store = store
        self.files = files
        self.records = records
        self.publisher = publisher
        self.config = config
        self.webhooks = webhooks
        self.wake = threading.Event()
        self._stop = threading.Event()
        self._busy: set[str] = set()
        self._shares = OwnerShares(max(1, config.threads // 2))
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(config.threads, thread_name_prefix="serve-driver")
        self._thread: threading.Thread | None = None

    def start(self) -> Driver:
        self._thread = threading.Thread(target=self._loop, name="serve-driver", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self.wake.set()
        if self._thread is not None:
            self._thread.join()
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self.webhooks is not None:
            self.webhooks.stop()

    def _ended(self, batch: ApiBatch, status: ApiStatus) -> None:
        """The batch reached its end here (this replica's transition took): its owner's webhook."""
        if self.webhooks is not None:
            self.webhooks.batch_ended(batch.owner, batch.id, status)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.wake.wait(self.config.interval)
            self.wake.clear()
            try:
                active = self.records.active()
            except BatchError as exc:
                log.warning("cannot list the active batches: %s", exc)
                continue
            for batch_id in active:
                with self._lock:
                    if batch_id in self._busy:
                        continue
                    self._busy.add(batch_id)
                self._pool.submit(self._guarded_step, batch_id)

    def _guarded_step(self, batch_id: str) -> None:
        try:
            self.step(batch_id)
        except StoreUnavailable as exc:
            log.warning("batch %s waits for Redis: %s", batch_id, exc)
        except Exception:
            log.exception("batch %s: unexpected error (it will be tried again)", batch_id)
        finally:
            with self._lock:
                self._busy.discard(batch_id)

    def step(self, batch_id: str) -> None:
        """Take whatever step the batch is ready for (safe to call at any time, from any replica)."""
        batch = self.records.load(batch_id)
        if batch is None or batch.status.terminal:
            self.records.deactivate(batch_id)
            return
        if not self._shares.take(batch.owner):
            return  # this owner's other batches hold its share of the threads: its turn comes
        try:
            with Lease(self.store.redis, api_lease(batch_id)) as held:
                if not held:
                    return
                if not batch.submitted:
                    batch = self._submit(batch)
                    if batch.status.terminal:
                        return
                self._advance(batch)
        finally:
            self._shares.give_back(batch.owner)

    def _submit(self, batch: ApiBatch) -> ApiBatch:
        try:
            return self._submit_file(batch, self.files.get(batch.owner, batch.input_file_id))
        except FileNotFound:  # before, or while it was read: what was read of it goes too
            self.store.delete(batch.store_id)
            return self._fail(batch, [{"code": "file_not_found", "line": None, "param": "input_file_id",
                                       "message": f"the input file {batch.input_file_id} was deleted"}])

    def _submit_file(self, batch: ApiBatch, stored: StoredFile) -> ApiBatch:
        options = replace(batch.options or self.config.options, priority=priority_of(batch.metadata))
        if options.cache:  # a tenant's answers are cached for that tenant alone
            options = replace(options, cache_scope=batch.owner)
        source = f"{batch.input_file_id} ({batch.id})"
        defaults = RequestDefaults(endpoint=endpoint_of(batch.endpoint))
        with open_content(self.files, stored.id) as stream:
            nothing = without_request(stream, defaults, options.providers(), self.config.settings.max_line_bytes)
        if nothing is not None and nothing.errors:
            return self._fail(batch, list(nothing.errors))
        if nothing is not None:
            return self._fail(batch, [{"code": "empty_file", "line": None, "param": "input_file_id",
                                       "message": "the input file holds no request"}])
        expected = expected_lines(self.files, stored)
        self.store.create(batch.store_id, source, options)
        try:
            with open_content(self.files, stored.id) as stream:
                submit_stream(self.store, self.publisher, stream, source, options, self.config.settings,
                              expected_lines=expected, batch_id=batch.store_id, resume=True, defaults=defaults)
        except BatchError as exc:
            if isinstance(exc, (StoreUnavailable, FileNotFound)):
                raise
            return self._fail(batch, [{"code": "invalid_file", "line": None, "param": None,
                                       "message": str(exc)}])
        info = self.store.info(batch.store_id)
        if not info.total:
            return self._fail(batch, [{"code": "empty_file", "line": None, "param": "input_file_id",
                                       "message": "the input file holds no request"}])
        now = int(time.time())
        self.records.transition(batch.id, (ApiStatus.VALIDATING,), ApiStatus.IN_PROGRESS,
                                {"in_progress_at": now})
        self.records.transition(batch.id, tuple(ApiStatus), None, {"submitted": "1"})
        return self._reload(batch)

    def _fail(self, batch: ApiBatch, errors: list[dict[str, object]]) -> ApiBatch:
        if self.records.transition(batch.id, (ApiStatus.VALIDATING, ApiStatus.CANCELLING), ApiStatus.FAILED,
                                   {"failed_at": int(time.time()), "errors": json.dumps(errors),
                                    "submitted": "1"}):
            self._ended(batch, ApiStatus.FAILED)
        self.records.deactivate(batch.id)
        self.records.expire_with_files(batch.id, batch.output_ttl)
        return self._reload(batch)

    def _reload(self, batch: ApiBatch) -> ApiBatch:
        return self.records.load(batch.id) or batch

    def _advance(self, batch: ApiBatch) -> None:
        try:
            info = self.store.info(batch.store_id)
        except BatchNotFound:
            self._fail_running(batch, "the batch's items expired from Redis before it finished")
            return
        if batch.status is ApiStatus.CANCELLING and not batch.cancel_sent:
            self.store.cancel(batch.store_id)
            self.records.transition(batch.id, (ApiStatus.CANCELLING,), None, {"cancel_sent": "1"})
            info = self.store.info(batch.store_id)
        elif (batch.status is ApiStatus.IN_PROGRESS and not batch.expiring and not info.finished
              and time.time() >= batch.expires_at):
            self.records.transition(batch.id, (ApiStatus.IN_PROGRESS,), None, {"expiring": "1"})
            self.store.cancel(batch.store_id)
            info = self.store.info(batch.store_id)
        if info.finished:
            self._finish(self._reload(batch), info)

    def _fail_running(self, batch: ApiBatch, message: str) -> None:
        if self.records.transition(
                batch.id, (ApiStatus.IN_PROGRESS, ApiStatus.CANCELLING, ApiStatus.FINALIZING), ApiStatus.FAILED,
                {"failed_at": int(time.time()), "errors": json.dumps(
                    [{"code": "batch_lost", "line": None, "param": None, "message": message}])}):
            self._ended(batch, ApiStatus.FAILED)
        self.records.deactivate(batch.id)
        self.records.expire_with_files(batch.id, batch.output_ttl)

    def _finish(self, batch: ApiBatch, info: BatchInfo) -> None:
        if batch.status is ApiStatus.CANCELLING:
            final, stamp = ApiStatus.CANCELLED, "cancelled_at"
        elif batch.expiring:
            final, stamp = ApiStatus.EXPIRED, "expired_at"
        else:
            final, stamp = ApiStatus.COMPLETED, "completed_at"
            if not self.records.transition(batch.id, (ApiStatus.IN_PROGRESS, ApiStatus.FINALIZING),
                                           ApiStatus.FINALIZING, {"finalizing_at": int(time.time())}):
                return
        totals = AnswerTotals()
        output, error = self._write_results(batch, info, totals, expired=final is ApiStatus.EXPIRED)
        fields: dict[str, object] = {stamp: int(time.time()), **final_snapshot(
            info, totals.cached_tokens, totals.reasoning_tokens, totals.model)}
        if output:
            fields["output_file_id"] = output
        if error:
            fields["error_file_id"] = error
        allowed = (ApiStatus.FINALIZING,) if final is ApiStatus.COMPLETED else (batch.status,)
        if self.records.transition(batch.id, allowed, final, fields):
            self._ended(batch, final)
            self.records.deactivate(batch.id)
            self.records.expire_with_files(batch.id, batch.output_ttl)
        else:
            for file_id in (output, error):
                if file_id:
                    self.files.delete(batch.owner, file_id)

    def _write_results(self, batch: ApiBatch, info: BatchInfo, totals: AnswerTotals, *,
                       expired: bool) -> tuple[str | None, str | None]:
        output = FileWriter(self.files, batch.owner, f"{batch.id}_output.jsonl", "batch_output", ttl=batch.output_ttl)
        error = FileWriter(self.files, batch.owner, f"{batch.id}_error.jsonl", "batch_output", ttl=batch.output_ttl)
        created = int(info.created)
        try:
            for _, raw in self.store.iter_results(batch.store_id, info.total or 0):
                if raw is None:
                    continue
                result = ItemResult.from_json(raw)
                success, line = api_line(result, expired=expired, created=created, totals=totals)
                (output if success else error).write(line)
            ids = tuple(w.commit().id if w.size else None for w in (output, error))
        except BaseException:
            output.abort()
            error.abort()
            raise
        return ids[0], ids[1]


def priority_of(metadata: dict[str, str] | None) -> int:
    """A batch's priority on ``serve``: its ``metadata["priority"]`` (checked when it was created)."""
    raw = (metadata or {}).get("priority", "1")
    return int(raw) if raw.isascii() and raw.isdigit() and 1 <= int(raw) <= MAX_PRIORITY else 1
