"""The ASGI app: OpenAI's /v1/files and /v1/batches over the store and queue, and a page.

:func:`build_app` wires the routes to their handlers (:mod:`.files_api`, :mod:`.batches_api`,
:mod:`.page_api`, :mod:`.metrics_api`), each behind :func:`.endpoint.endpoint`, and keeps what they share on
``app.state`` (:mod:`.state`). Handlers translate; the work is in jobs.files (files), records
(the Batch object), driver (running it). Every error answers in OpenAI's error form; blocking
Redis calls run in the thread pool.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .batches_api import cancel_batch, create_batch, delete_batch, get_batch, list_batches
from .clients import UploadSlots
from .context import ServeContext
from .endpoint import blocking, endpoint, error_response
from .errors import APIError
from .files_api import delete_file, file_content, get_file, list_files, upload_file
from .metrics_api import metrics
from .page_api import health, openapi_schema, page_batches, page_html, page_script, page_style
from .state import AppState, app_state

log = logging.getLogger("aivvm_batch.serve")

ROUTES = [
    Route("/", endpoint(page_html, authenticated=False)),
    Route("/ui/page.js", endpoint(page_script, authenticated=False)),
    Route("/ui/page.css", endpoint(page_style, authenticated=False)),
    Route("/ui/batches", endpoint(page_batches)),
    Route("/health", endpoint(health, authenticated=False)),
    Route("/metrics", endpoint(metrics, authenticated=False)),
    Route("/openapi.json", endpoint(openapi_schema, authenticated=False)),
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


def build_app(ctx: ServeContext, *, run_driver: bool = True) -> Starlette:
    app = Starlette(routes=ROUTES, lifespan=lifespan,
                    exception_handlers={HTTPException: http_error, Exception: server_error})
    app.state.serve = AppState(ctx, UploadSlots(), run_driver)
    return app


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    state = app_state(app)
    if state.run_driver:
        state.ctx.driver.start()
    try:
        yield
    finally:
        if state.run_driver:
            await blocking(state.ctx.driver.stop)


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    error = APIError(f"{request.method} {request.url.path}: {exc.detail}")
    error.status, error.type, error.code = exc.status_code, "invalid_request_error", None
    return error_response(error)


async def server_error(request: Request, exc: Exception) -> Response:
    log.error("%s %s: unexpected %s", request.method, request.url.path, type(exc).__name__, exc_info=exc)
    return error_response(APIError("The server had an error while processing your request."))
