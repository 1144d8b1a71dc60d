"""Result lines of an API batch: OpenAI's Batch output form, one per input line, in input order.

``jobs.formats.openai_line`` makes the line; here a cancelled item of a batch
that expired or was cancelled gets OpenAI's ``batch_expired`` / ``batch_cancelled``
error, and a completion body always carries a real ``created`` (the SDK's
``ChatCompletion`` requires it; a result recorded without one gets the batch's
creation time).
"""

from __future__ import annotations

import json

from jobs.formats import openai_line
from jobs.records import ItemResult, Status

EXPIRED = {"code": "batch_expired",
           "message": "This request could not be executed before the completion window expired."}
CANCELLED = {"code": "batch_cancelled", "message": "This request was cancelled with its batch."}


def api_line(result: ItemResult, *, expired: bool, created: int) -> tuple[bool, bytes]:
    """(whether the line belongs to the output file, the line with its newline)."""
    line = openai_line(result)
    if result.status is Status.CANCELLED:
        line["response"] = None
        line["error"] = dict(EXPIRED if expired else CANCELLED)
    response = line.get("response")
    body = response.get("body") if isinstance(response, dict) else None
    if isinstance(body, dict) and body.get("object") == "chat.completion":
        if not body.get("created"):
            body["created"] = created
    success = result.status is Status.OK
    return success, json.dumps(line, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"
