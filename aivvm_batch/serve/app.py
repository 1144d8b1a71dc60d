"""The ASGI app: OpenAI's /v1/files and /v1/batches over the store and queue, and a page.

Handlers translate; the work is in jobs.files (files), records (the Batch
object), driver (running it). Every error answers in OpenAI's error form;
blocking Redis calls run in the thread pool.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any, TypeVar

import anyio.to_thread
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse as StarletteJSON
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from jobs.endpoints import Endpoint
from jobs.errors import BatchError, BatchNotFound, StoreUnavailable
from jobs.files import BATCH_FILE_TTL, MAX_TTL, MIN_TTL, FileNotFound
from jobs.records import MAX_PRIORITY, BatchInfo

from . import page
from .auth import check_host, check_origin
from .clients import UploadSlots, idle_limited
from .context import ServeContext
from .errors import APIError, BadRequest, NotFound, TimedOut, TooLarge, Unavailable
from .records import ApiBatch, ApiStatus
from .upload import receive_upload

log = logging.getLogger("aivvm_batch.serve")
T = TypeVar("T")
Handler = Callable[[Request, str], Awaitable[Response]]

ENDPOINTS = tuple(e.value for e in Endpoint)
WINDOWS = ("24h",)
MAX_METADATA_PAIRS, MAX_METADATA_KEY, MAX_METADATA_VALUE = 16, 64, 512
MAX_IDEMPOTENCY_KEY = 255
PAGE_BATCHES = 50


class JSONResponse(StarletteJSON):
    """Starlette's, with every character beyond ASCII escaped: a string that holds a lone surrogate
    (stored before such text was refused) still renders, where UTF-8 cannot encode it (a 500)."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, allow_nan=False, separators=(",", ":")).encode("ascii")


def error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers())


async def blocking(func: Callable[..., T], *args: Any) -> T:
    return await anyio.to_thread.run_sync(partial(func, *args))


