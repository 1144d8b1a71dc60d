"""What one key may hold at once: active batches, queued items, bytes stored, uploads under way.

Over a quota, a request is refused with a 429 in OpenAI's form (``type`` "insufficient_quota",
``code`` "quota_exceeded", a message naming the quota and its figure) before anything is made.
The figures are read from Redis when asked (each key's own indexes), so every replica sees the
same; two requests at the very same moment may each pass a quota with one slot left.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import redis

from jobs.connection import translated
from jobs.errors import ConfigError
from jobs.files import FileNotFound, FileStore
from jobs.keys import API_ACTIVE, file_meta, owner_batches, owner_files, quota_lock
from jobs.store import BatchStore

from .errors import TooManyRequests
from .lease import Lease
from .records import BatchRecords

DEFAULT_ACTIVE_BATCHES = 100
DEFAULT_QUEUED_ITEMS = 1_000_000
DEFAULT_STORED_BYTES = 10 * 2**30
DEFAULT_UPLOADS = 4
LOCK_WAIT_SECONDS = 5.0  # a request waits this long at most for the owner's others
# how a quota is named in AIVVM_BATCH_API_KEYS and the keys file: ``sk-… batches=5 items=1e5``
WORDS = {"batches": "active_batches", "items": "queued_items", "bytes": "stored_bytes", "uploads": "uploads"}
_SIZE = re.compile(r"(\d+)([kKmMgG]i?)?")
_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "ki": 2**10, "mi": 2**20, "gi": 2**30}


@dataclass(frozen=True)
class Quota:
    active_batches: int = DEFAULT_ACTIVE_BATCHES
    queued_items: int = DEFAULT_QUEUED_ITEMS
    stored_bytes: int = DEFAULT_STORED_BYTES
    uploads: int = DEFAULT_UPLOADS


def with_words(base: Quota, words: Sequence[str], where: str) -> Quota:
    """``base`` with the ``name=value`` words of a key's entry (``bytes=2Gi``); a bad word is a
    :class:`ConfigError` naming ``where`` and the word's place, never the word (with a comma
    missing between two keys, the second key is that word)."""
    changes: dict[str, int] = {}
    for place, word in enumerate(words, 2):
        name, _, value = word.partition("=")
        found = _SIZE.fullmatch(value)
        if name not in WORDS or found is None or int(found.group(1)) < 1:
            what = f"quota {name!r} needs" if name in WORDS else "is not a quota: write"
            raise ConfigError(f"{where}, word {place} {what} {', '.join(w + '=N' for w in WORDS)} "
                              "(N a whole number over 0; bytes may end in k, M, G, Ki, Mi or Gi; keys are "
                              "separated by commas)")
        changes[WORDS[name]] = int(found.group(1)) * _UNITS[(found.group(2) or "").lower()]
    return replace(base, **changes)


class QuotaExceeded(TooManyRequests):
    type = "insufficient_quota"
    code = "quota_exceeded"


class Quotas:
    """Each owner's quota (a key's own, else the server's) and what the owner holds now."""

    def __init__(self, default: Quota, own: dict[str, Quota], files: FileStore, records: BatchRecords,
                 store: BatchStore) -> None:
        self.default = default
        self.own = own
        self.files = files
        self.records = records
        self.store = store

    def of(self, owner: str) -> Quota:
        return self.own.get(owner, self.default)

    def check_upload(self, owner: str, incoming: int) -> int:
        """Refuse an upload of ``incoming`` bytes (0: not said) that would take the owner past its
        bytes; else the bytes it may still store (the upload is held to them as it is read)."""
        limit = self.of(owner).stored_bytes
        held = self.stored_bytes(owner)
        if held + incoming > limit or held >= limit:
            raise QuotaExceeded(f"this key stores {held:,} bytes of files; its quota is {limit:,} bytes "
                                "(delete files, or let them expire)", retry_after=60)
        return limit - held

    @contextmanager
    def admitting(self, owner: str, new_items: int) -> Iterator[None]:
        """Check the owner's batch quotas and hold them while its batch is made: the owner's other
        requests (on any replica) wait for this one, so two cannot take the same last slot."""
        deadline = time.monotonic() + LOCK_WAIT_SECONDS
        while True:
            with Lease(self.records.redis, quota_lock(owner), ttl_seconds=10) as held:
                if held:
                    self.check_batch(owner, new_items)
                    yield
                    return
            if time.monotonic() > deadline:
                raise TooManyRequests("this key's other requests are making batches: try again", retry_after=1)
            time.sleep(0.01)

    def check_batch(self, owner: str, new_items: int) -> None:
        """Refuse a batch of ``new_items`` that would take the owner past its active batches or queued items."""
        quota = self.of(owner)
        active = self._active(owner)
        if len(active) >= quota.active_batches:
            raise QuotaExceeded(f"this key has {len(active)} batches under way; its quota is "
                                f"{quota.active_batches} (wait for one to end, or cancel one)", retry_after=60)
        queued = self.queued_items(active)
        if queued + new_items > quota.queued_items:
            raise QuotaExceeded(f"this key has {queued:,} items queued and this batch adds {new_items:,}; its "
                                f"quota is {quota.queued_items:,} queued items", retry_after=60)

    @translated
    def stored_bytes(self, owner: str) -> int:
        ids: Any = self.files.redis.zrange(owner_files(owner), 0, -1)
        pipe = self.files.redis.pipeline(transaction=False)
        for file_id in ids:
            pipe.hget(file_meta(file_id.decode()), "bytes")
        return sum(int(size) for size in pipe.execute() if size is not None and size.isdigit())

    @translated
    def _active(self, owner: str) -> list[str]:
        """The owner's batches among every owner's active ones (a set as small as what runs)."""
        client: redis.Redis = self.records.redis
        active: Any = client.smembers(API_ACTIVE)
        ids = sorted(m.decode() for m in active)
        pipe = client.pipeline(transaction=False)
        for batch_id in ids:
            pipe.zscore(owner_batches(owner), batch_id)
        return [batch_id for batch_id, score in zip(ids, pipe.execute()) if score is not None]

    def queued_items(self, active: Sequence[str]) -> int:
        """Items of these batches not ended yet (of a batch still validating: its file's lines)."""
        batches = [b for b in self.records.load_many(active) if not b.status.terminal]
        infos = self.store.infos([b.store_id for b in batches if b.submitted])
        queued = sum(max(0, (info.total or 0) - info.done) for info in infos.values())
        for batch in batches:
            if not batch.submitted:
                try:
                    queued += self.files.get(batch.owner, batch.input_file_id).lines or 0
                except FileNotFound:
                    continue
        return queued

