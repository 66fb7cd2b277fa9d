"""The application factory: routes, static dashboard, and the lifespan that runs the gateway."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles

from gateway import redact
from gateway.config import Settings
from gateway.endpoints import api, dashboard, device, health
from gateway.runtime import Gateway

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"


def create_app(settings: Settings) -> Starlette:
    """A Starlette app for *settings*; `app.state.gateway` holds the running parts."""
    redact.install()
    gateway = Gateway(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await gateway.start()
        try:
            yield
        finally:
            await gateway.stop()

    routes = [*health.routes, *dashboard.routes, *api.routes, *device.routes]
    if STATIC_DIR.is_dir():
        routes.append(Mount("/", StaticFiles(directory=STATIC_DIR, html=True), name="static"))
    handlers = api.exception_handlers()
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers=handlers)
    app.state.gateway = gateway
    app.add_middleware(RawSend)
    return app


class RawSend:
    """Keep the server's own ASGI send in the scope: Starlette wraps it, and abort needs it."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "websocket":
            scope["gateway.raw_send"] = send
        await self.app(scope, receive, send)
