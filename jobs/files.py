"""Uploaded and produced files in Redis, for the OpenAI-compatible files API of ``serve``.

A file is a hash of metadata and a list of content chunks (about 1 MiB each), so
that an upload is written, and a download read, a chunk at a time: no process
holds a whole file, and several ``serve`` replicas behind one Redis share them
without a shared disk. An upload's chunks carry a TTL until the file is
committed, so an interrupted upload leaves nothing behind.

Owners are opaque strings (a digest of an API key, never the key itself).
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import redis

from .connection import translated
from .errors import BatchError
from .keys import file_data, file_meta, owner_files

# an upload held in memory before it goes to Redis: 100 uploads stalled mid-chunk hold 100 of these
CHUNK_BYTES = 64 * 1024
READ_CHUNKS = 16  # a file is read back 1 MiB a round trip
PENDING_TTL = 3600
# a file's ``expires_after`` (OpenAI's bounds), and the default of batch files (OpenAI's too)
MIN_TTL, MAX_TTL = 3600, 30 * 24 * 3600
BATCH_FILE_TTL = MAX_TTL


class FileNotFound(BatchError):
    """No such file for this owner (another owner's file is not found either)."""

    def __init__(self, file_id: str) -> None:
        super().__init__(f"No such File object: {file_id}")
        self.file_id = file_id


@dataclass(frozen=True)
class StoredFile:
    id: str
    owner: str
    filename: str
    purpose: str
    bytes: int
    created_at: int
    expires_at: int | None = None
    lines: int | None = None  # None: stored before lines were counted

    def to_api(self) -> dict[str, Any]:
        """The OpenAI ``FileObject``."""
        return {"id": self.id, "object": "file", "bytes": self.bytes, "created_at": self.created_at,
                "filename": self.filename, "purpose": self.purpose, "status": "processed",
                "expires_at": self.expires_at, "status_details": None}


# what new_file_id makes: any other id names no file (and no other key of the store)
FILE_ID = re.compile(r"file-[0-9a-f]{24}")


def new_file_id() -> str:
    return "file-" + uuid.uuid4().hex[:24]


class FileWriter:
    """Appends an upload's content to Redis a chunk at a time; ``commit`` makes it a file."""

    def __init__(self, files: FileStore, owner: str, filename: str, purpose: str,
                 file_id: str | None = None, ttl: int | None = None) -> None:
        self.files = files
        self.ttl = ttl  # seconds the file lives from its creation (None: until deleted)
        self.id = file_id or new_file_id()
        self.owner = owner
        self.filename = filename
        self.purpose = purpose
        self.size = 0
        self.lines = 0
        self._last = b"\n"
        self._buffer = bytearray()

    def write(self, data: bytes) -> None:
        """Buffer ``data`` and push the full chunks to Redis."""
        self.add(data)
        self.push_full()

    def add(self, data: bytes) -> None:
        """Buffer ``data`` (no I/O)."""
        self._buffer += data
        self.size += len(data)
        if data:
            self.lines += data.count(b"\n")
            self._last = data[-1:]

    @property
    def full(self) -> bool:
        """Whether a whole chunk waits to be pushed."""
        return len(self._buffer) >= CHUNK_BYTES

    def push_full(self) -> None:
        while len(self._buffer) >= CHUNK_BYTES:
            self.files.append_chunk(self.id, bytes(self._buffer[:CHUNK_BYTES]))
            del self._buffer[:CHUNK_BYTES]

    def commit(self) -> StoredFile:
        if self._buffer:
            self.files.append_chunk(self.id, bytes(self._buffer))
            self._buffer.clear()
        created = int(time.time())
        stored = StoredFile(self.id, self.owner, self.filename, self.purpose, self.size, created,
                            created + self.ttl if self.ttl else None, self.lines + (self._last != b"\n"))
        self.files.commit(stored)
        return stored

    def abort(self) -> None:
        self._buffer.clear()
        self.files.discard(self.id)


class FileStore:
    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def writer(self, owner: str, filename: str, purpose: str) -> FileWriter:
        return FileWriter(self, owner, filename, purpose)

    @translated
    def append_chunk(self, file_id: str, chunk: bytes) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.rpush(file_data(file_id), chunk)
        pipe.expire(file_data(file_id), PENDING_TTL)
        pipe.execute()

    @translated
    def commit(self, stored: StoredFile) -> None:
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(file_meta(stored.id), mapping={
            "owner": stored.owner, "filename": stored.filename, "purpose": stored.purpose,
            "bytes": stored.bytes, "created_at": stored.created_at, "expires_at": stored.expires_at or "",
            "lines": "" if stored.lines is None else stored.lines})
        if stored.expires_at:  # the file's keys go at its time (the owner's index forgets it when listed)
            pipe.expireat(file_meta(stored.id), stored.expires_at)
            pipe.expireat(file_data(stored.id), stored.expires_at)
        else:
            pipe.persist(file_data(stored.id))
        pipe.zadd(owner_files(stored.owner), {stored.id: time.time() * 1000})
        pipe.execute()

    @translated
    def discard(self, file_id: str) -> None:
        self.redis.delete(file_data(file_id))

    @translated
    def get(self, owner: str, file_id: str) -> StoredFile:
        """The file ``file_id`` if ``owner`` owns it, else :class:`FileNotFound`."""
        if not FILE_ID.fullmatch(file_id):
            raise FileNotFound(file_id)
        raw: Any = self.redis.hgetall(file_meta(file_id))
        meta = {k.decode(): v.decode(errors="replace") for k, v in raw.items()}
        if not meta or meta.get("owner") != owner:
            raise FileNotFound(file_id)
        expires, lines = meta.get("expires_at", ""), meta.get("lines", "")
        return StoredFile(file_id, owner, meta.get("filename", ""), meta.get("purpose", ""),
                          int(meta.get("bytes", 0)), int(meta.get("created_at", 0)),
                          int(expires) if expires.isdigit() else None, int(lines) if lines.isdigit() else None)

    @translated
    def list_files(self, owner: str, *, after: str | None = None, limit: int = 100,
             newest_first: bool = True, purpose: str | None = None) -> tuple[list[StoredFile], bool]:
        """Up to ``limit`` files after the file ``after``, and whether more follow."""
        index = owner_files(owner)
        start = 0
        if after:
            rank: Any = self.redis.zrevrank(index, after) if newest_first else self.redis.zrank(index, after)
            if rank is None:
                raise FileNotFound(after)
            start = int(rank) + 1
        found: list[StoredFile] = []
        page = max(limit, 100)
        while len(found) <= limit:
            ids: Any = (self.redis.zrevrange(index, start, start + page - 1) if newest_first
                   else self.redis.zrange(index, start, start + page - 1))
            if not ids:
                break
            start += len(ids)
            for raw_id in ids:
                try:
                    stored = self.get(owner, raw_id.decode())
                except FileNotFound:
                    self.redis.zrem(index, raw_id)
                    continue
                if purpose is None or stored.purpose == purpose:
                    found.append(stored)
        return found[:limit], len(found) > limit

    @translated
    def chunk_count(self, file_id: str) -> int:
        return int(self.redis.llen(file_data(file_id)))

    def iter_content(self, file_id: str) -> Iterator[bytes]:
        """The content, a chunk at a time, :data:`READ_CHUNKS` chunks a round trip; a file deleted
        meanwhile is :class:`FileNotFound` (never a shorter file)."""
        count = self.chunk_count(file_id)
        for start in range(0, count, READ_CHUNKS):
            chunks = self._chunks(file_id, start, min(count, start + READ_CHUNKS) - 1)
            if len(chunks) < min(READ_CHUNKS, count - start):
                raise FileNotFound(file_id)
            yield from chunks

    @translated
    def _chunks(self, file_id: str, first: int, last: int) -> list[bytes]:
        values: Any = self.redis.lrange(file_data(file_id), first, last)
        return [bytes(v) for v in values]

    @translated
    def delete(self, owner: str, file_id: str) -> None:
        self.get(owner, file_id)
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(file_meta(file_id), file_data(file_id))
        pipe.zrem(owner_files(owner), file_id)
        pipe.execute()
