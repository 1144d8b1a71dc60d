"""Exceptions of the runtime.

    ProviderError                 base; ``kind`` is the result's error type
    ├── UnsupportedModel          (also a ValueError, as in the seed) permanent
    ├── ProviderHTTPError         non-2xx reply, ``status`` kept (the result's ``http_status``);
    │   │                         transient for 408/409/425/429/5xx, else permanent
    │   └── RedirectError         3xx: never followed (``redirect``), names the Location: permanent
    ├── ProviderTransportError    connection refused/reset, DNS...: transient (``connection_error``)
    ├── TLSError                  certificate not trusted, TLS handshake refused: permanent
    ├── ProviderTimeout           connect/read timeout or the item deadline: transient
    ├── IncompleteReply           the body was cut short by the connection: transient
    ├── EmptyReply                200 with nothing in it: transient
    ├── ReplyTooLarge             past AIVVM_BATCH_MAX_REPLY_BYTES (decoded) or past the
    │                             decompression ratio; the text up to the cap is kept: permanent
    ├── MalformedReply            the reply does not follow the protocol (a web page, an
    │                             encoding never asked for, an event that is not JSON): permanent
    ├── SchemaMismatch            the reply does not follow the JSON schema the request gave;
    │                             tried again AIVVM_BATCH_SCHEMA_RETRIES times, then final
    └── UnsupportedRequest        no provider of the chain can send the request as asked: permanent
    RateLimited                   the shared rate limiter says wait (not a provider failure)

Foreign exceptions (requests, urllib3, httptools, aiohttp, ssl, zlib) are translated to these at the
provider boundary: the transports (providers/http.py, providers/aio*.py) and the decoders.
"""

from __future__ import annotations

TRANSIENT_STATUSES = frozenset({408, 409, 425, 429, 500, 502, 503, 504, 520, 522, 524, 529})


class ProviderError(Exception):
    kind = "provider_error"
    transient = False
    retry_after: float | None = None
    # the call failed before any answer (refused, connect timeout): this worker's path to the
    # provider may be down while another worker's is not (worker.breaker)
    unreachable = False


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
        # the answer's body as the server sent it, and its x-request-id (set by the transport)
        self.body: object = None
        self.request_id: str | None = None

    def add_detail(self, detail: str) -> None:
        """Append ``detail`` to the message (what the worker knows and the server could not say)."""
        self.args = (f"{self.args[0]} ({detail})",)


class RedirectError(ProviderHTTPError):
    """A 3xx answer. Following it would send the request (and the key) where nobody configured."""

    def __init__(self, status: int, location: str | None) -> None:
        where = f"to {location}" if location else "without a Location"
        super().__init__(status, f"the server redirects {where}; redirects are not followed: "
                                 "use the URL that answers as the base URL", kind="redirect")
        self.location = location


class ProviderTransportError(ProviderError):
    """The connection failed before an answer (refused, reset, no route)."""

    kind = "connection_error"
    transient = True
    unreachable = True


class TLSError(ProviderError):
    """Retrying does not make an untrusted certificate trusted."""

    kind = "tls_error"


class ProviderTimeout(ProviderError):
    kind = "timeout"
    transient = True


class ConnectTimeout(ProviderTimeout):
    """No connection within the connect timeout (a cut link drops the packets)."""

    unreachable = True


class IncompleteReply(ProviderError):
    kind = "incomplete_reply"
    transient = True


class EmptyReply(ProviderError):
    kind = "empty_reply"
    transient = True


class ReplyTooLarge(ProviderError):
    """Asking again would fetch the same oversized reply (and pay for it) again."""

    kind = "reply_too_large"


class MalformedReply(ProviderError):
    kind = "malformed_reply"


class SchemaMismatch(ProviderError):
    kind = "schema_mismatch"


class UnsupportedRequest(ProviderError):
    kind = "unsupported_request"


class Abandoned(ProviderError):
    """A stream given up by its worker: the item may be another worker's by now (its claim
    lapsed while Redis was out of reach). What it streamed was paid, and is counted."""

    kind = "abandoned"


class CallNotStarted(Exception):
    """Raised before a provider call to stop it from starting (not a failure of the call)."""


class RateLimited(CallNotStarted):
    """Raised by the shared rate limiter: wait ``delay`` seconds before calling."""

    def __init__(self, delay: float) -> None:
        super().__init__(f"rate limit: wait {delay:.2f}s")
        self.delay = delay


class ClaimLost(CallNotStarted):
    """The item's claim is no longer this worker's (it lapsed during a wait, and another worker
    may hold it, or have recorded the item): no call may start for it here."""


def _kind_for(status: int) -> str:
    if status == 429:
        return "rate_limited"
    if status in (401, 403):
        return "unauthorized"
    if status >= 500:
        return "server_error"
    return "http_error"
