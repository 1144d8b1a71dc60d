"""``GET /metrics``: the Prometheus exposition of :mod:`aivvm_batch.metrics`, for those holding the
metrics token, and on a server without API keys (loopback only) for any loopback client. The
metrics name every tenant's batches, so no tenant key opens them; on a server with keys a peer on
loopback may be a proxy in front of anyone, so it needs the token too."""

from __future__ import annotations

import hmac

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.requests import Request
from starlette.responses import Response

from ..metrics import StoreCollector
from .auth import is_loopback
from .endpoint import blocking
from .errors import Forbidden
from .state import context


def may_scrape(peer: str | None, authorization: str | None, token: str | None, *, keyed: bool) -> bool:
    """With ``Authorization: Bearer <the metrics token>``; without it, a loopback peer of a server
    without keys (``keyed``: the server has API keys)."""
    if not keyed and peer is not None and is_loopback(peer):
        return True
    if token is None:
        return False
    scheme, _, presented = (authorization or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(presented.strip().encode(), token.encode())


async def metrics(request: Request, owner: str) -> Response:
    ctx = context(request)
    peer = request.client.host if request.client else None
    if not may_scrape(peer, request.headers.get("authorization"), ctx.metrics_token, keyed=not ctx.keys.open):
        raise Forbidden("/metrics needs the bearer AIVVM_BATCH_METRICS_TOKEN (on a server without API keys, "
                        "loopback is enough)")
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StoreCollector(ctx.store))
    return Response(await blocking(generate_latest, registry), media_type=CONTENT_TYPE_LATEST)
