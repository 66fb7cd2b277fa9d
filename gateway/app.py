"""The application factory: routes, static dashboard, and the lifespan that runs the gateway."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from starlette.applications import Starlette
from starlette.datastructures import State
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket

from gateway import compat, redact
from gateway.config import Settings
from gateway.endpoints import api, commands, dashboard, device, events, health, webhooks
from gateway.runtime import Gateway

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
DEVICE_PREFIX = "/ws/devices/"


def create_app(settings: Settings) -> GatewayApp:
    """The ASGI app for *settings*; `app.state.gateway` holds the running parts."""
    redact.install()
    gateway = Gateway(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await gateway.start()
        try:
            yield
        finally:
            await gateway.stop()

    routes = [
        *health.routes,
        *dashboard.routes,
        *commands.routes,
        *events.routes,
        *webhooks.routes,
        *api.routes,
        *device.routes,
    ]
    if STATIC_DIR.is_dir():
        routes.append(Mount("/", StaticFiles(directory=STATIC_DIR, html=True), name="static"))
    handlers = api.exception_handlers()
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers=handlers)
    app.state.gateway = gateway
    return GatewayApp(app)


class GatewayApp:
    """The Starlette app, with a short path for device sockets.

    A device socket lives for days, and every coroutine between uvicorn and the endpoint stays
    suspended on its stack for as long: the middleware and routing layers cost a few KiB per
    connection, a third of the whole. Device sockets skip them; everything else goes through
    Starlette. The server's own ASGI send is kept in the scope, since closing a stalled peer
    needs its transport (Starlette wraps send).
    """

    def __init__(self, app: Starlette) -> None:
        self.app = app

    @property
    def state(self) -> State:
        return self.app.state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            scope[compat.RAW_SEND] = send
            device_id = _device_path(scope["path"])
            if device_id is not None:
                scope["app"] = self.app
                scope["path_params"] = {"device_id": device_id}
                await device.device_socket(WebSocket(scope, receive, send), receive)
                return
        await self.app(scope, receive, send)


def _device_path(path: str) -> str | None:
    """The id in `/ws/devices/{id}` (one path segment), as the Starlette route would match."""
    if not path.startswith(DEVICE_PREFIX):
        return None
    rest = path[len(DEVICE_PREFIX) :]
    return rest if rest and "/" not in rest else None
