"""HTTP/1.1 framing as pure functions on bytes: the request head, body length, chunk sizes, the response head."""

from __future__ import annotations

from dataclasses import dataclass
from http import HTTPStatus
from typing import Iterable

MAX_BODY_BYTES = 32 * 1024 * 1024
MAX_HEAD_BYTES = 64 * 1024

_REASONS = {status.value: status.phrase for status in HTTPStatus}


@dataclass(frozen=True)
class RequestHead:
    """Request line and headers (names lower-cased; repeated headers joined with ``, ``)."""

    method: str
    path: str
    version: str
    headers: dict[str, str]

    @property
    def keep_alive(self) -> bool:
        """HTTP/1.1 keeps the connection unless ``close``; HTTP/1.0 only with ``keep-alive``."""
        tokens = {t.strip().lower() for t in self.headers.get("connection", "").split(",")}
        if self.version == "HTTP/1.0":
            return "keep-alive" in tokens
        return "close" not in tokens


def parse_request_head(data: bytes) -> RequestHead:
    """Parse ``request-line CRLF *(header CRLF) CRLF``; ``ValueError`` if malformed.

    Empty lines before the request line are skipped (RFC 9112, 2.2); folded
    header lines are refused.
    """
    lines = data.decode("latin-1").split("\r\n")
    while lines and lines[0] == "":
        lines.pop(0)
    if not lines:
        raise ValueError("empty request")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[0].isalpha() or not parts[1]:
        raise ValueError(f"bad request line {lines[0]!r}")
    method, target, version = parts
    if version not in ("HTTP/1.0", "HTTP/1.1"):
        raise ValueError(f"unsupported version {version!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip() or line[0] in " \t":
            raise ValueError(f"bad header line {line!r}")
        key = name.lower()
        value = value.strip()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    return RequestHead(method=method, path=target.split("?", 1)[0], version=version, headers=headers)


def body_length(head: RequestHead) -> int | None:
    """Bytes of body after ``head``: ``None`` for a chunked body; ``ValueError`` if invalid."""
    if "chunked" in head.headers.get("transfer-encoding", "").lower():
        return None
    raw = head.headers.get("content-length", "0") or "0"
    if not raw.isdigit():
        raise ValueError(f"bad Content-Length {raw!r}")
    length = int(raw)
    if length > MAX_BODY_BYTES:
        raise ValueError("body too large")
    return length


def parse_chunk_size(line: bytes) -> int:
    """Size of one chunk of a chunked body from its size line; ``ValueError`` if invalid."""
    digits = line.split(b";", 1)[0].strip()
    if not digits or not all(c in b"0123456789abcdefABCDEF" for c in digits):
        raise ValueError(f"bad chunk size line {line!r}")
    return int(digits, 16)


def response_head(status: int, headers: Iterable[tuple[str, str]]) -> bytes:
    """``HTTP/1.1 <status> <reason>`` and the header lines, ending with the empty line."""
    reason = _REASONS.get(status, "Unknown")
    lines = [f"HTTP/1.1 {status} {reason}", *(f"{name}: {value}" for name, value in headers), "", ""]
    return "\r\n".join(lines).encode("latin-1")


def chunk_frame(data: bytes) -> bytes:
    """One HTTP/1.1 chunk (``data`` must be non-empty)."""
    return b"%X\r\n%b\r\n" % (len(data), data)
