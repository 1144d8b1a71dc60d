"""A Redis lease: one ``serve`` replica at a time advances a batch; it lapses if that replica dies."""

from __future__ import annotations

import threading
import uuid
from types import TracebackType

import redis

from jobs import scripts


class Lease:
    """``with Lease(...) as held:`` — ``held`` is False if another holder has it; renewed while held."""

    def __init__(self, client: redis.Redis, key: str, ttl_seconds: float = 30.0) -> None:
        self.redis = client
        self.key = key
        self.ttl_ms = int(ttl_seconds * 1000)
        self.token = uuid.uuid4().hex
        # an item's claim and this lease are alike: a key holding its holder's token, with a TTL
        self._renew_script = client.register_script(scripts.TOUCH)
        self._release_script = client.register_script(scripts.RELEASE)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> bool:
        if not self.redis.set(self.key, self.token, nx=True, px=self.ttl_ms):
            return False
        self._thread = threading.Thread(target=self._renew, name=f"lease {self.key}", daemon=True)
        self._thread.start()
        return True

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_ms / 3000):
            try:
                if not self._renew_script(keys=[self.key], args=[self.ttl_ms, self.token])[0]:
                    return
            except redis.RedisError:
                continue

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        try:
            self._release_script(keys=[self.key], args=[self.token])
        except redis.RedisError:
            pass
