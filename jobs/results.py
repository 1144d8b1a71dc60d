"""Reading a batch's results: in input order or in the order recorded, a chunk at a time."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import cast

import redis

from . import keys
from .connection import translated
from .records import ItemResult, Usage

READ_CHUNK = 2000


class ResultReader:
    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

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
