"""``POST /v1/embeddings``: deterministic unit vectors from a hash of each input (never streamed).

``input`` is a string, a list of strings, a list of ints (one token array) or a
list of lists of ints; ``dimensions`` (default 8, at most 4096) sets the vector
length and ``encoding_format: "base64"`` sends each vector as the base64 of its
little-endian float32s.  A directive in an input string applies to the request;
``bytes=N`` lengthens the vectors until the body is about N bytes.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import struct
from dataclasses import dataclass
from typing import Any, Union

from .chat import messages_key
from .faults import FaultPlan, build_plan, has_directive, parse_directive
from .text import word_count

DEFAULT_DIMENSIONS = 8
MAX_DIMENSIONS = 4096
MAX_INPUTS = 2048
MAX_PADDED_DIMENSIONS = 1 << 20

EmbeddingInput = Union[str, list[int]]


@dataclass(frozen=True)
class EmbeddingRequest:
    """A parsed embeddings request: each input as its text (directive removed) or its token array."""

    inputs: list[EmbeddingInput]
    prompt: str
    plan: FaultPlan
    key: str
    model: str
    dimensions: int
    base64: bool

    @property
    def prompt_tokens(self) -> int:
        """Words of the texts plus the length of the token arrays."""
        return sum(word_count(i) if isinstance(i, str) else len(i) for i in self.inputs)


def _is_tokens(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value)
    )


def _inputs(value: Any) -> list[EmbeddingInput]:
    """The inputs of ``input``; ``ValueError`` unless one of the four accepted forms."""
    if isinstance(value, str) and value:
        return [value]
    if isinstance(value, list) and 0 < len(value) <= MAX_INPUTS:
        if all(isinstance(v, str) and v for v in value):
            return list(value)
        if _is_tokens(value):
            return [list(value)]
        if all(_is_tokens(v) for v in value):
            return [list(v) for v in value]
    raise ValueError(
        "'input' must be a non-empty string, a list of non-empty strings, "
        f"a token array or a list of token arrays (at most {MAX_INPUTS} inputs)"
    )


def parse_embedding_request(
    raw: bytes, *, latency: float = 0.0, chunks: int = 4, reply_bytes: int | None = None
) -> EmbeddingRequest:
    """Parse an embeddings body; ``ValueError`` if invalid."""
    body = json.loads(raw)
    if not isinstance(body, dict):
        raise ValueError("request body must be a JSON object")
    given = _inputs(body.get("input"))
    dimensions = body.get("dimensions")
    if dimensions is None:
        dimensions = DEFAULT_DIMENSIONS
    elif isinstance(dimensions, bool) or not isinstance(dimensions, int) or not 1 <= dimensions <= MAX_DIMENSIONS:
        raise ValueError(f"'dimensions' must be an integer in 1..{MAX_DIMENSIONS}")
    encoding = body.get("encoding_format")
    if encoding not in (None, "float", "base64"):
        raise ValueError("'encoding_format' must be 'float' or 'base64'")
    options = next((parse_directive(i)[0] for i in given if isinstance(i, str) and has_directive(i)), {})
    inputs: list[EmbeddingInput] = [parse_directive(i)[1] if isinstance(i, str) else i for i in given]
    model = body.get("model")
    return EmbeddingRequest(
        inputs=inputs,
        prompt="\n".join(i for i in inputs if isinstance(i, str)),
        plan=build_plan(options, latency=latency, chunks=chunks, reply_bytes=reply_bytes),
        key=messages_key([{"input": body.get("input")}]),
        model=model if isinstance(model, str) else "stub",
        dimensions=dimensions,
        base64=encoding == "base64",
    )


def embedding_vector(value: EmbeddingInput, dimensions: int) -> list[float]:
    """A unit vector of ``dimensions`` floats from a hash of ``value`` (a text or a token array)."""
    seed = b"t:" + value.encode("utf-8") if isinstance(value, str) else b"k:" + json.dumps(value).encode()
    words = struct.unpack(f"<{dimensions}I", hashlib.shake_256(seed).digest(4 * dimensions))
    values = [w / 2_147_483_648.0 - 1.0 for w in words]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [v / norm for v in values]


def encode_base64(vector: list[float]) -> str:
    """The base64 of ``vector`` as little-endian float32s."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


def embeddings_payload(request: EmbeddingRequest, dimensions: int) -> dict[str, Any]:
    """The ``list`` object with one ``embedding`` per input."""
    data = []
    for index, value in enumerate(request.inputs):
        vector = embedding_vector(value, dimensions)
        embedding: list[float] | str = encode_base64(vector) if request.base64 else vector
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    tokens = request.prompt_tokens
    return {
        "object": "list",
        "data": data,
        "model": request.model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def _encoded(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, ensure_ascii=False).encode("utf-8")


def embeddings_body(request: EmbeddingRequest, size: int | None = None) -> bytes:
    """The JSON body; with ``size`` the vectors grow until it is about ``size`` bytes (never shorter)."""
    dims = request.dimensions
    body = _encoded(embeddings_payload(request, dims))
    if size is None or len(body) >= size:
        return body
    start, start_size = dims, len(body)
    probe = len(_encoded(embeddings_payload(request, 2 * dims)))
    per_dimension = max(1.0, (probe - start_size) / dims)  # bytes one more dimension adds over every vector
    while len(body) < size and dims < MAX_PADDED_DIMENSIONS:
        dims = min(MAX_PADDED_DIMENSIONS, dims + max(1, math.ceil((size - len(body)) / per_dimension)))
        body = _encoded(embeddings_payload(request, dims))
        per_dimension = max(1.0, (len(body) - start_size) / (dims - start))
    return body
