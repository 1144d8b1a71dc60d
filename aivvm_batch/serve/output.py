"""Result lines of an API batch: OpenAI's Batch output form, one per input line, in input order.

``jobs.formats.openai_line`` makes the line; here a cancelled item of a batch
that expired or was cancelled gets OpenAI's ``batch_expired`` / ``batch_cancelled``
error; a result recorded without a time of its own gets the batch's creation time
as its ``created``.
"""

from __future__ import annotations

from jobs.formats import openai_line
from jobs.records import ItemResult, Status, json_text

EXPIRED = {"code": "batch_expired",
           "message": "This request could not be executed before the completion window expired."}
CANCELLED = {"code": "batch_cancelled", "message": "This request was cancelled with its batch."}


def api_line(result: ItemResult, *, expired: bool, created: int) -> tuple[bool, bytes]:
    """(whether the line belongs to the output file, the line with its newline)."""
    line = openai_line(result, batch_created=created)
    if result.status is Status.CANCELLED:
        line["response"] = None
        line["error"] = dict(EXPIRED if expired else CANCELLED)
    success = result.status is Status.OK
    return success, json_text(line).encode() + b"\n"
