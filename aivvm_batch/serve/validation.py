"""Whether an uploaded file holds any request, found before the batch stores anything.

A file with no valid line fails in ``validating`` with OpenAI's ``errors.data`` (its first lines'
problems), and Redis keeps no record of its lines: 100,000 invalid lines cost Redis nothing but the
upload. Reading stops at the first valid line, so a usual file costs a line's parse here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import BinaryIO

from jobs.errors import InvalidLine
from jobs.lines import numbered_lines, parse_data
from jobs.records import RequestDefaults

# OpenAI's errors.data of a failed batch: the first problems, not all of them
MAX_REPORTED_ERRORS = 100


@dataclass(frozen=True)
class NoRequest:
    """A file without a valid line: its first problems (none: the file has no line at all)."""

    errors: tuple[dict[str, object], ...]


def without_request(stream: BinaryIO, defaults: RequestDefaults, providers: tuple[str, ...],
                    max_line_bytes: int, keep: int = MAX_REPORTED_ERRORS) -> NoRequest | None:
    """:class:`NoRequest` if no line of ``stream`` is a request ``submit`` would take, else None."""
    errors: list[dict[str, object]] = []
    for number, data, oversized in numbered_lines(stream, max_line_bytes):
        try:
            parse_data(number, data, oversized, max_line_bytes, defaults, providers)
        except InvalidLine as exc:
            if len(errors) < keep:
                errors.append({"code": "invalid_request", "line": number, "param": None, "message": str(exc)})
            continue
        return None
    return NoRequest(tuple(errors))
