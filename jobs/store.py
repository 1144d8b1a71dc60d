"""The Redis batch store: one place that reads and writes a batch's keys.

The connection is passed in, never global. Every state change that must happen
once (the final result of an item, its count, the batch's expiry) happens
inside one Lua script, so a task that runs twice cannot record twice.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from enum import Enum, IntEnum
from typing import Any, TypeVar, cast

import redis
from redis.backoff import ExponentialBackoff
from redis.exceptions import AuthenticationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry as RedisRetry
from redis.typing import EncodableT, FieldT

from . import keys, scripts
from .cache import cache_key, reused
from .cache import entry as cache_entry
from .errors import BatchNotFound, ConfigError, StoreFull, StoreUnavailable
from .records import (
    BatchInfo,
    BatchOptions,
    BatchState,
    ItemRequest,
    ItemResult,
    Status,
    Usage,
    cancelled_result,
    invalid_result,
)

DEFAULT_RESULT_TTL = 7 * 24 * 3600
READ_CHUNK = 2000
FULL_RATIO = 0.98
SAFE_POLICY = "noeviction"

F = TypeVar("F", bound=Callable[..., Any])
# a worker's client rides out a Redis restart (about two minutes); every store call is idempotent
WORKER_RETRIES = 30
POOL_WAIT_SECONDS = 5.0


def connect(url: str, *, max_connections: int | None = None, retries: int = 0,
            connect_timeout: float | None = None, socket_timeout: float | None = None) -> redis.Redis:
    """The one way to build a Redis client here.

    ``max_connections``: a pool of at most that many connections, where a caller past the
    limit waits (up to 5 s, then a connection error: a wait, not a crash) instead of redis-py's
    default of failing at once past 100. ``retries``: each command is retried that many times,
    with backoff, on connection errors and timeouts (the workers' clients: ride out a restart).
    ``socket_timeout``: a reply that does not come within it is a timeout (a host cut off from
    Redis drops packets: without one, a call waits for TCP to give up, a quarter of an hour).
    """
    options: dict[str, Any] = {"health_check_interval": 30, "socket_keepalive": True}
    if connect_timeout is not None:
        options["socket_connect_timeout"] = connect_timeout
    if socket_timeout is not None:
        options["socket_timeout"] = socket_timeout
    if retries:
        options["retry"] = RedisRetry(ExponentialBackoff(cap=5.0, base=0.2), retries)
        options["retry_on_error"] = [RedisConnectionError, RedisTimeoutError]
    if max_connections is None:
        return redis.Redis.from_url(url, **options)
    pool = redis.BlockingConnectionPool.from_url(url, max_connections=max_connections,
                                                 timeout=POOL_WAIT_SECONDS, **options)
    client = redis.Redis(connection_pool=pool)
    client.auto_close_connection_pool = True
    return client



def translated(func: F) -> F:
    """Turn redis-py's failures into this package's errors (:class:`StoreUnavailable`, ...)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except AuthenticationError as exc:
            raise ConfigError(f"Redis refused the credentials in the Redis URL: {exc}") from exc
        except (RedisConnectionError, RedisTimeoutError) as exc:
            raise StoreUnavailable(f"Redis is unreachable: {exc}") from exc
        except ResponseError as exc:
            if is_out_of_memory(exc):
                raise StoreFull(FULL_MESSAGE) from exc
            if "NOAUTH" in str(exc) or "WRONGPASS" in str(exc):
                raise ConfigError(f"Redis refused the credentials in the Redis URL: {exc}") from exc
            raise

    return wrapper  # type: ignore[return-value]


FULL_MESSAGE = ("Redis is full: it reached its maxmemory and refuses writes "
                "(OOM command not allowed); free memory or raise maxmemory")


def is_out_of_memory(exc: BaseException | None) -> bool:
    """A write refused at ``maxmemory``, also wrapped: in an ERR reply of a script (Redis 6.2),
    an aborted transaction, or a kombu error (followed along ``__cause__`` / ``__context__``)."""
    seen = 0
    while exc is not None and seen < 5:
        if isinstance(exc, OutOfMemoryError) or "command not allowed when used memory" in str(exc):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


@dataclass(frozen=True)
class WorkerSeen:
    """A worker's last heartbeat: how long ago (Redis's clock), the claims it held, its note."""

    name: str
    age: float
    held: int = 0
    note: str = ""
    slots: int = 0  # its requests in flight at most (0: not said)

    @property
    def missing(self) -> bool:
        return self.age >= WORKER_MISSING_SECONDS


# a worker not seen for this long is shown as missing (heartbeats come every sweep, 10 s by default)
WORKER_MISSING_SECONDS = 60.0


def worker_seen(name: str, value: str, now: float) -> WorkerSeen:
    """A heartbeat as stored (``"<seen> <held>/<slots> <note>"``; older workers wrote ``"<seen>"``
    or ``"<seen> <held> <note>"``)."""
    parts = value.split(" ", 2)
    try:
        seen = float(parts[0])
        held, _, slots = (parts[1] if len(parts) > 1 else "0").partition("/")
        held_n, slots_n = int(held), int(slots or 0)
    except ValueError:
        return WorkerSeen(name, float("inf"))
    return WorkerSeen(name, max(0.0, now - seen), held_n, parts[2] if len(parts) > 2 else "", slots_n)


class Recorded(IntEnum):
    """What recording an item's result did (the RECORD script's answer per item)."""

    NOT = 0  # the batch is gone, or the item has its result already (this one, sent again)
    RECORDED = 1
    LATE = 2  # paid, not the final result (the claim had passed on): counted in usage, as late


class ClaimOutcome(str, Enum):
    CLAIMED = "claimed"
    DONE = "done"
    BUSY = "busy"
    PAUSED = "paused"
    CANCELLED = "cancelled"
    BUDGET = "budget"  # what the batch paid reached its budget: the item does not start
    GONE = "gone"


@dataclass(frozen=True)
class Claim:
    """What a worker learns when it tries to start an item, in one round trip."""

    outcome: ClaimOutcome
    request: ItemRequest | None = None
    options: BatchOptions | None = None
    paused_seconds: float = 0.0


@dataclass(frozen=True)
class ServerMemory:
    """INFO memory of the Redis: bytes used, the limit (0: none) and the eviction policy."""

    used: int
    maxmemory: int
    policy: str

    @property
    def full(self) -> bool:
        """At (or within 2% of) maxmemory: writes are refused, or soon will be."""
        return self.maxmemory > 0 and self.used >= self.maxmemory * FULL_RATIO

    def describe(self) -> str:
        return f"{self.used / 2**20:.1f} MiB used of maxmemory {self.maxmemory / 2**20:.1f} MiB"


@dataclass(frozen=True)
class Reuse:
    """An earlier batch whose ``ok`` results a new submission may carry over.

    ``same_options``: the earlier batch had the same provider and base URL (else
    nothing is kept, and every line with a counterpart counts as changed).
    """

    batch_id: str
    same_options: bool


@dataclass(frozen=True)
class ChunkOutcome:
    """What :meth:`BatchStore.add_chunk` did with one chunk."""

    enqueued: list[int]
    kept: int = 0
    changed: int = 0
    cached: int = 0  # answered from the cache
    duplicates: int = 0  # lines whose id an earlier line has: invalid


@dataclass(frozen=True)
class ChunkEntry:
    """One non-blank input line on its way into the store."""

    seq: int
    parsed: ItemRequest | ItemResult


class BatchStore:
    def __init__(self, client: redis.Redis, result_ttl: int = DEFAULT_RESULT_TTL) -> None:
        self.redis = client
        self.result_ttl = result_ttl
        self._record = client.register_script(scripts.RECORD)
        self._claim = client.register_script(scripts.CLAIM)
        self._spend = client.register_script(scripts.SPEND)
        self._pause = client.register_script(scripts.PAUSE)
        self._release = client.register_script(scripts.RELEASE)
        self._touch = client.register_script(scripts.TOUCH)
        self._cancel = client.register_script(scripts.CANCEL)
        self._reset = client.register_script(scripts.RESET)
        self._own_ids = client.register_script(scripts.OWN_IDS)
        self._store_requests = client.register_script(scripts.STORE_REQUESTS)
        self._finalize = client.register_script(scripts.FINALIZE)
        self._count_late = client.register_script(scripts.COUNT_LATE)
        self._worker_beat = client.register_script(scripts.WORKER_BEAT)

    @translated
    def load_scripts(self) -> None:
        """Load the item path's scripts in one round trip (a worker, at its start): the first use
        of each would otherwise be refused (NOSCRIPT) and sent again, a second on a slow link."""
        pipe = self.redis.pipeline(transaction=False)
        for script in (self._claim, self._record, self._touch, self._release, self._count_late):
            pipe.script_load(script.script)
        pipe.execute()

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
    def memory(self) -> ServerMemory:
        info = self.redis.info("memory")
        return ServerMemory(int(info.get("used_memory", 0)), int(info.get("maxmemory", 0)),
                            str(info.get("maxmemory_policy", "")))

    @translated
    def check_server(self) -> None:
        """Refuse a Redis that may evict keys: it would silently drop queued messages and batches.

        The policy comes from CONFIG GET, else (a managed Redis that disables CONFIG) from INFO.
        """
        try:
            policy = str(self.redis.config_get("maxmemory-policy").get("maxmemory-policy", ""))
        except ResponseError:
            policy = ""
        policy = policy or self.memory().policy
        if policy and policy != SAFE_POLICY:
            raise ConfigError(f"maxmemory-policy must be {SAFE_POLICY}, but this Redis has {policy}: "
                              "it would silently drop queued items and batches when memory runs out "
                              f"(CONFIG SET maxmemory-policy {SAFE_POLICY})")

    def _data_loss_hint(self) -> str:
        """Why a batch may be missing although it was submitted here (BatchNotFound's hint)."""
        try:
            if not self.redis.exists(keys.BATCH_INDEX):
                return ("this Redis holds no batch at all: if the batch was submitted here, the Redis "
                        "has lost its data (restarted without persistence, or flushed)")
            info = self.redis.info("persistence")
            if info.get("aof_enabled") or not self._no_snapshots():
                return ""
            uptime = int(self.redis.info("server").get("uptime_in_seconds", 0))
        except (ResponseError, RedisConnectionError, RedisTimeoutError):
            return ""
        return (f"this Redis keeps no data across restarts (no AOF, no RDB snapshots) and started "
                f"{uptime} s ago: the batch may have been lost in a restart")

    def _no_snapshots(self) -> bool:
        try:
            return not self.redis.config_get("save").get("save")
        except ResponseError:
            return False

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
            raise BatchNotFound(batch_id, self._data_loss_hint())
        return _batch_info(batch_id, meta, counts, usage, errors)

    @translated
    def note_attempt_error(self, batch_id: str, text: str) -> None:
        """Count a failed attempt's error (``"<type>: <message>"``) for ``status`` and progress."""
        self.note_attempt_errors([(batch_id, text)])

    @translated
    def note_attempt_errors(self, errors: Sequence[tuple[str, str]]) -> None:
        """Count many failed attempts' errors ``(batch_id, text)`` in one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        for batch_id, text in errors:
            pipe.hincrby(keys.errors(batch_id), text[:200], 1)
        for batch_id in {batch_id for batch_id, _ in errors}:
            pipe.expire(keys.errors(batch_id), self.result_ttl)
        pipe.execute()

    @translated
    def worker_heartbeat(self, name: str, held: int = 0, note: str = "", slots: int = 0) -> None:
        """Say that worker ``name`` is alive now (Redis's time), holding ``held`` claims of its
        ``slots``; ``note``: what it wants known (``provider unreachable for 60 s``)."""
        self._worker_beat(keys=[keys.WORKERS], args=[name, f"{held}/{slots} {note}".strip()])

    @translated
    def set_slots(self, total: int, ttl: float) -> None:
        """The slots of the workers seen lately, together: how large the batches' windows are."""
        self.redis.set(keys.SLOTS, total, px=max(1, int(ttl * 1000)))

    @translated
    def workers(self) -> list[WorkerSeen]:
        """Every worker that ever said it was alive, the latest first, aged by Redis's clock."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(keys.WORKERS)
        pipe.time()
        entries, (seconds, micros) = pipe.execute()
        now = seconds + micros / 1e6
        seen = [worker_seen(name.decode(errors="replace"), value.decode(errors="replace"), now)
                for name, value in entries.items()]
        return sorted(seen, key=lambda w: w.age)

    @translated
    def forget_workers(self, names: Sequence[str]) -> None:
        """Stop listing these workers (not seen for a long time)."""
        if names:
            self.redis.hdel(keys.WORKERS, *names)

    def last_worker_age(self) -> float | None:
        """Seconds since the latest heartbeat of any worker, or None if none was ever seen."""
        seen = self.workers()
        return seen[0].age if seen else None

    @translated
    def count_late(self, batch_id: str, calls: Sequence[tuple[int, Usage, int, str]]) -> int:
        """Count calls paid for items ``(seq, their usage, how many calls, the claim's token)`` that
        another result answers (a run whose claim passed on); once per token."""
        if not calls:
            return 0
        args: list[Any] = []
        for seq, usage, count, token in calls:
            args += [seq, usage.prompt_tokens, usage.completion_tokens, int(usage.estimated), count, token]
        return int(self._count_late(keys=keys.batch_keys(batch_id), args=args))

    @translated
    def list_batches(self, limit: int = 100) -> list[BatchInfo]:
        # members without scores, as bytes: the store's clients never decode responses
        members = cast("list[bytes]", self.redis.zrevrange(keys.BATCH_INDEX, 0, limit - 1))
        ids = [i.decode() for i in members]
        pipe = self.redis.pipeline(transaction=False)
        parts = (keys.meta, keys.counts, keys.usage, keys.errors)
        for batch_id in ids:
            for part in parts:
                pipe.hgetall(part(batch_id))
        replies = pipe.execute()
        found, gone = [], []
        for i, batch_id in enumerate(ids):
            meta, counts, usage, errors = replies[len(parts) * i:len(parts) * (i + 1)]
            if meta:
                found.append(_batch_info(batch_id, meta, counts, usage, errors))
            else:
                gone.append(batch_id)
        if gone:
            self.redis.zrem(keys.BATCH_INDEX, *gone)
        return found

    @translated
    def add_chunk(self, batch_id: str, entries: Sequence[ChunkEntry], *, resume: bool,
                  enqueue: Callable[[Any, list[int]], None], reuse: Reuse | None = None,
                  send: Callable[[Any], None] | None = None, cache: BatchOptions | None = None) -> ChunkOutcome:
        """Store a chunk of lines in two round trips and enqueue its items in the second.

        Duplicate ids become ``invalid`` results. With ``resume``, items that
        already have a result are not enqueued again (a re-submission of the same file).
        With ``reuse``, an item whose request equals the earlier batch's at the same
        seq, and whose result there is ``ok``, gets that result instead of a message.
        ``send`` sends the second round trip (a pipeline) instead of executing it here
        (:class:`jobs.submit.OneAhead`); nothing in it is read back. With ``cache`` (the batch's
        options, asking for it), an item whose very request was answered ``ok`` before gets that
        answer (:mod:`jobs.cache`).
        """
        valid = [(e.seq, e.parsed) for e in entries if isinstance(e.parsed, ItemRequest)]
        seqs = [seq for seq, _ in valid]
        pipe = self.redis.pipeline(transaction=False)
        nothing: list[Any] = [None] * len(valid)
        owners, finished, old_requests, old_results, answers = seqs, nothing, nothing, nothing, nothing
        if valid:
            # every id and seq in two arguments (scripts.OWN_IDS): packing thousands costs more
            ids = scripts.SEP.join([request.id.encode() for _, request in valid]) + scripts.SEP
            self._own_ids(keys=[keys.ids(batch_id)], args=[ids, " ".join(map(str, seqs))], client=pipe)
            if resume:
                pipe.hmget(keys.results(batch_id), seqs)
            if reuse is not None:
                pipe.hmget(keys.requests(reuse.batch_id), seqs)
                pipe.hmget(keys.results(reuse.batch_id), seqs)
            if cache is not None:
                pipe.mget([keys.cache(cache_key(cache, request)) for _, request in valid])
            replies = iter(pipe.execute())
            taken = next(replies)
            if taken:  # ids already owned by another seq: duplicates
                owners = list(seqs)
                for i in range(0, len(taken), 2):
                    owners[int(taken[i]) - 1] = int(taken[i + 1])
            finished = next(replies) if resume else nothing
            if reuse is not None:
                old_requests, old_results = next(replies), next(replies)
            if cache is not None:
                answers = next(replies)
        earlier = list(zip(old_requests, old_results))

        results: dict[int, ItemResult] = {e.seq: e.parsed for e in entries if isinstance(e.parsed, ItemResult)}
        stored_seqs: list[int] = []
        stored: list[str] = []
        to_enqueue: list[int] = []
        kept = changed = from_cache = duplicates = 0
        first_lines = self._lines_of(batch_id, [owner for (seq, _), owner in zip(valid, owners) if owner != seq],
                                     {seq: request.line for seq, request in valid})
        for (seq, request), owner, done, (old_request, old_result), answer in zip(valid, owners, finished, earlier,
                                                                                  answers):
            if owner != seq:
                first = f"line {first_lines[owner]}" if owner in first_lines else "an earlier line"
                results[seq] = invalid_result(
                    request.line, f"line {request.line}: duplicate id {request.id!r} (first used on {first})",
                    request.id,
                )
                duplicates += 1
                continue
            request_json = request.to_json()
            stored_seqs.append(seq)
            stored.append(request_json)
            if done is not None:
                continue
            carried = _carried_over(request, request_json, old_request, old_result, reuse)
            if carried is not None:
                results[seq] = carried
                kept += 1
                continue
            changed += old_request is not None or old_result is not None
            hit = reused(answer, request) if answer is not None else None
            if hit is not None:
                results[seq] = hit
                from_cache += 1
                continue
            to_enqueue.append(seq)
        pipe = self.redis.pipeline(transaction=False)
        if stored:
            # HSET requests seq request ..., its arguments joined as OWN_IDS's are
            self._store_requests(keys=[keys.requests(batch_id)],
                                 args=[scripts.SEP.join([r.encode() for r in stored]) + scripts.SEP,
                                       " ".join(map(str, stored_seqs))], client=pipe)
        if results:
            self._record_in(pipe, batch_id, list(results.items()))
        enqueue(pipe, to_enqueue)
        if send is None:
            pipe.execute()
        else:
            send(pipe)
        return ChunkOutcome(to_enqueue, kept, changed, from_cache, duplicates)

    def _lines_of(self, batch_id: str, seqs: list[int], known: dict[int, int]) -> dict[int, int]:
        """The input line of each seq: from ``known`` (this chunk), else from its stored request."""
        lines = {seq: known[seq] for seq in seqs if seq in known}
        stored = sorted({seq for seq in seqs if seq not in known})
        if stored:
            for seq, raw in zip(stored, self.redis.hmget(keys.requests(batch_id), stored)):
                if raw is not None:
                    lines[seq] = int(json.loads(raw)["line"])
        return lines

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
        self.clear_claims(batch_id)

    @translated
    def finalize(self, batch_id: str, total: int) -> None:
        self._finalize(keys=keys.batch_keys(batch_id), args=[total, self.result_ttl])

    @translated
    def claim(self, batch_id: str, seq: int, token: str, ttl_seconds: float) -> Claim:
        """Take an item for ``ttl_seconds`` unless it is done, taken, cancelled or paused."""
        return self.claim_many(batch_id, [(seq, token)], ttl_seconds)[0]

    @translated
    def claim_many(self, batch_id: str, held: Sequence[tuple[int, str]], ttl_seconds: float) -> list[Claim]:
        """Take each item ``(seq, token)`` (distinct seqs) for its token and load its request:
        a chunk of items in one script."""
        args: list[Any] = [max(1, int(ttl_seconds * 1000))]
        for seq, token in held:
            args += [seq, token]
        reply = self._claim(
            keys=[keys.meta(batch_id), keys.requests(batch_id), keys.results(batch_id), keys.usage(batch_id),
                  *(keys.claim(batch_id, seq) for seq, _ in held)],
            args=args,
        )
        if reply[0] == b"gone":
            return [Claim(ClaimOutcome.GONE) for _ in held]
        options = BatchOptions(**json.loads(reply[1])) if reply[1] else None
        paused = int(reply[2]) / 1000
        claims = []
        for i in range(len(held)):
            outcome = ClaimOutcome(reply[3 + 2 * i].decode())
            raw = reply[4 + 2 * i]
            request = ItemRequest.from_json(raw) if raw else None
            claims.append(Claim(outcome, request, options if request is not None else None,
                                paused if outcome is ClaimOutcome.PAUSED else 0.0))
        return claims

    @translated
    def spend(self, batch_id: str) -> bool:
        """Before a provider call of a batch with a budget: may it start? (counted if so)"""
        return bool(self._spend(keys=[keys.meta(batch_id), keys.usage(batch_id)]))

    @translated
    def keep_claim(self, batch_id: str, seq: int, token: str, ttl_seconds: float) -> bool:
        """Extend this execution's claim (also in a full Redis); False if it is no longer held."""
        return self.keep_claims([(batch_id, seq, token)], ttl_seconds)[0]

    @translated
    def keep_claims(self, held: Sequence[tuple[str, int, str]], ttl_seconds: float) -> list[bool]:
        """Extend many claims ``(batch_id, seq, token)`` at once, one script per batch (a lease renewal)."""
        kept: dict[tuple[str, int, str], bool] = {}
        ttl_ms = max(1, int(ttl_seconds * 1000))
        for batch_id, group in _by_batch(held).items():
            reply = self._touch(keys=[keys.claim(batch_id, seq) for _, seq, _ in group],
                                args=[ttl_ms, *(token for _, _, token in group)])
            kept.update(zip(group, (bool(r) for r in reply)))
        return [kept[entry] for entry in held]

    @translated
    def pause(self, batch_id: str, seconds: float) -> None:
        """No item of the batch starts for ``seconds``, on any worker (a server's Retry-After)."""
        self._pause(keys=[keys.meta(batch_id)], args=[max(1, int(seconds * 1000))])

    @translated
    def release(self, batch_id: str, seq: int, token: str) -> None:
        self.release_many([(batch_id, seq, token)])

    @translated
    def release_many(self, held: Sequence[tuple[str, int, str]]) -> int:
        """Drop claims ``(batch_id, seq, token)`` still held by their token; how many were dropped."""
        released = 0
        for batch_id, group in _by_batch(held).items():
            released += int(self._release(keys=[keys.claim(batch_id, seq) for _, seq, _ in group],
                                          args=[token for _, _, token in group]))
        return released

    @translated
    def record(self, batch_id: str, seq: int, result: ItemResult) -> bool:
        """Record the final result of an item; False if one was already recorded."""
        return self.record_many(batch_id, [(seq, result)])[0] is Recorded.RECORDED

    @translated
    def record_many(self, batch_id: str, results: Sequence[tuple[int, ItemResult]],
                    tokens: Sequence[str] | None = None) -> list[Recorded]:
        """Record the final results of many items in one script; per item, what it did.

        With ``tokens`` (the claims the results were made under), a result whose claim has
        passed to another token, or whose item has another result, is not recorded but
        counted as late (:class:`Recorded`); without, the first result wins and that is all.
        """
        if not results:
            return []
        return [Recorded(int(r)) for r in self._record_in(None, batch_id, results, tokens)]

    def _record_in(self, pipe: Any, batch_id: str, results: Sequence[tuple[int, ItemResult]],
                   tokens: Sequence[str] | None = None) -> Any:
        args: list[Any] = [self.result_ttl]
        for position, (seq, result) in enumerate(results):
            usage = None if result.cached else result.usage  # a reused answer costs the batch nothing
            args += [seq, result.to_json(), result.status.value, usage.prompt_tokens if usage else 0,
                     usage.completion_tokens if usage else 0, int(bool(usage and usage.estimated)),
                     tokens[position] if tokens else "", max(1, result.attempts)]
        return self._record(keys=[*keys.batch_keys(batch_id), *(keys.claim(batch_id, seq) for seq, _ in results)],
                            args=args, client=pipe)

    @translated
    def keep_answers(self, answers: Sequence[tuple[BatchOptions, ItemRequest, ItemResult]], ttl: int) -> None:
        """Keep ``ok`` results in the cache for later batches that ask the same (jobs/cache.py), in
        one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        for options, request, result in answers:
            text = cache_entry(result, options)
            if text is not None:
                pipe.set(keys.cache(cache_key(options, request)), text, ex=max(1, ttl))
        pipe.execute()

    @translated
    def finished_since(self, batch_id: str, offset: int, limit: int = READ_CHUNK) -> list[int]:
        """Seqs of the results recorded after the first ``offset`` ones, in the order recorded."""
        return [int(s) for s in self.redis.lrange(keys.finished_log(batch_id), offset, offset + limit - 1)]

    def iter_results(self, batch_id: str, total: int, chunk: int = READ_CHUNK) -> Iterator[tuple[int, bytes | None]]:
        """Yield ``(seq, result JSON or None)`` in input order, a chunk in memory at a time."""
        for start in range(0, total, chunk):
            seqs = list(range(start, min(start + chunk, total)))
            yield from zip(seqs, self.results_of(batch_id, seqs))

    @translated
    def results_of(self, batch_id: str, seqs: Sequence[int]) -> list[bytes | None]:
        """The results of ``seqs`` (None: none yet), with the calls paid late for them added in."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hmget(keys.results(batch_id), seqs)
        pipe.hmget(keys.late(batch_id), seqs)
        # bytes or None: the store's clients never decode responses
        raws, lates = cast("tuple[list[bytes | None], list[bytes | None]]", tuple(pipe.execute()))
        if any(lates):
            return [with_late(raw, late) if raw is not None and late else raw for raw, late in zip(raws, lates)]
        return list(raws)

    def unfinished(self, batch_id: str, total: int) -> Iterator[int]:
        for seq, raw in self.iter_results(batch_id, total):
            if raw is None:
                yield seq

    @translated
    def cancel(self, batch_id: str) -> int:
        """Stop a batch: no item starts after this; not-started items end ``cancelled``."""
        info = self.info(batch_id)
        self.redis.hset(keys.meta(batch_id), "state", BatchState.CANCELLED.value)
        total = info.total if info.total is not None else self.redis.hlen(keys.requests(batch_id))
        cancelled = 0
        pending = list(self.unfinished(batch_id, total))
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
        for seq, raw in self.iter_results(batch_id, info.total or 0):
            if raw is not None and json.loads(raw)["status"] == status.value:
                chosen.append(seq)
        reset: list[int] = []
        for start in range(0, len(chosen), READ_CHUNK):
            reply = self._reset(keys=keys.batch_keys(batch_id),
                                args=[status.value, *chosen[start:start + READ_CHUNK]])
            reset += [int(s) for s in reply]
        return reset

    @translated
    def claimed(self, batch_id: str, seqs: Sequence[int]) -> set[int]:
        """The items among ``seqs`` that an execution holds a live claim on."""
        pipe = self.redis.pipeline(transaction=False)
        for seq in seqs:
            pipe.exists(keys.claim(batch_id, seq))
        return {seq for seq, held in zip(seqs, pipe.execute()) if held}

    @translated
    def clear_claims(self, batch_id: str) -> None:
        """Drop every claim of a batch (only safe when no worker of it can be alive)."""
        for key in self.redis.scan_iter(match=keys.claim_pattern(batch_id), count=1000):
            self.redis.delete(key)


def _by_batch(held: Sequence[tuple[str, int, str]]) -> dict[str, list[tuple[str, int, str]]]:
    groups: dict[str, list[tuple[str, int, str]]] = {}
    for entry in held:
        groups.setdefault(entry[0], []).append(entry)
    return groups


def _carried_over(request: ItemRequest, request_json: str, old_request: bytes | None,
                  old_result: bytes | None, reuse: Reuse | None) -> ItemResult | None:
    """The earlier batch's result for this item, if it may stand for the new one."""
    if reuse is None or not reuse.same_options or old_request is None or old_result is None:
        return None
    if json.loads(old_request) != json.loads(request_json):
        return None
    result = ItemResult.from_json(old_result)
    if result.status is not Status.OK:
        return None
    return dataclasses.replace(result, id=request.id, line=request.line)


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


def with_late(raw: bytes, late: bytes) -> bytes:
    """A stored result with the calls paid late for its item added: their tokens to its ``usage``
    (estimated if any was), their number to its ``attempts`` (``late`` as :func:`keys.late` has it)."""
    try:
        prompt, completion, calls, estimated = (int(part) for part in late.split())
    except ValueError:
        return raw
    result = ItemResult.from_json(raw)
    usage = result.usage or Usage(0, 0, estimated=False)
    usage = Usage(usage.prompt_tokens + prompt, usage.completion_tokens + completion,
                  usage.estimated or bool(estimated))
    return dataclasses.replace(result, usage=usage, attempts=result.attempts + calls).to_json().encode()
