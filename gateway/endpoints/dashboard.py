"""`/ws/dashboard` and the login that gives a browser its session cookie (contract §6)."""

from __future__ import annotations

import logging
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route, WebSocketRoute
from starlette.websockets import WebSocket

from gateway import disconnect, logins, protocol
from gateway.auth import Role, bearer
from gateway.contract import LoginRequest, Reply
from gateway.dashboards import Dashboard
from gateway.endpoints.api import endpoint
from gateway.errors import InvalidCursor
from gateway.eventlog import Position
from gateway.presence import REDIS_ERRORS
from gateway.problems import Problem
from gateway.ratelimit import TokenBucket
from gateway.runtime import Gateway
from gateway.writer import Writer

log = logging.getLogger("gateway.dashboard")
DASHBOARD_QUEUE = 64  # frames: about six seconds of batches before a stalled page is dropped
MAX_LOGIN_BODY = 4096


async def role_of(gateway: Gateway, token: str | None, cookie: str | None) -> Role | None:
    """The role an API key (header or query) or a login cookie grants."""
    role = gateway.api_keys.role(token)
    if role is None and cookie:
        role = await logins.resolve(gateway.redis, gateway.keys, cookie)
    return role


async def dashboard_socket(websocket: WebSocket) -> None:
    gateway: Gateway = websocket.app.state.gateway
    origin = websocket.headers.get("origin")
    if not logins.same_origin(origin, websocket.headers.get("host"),
                              gateway.settings.allowed_origins):  # fmt: skip
        # cross-site WebSocket hijacking: refuse before anything is accepted
        await websocket.send_denial_response(
            JSONResponse({"status": 403, "detail": "origin not allowed"}, status_code=403)
        )
        return
    await websocket.accept()
    try:
        role = await role_of(
            gateway, websocket.query_params.get("token"), websocket.cookies.get(logins.COOKIE)
        )
    except REDIS_ERRORS:
        await websocket.close(disconnect.RESTARTING.code, "store unavailable")
        return
    if role is None:
        await websocket.close(disconnect.AUTH_REQUIRED.code, disconnect.AUTH_REQUIRED.reason)
        return
    writer = Writer(websocket, DASHBOARD_QUEUE, lambda: _slow(gateway))
    try:
        hub = gateway.dashboards
    except REDIS_ERRORS:
        await websocket.close(disconnect.RESTARTING.code, "store unavailable")
        return
    dashboard = Dashboard(writer, Position.start(gateway.keys.partitions))
    try:
        await _snapshot(gateway, dashboard, reason=None)
        await _serve(websocket, gateway, dashboard)
    except REDIS_ERRORS as exc:
        log.warning("dashboard closed: Redis failed (%s)", exc)
        writer.close(disconnect.RESTARTING)
    finally:
        hub.leave(dashboard)
        writer.close(disconnect.NORMAL)
        await writer.wait_closed()  # the close frame goes out before uvicorn drops TCP


def _slow(gateway: Gateway) -> None:
    gateway.metrics.slow_clients.labels("dashboard").inc()


async def _snapshot(gateway: Gateway, dashboard: Dashboard, reason: str | None) -> None:
    """Current devices and counts, then live events from the snapshot's stream position on."""
    gateway.dashboards.leave(dashboard)
    position = await gateway.store.position()
    devices: list[dict[str, Any]] = []
    next_cursor: str | None = None
    limit = gateway.settings.dashboard_snapshot_limit
    while len(devices) < limit:
        page = await gateway.store.page(limit=min(1000, limit - len(devices)), cursor=next_cursor)
        devices += page.items
        next_cursor = page.next_cursor
        if next_cursor is None:
            break
    frame: dict[str, Any] = {
        "type": "snapshot",
        "devices": devices,
        "cursor": position.encode(),
        "stats": await gateway.store.stats(),
        "truncated": next_cursor is not None,
        "next_cursor": next_cursor,  # where `GET /api/devices` goes on after these devices
    }
    if reason:
        frame["reason"] = reason
    dashboard.writer.send(orjson.dumps(frame))
    dashboard.after = dashboard.snapshot = position
    await gateway.dashboards.join(dashboard)


