"""``/v1/files``: upload, list, get, download and delete a key's files (the work is in jobs.files)."""

from __future__ import annotations

from functools import partial

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from jobs.files import FileNotFound, StoredFile

from .endpoint import JSONResponse, blocking, list_object
from .errors import NotFound
from .params import digits_value, int_param, newest_first
from .state import app_state, context
from .upload import receive_upload


async def upload_file(request: Request, owner: str) -> Response:
    state = app_state(request.app)
    quotas = state.ctx.quotas
    limit = state.ctx.limits.max_upload_bytes
    declared = min(digits_value(request.headers.get("content-length", ""), limit) or 0, limit)
    room = await blocking(quotas.check_upload, owner, declared)
    async with state.uploads.hold(owner, quotas.of(owner).uploads):
        stored = await receive_upload(request, state.ctx.files, owner, limit, room)
    return JSONResponse(stored.to_api())


async def list_files(request: Request, owner: str) -> Response:
    q = request.query_params
    limit = int_param(q.get("limit"), "limit", 1, 10_000, 10_000)
    try:
        found, more = await blocking(partial(context(request).files.list_files, owner, after=q.get("after"),
                                             limit=limit, newest_first=newest_first(q.get("order")),
                                             purpose=q.get("purpose")))
    except FileNotFound as exc:
        raise NotFound(str(exc), param="after") from exc
    return JSONResponse(list_object([f.to_api() for f in found], more))


async def get_file(request: Request, owner: str) -> Response:
    return JSONResponse((await _owned_file(request, owner)).to_api())


async def file_content(request: Request, owner: str) -> Response:
    stored = await _owned_file(request, owner)
    return StreamingResponse(context(request).files.iter_content(stored.id), media_type="application/octet-stream",
                             headers={"content-length": str(stored.bytes)})


async def delete_file(request: Request, owner: str) -> Response:
    file_id = request.path_params["file_id"]
    try:
        await blocking(context(request).files.delete, owner, file_id)
    except FileNotFound as exc:
        raise NotFound(str(exc), param="file_id") from exc
    return JSONResponse({"id": file_id, "object": "file", "deleted": True})


async def _owned_file(request: Request, owner: str) -> StoredFile:
    try:
        return await blocking(context(request).files.get, owner, request.path_params["file_id"])
    except FileNotFound as exc:
        raise NotFound(str(exc), param="file_id") from exc
