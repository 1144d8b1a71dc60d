"""Result line formats: ours (DESIGN.md), and OpenAI's Batch output form."""

from __future__ import annotations

import json
from enum import Enum
from typing import Any

from .records import ItemResult, Status


class ResultFormat(str, Enum):
    NATIVE = "native"
    OPENAI = "openai"


def render(raw: bytes, fmt: ResultFormat) -> bytes:
    """One output line (without newline) from a stored result."""
    if fmt is ResultFormat.NATIVE:
        return raw
    result = ItemResult.from_json(raw)
    return json.dumps(openai_line(result), ensure_ascii=False, separators=(",", ":")).encode()


def openai_line(result: ItemResult) -> dict[str, Any]:
    """The OpenAI Batch output form, so tools written for it read ours unchanged."""
    request_id = f"req_{result.line}"
    if result.status is Status.OK:
        usage = result.usage.to_dict() if result.usage else None
        if usage is not None:
            usage.pop("estimated", None)
        return {
            "id": f"batch_req_{result.line}",
            "custom_id": result.id,
            "response": {
                "status_code": 200,
                "request_id": request_id,
                "body": {
                    "id": f"chatcmpl-{result.line}",
                    "object": "chat.completion",
                    "model": result.model,
                    "choices": [{
                        "index": 0,
                        "message": {"role": "assistant", "content": result.output},
                        "finish_reason": result.finish_reason or "stop",
                    }],
                    "usage": usage,
                },
            },
            "error": None,
        }
    error = result.error
    return {
        "id": f"batch_req_{result.line}",
        "custom_id": result.id,
        "response": None,
        "error": {
            "code": error.type if error else result.status.value,
            "message": error.message if error else result.status.value,
        },
    }
