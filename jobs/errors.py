"""Exceptions of the batch package.

    BatchError
    ├── ConfigError          a setting or option is unusable (exit code 2)
    ├── InputFileError       the input file cannot be read at all
    ├── BatchNotFound        unknown batch id, or its results expired
    ├── StoreUnavailable     Redis could not be reached (translated from redis-py)
    │   └── StoreFull        Redis is at maxmemory and refuses writes (OutOfMemoryError): wait
    ├── WaitTimeout          a batch did not finish within the time a caller would wait
    └── InvalidLine          one input line is not a valid request (kept as an ``invalid`` result)
"""

from __future__ import annotations


class BatchError(Exception):
    """Base of every error this package raises on purpose."""


class ConfigError(BatchError):
    pass


class InputFileError(BatchError):
    pass


class WaitTimeout(BatchError):
    """The batch did not finish within the time the caller would wait (``--timeout``)."""


class BatchNotFound(BatchError):
    """``hint`` says why the Redis may have lost the batch (see ``jobs.redis_health.RedisHealth.data_loss_hint``)."""

    def __init__(self, batch_id: str, hint: str = "") -> None:
        message = (f"batch {batch_id!r} not found: it never existed on this Redis, "
                   "or its results expired (see AIVVM_BATCH_RESULT_TTL)")
        super().__init__(f"{message}; {hint}" if hint else message)
        self.batch_id = batch_id
        self.hint = hint


class StoreUnavailable(BatchError):
    pass


class StoreFull(StoreUnavailable):
    """Redis is at ``maxmemory`` (policy ``noeviction``) and refuses writes until memory frees."""


# what a line's explanation may hold: it is kept with each invalid line (and in a failed batch's
# errors.data), so a line cannot make it as large as itself
MAX_EXPLANATION = 500


class InvalidLine(BatchError):
    """A line that cannot become a request; ``str(exc)`` names the line and the field (at most
    :data:`MAX_EXPLANATION` characters: a line of 25,000 unknown fields named them all, 239 KB)."""

    def __init__(self, line: int, message: str, field: str | None = None) -> None:
        if field is not None and len(field) > 80:
            field = field[:80] + "…"
        where = f"line {line}" + (f", field '{field}'" if field else "")
        text = f"{where}: {message}"
        super().__init__(text if len(text) <= MAX_EXPLANATION else text[:MAX_EXPLANATION - 1] + "…")
        self.line = line
        self.field = field
        self.item_id: str | None = None
