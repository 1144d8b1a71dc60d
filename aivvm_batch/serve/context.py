"""What the HTTP app needs: the stores, the driver and the limits."""

from __future__ import annotations

from dataclasses import dataclass

from jobs.files import FileStore
from jobs.store import BatchStore

from .auth import KeyRing
from .driver import Driver
from .records import BatchRecords

DEFAULT_MAX_UPLOAD_BYTES = 200 * 1024 * 1024
DEFAULT_MAX_BODY_BYTES = 1024 * 1024
DEFAULT_WINDOW_SECONDS = 24 * 3600


@dataclass(frozen=True)
class ServeLimits:
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    # what the only accepted completion window, "24h", lasts (shorter in tests)
    window_seconds: int = DEFAULT_WINDOW_SECONDS


@dataclass(frozen=True)
class ServeContext:
    store: BatchStore
    files: FileStore
    records: BatchRecords
    driver: Driver
    keys: KeyRing
    limits: ServeLimits = ServeLimits()
