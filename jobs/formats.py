"""Result line formats: ours (README.md's Results), and OpenAI's Batch output form.

The OpenAI form follows the per-line object of OpenAI's batch output and error
files (``BatchRequestOutput``): ``{id, custom_id, response, error}``. A request
that got an HTTP answer has ``response: {status_code, request_id, body}`` and
``error: null``: for a success the body the server would have answered without
streaming (a ``ChatCompletion`` joined from its chunks, the final ``Response``, the
embeddings list...), for a refusal the server's own body, verbatim; ``request_id`` is
the server's ``x-request-id`` when it sent one. One that got none (unreachable server,
invalid line, cancelled) has ``response: null`` and ``error: {code, message}``.
"""

from __future__ import annotations

import time
from enum import Enum
from typing import Any

from .answers import chat_body
from .endpoints import Endpoint
from .records import ItemResult, Status, json_text


class ResultFormat(str, Enum):
    NATIVE = "native"
    OPENAI = "openai"


# the finish reasons a ChatCompletion may carry; any other is reported as "stop"
FINISH_REASONS = frozenset({"stop", "length", "tool_calls", "content_filter", "function_call"})


def render(raw: bytes, fmt: ResultFormat, batch_created: float | None = None) -> bytes:
    """One output line (without newline) from a stored result.

    ``batch_created`` (Unix seconds) stands in for the ``created`` time of a
    result recorded without one (else the time of rendering).
    """
    if fmt is ResultFormat.NATIVE:
        return raw
    result = ItemResult.from_json(raw)
    line = openai_line(result, batch_created)
    return json_text(line).encode()


def openai_line(result: ItemResult, batch_created: float | None = None) -> dict[str, Any]:
    """The OpenAI Batch output form, so tools written for it read ours unchanged."""
    line: dict[str, Any] = {"id": f"batch_req_{result.line}", "custom_id": result.id}
    answer = result.answer
    request_id = answer.request_id if answer is not None and answer.request_id else f"req_{result.line}"
    error = result.error
    if result.status is Status.OK:
        line["response"] = {"status_code": 200, "request_id": request_id,
                            "body": _success_body(result, batch_created)}
        line["error"] = None
    elif error is not None and error.http_status is not None:
        body = error.body if error.body is not None else {
            "error": {"message": error.message, "type": error.type, "param": None, "code": error.type}}
        line["response"] = {"status_code": error.http_status,
                            "request_id": error.request_id or request_id, "body": body}
        line["error"] = None
    else:
        line["response"] = None
        line["error"] = {
            "code": error.type if error else result.status.value,
            "message": error.message if error else result.status.value,
        }
    return line


def _success_body(result: ItemResult, batch_created: float | None) -> dict[str, Any]:
    """The server's own body where it sent one, else a ChatCompletion made from the text."""
    answer = result.answer
    if answer is not None:
        if answer.endpoint is not Endpoint.CHAT and answer.body is not None:
            return answer.body
        body = chat_body(answer, result.output or "")
        if body is not None:
            return body
    return _completion(result, batch_created)


def _completion(result: ItemResult, batch_created: float | None) -> dict[str, Any]:
    if result.created is not None:
        created = result.created
    else:
        created = int(batch_created if batch_created is not None else time.time())
    finish = result.finish_reason if result.finish_reason in FINISH_REASONS else "stop"
    body: dict[str, Any] = {
        "id": f"chatcmpl-{result.line}",
        "object": "chat.completion",
        "created": created,
        "model": result.model or "",
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": result.output},
            "finish_reason": finish,
            "logprobs": None,
        }],
    }
    usage = result.usage.to_dict() if result.usage is not None else None
    if usage is not None:
        usage.pop("estimated", None)
    body["usage"] = usage
    if result.metadata:
        body["metadata"] = dict(result.metadata)
    return body
