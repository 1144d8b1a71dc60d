"""The OpenAI side of a batch, kept beside the store's batch in one Redis hash.

The store (jobs.store) knows items and results; this record knows what the
OpenAI Batch object adds: its owner, input and result files, endpoint, window,
metadata, status and timestamps. Status changes are compare-and-set in one Lua
script, so several ``serve`` replicas and a concurrent cancel cannot both win.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import uuid
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import redis

from jobs.connection import translated
from jobs.files import BATCH_FILE_TTL
from jobs.keys import API_ACTIVE, api_batch, api_idempotency, owner_batches
from jobs.records import BatchInfo, BatchOptions, Status

from .errors import BadRequest, Conflict, NotFound

# what new_batch_ids makes: any other id names no batch (and no other key of the store)
BATCH_ID = re.compile(r"batch_[0-9a-f]{24}")
# a request's Idempotency-Key names its batch this long; "pending" while the request is under way
IDEMPOTENCY_SECONDS = 24 * 3600
PENDING_SECONDS = 60
PENDING = "pending"

class ApiStatus(str, Enum):
    VALIDATING = "validating"
    FAILED = "failed"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (ApiStatus.FAILED, ApiStatus.COMPLETED, ApiStatus.EXPIRED, ApiStatus.CANCELLED)


TIMESTAMPS = ("in_progress_at", "finalizing_at", "completed_at", "failed_at", "expired_at",
              "cancelling_at", "cancelled_at")

# KEYS: record ; ARGV: n, from_1..from_n, field_1, value_1, ... -> 1 if changed
_TRANSITION = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 0 end
local n = tonumber(ARGV[1])
local allowed = false
for i = 2, n + 1 do if ARGV[i] == status then allowed = true end end
if not allowed then return 0 end
for i = n + 2, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
return 1
"""


@dataclass(frozen=True)
class ApiBatch:
    id: str
    owner: str
    store_id: str
    input_file_id: str
    endpoint: str
    completion_window: str
    created_at: int
    expires_at: int
    status: ApiStatus
    metadata: dict[str, str] | None = None
    times: dict[str, int] = field(default_factory=dict)
    output_file_id: str | None = None
    error_file_id: str | None = None
    errors: list[dict[str, Any]] | None = None
    # set once the input file is wholly in the store
    submitted: bool = False
    # the store batch has been cancelled for a cancel request / the window's end
    cancel_sent: bool = False
    expiring: bool = False
    # request counts and usage as they were when the batch ended
    final_counts: dict[str, int] | None = None
    final_usage: dict[str, int] | None = None
    # the model most of its answers named, once it ended
    model: str | None = None
    # provider and base URL of the server that accepted the batch (never a secret)
    options: BatchOptions | None = None
    # how long its output and error files live (``output_expires_after``); the record goes with them
    output_ttl: int = BATCH_FILE_TTL

    def to_api(self, info: BatchInfo | None) -> dict[str, Any]:
        """The OpenAI ``Batch`` object, with counts and usage from ``info`` while the batch runs."""
        counts = self.final_counts or _counts(info)
        usage = self.final_usage or _usage(info)
        body: dict[str, Any] = {
            "id": self.id, "object": "batch", "endpoint": self.endpoint, "errors": None,
            "input_file_id": self.input_file_id, "completion_window": self.completion_window,
            "status": self.status.value, "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id, "created_at": self.created_at,
            "expires_at": self.expires_at, "request_counts": counts, "metadata": self.metadata,
            "model": self.model,
            "usage": {"input_tokens": usage["input_tokens"], "output_tokens": usage["output_tokens"],
                      "total_tokens": usage["input_tokens"] + usage["output_tokens"],
                      "input_tokens_details": {"cached_tokens": usage.get("cached_tokens", 0)},
                      "output_tokens_details": {"reasoning_tokens": usage.get("reasoning_tokens", 0)}},
        }
        body.update({name: self.times.get(name) for name in TIMESTAMPS})
        if self.errors:
            body["errors"] = {"object": "list", "data": self.errors}
        return body


def _counts(info: BatchInfo | None) -> dict[str, int]:
    if info is None:
        return {"total": 0, "completed": 0, "failed": 0}
    ok = info.counts.get(Status.OK.value, 0)
    return {"total": info.total if info.total is not None else 0, "completed": ok,
            "failed": info.done - ok}


def _usage(info: BatchInfo | None) -> dict[str, int]:
    usage = info.usage if info is not None else {}
    return {"input_tokens": usage.get("prompt_tokens", 0), "output_tokens": usage.get("completion_tokens", 0)}