def build_app(ctx: ServeContext, *, run_driver: bool = True) -> Starlette:
    uploads = UploadSlots(ctx.limits.uploads_per_key)
    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if run_driver:
            ctx.driver.start()
        try:
            yield
        finally:
            if run_driver:
                await blocking(ctx.driver.stop)

    def endpoint(handler: Handler, *, authenticated: bool = True) -> Callable[[Request], Awaitable[Response]]:
        async def wrapped(request: Request) -> Response:
            try:
                if ctx.keys.open:
                    check_host(request.headers.get("host"))
                check_origin(request.headers.get("origin"), request.headers.get("host"))
                owner = ctx.keys.owner(request.headers.get("authorization")) if authenticated else ""
                request = Request(request.scope, idle_limited(request.receive, ctx.limits.client_idle_seconds))
                return await handler(request, owner)
            except TimedOut as exc:
                log.warning("%s %s: %s", request.method, request.url.path, exc)
                return error_response(exc)
            except ClientDisconnect:
                log.warning("%s %s: the client went away before its request was whole", request.method,
                            request.url.path)
                return Response(status_code=400)  # nobody reads it
            except APIError as exc:
                return error_response(exc)
            except StoreUnavailable as exc:
                log.warning("%s %s: %s", request.method, request.url.path, exc)
                return error_response(Unavailable("the batch store (Redis) is unreachable; try again"))
            except BatchError as exc:
                return error_response(BadRequest(str(exc)))
        return wrapped

    # -- files -----------------------------------------------------------------------------

    async def upload_file(request: Request, owner: str) -> Response:
        async with uploads.hold(owner):
            stored = await receive_upload(request, ctx.files, owner, ctx.limits.max_upload_bytes)
        return JSONResponse(stored.to_api())

    async def list_files(request: Request, owner: str) -> Response:
        q = request.query_params
        limit = _int_param(q.get("limit"), "limit", 1, 10_000, 10_000)
        try:
            found, more = await blocking(partial(ctx.files.list_files, owner, after=q.get("after"), limit=limit,
                                                 newest_first=_order(q.get("order")) == "desc",
                                                 purpose=q.get("purpose")))
        except FileNotFound as exc:
            raise NotFound(str(exc), param="after") from exc
        return JSONResponse(_page([f.to_api() for f in found], more))

    async def get_file(request: Request, owner: str) -> Response:
        return JSONResponse((await _owned_file(request, owner)).to_api())

    async def file_content(request: Request, owner: str) -> Response:
        stored = await _owned_file(request, owner)
        return StreamingResponse(ctx.files.iter_content(stored.id), media_type="application/octet-stream",
                                 headers={"content-length": str(stored.bytes)})

    async def delete_file(request: Request, owner: str) -> Response:
        file_id = request.path_params["file_id"]
        try:
            await blocking(ctx.files.delete, owner, file_id)
        except FileNotFound as exc:
            raise NotFound(str(exc), param="file_id") from exc
        return JSONResponse({"id": file_id, "object": "file", "deleted": True})

    async def _owned_file(request: Request, owner: str) -> Any:
        try:
            return await blocking(ctx.files.get, owner, request.path_params["file_id"])
        except FileNotFound as exc:
            raise NotFound(str(exc), param="file_id") from exc

    # -- batches ---------------------------------------------------------------------------

    async def create_batch(request: Request, owner: str) -> Response:
        body = await _json_body(request, ctx.limits.max_body_bytes)
        input_file_id = body.get("input_file_id")
        if not isinstance(input_file_id, str) or not input_file_id:
            raise BadRequest("input_file_id is required (the id of a file uploaded with purpose 'batch')",
                             param="input_file_id")
        endpoint_ = body.get("endpoint")
        if endpoint_ not in ENDPOINTS:
            raise BadRequest(f"endpoint must be one of {', '.join(ENDPOINTS)}, got {endpoint_!r}", param="endpoint")
        window = body.get("completion_window")
        if window not in WINDOWS:
            raise BadRequest(f"completion_window must be '24h', got {window!r}", param="completion_window")
        metadata = _metadata(body.get("metadata"))
        output_ttl = _output_ttl(body.get("output_expires_after"))
        try:
            stored = await blocking(ctx.files.get, owner, input_file_id)
        except FileNotFound as exc:
            raise NotFound(str(exc), param="input_file_id") from exc
        if stored.purpose != "batch":
            raise BadRequest(f"the file {input_file_id} was not uploaded with purpose 'batch'",
                             param="input_file_id")
        batch = await blocking(partial(ctx.records.create, owner, input_file_id, endpoint_, window,
                                       ctx.limits.window_seconds, metadata, ctx.driver.config.options,
                                       idempotency_key=_idempotency_key(request), output_ttl=output_ttl))
        ctx.driver.wake.set()
        return JSONResponse(batch.to_api(None))

    async def list_batches(request: Request, owner: str) -> Response:
        q = request.query_params
        limit = _int_param(q.get("limit"), "limit", 1, 100, 20)
        found, more = await blocking(ctx.records.list_batches, owner, q.get("after"), limit,
                                     _order(q.get("order")) == "desc")
        return JSONResponse(_page([b.to_api(i) for b, i in await blocking(_with_infos, found)], more))

    async def get_batch(request: Request, owner: str) -> Response:
        batch = await blocking(ctx.records.get, owner, request.path_params["batch_id"])
        return JSONResponse(batch.to_api(await blocking(_info, batch)))

    async def delete_batch(request: Request, owner: str) -> Response:
        """An ended batch goes, with its output and error files (as Anthropic's DELETE of a batch)."""
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
        return JSONResponse(batch.to_api(await blocking(_info, batch)))

    def _info(batch: ApiBatch, live: bool = False) -> BatchInfo | None:
        """The store's view of the batch, while it exists (``live``: even once the batch ended)."""
        if (batch.final_counts is not None and not live) or not batch.store_id:
            return None
        try:
            return ctx.store.info(batch.store_id)
        except BatchNotFound:
            return None

    def _with_infos(batches: list[ApiBatch], live: bool = False) -> list[tuple[ApiBatch, BatchInfo | None]]:
        return [(b, _info(b, live)) for b in batches]

    # -- the page --------------------------------------------------------------------------

    async def page_batches(request: Request, owner: str) -> Response:
        found, _ = await blocking(ctx.records.list_batches, owner, None, PAGE_BATCHES)
        rows = []
        for batch, info in await blocking(_with_infos, found, True):
            rows.append(page.row(batch.to_api(info), info))
        return JSONResponse({"batches": rows, "workers": page.workers(await blocking(ctx.store.workers))})

    async def health(request: Request, owner: str) -> Response:
        return JSONResponse({"status": "ok"})

    def static(body: str, media_type: str) -> Handler:
        async def handler(request: Request, owner: str) -> Response:
            return Response(body, media_type=media_type, headers=page.HEADERS)
        return handler

    routes = [
        Route("/", endpoint(static(page.HTML, "text/html; charset=utf-8"), authenticated=False)),
        Route("/ui/page.js", endpoint(static(page.SCRIPT, "text/javascript; charset=utf-8"), authenticated=False)),
        Route("/ui/page.css", endpoint(static(page.STYLE, "text/css; charset=utf-8"), authenticated=False)),
        Route("/ui/batches", endpoint(page_batches)),
        Route("/health", endpoint(health, authenticated=False)),
        Route("/v1/files", endpoint(upload_file), methods=["POST"]),
        Route("/v1/files", endpoint(list_files), methods=["GET"]),
        Route("/v1/files/{file_id}", endpoint(get_file), methods=["GET"]),
        Route("/v1/files/{file_id}", endpoint(delete_file), methods=["DELETE"]),
        Route("/v1/files/{file_id}/content", endpoint(file_content), methods=["GET"]),
        Route("/v1/batches", endpoint(create_batch), methods=["POST"]),
        Route("/v1/batches", endpoint(list_batches), methods=["GET"]),
        Route("/v1/batches/{batch_id}", endpoint(get_batch), methods=["GET"]),
        Route("/v1/batches/{batch_id}", endpoint(delete_batch), methods=["DELETE"]),
        Route("/v1/batches/{batch_id}/cancel", endpoint(cancel_batch), methods=["POST"]),
    ]

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        error = APIError(f"{request.method} {request.url.path}: {exc.detail}")
        error.status, error.type, error.code = exc.status_code, "invalid_request_error", None
        return error_response(error)

    async def server_error(request: Request, exc: Exception) -> Response:
        log.error("%s %s: unexpected %s", request.method, request.url.path, type(exc).__name__, exc_info=exc)
        return error_response(APIError("The server had an error while processing your request."))

    return Starlette(routes=routes, lifespan=lifespan,
                     exception_handlers={HTTPException: http_error, Exception: server_error})


