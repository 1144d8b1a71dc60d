"""Exceptions of the runtime.

    ProviderError                 base; ``kind`` is the result's error type
    ├── UnsupportedModel          (also a ValueError, as in the seed) permanent
    ├── ProviderHTTPError         non-2xx reply; transient for 408/409/425/429/5xx
    ├── ProviderTransportError    connection refused/reset, DNS...: transient
    ├── ProviderTimeout           connect/read timeout or the item deadline: transient
    ├── IncompleteReply           the body was cut short by the connection: transient
    ├── EmptyReply                200 with nothing in it: transient
    └── MalformedReply            the reply does not follow the protocol: permanent
    RateLimited                   the shared rate limiter says wait (not a provider failure)

Foreign exceptions (requests, urllib3) are translated to these at the provider boundary.
"""

from __future__ import annotations

TRANSIENT_STATUSES = frozenset({408, 409, 425, 429, 500, 502, 503, 504, 520, 522, 524, 529})


class ProviderError(Exception):
    kind = "provider_error"
    transient = False
    retry_after: float | None = None


class UnsupportedModel(ProviderError, ValueError):
    kind = "unsupported_model"

    def __init__(self, model: str) -> None:
        super().__init__(f"Model is not supported: {model}")
        self.model = model


class ProviderHTTPError(ProviderError):
    def __init__(self, status: int, message: str, *, kind: str | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(f"HTTP {status}: {message}" if message else f"HTTP {status}")
        self.status = status
        self.kind = kind or _kind_for(status)
        self.transient = status in TRANSIENT_STATUSES
        self.retry_after = retry_after


class ProviderTransportError(ProviderError):
    kind = "connection_error"
    transient = True


class ProviderTimeout(ProviderError):
    kind = "timeout"
    transient = True


class IncompleteReply(ProviderError):
    kind = "incomplete_reply"
    transient = True


class EmptyReply(ProviderError):
    kind = "empty_reply"
    transient = True


class MalformedReply(ProviderError):
    kind = "malformed_reply"


class RateLimited(Exception):
    """Raised by the shared rate limiter: wait ``delay`` seconds before calling."""

    def __init__(self, delay: float) -> None:
        super().__init__(f"rate limit: wait {delay:.2f}s")
        self.delay = delay


def _kind_for(status: int) -> str:
    if status == 429:
        return "rate_limited"
    if status in (401, 403):
        return "unauthorized"
    if status >= 500:
        return "server_error"
    return "http_error"
