"""A submitted chunk of input lines into the store: requests kept, items enqueued or answered at once.

An item is answered without a provider call when it has its result already (a resumed
submission), when an earlier batch answered the same request ``ok`` (:class:`Reuse`), or
when the cache has its answer (:mod:`jobs.cache`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from . import keys, scripts
from .cache import cache_key, reused
from .connection import translated
from .recording import ResultRecorder
from .records import BatchOptions, ItemRequest, ItemResult, Status, invalid_result


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
    """What :meth:`ChunkIntake.add_chunk` did with one chunk."""

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


class ChunkIntake:
    def __init__(self, client: redis.Redis, recorder: ResultRecorder) -> None:
        self.redis = client
        self.recorder = recorder
        self._own_ids = client.register_script(scripts.OWN_IDS)
        self._store_requests = client.register_script(scripts.STORE_REQUESTS)

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
            self.recorder.record_in(pipe, batch_id, list(results.items()))
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


def _written(request: dict[str, Any]) -> dict[str, Any]:
    """A stored request without the fields at their defaults (older batches wrote them out)."""
    return {k: v for k, v in request.items() if v is not None and v != {}}


def _carried_over(request: ItemRequest, request_json: str, old_request: bytes | None,
                  old_result: bytes | None, reuse: Reuse | None) -> ItemResult | None:
    """The earlier batch's result for this item, if it may stand for the new one."""
    if reuse is None or not reuse.same_options or old_request is None or old_result is None:
        return None
    if _written(json.loads(old_request)) != _written(json.loads(request_json)):
        return None
    result = ItemResult.from_json(old_result)
    if result.status is not Status.OK:
        return None
    return dataclasses.replace(result, id=request.id, line=request.line)
