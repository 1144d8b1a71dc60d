"""What every handler shares: the wrapper that checks the host, the origin and the key and
answers every error in OpenAI's form, the JSON response, and blocking calls in the thread pool."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, TypeVar

import anyio.to_thread
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse as StarletteJSON
from starlette.responses import Response

from jobs.errors import BatchError, StoreUnavailable

from .auth import check_host, check_origin
from .clients import idle_limited
from .errors import APIError, BadRequest, TimedOut, Unavailable
from .state import context

log = logging.getLogger("aivvm_batch.serve")
T = TypeVar("T")
# a handler gets the request and the owner of its key ("" where no key is asked for)
Handler = Callable[[Request, str], Awaitable[Response]]


class JSONResponse(StarletteJSON):
    """Starlette's, with every character beyond ASCII escaped: a string that holds a lone surrogate
    (stored before such text was refused) still renders, where UTF-8 cannot encode it (a 500)."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, allow_nan=False, separators=(",", ":")).encode("ascii")


def error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers())


def list_object(data: list[dict[str, Any]], more: bool) -> dict[str, Any]:
    """OpenAI's page of a list."""
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": more}


async def blocking(func: Callable[..., T], *args: Any) -> T:
    return await anyio.to_thread.run_sync(partial(func, *args))


def endpoint(handler: Handler, *, authenticated: bool = True) -> Callable[[Request], Awaitable[Response]]:
    """The route's endpoint: ``handler``, behind the checks every request passes, its errors answered."""

    async def wrapped(request: Request) -> Response:
        ctx = context(request)
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
