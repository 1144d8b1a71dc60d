"""What the handlers share, kept on ``app.state`` by :func:`.app.build_app`, read back typed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from starlette.requests import Request

from .clients import UploadSlots
from .context import ServeContext


@dataclass(frozen=True)
class AppState:
    ctx: ServeContext
    uploads: UploadSlots
    # the lifespan starts and stops the driver (tests drive it by hand)
    run_driver: bool = True


def app_state(app: Any) -> AppState:
    """The app's :class:`AppState` (Starlette's ``app.state`` is untyped)."""
    state = app.state.serve
    assert isinstance(state, AppState)
    return state


def context(request: Request) -> ServeContext:
    return app_state(request.app).ctx
