"""What ``run`` makes of a view of its batch: warnings worth a line, and when to stop paying.

Pure functions of :class:`~jobs.records.BatchInfo`, so that the rules are tested without
Redis or workers.
"""

from __future__ import annotations

from jobs.records import BatchInfo, Status

# A warning needs this many failed attempts (or one per item, if fewer items)...
WARN_AFTER_ATTEMPTS = 3
# ...and a stop this many items ended failed (or every item, if fewer).
STOP_AFTER_ITEMS = 8
ERROR_TEXT_CHARS = 160


def valid_items(info: BatchInfo) -> int | None:
    """Items that are sent to a provider (invalid lines are not), once the total is known."""
    if info.total is None:
        return None
    return info.total - info.counts.get(Status.INVALID.value, 0)


def failed_attempts(info: BatchInfo) -> int:
    return sum(info.errors.values())


def short(text: str, limit: int = ERROR_TEXT_CHARS) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def attempts_warning(info: BatchInfo) -> str | None:
    """``12 of 12 attempts failed: <error>`` while no item is ok and the first attempts fail,
    all in the same way.

    Said once the first few attempts have all failed alike, long before the retries of
    a systematic failure (server down, wrong base URL, missing key) run out. Failures that
    differ are no sign of one (each item's own trouble): nothing is said.
    """
    valid = valid_items(info)
    failed = failed_attempts(info)
    if info.counts.get(Status.OK.value, 0) or not valid or failed < min(WARN_AFTER_ATTEMPTS, valid):
        return None
    top = info.top_error
    assert top is not None
    text, count = top
    attempts = failed + info.counts.get(Status.OK.value, 0)
    if count != failed:
        return None
    return f"{failed} of {attempts} attempts failed: {short(text)}"


def systematic_failure(info: BatchInfo) -> str | None:
    """Why the batch should stop, when every item that ended failed the same way.

    That is: at least ``STOP_AFTER_ITEMS`` items (or all of them, if fewer) ended
    ``failed``, none is ``ok``, every failed attempt so far had one identical error,
    and items remain that would be paid for next.
    """
    valid = valid_items(info)
    if not valid or info.finished or info.counts.get(Status.OK.value, 0):
        return None
    failed = info.counts.get(Status.FAILED.value, 0)
    if failed < min(STOP_AFTER_ITEMS, valid) or len(info.errors) != 1:
        return None
    text = next(iter(info.errors))
    return f"the first {failed} items all failed with the same error: {short(text)}"


def error_brief(info: BatchInfo, limit: int = 60) -> str:
    """The most frequent attempt error and its count, for a progress line; empty if none."""
    top = info.top_error
    if top is None:
        return ""
    text, count = top
    return f"{count}× {short(text, limit)}"
