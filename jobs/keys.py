"""Every Redis key the project writes, in one place.

Per-batch keys share the hash tag ``{batch_id}`` so they live in one cluster slot,
which the Lua scripts of :mod:`jobs.scripts` rely on.
"""

from __future__ import annotations

PREFIX = "aivb"
QUEUE = "aivvm-batch"
BATCH_INDEX = f"{PREFIX}:batches"
# Hash: worker node name -> "<Redis time last seen> <claims held> <note>" (its sweeper's heartbeat)
WORKERS = f"{PREFIX}:workers"
# Hash: a caller's key for an input source (``run``'s) -> the batch id it last ran
RUN_BATCHES = f"{PREFIX}:runs"
# The workers' sweep for lost messages: a lock (string) and batch id -> finished count seen (hash)
SWEEP_LOCK = f"{PREFIX}:sweep:lock"
SWEEP_SEEN = f"{PREFIX}:sweep:seen"
# kombu's Redis transport (not ours, named here so that every key read or written is in one place):
# hash delivery tag -> [message, exchange, routing key] of each delivered, unacknowledged message,
# and a sorted set of those tags scored by the time the message was delivered (or last renewed)
UNACKED = "unacked"
UNACKED_INDEX = "unacked_index"


def meta(batch_id: str) -> str:
    """Hash: source, created, state, options, total, finished_at."""
    return f"{PREFIX}:{{{batch_id}}}:meta"


def held(batch_id: str) -> str:
    """List: the batch's messages not yet on the queue (the window of :mod:`jobs.queue`)."""
    return f"{PREFIX}:{{{batch_id}}}:held"


def out(batch_id: str) -> str:
    """String: how many of the batch's messages are on the queue or being worked on."""
    return f"{PREFIX}:{{{batch_id}}}:out"


# String with a TTL: the slots of the workers seen lately, together (the windows' measure)
SLOTS = f"{PREFIX}:workers:slots"


def requests(batch_id: str) -> str:
    """Hash: item seq -> request JSON (valid lines only)."""
    return f"{PREFIX}:{{{batch_id}}}:req"


def results(batch_id: str) -> str:
    """Hash: item seq -> final result JSON; written once (HSETNX)."""
    return f"{PREFIX}:{{{batch_id}}}:res"


def counts(batch_id: str) -> str:
    """Hash: status -> number of final results with it."""
    return f"{PREFIX}:{{{batch_id}}}:counts"


def ids(batch_id: str) -> str:
    """Hash: item id -> seq of the line that first used it (duplicate detection)."""
    return f"{PREFIX}:{{{batch_id}}}:ids"


def claim(batch_id: str, seq: int) -> str:
    """String with a TTL: the token of the execution currently working on an item."""
    return f"{PREFIX}:{{{batch_id}}}:claim:{seq}"


def claim_pattern(batch_id: str) -> str:
    return f"{PREFIX}:{{{batch_id}}}:claim:*"


def finished_log(batch_id: str) -> str:
    """List: item seqs in the order their final results were recorded (for ``collect --follow``)."""
    return f"{PREFIX}:{{{batch_id}}}:log"


def usage(batch_id: str) -> str:
    """Hash: prompt_tokens, completion_tokens, estimated (items whose counts are estimates)."""
    return f"{PREFIX}:{{{batch_id}}}:usage"


def errors(batch_id: str) -> str:
    """Hash: "<error type>: <message>" of a failed attempt (transient or final) -> how many times."""
    return f"{PREFIX}:{{{batch_id}}}:errors"


def late(batch_id: str) -> str:
    """Hash: item seq -> "<prompt tokens> <completion tokens> <calls> <estimated 0|1>" of the calls
    paid for an item beyond the one recorded (a worker whose claim had passed to another)."""
    return f"{PREFIX}:{{{batch_id}}}:late"


# The keys that make up a batch, in the order the scripts of jobs.scripts receive them
BATCH_PARTS = ("meta", "req", "res", "counts", "ids", "log", "usage", "late")


def batch_keys(batch_id: str) -> list[str]:
    """The keys that make up a batch and expire together after it finishes (named as BATCH_PARTS)."""
    return [f"{PREFIX}:{{{batch_id}}}:{part}" for part in BATCH_PARTS]


def task_id(batch_id: str, first_seq: int, count: int) -> str:
    """The Celery task id of a message carrying ``count`` items of a batch from ``first_seq``."""
    return f"{batch_id}:{first_seq}+{count}"


def rate_bucket(scope: str) -> str:
    """Global rate limiter state for one provider and base URL."""
    return f"{PREFIX}:rate:{scope}"


def rate_keys(scope: str) -> list[str]:
    """The rate limiter's keys of one scope: next free request slot, next free token slot, pause."""
    bucket = rate_bucket(scope)
    return [bucket + ":req", bucket + ":tok", bucket + ":pause"]


def cache(digest: str) -> str:
    """String with a TTL: an ``ok`` result kept under the digest of what was asked (jobs/cache.py)."""
    return f"{PREFIX}:cache:{digest}"


def file_meta(file_id: str) -> str:
    """Hash: owner, filename, purpose, bytes, created_at, status (``serve``'s uploaded files)."""
    return f"{PREFIX}:file:{file_id}:meta"


def file_data(file_id: str) -> str:
    """List: an uploaded file's content in chunks of about 1 MiB, in order."""
    return f"{PREFIX}:file:{file_id}:data"


def owner_files(owner: str) -> str:
    """Sorted set: file ids of one API key's owner, scored by creation time (ms)."""
    return f"{PREFIX}:owner:{owner}:files"


# Set: ids of the API batches that are not final yet (``serve``'s driver advances them)
API_ACTIVE = f"{PREFIX}:api:active"

# Hashes: histograms of the provider's latency and time to first chunk (jobs/observations.py)
OBSERVED_LATENCY = f"{PREFIX}:observed:latency"
OBSERVED_FIRST_CHUNK = f"{PREFIX}:observed:first_chunk"


def api_batch(batch_id: str) -> str:
    """Hash: the OpenAI Batch fields of one API batch (owner, files, window, status, times)."""
    return f"{PREFIX}:api:batch:{batch_id}"


def api_lease(batch_id: str) -> str:
    """String with a TTL: the ``serve`` replica currently advancing this batch."""
    return f"{PREFIX}:api:batch:{batch_id}:lease"


def api_idempotency(owner: str, digest: str) -> str:
    """String with a TTL: "<batch id or 'pending'> <parameters' digest>" for one Idempotency-Key
    (``digest``: its SHA-256) of one owner."""
    return f"{PREFIX}:owner:{owner}:idempotency:{digest}"


def quota_lock(owner: str) -> str:
    """String, short-lived: one request at a time checks the owner's quotas and makes its batch."""
    return f"{PREFIX}:api:quota-lock:{owner}"


def owner_batches(owner: str) -> str:
    """Sorted set: API batch ids of one owner, scored by creation time (ms)."""
    return f"{PREFIX}:owner:{owner}:batches"
