"""Local stand-in chat provider ("stub") for trying aivvm-batch and for tests.

This is NOT a model and generates nothing: it is a small deterministic HTTP
server on 127.0.0.1 that answers chat requests with canned text so the batch
worker can be tried end to end, tested and benchmarked without a real
provider.  It speaks two protocols:

* Aivvm / chatbot-ui: ``POST /api/chat`` -> the reply as plain UTF-8 text,
  streamed with ``Transfer-Encoding: chunked``, one HTTP chunk per reply chunk.
  Chunks are cut on bytes, so a multi-byte character may straddle two chunks.
* OpenAI-compatible: ``POST /v1/chat/completions`` (and ``/chat/completions``)
  -> server-sent ``chat.completion.chunk`` events (``"stream": true``) or one
  ``chat.completion`` JSON object.  Tools (``tool_calls`` with arguments built
  from each function's JSON schema), ``logprobs``/``top_logprobs``, ``n`` > 1,
  ``response_format`` (``json_object``/``json_schema``) and refusals are
  answered too, deterministically; so are ``POST /v1/embeddings``,
  ``POST /v1/responses`` (the Responses API, streamed as named events) and
  ``POST /v1/completions`` (legacy text completions), each also without ``/v1``.

The reply is ``"Stand-in reply to: <last user message>"``.  A message may
carry one directive ``[[stub k=v k=v ...]]`` that is removed from the text and
injects a fault or changes the reply (see :func:`parse_directive` and
:func:`build_plan`).  ``GET /__stub/stats``, ``POST /__stub/reset`` and
``GET /health`` let tests inspect the server.  Every answer carries an
``x-request-id: req_<counter>`` header; every OpenAI chunk and completion says
``system_fingerprint: "fp_stub"``.

Modules, one concern each: :mod:`.faults` (the directive language),
:mod:`.text` (reply text, padding, cuts), :mod:`.http` (HTTP/1.1 framing),
:mod:`.openai_wire` (SSE, errors, usage, the plain chat payloads),
:mod:`.chat` (chat requests and their options), :mod:`.chat_features` (tools,
logprobs, choices, JSON, refusals), :mod:`.schema` (JSON from a JSON schema),
:mod:`.embeddings`, :mod:`.responses`, :mod:`.completions` (the other
endpoints), :mod:`.state` (counters), :mod:`.exchange` (one request and its
response) and :mod:`.server` (the asyncio core, :class:`StubServer`, :func:`serve`).
"""

from __future__ import annotations

from .chat import (
    MAX_CHOICES,
    MAX_PARALLEL_CALLS,
    MAX_TOP_LOGPROBS,
    ChatOptions,
    ChatRequest,
    JsonFormat,
    ToolSpec,
    last_user_prompt,
    messages_key,
    parse_chat_options,
    parse_chat_request,
)
from .chat_features import (
    REFUSAL_TEXT,
    ChoiceReply,
    ToolCall,
    call_id,
    chat_choices,
    chat_completion,
    chat_stream_parts,
    token_logprob,
)
from .completions import CompletionRequest, completion_object, completion_stream_parts, parse_completion_request
from .embeddings import (
    DEFAULT_DIMENSIONS,
    MAX_DIMENSIONS,
    EmbeddingRequest,
    embedding_vector,
    embeddings_body,
    parse_embedding_request,
)
from .exchange import (
    AIVVM_PATH,
    COMPLETIONS_PATHS,
    EMBEDDINGS_PATHS,
    HEALTH_PATH,
    OPENAI_PATHS,
    RESET_PATH,
    RESPONSES_PATHS,
    SERVER_NAME,
    STATS_PATH,
    _Exchange,
)
from .faults import (
    DEFAULT_STALL,
    DIRECTIVE_KEYS,
    FAULTS,
    _DIRECTIVE_RE,
    FaultPlan,
    _float_option,
    _int_option,
    build_plan,
    find_directive,
    parse_directive,
)
from .http import (
    _REASONS,
    MAX_BODY_BYTES,
    MAX_HEAD_BYTES,
    RequestHead,
    body_length,
    chunk_frame,
    parse_chunk_size,
    parse_request_head,
    response_head,
)
from .openai_wire import (
    _OPENAI_ERROR_TYPES,
    DONE_EVENT,
    SYSTEM_FINGERPRINT,
    openai_chunk,
    openai_completion,
    openai_error,
    openai_stream_parts,
    sse_event,
    sse_named_event,
    usage_for,
)
from .responses import ResponsesRequest, parse_responses_request, responses_stream_parts
from .schema import example_value, violating_value
from .ratelimit import RateLimit
from .server import (
    DEFAULT_BACKLOG,
    StubServer,
    _Core,
    _install_sigterm,
    _listening_socket,
    raise_open_file_limit,
    serve,
)
from .state import TIMES_WINDOW, _StubState
from .text import (
    _FILLER,
    BAD_BYTES,
    SPLIT_TEXT,
    VOCABULARY,
    _Seq,
    aivvm_chunks,
    cut_at,
    even_cuts,
    message_text,
    multibyte_cuts,
    pad_reply,
    reply_text,
    split_evenly,
    tokens,
    word_count,
    word_text,
)

__all__ = [
    "RateLimit",
    "StubServer",
    "serve",
    "FaultPlan",
    "ChatRequest",
    "parse_directive",
    "find_directive",
    "build_plan",
    "last_user_prompt",
    "reply_text",
    "word_text",
    "split_evenly",
    "aivvm_chunks",
    "openai_stream_parts",
    "parse_chat_request",
    "pad_reply",
    "RequestHead",
    "parse_request_head",
    "body_length",
    "parse_chunk_size",
    "response_head",
    "raise_open_file_limit",
    # constants tests and benchmarks compare replies with
    "SPLIT_TEXT",
    "BAD_BYTES",
    "VOCABULARY",
    "REFUSAL_TEXT",
    "SYSTEM_FINGERPRINT",
    # the OpenAI API beyond plain chat
    "ChatOptions",
    "parse_chat_options",
    "chat_choices",
    "chat_completion",
    "chat_stream_parts",
    "example_value",
    "violating_value",
    "parse_embedding_request",
    "embeddings_body",
    "parse_responses_request",
    "responses_stream_parts",
    "parse_completion_request",
    "completion_stream_parts",
    "completion_object",
]
