"""A batch's life in the store: created, listed, finalized, cancelled, reset, deleted.

A batch is a meta hash plus the keys of :data:`jobs.keys.BATCH_PARTS`; the changes that
must happen once (its finish, its cancelled items, its reset ones) happen inside scripts.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any, cast

import redis
from redis.typing import EncodableT, FieldT

from . import keys, scripts
from .claims import ItemClaims
from .connection import translated
from .errors import BatchNotFound
from .records import BatchInfo, BatchOptions, BatchState, ItemRequest, Status, cancelled_result
from .redis_health import RedisHealth
from .results import READ_CHUNK, ResultReader


class BatchLifecycle:
    def __init__(self, client: redis.Redis, result_ttl: int, health: RedisHealth, results: ResultReader,
                 claims: ItemClaims) -> None:
        self.redis = client
        self.result_ttl = result_ttl
        self.health = health
        self.results = results
        self.claims = claims
        self._finalize = client.register_script(scripts.FINALIZE)
        self._cancel = client.register_script(scripts.CANCEL)
        self._reset = client.register_script(scripts.RESET)

    @translated
    def create(self, batch_id: str, source: str, options: BatchOptions) -> bool:
        """Record a new batch; False if one with this id is already there."""
        created = time.time()
        fields: dict[FieldT, EncodableT] = {
            "source": source,
            "created": repr(created),
            "state": BatchState.SUBMITTING.value,
            "options": json.dumps(options.__dict__),
            "priority": options.priority,
        }
        if options.max_tokens_total is not None:
            fields["budget_tokens"] = options.max_tokens_total
        if options.max_requests is not None:
            fields["budget_requests"] = options.max_requests
        if not self.redis.hsetnx(keys.meta(batch_id), "created", fields["created"]):
            return False
        pipe = self.redis.pipeline()
        pipe.hset(keys.meta(batch_id), mapping=fields)
        pipe.zadd(keys.BATCH_INDEX, {batch_id: created})
        try:
            pipe.execute()
        except redis.RedisError:
            self.redis.delete(keys.meta(batch_id))  # no half-made batch (DEL works in a full Redis)
            raise
        return True

    @translated
    def exists(self, batch_id: str) -> bool:
        return bool(self.redis.exists(keys.meta(batch_id)))

    @translated
    def update_options(self, batch_id: str, options: BatchOptions) -> None:
        self.redis.hset(keys.meta(batch_id), "options", json.dumps(options.__dict__))

    @translated
    def info(self, batch_id: str) -> BatchInfo:
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(keys.meta(batch_id))
        pipe.hgetall(keys.counts(batch_id))
        pipe.hgetall(keys.usage(batch_id))
        pipe.hgetall(keys.errors(batch_id))
        meta, counts, usage, errors = pipe.execute()
        if not meta:
            raise BatchNotFound(batch_id, self.health.data_loss_hint())
        return _batch_info(batch_id, meta, counts, usage, errors)

    @translated
    def list_batches(self, limit: int = 100) -> list[BatchInfo]:
        # members without scores, as bytes: the store's clients never decode responses
        members = cast("list[bytes]", self.redis.zrevrange(keys.BATCH_INDEX, 0, limit - 1))
        ids = [i.decode() for i in members]
        found = self.infos(ids)
        gone = [batch_id for batch_id in ids if batch_id not in found]
        if gone:
            self.redis.zrem(keys.BATCH_INDEX, *gone)
        return [found[batch_id] for batch_id in ids if batch_id in found]

    @translated
    def infos(self, batch_ids: Sequence[str]) -> dict[str, BatchInfo]:
        """:meth:`info` of many batches in one round trip; a batch that is gone is left out."""
        pipe = self.redis.pipeline(transaction=False)
        parts = (keys.meta, keys.counts, keys.usage, keys.errors)
        for batch_id in batch_ids:
            for part in parts:
                pipe.hgetall(part(batch_id))
        replies = pipe.execute() if batch_ids else []
        found = {}
        for i, batch_id in enumerate(batch_ids):
            meta, counts, usage, errors = replies[len(parts) * i:len(parts) * (i + 1)]
            if meta:
                found[batch_id] = _batch_info(batch_id, meta, counts, usage, errors)
        return found

    @translated
    def run_batch(self, source_key: str) -> str | None:
        """The batch last set for ``source_key`` (see :meth:`set_run_batch`), if it still exists."""
        found = self.redis.hget(keys.RUN_BATCHES, source_key)
        if found is None:
            return None
        batch_id = found.decode() if isinstance(found, bytes) else str(found)
        if not self.redis.exists(keys.meta(batch_id)):
            self.redis.hdel(keys.RUN_BATCHES, source_key)
            return None
        return batch_id

    @translated
    def set_run_batch(self, source_key: str, batch_id: str) -> None:
        self.redis.hset(keys.RUN_BATCHES, source_key, batch_id)

    @translated
    def delete(self, batch_id: str) -> None:
        """Remove a batch: its keys, claims and index entry (DEL is allowed in a full Redis).

        Its messages still queued find it gone and are dropped; the sweep never sees it again.
        The meta key goes first, so that nothing running can record into the batch after it.
        """
        self.redis.delete(keys.meta(batch_id))
        pipe = self.redis.pipeline(transaction=False)
        pipe.delete(*keys.batch_keys(batch_id), keys.errors(batch_id), keys.held(batch_id), keys.out(batch_id))
        pipe.zrem(keys.BATCH_INDEX, batch_id)
        pipe.hdel(keys.SWEEP_SEEN, batch_id)
        pipe.execute()
        self.claims.clear_claims(batch_id)

    @translated
    def finalize(self, batch_id: str, total: int) -> None:
        self._finalize(keys=keys.batch_keys(batch_id), args=[total, self.result_ttl])

    @translated
    def cancel(self, batch_id: str) -> int:
        """Stop a batch: no item starts after this; not-started items end ``cancelled``."""
        info = self.info(batch_id)
        self.redis.hset(keys.meta(batch_id), "state", BatchState.CANCELLED.value)
        total = info.total if info.total is not None else self.redis.hlen(keys.requests(batch_id))
        cancelled = 0
        pending = list(self.results.unfinished(batch_id, total))
        for start in range(0, len(pending), READ_CHUNK):
            seqs = pending[start:start + READ_CHUNK]
            raws = self.redis.hmget(keys.requests(batch_id), seqs)
            args: list[Any] = [self.result_ttl]
            claim_keys = []
            for seq, raw in zip(seqs, raws):
                if raw is None:
                    continue
                claim_keys.append(keys.claim(batch_id, seq))
                args += [seq, cancelled_result(ItemRequest.from_json(raw)).to_json()]
            if claim_keys:
                cancelled += int(self._cancel(keys=[*keys.batch_keys(batch_id), *claim_keys], args=args))
        return cancelled

    @translated
    def reset(self, batch_id: str, status: Status) -> list[int]:
        """Forget the results with ``status`` so their items can run again."""
        info = self.info(batch_id)
        chosen = []
        for seq, raw in self.results.iter_results(batch_id, info.total or 0):
            if raw is not None and json.loads(raw)["status"] == status.value:
                chosen.append(seq)
        reset: list[int] = []
        for start in range(0, len(chosen), READ_CHUNK):
            reply = self._reset(keys=keys.batch_keys(batch_id),
                                args=[status.value, *chosen[start:start + READ_CHUNK]])
            reset += [int(s) for s in reply]
        return reset


def _batch_info(batch_id: str, meta: dict[bytes, bytes], counts: dict[bytes, bytes],
                usage: dict[bytes, bytes] | None = None,
                errors: dict[bytes, bytes] | None = None) -> BatchInfo:
    m = {k.decode(): v.decode() for k, v in meta.items()}
    return BatchInfo(
        id=batch_id,
        source=m.get("source", ""),
        created=float(m.get("created", 0)),
        state=_state(m),
        options=BatchOptions(**json.loads(m.get("options", "{}"))),
        total=int(m["total"]) if "total" in m else None,
        counts={k.decode(): int(v) for k, v in counts.items() if int(v)},
        usage={k.decode(): int(v) for k, v in (usage or {}).items()},
        errors={k.decode(errors="replace"): int(v) for k, v in (errors or {}).items()},
    )


def _state(meta: dict[str, str]) -> BatchState:
    state = BatchState(meta.get("state", BatchState.SUBMITTING.value))
    if "finished_at" in meta and state is not BatchState.CANCELLED:
        return BatchState.FINISHED
    return state