async def _serve(websocket: WebSocket, gateway: Gateway, dashboard: Dashboard) -> None:
    bucket = TokenBucket(gateway.settings.rate_limit, gateway.settings.rate_burst)
    malformed = 0
    while not dashboard.writer.closed:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return
        data = message.get("text")
        if not bucket.take():
            dashboard.writer.close(disconnect.RATE_LIMITED)
            return
        try:
            if data is None:
                raise protocol.FrameError("binary_frame", "frames must be JSON text")
            frame = protocol.parse_dashboard_frame(data)
        except protocol.FrameError as exc:
            malformed += 1
            if malformed > gateway.settings.malformed_tolerance:
                dashboard.writer.close(disconnect.MALFORMED)
                return
            dashboard.writer.send(protocol.error(exc.code, exc.message))
            continue
        if isinstance(frame, protocol.Subscribe):
            dashboard.types, dashboard.ids = frame.types, frame.ids
            dashboard.writer.send(
                orjson.dumps(
                    {
                        "type": "subscribed",
                        "types": sorted(frame.types) if frame.types is not None else None,
                        "ids": sorted(frame.ids) if frame.ids is not None else None,
                    }
                )
            )
        elif isinstance(frame, protocol.Resume):
            try:
                after = gateway.store.events.decode(frame.after)
            except InvalidCursor as exc:
                dashboard.writer.send(protocol.error("invalid_frame", exc.detail))
                continue
            if not await gateway.dashboards.replay(dashboard, after):
                await _snapshot(gateway, dashboard, reason="resume_gap")
        else:
            dashboard.writer.send(b'{"type":"pong"}')


# --- login ------------------------------------------------------------------------
@endpoint(
    Reply(204, description="Signed in", headers={"Set-Cookie": "The session cookie"}),
    access="public",
    problems=("unauthorized", "forbidden", "redis-unavailable"),
    tag="session",
    body_limit=MAX_LOGIN_BODY,
)
async def login(request: Request, body: LoginRequest) -> Response:
    """Exchange an API key for an HttpOnly, SameSite=Strict session cookie.

    The dashboard signs in with it: the key never has to stay in the page. Only from this
    origin (or one allowed by `GATEWAY_ALLOWED_ORIGINS`).
    """
    gateway: Gateway = request.app.state.gateway
    if not logins.same_origin(request.headers.get("origin"), request.headers.get("host"),
                              gateway.settings.allowed_origins):  # fmt: skip
        raise Problem("forbidden", "origin not allowed")
    role = gateway.api_keys.role(body.api_key or bearer(request.headers.get("authorization")))
    if role is None:
        raise Problem("unauthorized", "unknown API key")
    value = await logins.create(gateway.redis, gateway.keys, role)
    response = Response(status_code=204)
    response.set_cookie(
        logins.COOKIE,
        value,
        max_age=logins.LIFETIME,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path="/",
    )
    return response


@endpoint(
    Reply(204, description="Signed out", headers={"Set-Cookie": "Clears the session cookie"}),
    access="public",
    problems=("redis-unavailable",),
    tag="session",
)
async def logout(request: Request) -> Response:
    """End the login session of the cookie sent, if any; harmless without one."""
    gateway: Gateway = request.app.state.gateway
    await logins.delete(gateway.redis, gateway.keys, request.cookies.get(logins.COOKIE))
    response = Response(status_code=204)
    response.delete_cookie(logins.COOKIE, path="/")
    return response


routes: list[BaseRoute] = [
    WebSocketRoute("/ws/dashboard", dashboard_socket),
    Route("/api/session", login, methods=["POST"]),
    Route("/api/session", logout, methods=["DELETE"]),
]
