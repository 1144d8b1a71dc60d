"""Claims of items: a worker takes an item for a while (a lease it renews), then lets it go.

Whether an item may start at all is decided here too: a paused batch, a spent budget.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import redis
from redis.commands.core import Script

from . import keys, scripts
from .connection import translated
from .records import BatchOptions, ItemRequest


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


class ItemClaims:
    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._claim = client.register_script(scripts.CLAIM)
        self._touch = client.register_script(scripts.TOUCH)
        self._release = client.register_script(scripts.RELEASE)
        # the scripts of every item's path, that a worker loads at its start (BatchStore.load_scripts)
        self.item_path_scripts: tuple[Script, ...] = (self._claim, self._touch, self._release)
        self._spend = client.register_script(scripts.SPEND)
        self._pause = client.register_script(scripts.PAUSE)

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
