"""The page's routes: its static assets, the data it polls, the health check and the API's OpenAPI schema."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from . import page
from .batches_api import with_infos
from .endpoint import JSONResponse, blocking
from .openapi import OPENAPI
from .state import context

PAGE_BATCHES = 50


async def page_html(request: Request, owner: str) -> Response:
    return _asset(page.HTML, "text/html; charset=utf-8")


async def page_script(request: Request, owner: str) -> Response:
    return _asset(page.SCRIPT, "text/javascript; charset=utf-8")


async def page_style(request: Request, owner: str) -> Response:
    return _asset(page.STYLE, "text/css; charset=utf-8")


async def page_batches(request: Request, owner: str) -> Response:
    ctx = context(request)
    found, _ = await blocking(ctx.records.list_batches, owner, None, PAGE_BATCHES)
    rows = []
    for batch, info in await blocking(with_infos, ctx, found, True):
        rows.append(page.row(batch.to_api(info), info))
    return JSONResponse({"batches": rows, "workers": page.workers(await blocking(ctx.store.workers))})


async def openapi_schema(request: Request, owner: str) -> Response:
    return JSONResponse(OPENAPI)


async def health(request: Request, owner: str) -> Response:
    return JSONResponse({"status": "ok"})


def _asset(body: str, media_type: str) -> Response:
    return Response(body, media_type=media_type, headers=page.HEADERS)
