"""Joining a Responses API stream: the text deltas as they come, the final ``Response`` as sent."""

from __future__ import annotations

from typing import Any

from ...errors import EmptyReply, MalformedReply, ProviderError, ProviderHTTPError
from ..call import Item, StreamEnd
from ..credentials import redact
from .json_values import Event, token_count

# Responses API error codes that blame the request: another attempt would fail (and pay) again.
# The others (server_error, rate_limit_exceeded, vector_store_timeout, unknown ones) are transient.
PERMANENT_RESPONSE_CODES = frozenset({
    "invalid_prompt", "data_residency_mismatch", "bio_policy", "misalignment_policy_violation",
    "invalid_image", "invalid_image_format", "invalid_base64_image", "invalid_image_url", "image_too_large",
    "image_too_small", "image_parse_error", "image_content_policy_violation", "invalid_image_mode",
    "image_file_too_large", "unsupported_image_media_type", "empty_image_file", "failed_to_download_image",
    "image_file_not_found",
})


class ResponseFailed(ProviderError):
    """A Responses API stream ended with ``response.failed``: the server's error code is the kind.

    Transient for server-side codes (``server_error``, ``rate_limit_exceeded``,
    ``vector_store_timeout``) and for codes this worker does not know, as a 500 is;
    permanent for the documented ones that blame the request (``invalid_prompt``,
    ``invalid_image``...), which another attempt would only pay for again.
    """

    def __init__(self, message: str, code: str | None) -> None:
        super().__init__(message)
        self.kind = code or "server_error"
        self.transient = code not in PERMANENT_RESPONSE_CODES


class ResponsesJoiner:
    """Responses API events: the text deltas as they come; the final ``Response`` as sent.

    ``response.completed`` and ``response.incomplete`` end the reply with their
    ``response``; ``response.failed`` raises :class:`ResponseFailed`; an ``error`` event
    raises :class:`ProviderHTTPError` (as a chat stream's error event does).
    """

    __slots__ = ("response", "_incomplete", "_api_key")

    def __init__(self, api_key: str | None = None) -> None:
        self.response: dict[str, Any] | None = None  # set when the reply is complete
        self._incomplete = False
        self._api_key = api_key

    @property
    def complete(self) -> bool:
        return self.response is not None

    def add(self, event: Event, out: list[Item]) -> None:
        kind = event.get("type")
        if kind == "response.output_text.delta":
            delta = event.get("delta")
            if delta and type(delta) is str:
                out.append(delta)
        elif kind in ("response.completed", "response.incomplete"):
            response = event.get("response")
            if type(response) is not dict or type(response.get("output")) is not list:
                raise MalformedReply(f"a {kind} event has no response object with an output list")
            status = response.get("status")
            if status in ("failed", "cancelled"):
                raise ResponseFailed(f"{kind} with status {status}", None)
            if not response["output"] and kind == "response.completed":
                raise EmptyReply("the response has no output")
            self.response = response
            self._incomplete = kind == "response.incomplete" or response.get("status") == "incomplete"
        elif kind == "response.failed":
            response = event.get("response")
            error = response.get("error") if type(response) is dict else None
            if type(error) is not dict:
                error = {}
            code = error.get("code")
            message = self._clean(error.get("message") or "the response failed")
            raise ResponseFailed(f"response.failed: {message}", str(code) if code else None)
        elif kind == "error":
            raise ProviderHTTPError(500, self._clean(event.get("message", "")),
                                    kind=str(event.get("code") or "server_error"))

    def _clean(self, message: Any) -> str:
        return redact(str(message), [self._api_key])[:300]

    def end(self) -> StreamEnd:
        response = self.response or {}
        reason: str | None = "stop"
        if self._incomplete:
            details = response.get("incomplete_details")
            why = details.get("reason") if type(details) is dict else None
            reason = "length" if why == "max_output_tokens" else (str(why) if why else "incomplete")
        usage = response.get("usage")
        usage = usage if type(usage) is dict else None
        return StreamEnd(reason, token_count(usage, "input_tokens"), token_count(usage, "output_tokens"),
                         body=self.response)
