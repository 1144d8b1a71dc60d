"""Result lines of an API batch: OpenAI's Batch output form, one per input line, in input order.

``jobs.formats.openai_line`` makes the line; here a cancelled item of a batch
that expired or was cancelled gets OpenAI's ``batch_expired`` / ``batch_cancelled``
error; a result recorded without a time of its own gets the batch's creation time
as its ``created``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from jobs.formats import openai_line
from jobs.records import ItemResult, Status, json_text

EXPIRED = {"code": "batch_expired",
           "message": "This request could not be executed before the completion window expired."}
CANCELLED = {"code": "batch_cancelled", "message": "This request was cancelled with its batch."}


@dataclass
class AnswerTotals:
    """What the servers' answers of a batch say beyond our counts: the ``Batch`` object's cached
    and reasoning tokens, and its ``model`` (the one most of its answers name)."""

    cached_tokens: int = 0
    reasoning_tokens: int = 0
    models: Counter[str] = field(default_factory=Counter)

    def add(self, line: dict[str, Any]) -> None:
        response = line.get("response")
        body = response.get("body") if isinstance(response, dict) and response.get("status_code") == 200 else None
        if not isinstance(body, dict):
            return
        if isinstance(body.get("model"), str):
            self.models[body["model"]] += 1
        usage = body.get("usage")
        if isinstance(usage, dict):
            # chat and completions name them prompt/completion, the Responses API input/output
            self.cached_tokens += _detail(usage, ("prompt_tokens_details", "input_tokens_details"), "cached_tokens")
            self.reasoning_tokens += _detail(usage, ("completion_tokens_details", "output_tokens_details"),
                                             "reasoning_tokens")

    @property
    def model(self) -> str | None:
        return self.models.most_common(1)[0][0] if self.models else None


def _detail(usage: dict[str, Any], names: tuple[str, ...], key: str) -> int:
    for name in names:
        details = usage.get(name)
        value = details.get(key) if isinstance(details, dict) else None
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return 0


def api_line(result: ItemResult, *, expired: bool, created: int,
             totals: AnswerTotals | None = None) -> tuple[bool, bytes]:
    """(whether the line belongs to the output file, the line with its newline); what the answer
    says of its usage and model is added to ``totals``."""
    line = openai_line(result, batch_created=created)
    if result.status is Status.CANCELLED:
        line["response"] = None
        line["error"] = dict(EXPIRED if expired else CANCELLED)
    success = result.status is Status.OK
    if totals is not None and success:
        totals.add(line)
    return success, json_text(line).encode() + b"\n"
