"""``/v1/batches``: create, list, get, cancel and delete a key's batches.

The Batch object is :mod:`.records`'; running a batch is the driver's (:mod:`.driver`), woken
when a batch is created or cancelled.
"""

from __future__ import annotations

import time
from functools import partial

from starlette.requests import Request
from starlette.responses import Response

from jobs.endpoints import Endpoint
from jobs.errors import BatchNotFound
from jobs.files import FileNotFound
from jobs.records import BatchInfo

from .context import ServeContext
from .endpoint import JSONResponse, blocking, list_object
from .errors import BadRequest, NotFound
from .params import idempotency_key, int_param, json_body, metadata, newest_first, output_ttl, shown
from .records import ApiBatch, ApiStatus
from .state import context

ENDPOINTS = tuple(e.value for e in Endpoint)
WINDOWS = ("24h",)


async def create_batch(request: Request, owner: str) -> Response:
    ctx = context(request)
    body = await json_body(request, ctx.limits.max_body_bytes)
    input_file_id = body.get("input_file_id")
    if not isinstance(input_file_id, str) or not input_file_id:
        raise BadRequest("input_file_id is required (the id of a file uploaded with purpose 'batch')",
                         param="input_file_id")
    endpoint = body.get("endpoint")
    if endpoint not in ENDPOINTS:
        raise BadRequest(f"endpoint must be one of {', '.join(ENDPOINTS)}, got {shown(endpoint)}", param="endpoint")
    window = body.get("completion_window")
    if window not in WINDOWS:
        raise BadRequest(f"completion_window must be '24h', got {shown(window)}", param="completion_window")
    pairs = metadata(body.get("metadata"))
    ttl = output_ttl(body.get("output_expires_after"))
    try:
        stored = await blocking(ctx.files.get, owner, input_file_id)
    except FileNotFound as exc:
        raise NotFound(str(exc), param="input_file_id") from exc
    if stored.purpose != "batch":
        raise BadRequest(f"the file {input_file_id} was not uploaded with purpose 'batch'",
                         param="input_file_id")
    batch = await blocking(partial(ctx.records.create, owner, input_file_id, endpoint, window,
                                   ctx.limits.window_seconds, pairs, ctx.driver.config.options,
                                   idempotency_key=idempotency_key(request), output_ttl=ttl,
                                   admitting=partial(ctx.quotas.admitting, owner, stored.lines or 0)))
    ctx.driver.wake.set()
    return JSONResponse(batch.to_api(None))


async def list_batches(request: Request, owner: str) -> Response:
    ctx = context(request)
    q = request.query_params
    limit = int_param(q.get("limit"), "limit", 1, 100, 20)
    found, more = await blocking(ctx.records.list_batches, owner, q.get("after"), limit,
                                 newest_first(q.get("order")))
    return JSONResponse(list_object([b.to_api(i) for b, i in await blocking(with_infos, ctx, found)], more))


async def get_batch(request: Request, owner: str) -> Response:
    ctx = context(request)
    batch = await blocking(ctx.records.get, owner, request.path_params["batch_id"])
    return JSONResponse(batch.to_api(await blocking(info_of, ctx, batch)))


async def delete_batch(request: Request, owner: str) -> Response:
    """An ended batch goes, with its output and error files (as Anthropic's DELETE of a batch)."""
    ctx = context(request)
    batch_id = request.path_params["batch_id"]
    batch = await blocking(ctx.records.get, owner, batch_id)
    if not batch.status.terminal:
        raise BadRequest(f"Cannot delete a batch with status '{batch.status.value}': cancel it first.",
                         param="batch_id", code="invalid_status")
    for file_id in (batch.output_file_id, batch.error_file_id):
        if file_id:
            try:
                await blocking(ctx.files.delete, owner, file_id)
            except FileNotFound:
                pass
    await blocking(ctx.records.delete, owner, batch_id)
    return JSONResponse({"id": batch_id, "object": "batch.deleted", "deleted": True})


async def cancel_batch(request: Request, owner: str) -> Response:
    ctx = context(request)
    batch_id = request.path_params["batch_id"]
    batch = await blocking(ctx.records.get, owner, batch_id)
    if batch.status in (ApiStatus.VALIDATING, ApiStatus.IN_PROGRESS):
        await blocking(ctx.records.transition, batch_id, (ApiStatus.VALIDATING, ApiStatus.IN_PROGRESS),
                       ApiStatus.CANCELLING, {"cancelling_at": int(time.time())})
        ctx.driver.wake.set()
        batch = await blocking(ctx.records.get, owner, batch_id)
    if batch.status not in (ApiStatus.CANCELLING, ApiStatus.CANCELLED):
        raise BadRequest(f"Cannot cancel a batch with status '{batch.status.value}'.", param="batch_id",
                         code="invalid_status")
    return JSONResponse(batch.to_api(await blocking(info_of, ctx, batch)))


def info_of(ctx: ServeContext, batch: ApiBatch, live: bool = False) -> BatchInfo | None:
    """The store's view of the batch, while it exists (``live``: even once the batch ended)."""
    if (batch.final_counts is not None and not live) or not batch.store_id:
        return None
    try:
        return ctx.store.info(batch.store_id)
    except BatchNotFound:
        return None


def with_infos(ctx: ServeContext, batches: list[ApiBatch],
               live: bool = False) -> list[tuple[ApiBatch, BatchInfo | None]]:
    """:func:`info_of` of each batch, in one round trip."""
    asked = [b.store_id for b in batches if b.store_id and (b.final_counts is None or live)]
    found = ctx.store.infos(asked)
    return [(b, found.get(b.store_id) if b.store_id in asked else None) for b in batches]
