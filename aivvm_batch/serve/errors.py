"""Errors of the HTTP API, each one answered in OpenAI's error form.

    APIError                 {"error": {"message", "type", "param", "code"}} with ``status``
    ├── BadRequest           400 invalid_request_error
    ├── Unauthorized         401 invalid_api_key
    ├── Forbidden            403 (a cross-site request, a host that is not loopback)
    ├── NotFound             404 (also another key's object)
    ├── TimedOut             408 a body that stopped arriving
    ├── Conflict             409 a request with the same Idempotency-Key still under way
    ├── TooLarge             413 a body or an upload over its limit
    └── TooManyRequests      429 over a per-key limit (with Retry-After)
"""

from __future__ import annotations

from typing import Any


class APIError(Exception):
    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def headers(self) -> dict[str, str]:
        return {}


class BadRequest(APIError):
    status = 400
    type = "invalid_request_error"


class Unauthorized(APIError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class Forbidden(APIError):
    status = 403
    type = "invalid_request_error"
    code = "forbidden"


class NotFound(APIError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class TimedOut(APIError):
    status = 408
    type = "invalid_request_error"
    code = "request_timeout"

    def headers(self) -> dict[str, str]:
        return {"connection": "close"}


class Conflict(APIError):
    status = 409
    type = "invalid_request_error"
    code = "idempotency_conflict"


class TooLarge(APIError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class Unavailable(APIError):
    status = 503
    type = "server_error"
    code = "unavailable"


class TooManyRequests(APIError):
    """OpenAI's form of a rate limit (``type`` "requests", ``code`` "rate_limit_exceeded")."""

    status = 429
    type = "requests"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"retry-after": str(self.retry_after)}
