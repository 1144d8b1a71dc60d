"""What the HTTP app needs: the stores, the driver and the limits."""

from __future__ import annotations

from dataclasses import dataclass

from jobs.files import FileStore
from jobs.store import BatchStore

from .auth import KeyRing
from .driver import Driver
from .quotas import Quota, Quotas
from .records import BatchRecords

DEFAULT_MAX_UPLOAD_BYTES = 200 * 1024 * 1024
DEFAULT_MAX_BODY_BYTES = 1024 * 1024
DEFAULT_WINDOW_SECONDS = 24 * 3600
DEFAULT_CLIENT_IDLE_SECONDS = 30.0
DEFAULT_MAX_CONNECTIONS = 256


@dataclass(frozen=True)
class ServeLimits:
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    # what the only accepted completion window, "24h", lasts (shorter in tests)
    window_seconds: int = DEFAULT_WINDOW_SECONDS
    # a request's body that sends nothing this long ends it (408)
    client_idle_seconds: float = DEFAULT_CLIENT_IDLE_SECONDS
    # connections at once (uvicorn answers 503 beyond)
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    # what a key may hold at once, unless its entry in the keys says otherwise
    quota: Quota = Quota()


@dataclass(frozen=True)
class ServeContext:
    store: BatchStore
    files: FileStore
    records: BatchRecords
    driver: Driver
    keys: KeyRing
    quotas: Quotas
    limits: ServeLimits = ServeLimits()
    # a bearer token that may scrape /metrics from beyond loopback (None: loopback only)
    metrics_token: str | None = None