def final_snapshot(info: BatchInfo, cached_tokens: int = 0, reasoning_tokens: int = 0,
                   model: str | None = None) -> dict[str, str]:
    """Fields that keep the counts, the usage (with what the answers said of their cached and
    reasoning tokens, read as the output file was written) and the model once the store's batch
    has expired."""
    usage = {**_usage(info), "cached_tokens": cached_tokens, "reasoning_tokens": reasoning_tokens}
    fields = {"final_counts": json.dumps(_counts(info)), "final_usage": json.dumps(usage)}
    if model is not None:
        fields["model"] = model
    return fields


def new_batch_ids() -> tuple[str, str]:
    """An OpenAI-looking id and the store's id for the same batch ([0-9a-z] only)."""
    token = uuid.uuid4().hex[:24]
    return "batch_" + token, "a" + token


class BatchRecords:
    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._transition = client.register_script(_TRANSITION)

    @translated
    def create(self, owner: str, input_file_id: str, endpoint: str, completion_window: str,
               window_seconds: int, metadata: dict[str, str] | None,
               options: BatchOptions | None = None, idempotency_key: str | None = None,
               output_ttl: int = BATCH_FILE_TTL,
               admitting: Callable[[], AbstractContextManager[None]] = nullcontext) -> ApiBatch:
        """A new batch, run with ``options`` (the creating server's provider and base URL); with
        ``idempotency_key`` (a client's Idempotency-Key header), the batch that key made already
        (its retry), made once whatever the retries: the key and the batch are written together.
        ``admitting`` raises if a new batch may not be made (a quota) and holds what it checked while
        the batch is made; a retry's batch is not new."""
        if idempotency_key is None:
            with admitting():
                return self._create(owner, input_file_id, endpoint, completion_window, window_seconds, metadata,
                                options, output_ttl, lambda pipe, batch_id: None)
        key = api_idempotency(owner, hashlib.sha256(idempotency_key.encode()).hexdigest())
        asked = hashlib.sha256(json.dumps([input_file_id, endpoint, completion_window, metadata, output_ttl],
                                          sort_keys=True).encode()).hexdigest()
        if not self.redis.set(key, f"{PENDING} {asked}", nx=True, ex=PENDING_SECONDS):
            return self._made_by(owner, key, asked)
        try:
            with admitting():
                return self._create(owner, input_file_id, endpoint, completion_window, window_seconds, metadata,
                                    options, output_ttl,
                                    lambda pipe, batch_id: pipe.set(key, f"{batch_id} {asked}", ex=IDEMPOTENCY_SECONDS))
        except BaseException:
            self.redis.delete(key)
            raise

    def _made_by(self, owner: str, key: str, asked: str) -> ApiBatch:
        """The batch an Idempotency-Key made already (the parameters must be the same)."""
        raw: Any = self.redis.get(key)
        made, _, digest = (raw or b"").decode().partition(" ")
        if not made:
            raise Conflict("a request with this Idempotency-Key has just failed; send it again")
        if digest != asked:
            raise BadRequest("this Idempotency-Key was sent with other parameters", code="idempotency_key_reused")
        if made == PENDING:
            raise Conflict("a request with this Idempotency-Key is under way; send it again in a moment")
        return self.get(owner, made)

    def _create(self, owner: str, input_file_id: str, endpoint: str, completion_window: str, window_seconds: int,
                metadata: dict[str, str] | None, options: BatchOptions | None, output_ttl: int,
                also: Callable[[Any, str], None]) -> ApiBatch:
        batch_id, store_id = new_batch_ids()
        now = int(time.time())
        batch = ApiBatch(id=batch_id, owner=owner, store_id=store_id, input_file_id=input_file_id,
                         endpoint=endpoint, completion_window=completion_window, created_at=now,
                         expires_at=now + window_seconds, status=ApiStatus.VALIDATING, metadata=metadata,
                         options=options, output_ttl=output_ttl)
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(api_batch(batch_id), mapping={
            "owner": owner, "store_id": store_id, "input_file_id": input_file_id, "endpoint": endpoint,
            "completion_window": completion_window, "created_at": now, "expires_at": batch.expires_at,
            "status": ApiStatus.VALIDATING.value, "metadata": json.dumps(metadata),
            "options": json.dumps(options.__dict__ if options else None), "output_ttl": output_ttl})
        pipe.zadd(owner_batches(owner), {batch_id: time.time() * 1000})
        pipe.sadd(API_ACTIVE, batch_id)
        also(pipe, batch_id)
        pipe.execute()
        return batch

    @translated
    def load(self, batch_id: str) -> ApiBatch | None:
        if not BATCH_ID.fullmatch(batch_id):
            return None
        raw: Any = self.redis.hgetall(api_batch(batch_id))
        return _from_hash(batch_id, raw) if raw else None

    @translated
    def load_many(self, batch_ids: Sequence[str]) -> list[ApiBatch]:
        """:meth:`load` of many batches in one round trip; those that are gone are left out."""
        ids = [batch_id for batch_id in batch_ids if BATCH_ID.fullmatch(batch_id)]
        pipe = self.redis.pipeline(transaction=False)
        for batch_id in ids:
            pipe.hgetall(api_batch(batch_id))
        return [_from_hash(batch_id, raw) for batch_id, raw in zip(ids, pipe.execute() if ids else []) if raw]

    def get(self, owner: str, batch_id: str) -> ApiBatch:
        """The batch if ``owner`` owns it; :class:`NotFound` otherwise (another owner's too)."""
        batch = self.load(batch_id)
        if batch is None or batch.owner != owner:
            raise NotFound(f"No batch found with id '{batch_id}'.", param="batch_id")
        return batch

    @translated
    def list_batches(self, owner: str, after: str | None, limit: int,
                     newest_first: bool = True) -> tuple[list[ApiBatch], bool]:
        """Newest first (else oldest first): up to ``limit`` batches after the batch ``after``, and
        whether more follow."""
        index = owner_batches(owner)
        start = 0
        if after:
            rank: Any = (self.redis.zrevrank if newest_first else self.redis.zrank)(index, after)
            if rank is None:
                raise NotFound(f"No batch found with id '{after}'.", param="after")
            start = int(rank) + 1
        replies: Any = (self.redis.zrevrange if newest_first else self.redis.zrange)(index, start, start + limit)
        ids = [i.decode() for i in replies]
        found = []
        for batch_id in ids[:limit]:
            batch = self.load(batch_id)
            if batch is None:  # expired with its files, or deleted: the index forgets it
                self.redis.zrem(index, batch_id)
            else:
                found.append(batch)
        return found, len(ids) > limit

    @translated
    def expire_with_files(self, batch_id: str, seconds: int) -> None:
        """The ended batch's record lives as long as its output and error files."""
        self.redis.expire(api_batch(batch_id), seconds)

    @translated
    def delete(self, owner: str, batch_id: str) -> None:
        """Forget an ended batch's record (its files are deleted by the caller)."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(api_batch(batch_id))
        pipe.zrem(owner_batches(owner), batch_id)
        pipe.srem(API_ACTIVE, batch_id)
        pipe.execute()

    @translated
    def transition(self, batch_id: str, allowed: tuple[ApiStatus, ...], to: ApiStatus | None,
                   fields: dict[str, Any] | None = None) -> bool:
        """Set ``fields`` (and the status ``to``) only if the status is one of ``allowed``."""
        values = dict(fields or {})
        if to is not None:
            values["status"] = to.value
        args: list[Any] = [len(allowed), *(s.value for s in allowed)]
        for name, value in values.items():
            args += [name, value]
        return bool(self._transition(keys=[api_batch(batch_id)], args=args))

    @translated
    def active(self) -> list[str]:
        members: Any = self.redis.smembers(API_ACTIVE)
        return sorted(m.decode() for m in members)

    @translated
    def deactivate(self, batch_id: str) -> None:
        self.redis.srem(API_ACTIVE, batch_id)


def _from_hash(batch_id: str, raw: dict[bytes, bytes]) -> ApiBatch:
    m = {k.decode(): v.decode(errors="replace") for k, v in raw.items()}
    return ApiBatch(
        id=batch_id, owner=m.get("owner", ""), store_id=m.get("store_id", ""),
        input_file_id=m.get("input_file_id", ""), endpoint=m.get("endpoint", ""),
        completion_window=m.get("completion_window", "24h"), created_at=int(m.get("created_at", 0)),
        expires_at=int(m.get("expires_at", 0)), status=ApiStatus(m.get("status", "validating")),
        metadata=json.loads(m.get("metadata", "null")),
        times={name: int(m[name]) for name in TIMESTAMPS if name in m},
        output_file_id=m.get("output_file_id") or None, error_file_id=m.get("error_file_id") or None,
        errors=json.loads(m["errors"]) if "errors" in m else None,
        submitted=m.get("submitted") == "1", cancel_sent=m.get("cancel_sent") == "1",
        expiring=m.get("expiring") == "1",
        final_counts=json.loads(m["final_counts"]) if "final_counts" in m else None,
        final_usage=json.loads(m["final_usage"]) if "final_usage" in m else None,
        model=m.get("model") or None,
        options=_options(m.get("options")),
        output_ttl=int(m["output_ttl"]) if m.get("output_ttl", "").isdigit() else BATCH_FILE_TTL,
    )


def _options(raw: str | None) -> BatchOptions | None:
    data = json.loads(raw) if raw else None
    return BatchOptions(**data) if isinstance(data, dict) else None