def _page(data: list[dict[str, Any]], more: bool) -> dict[str, Any]:
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": more}


def _output_ttl(value: Any) -> int:
    """Seconds the output and error files live: ``output_expires_after`` (OpenAI's bounds), by
    default 30 days."""
    if value is None:
        return BATCH_FILE_TTL
    seconds = value.get("seconds") if isinstance(value, dict) else None
    if not isinstance(value, dict) or value.get("anchor") != "created_at":
        raise BadRequest("output_expires_after must be {\"anchor\": \"created_at\", \"seconds\": N}",
                         param="output_expires_after")
    if isinstance(seconds, bool) or not isinstance(seconds, int) or not MIN_TTL <= seconds <= MAX_TTL:
        raise BadRequest(f"output_expires_after.seconds must be a whole number from {MIN_TTL} to {MAX_TTL}",
                         param="output_expires_after.seconds")
    return seconds


def _order(raw: str | None) -> str:
    order = raw or "desc"
    if order not in ("asc", "desc"):
        raise BadRequest("order must be 'asc' or 'desc'", param="order")
    return order


def _idempotency_key(request: Request) -> str | None:
    key = request.headers.get("idempotency-key")
    if key is not None and not (0 < len(key) <= MAX_IDEMPOTENCY_KEY and key.isascii() and key.isprintable()):
        raise BadRequest(f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} printable ASCII characters",
                         param="Idempotency-Key")
    return key


def _int_param(raw: str | None, name: str, low: int, high: int, default: int) -> int:
    if raw is None or raw == "":
        return default
    if not (raw.isascii() and raw.isdigit()):  # int() also takes "１０" and " 10_0 "
        raise BadRequest(f"{name} must be an integer, got {raw!r}", param=name)
    value = int(raw)
    if not low <= value <= high:
        raise BadRequest(f"{name} must be between {low} and {high}, got {value}", param=name)
    return value


def _metadata(value: Any) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or len(value) > MAX_METADATA_PAIRS:
        raise BadRequest(f"metadata must be an object of at most {MAX_METADATA_PAIRS} pairs", param="metadata")
    for key, item in value.items():
        if not isinstance(item, str) or len(key) > MAX_METADATA_KEY or len(item) > MAX_METADATA_VALUE:
            raise BadRequest(f"metadata keys are strings of at most {MAX_METADATA_KEY} characters and values "
                             f"strings of at most {MAX_METADATA_VALUE}", param="metadata")
    priority = value.get("priority")
    if priority is not None and not (priority.isascii() and priority.isdigit() and 1 <= int(priority) <= MAX_PRIORITY):
        raise BadRequest(f"metadata.priority is the batch's share of the workers: a whole number from 1 to "
                         f"{MAX_PRIORITY}, got {priority!r}", param="metadata.priority")
    return dict(value)


async def _json_body(request: Request, limit: int) -> dict[str, Any]:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise TooLarge(f"the request body is larger than {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise TooLarge(f"the request body is larger than {limit} bytes")
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BadRequest("the request body must be a JSON object")
    where = _lone_surrogate(data, "")
    if where is not None:  # before anything is written: the text could not be stored or answered
        raise BadRequest(f"the request body holds a lone surrogate (text that is not Unicode) at {where or 'a key'}",
                         param=where or None)
    return data


def _lone_surrogate(value: Any, path: str) -> str | None:
    """The path of the first string (or key) in ``value`` that UTF-8 cannot encode, else None."""
    if isinstance(value, str):
        return None if value.isascii() or _encodes(value) else path
    if isinstance(value, dict):
        for key, item in value.items():
            where = path + "." + key if path else key
            if not _encodes(key):
                return (path + "." if path else "") + ascii(key)
            found = _lone_surrogate(item, where)
            if found is not None:
                return found
    if isinstance(value, list):
        for index, item in enumerate(value):
            found = _lone_surrogate(item, f"{path}[{index}]")
            if found is not None:
                return found
    return None


def _encodes(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
