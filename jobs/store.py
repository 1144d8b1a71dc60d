"""The Redis batch store: one place that reads and writes a batch's keys.

The connection is passed in, never global. Every state change that must happen
once (the final result of an item, its count, the batch's expiry) happens
inside one Lua script (:mod:`jobs.scripts`), so a task that runs twice cannot record twice.

:class:`BatchStore` is the one door the rest of the code uses; behind it, one part per
concept, each in its module: the batch's life (:mod:`jobs.lifecycle`), a submitted chunk
(:mod:`jobs.intake`), claims of items (:mod:`jobs.claims`), recording results
(:mod:`jobs.recording`), reading them (:mod:`jobs.results`), workers' heartbeats
(:mod:`jobs.heartbeats`) and the server's own state (:mod:`jobs.redis_health`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import redis

from .claims import Claim, ItemClaims
from .connection import translated
from .heartbeats import Heartbeats, WorkerSeen
from .intake import ChunkEntry, ChunkIntake, ChunkOutcome, Reuse
from .lifecycle import BatchLifecycle
from .recording import Recorded, ResultRecorder
from .records import BatchInfo, BatchOptions, ItemRequest, ItemResult, Status, Usage
from .redis_health import RedisHealth, ServerMemory
from .results import READ_CHUNK, ResultReader

DEFAULT_RESULT_TTL = 7 * 24 * 3600


class BatchStore:
    def __init__(self, client: redis.Redis, result_ttl: int = DEFAULT_RESULT_TTL) -> None:
        self.redis = client
        self.result_ttl = result_ttl
        self._health = RedisHealth(client)
        self._heartbeats = Heartbeats(client)
        self._claims = ItemClaims(client)
        self._recorder = ResultRecorder(client, result_ttl)
        self._results = ResultReader(client)
        self._intake = ChunkIntake(client, self._recorder)
        self._lifecycle = BatchLifecycle(client, result_ttl, self._health, self._results, self._claims)

    @translated
    def load_scripts(self) -> None:
        """Load the item path's scripts in one round trip (a worker, at its start): the first use
        of each would otherwise be refused (NOSCRIPT) and sent again, a second on a slow link."""
        pipe = self.redis.pipeline(transaction=False)
        for script in (*self._claims.item_path_scripts, *self._recorder.item_path_scripts):
            pipe.script_load(script.script)
        pipe.execute()

    # the server (jobs.redis_health)

    def memory(self) -> ServerMemory:
        return self._health.memory()

    def check_server(self) -> None:
        self._health.check_server()

    # a batch's life (jobs.lifecycle)

    def create(self, batch_id: str, source: str, options: BatchOptions) -> bool:
        return self._lifecycle.create(batch_id, source, options)

    def exists(self, batch_id: str) -> bool:
        return self._lifecycle.exists(batch_id)

    def update_options(self, batch_id: str, options: BatchOptions) -> None:
        self._lifecycle.update_options(batch_id, options)

    def info(self, batch_id: str) -> BatchInfo:
        return self._lifecycle.info(batch_id)

    def list_batches(self, limit: int = 100) -> list[BatchInfo]:
        return self._lifecycle.list_batches(limit)

    def infos(self, batch_ids: Sequence[str]) -> dict[str, BatchInfo]:
        return self._lifecycle.infos(batch_ids)

    def run_batch(self, source_key: str) -> str | None:
        return self._lifecycle.run_batch(source_key)

    def set_run_batch(self, source_key: str, batch_id: str) -> None:
        self._lifecycle.set_run_batch(source_key, batch_id)

    def delete(self, batch_id: str) -> None:
        self._lifecycle.delete(batch_id)

    def finalize(self, batch_id: str, total: int) -> None:
        self._lifecycle.finalize(batch_id, total)

    def cancel(self, batch_id: str) -> int:
        return self._lifecycle.cancel(batch_id)

    def reset(self, batch_id: str, status: Status) -> list[int]:
        return self._lifecycle.reset(batch_id, status)

    # a submitted chunk (jobs.intake)

    def add_chunk(self, batch_id: str, entries: Sequence[ChunkEntry], *, resume: bool,
                  enqueue: Callable[[Any, list[int]], None], reuse: Reuse | None = None,
                  send: Callable[[Any], None] | None = None, cache: BatchOptions | None = None) -> ChunkOutcome:
        return self._intake.add_chunk(batch_id, entries, resume=resume, enqueue=enqueue, reuse=reuse,
                                      send=send, cache=cache)

    # claims of items (jobs.claims)

    def claim(self, batch_id: str, seq: int, token: str, ttl_seconds: float) -> Claim:
        return self._claims.claim(batch_id, seq, token, ttl_seconds)

    def claim_many(self, batch_id: str, held: Sequence[tuple[int, str]], ttl_seconds: float) -> list[Claim]:
        return self._claims.claim_many(batch_id, held, ttl_seconds)

    def spend(self, batch_id: str) -> bool:
        return self._claims.spend(batch_id)

    def keep_claim(self, batch_id: str, seq: int, token: str, ttl_seconds: float) -> bool:
        return self._claims.keep_claim(batch_id, seq, token, ttl_seconds)

    def keep_claims(self, held: Sequence[tuple[str, int, str]], ttl_seconds: float) -> list[bool]:
        return self._claims.keep_claims(held, ttl_seconds)

    def pause(self, batch_id: str, seconds: float) -> None:
        self._claims.pause(batch_id, seconds)

    def release(self, batch_id: str, seq: int, token: str) -> None:
        self._claims.release(batch_id, seq, token)

    def release_many(self, held: Sequence[tuple[str, int, str]]) -> int:
        return self._claims.release_many(held)

    def claimed(self, batch_id: str, seqs: Sequence[int]) -> set[int]:
        return self._claims.claimed(batch_id, seqs)

    def clear_claims(self, batch_id: str) -> None:
        self._claims.clear_claims(batch_id)

    # recording results (jobs.recording)

    def record(self, batch_id: str, seq: int, result: ItemResult) -> bool:
        return self._recorder.record(batch_id, seq, result)

    def record_many(self, batch_id: str, results: Sequence[tuple[int, ItemResult]],
                    tokens: Sequence[str] | None = None) -> list[Recorded]:
        return self._recorder.record_many(batch_id, results, tokens)

    def count_late(self, batch_id: str, calls: Sequence[tuple[int, Usage, int, str]]) -> int:
        return self._recorder.count_late(batch_id, calls)

    def note_attempt_error(self, batch_id: str, text: str) -> None:
        self._recorder.note_attempt_error(batch_id, text)

    def note_attempt_errors(self, errors: Sequence[tuple[str, str]]) -> None:
        self._recorder.note_attempt_errors(errors)

    def keep_answers(self, answers: Sequence[tuple[BatchOptions, ItemRequest, ItemResult]], ttl: int) -> None:
        self._recorder.keep_answers(answers, ttl)

    # reading results (jobs.results)

    def finished_since(self, batch_id: str, offset: int, limit: int = READ_CHUNK) -> list[int]:
        return self._results.finished_since(batch_id, offset, limit)

    def iter_results(self, batch_id: str, total: int, chunk: int = READ_CHUNK) -> Iterator[tuple[int, bytes | None]]:
        return self._results.iter_results(batch_id, total, chunk)

    def results_of(self, batch_id: str, seqs: Sequence[int]) -> list[bytes | None]:
        return self._results.results_of(batch_id, seqs)

    def unfinished(self, batch_id: str, total: int) -> Iterator[int]:
        return self._results.unfinished(batch_id, total)

    # workers' heartbeats (jobs.heartbeats)

    def worker_heartbeat(self, name: str, held: int = 0, note: str = "", slots: int = 0) -> None:
        self._heartbeats.worker_heartbeat(name, held, note, slots)

    def set_slots(self, total: int, ttl: float) -> int:
        return self._heartbeats.set_slots(total, ttl)

    def workers(self) -> list[WorkerSeen]:
        return self._heartbeats.workers()

    def forget_workers(self, names: Sequence[str]) -> None:
        self._heartbeats.forget_workers(names)

    def last_worker_age(self) -> float | None:
        return self._heartbeats.last_worker_age()
