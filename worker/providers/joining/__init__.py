"""Joining a streamed reply into what the server would have answered without streaming: pure.

Fed the parsed events of one reply (JSON objects, in order), a joiner hands out the text
of the first choice as it comes and, at the end, builds the body of the unstreamed answer:

* :class:`ChatJoiner` (:mod:`.chat`): ``chat.completion.chunk`` events -> a ``ChatCompletion``;
* :class:`CompletionsJoiner` (:mod:`.completions`): ``text_completion`` events -> a ``Completion``;
* :class:`ResponsesJoiner` (:mod:`.responses`): Responses API events -> the final ``Response`` as sent;
* :func:`embeddings_body` (:mod:`.embeddings`): the one JSON body of ``/embeddings`` -> a
  ``CreateEmbeddingResponse``.

The first two share :mod:`.choices` (envelope, choices by index) and :mod:`.deltas` (how
deltas accumulate); :mod:`.bounds` caps what a reply may make a joiner hold, and
:mod:`.json_values` reads JSON strictly.
"""

from __future__ import annotations

from .bounds import Containers
from .chat import ChatJoiner
from .completions import CompletionsJoiner
from .embeddings import embeddings_body, embeddings_count
from .json_values import NonFiniteNumber, strict_json
from .responses import ResponseFailed, ResponsesJoiner

__all__ = ["ChatJoiner", "CompletionsJoiner", "Containers", "NonFiniteNumber", "ResponseFailed", "ResponsesJoiner",
           "embeddings_body", "embeddings_count", "strict_json"]
