"""An HTTP/1.1 request's head as bytes, free of I/O: the request line, Host, and header lines
that no value can split (a CR, LF or NUL refused before anything is sent)."""

from __future__ import annotations

import functools
from typing import Any
from urllib.parse import SplitResult

USER_AGENT = "aivvm-batch"
Key = tuple[str, str, int]  # scheme, host, port: whose connections may carry the request
_BREAKS = frozenset("\r\n\x00")


def plain(url: str) -> bool:
    """No byte in the URL that could end the request line early."""
    return not any(c in url for c in "\r\n\t \x00")


def request_start(parts: SplitResult) -> tuple[Key, bytes]:
    """The connections' key and the request line with its Host (the port named only when not the
    scheme's own)."""
    host = parts.hostname or ""
    default = 443 if parts.scheme == "https" else 80
    port = parts.port or default
    shown = f"[{host}]" if ":" in host else host
    host_header = shown if port == default else f"{shown}:{port}"
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    start = f"POST {path} HTTP/1.1\r\nHost: {host_header}\r\n".encode("utf-8")
    return (parts.scheme, host, port), start


def header_lines(headers: dict[str, Any], length: int) -> bytes:
    """The request's header lines (a name or value that could split the head is refused)."""
    return _header_block(tuple((name, str(value)) for name, value in headers.items())) \
        + b"Content-Length: %d\r\n\r\n" % length


@functools.lru_cache(maxsize=256)
def _header_block(headers: tuple[tuple[str, str], ...]) -> bytes:
    """Every header line but the length: the same for each item of a provider, so made once."""
    given = {name.lower() for name, _ in headers}
    lines = []
    for name, value in headers:
        if _BREAKS.intersection(value) or _BREAKS.intersection(name) or ":" in name:
            raise ValueError(f"the header {name[:40]!r} holds a line break or a colon")
        lines.append(f"{name}: {value}\r\n")
    if "user-agent" not in given:
        lines.append(f"User-Agent: {USER_AGENT}\r\n")
    if "accept" not in given:
        lines.append("Accept: */*\r\n")
    return "".join(lines).encode("utf-8")
