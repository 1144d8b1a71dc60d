"""The answer cache: an ``ok`` answer kept under what was asked, for any later batch that asks
the very same (``--cache``), so that it is not paid for twice.

"The same" is the provider (the whole fallback list), the base URL, the endpoint and the whole
request after defaults (model, messages, temperature, system message, every other field): not
the line's id, number or metadata. A ``serve`` tenant's batches ask in a namespace of their own,
so that no tenant is answered from another's requests. Pure: the keys and the results; the
store reads and writes them (:meth:`jobs.store.BatchStore.add_chunk`, the worker's record).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

from .records import BatchOptions, ItemRequest, ItemResult, Status

# an answer larger than this is not kept (its Redis cost would outweigh a saved call of its kind)
MAX_ENTRY_BYTES = 256 * 1024


def cache_key(options: BatchOptions, request: ItemRequest) -> str:
    """The hex digest that names what ``request`` asks of the batch's provider."""
    asked = [options.cache_scope, list(options.providers()), options.base_url, request.endpoint.value,
             request.model, [message.to_dict() for message in request.messages], request.temperature,
             request.system_message, dict(request.params)]
    text = json.dumps(asked, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def entry(result: ItemResult, options: BatchOptions) -> str | None:
    """What the cache keeps of a result: an ``ok`` one of the batch's first provider (a fallback's
    base URL is the worker's, not in the key), small enough; else ``None``."""
    if result.status is not Status.OK or result.cached or result.provider != options.providers()[0]:
        return None
    text = result.to_json()
    return text if len(text.encode("utf-8", "surrogatepass")) <= MAX_ENTRY_BYTES else None


def reused(raw: bytes, request: ItemRequest) -> ItemResult | None:
    """A kept answer as this request's result: its id, line and metadata; ``cached``, no attempt."""
    try:
        result = ItemResult.from_json(raw)
    except (ValueError, KeyError, TypeError):
        return None
    if result.status is not Status.OK:
        return None
    return dataclasses.replace(result, id=request.id, line=request.line, metadata=request.metadata,
                               attempts=0, cached=True)
