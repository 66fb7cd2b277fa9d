"""`/ws/devices/{device_id}`: authenticate at the handshake, then hand over to a DeviceSession."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets

from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, WebSocketRoute
from starlette.types import Receive
from starlette.websockets import WebSocket

from gateway import compat, disconnect
from gateway.auth import bearer
from gateway.device_session import DeviceSession
from gateway.keys import is_device_id
from gateway.presence import REDIS_ERRORS, Revoked
from gateway.runtime import Gateway

log = logging.getLogger("gateway.device")
# a subscription not confirmed by then is re-synced when its connection recovers
SUBSCRIBE_WAIT = 2.0


async def _deny(websocket: WebSocket, gateway: Gateway, status: int, detail: str) -> None:
    """Refuse the handshake with an HTTP response: nothing was accepted, nothing written."""
    gateway.metrics.handshakes_refused.labels(str(status)).inc()
    await websocket.send_denial_response(
        JSONResponse({"status": status, "detail": detail}, status_code=status)
    )


async def device_socket(websocket: WebSocket, receive: Receive | None = None) -> None:
    """One device's socket, from the handshake to the end of its session.

    *receive* is the server's own, when the caller has it (the app's short path): awaiting it
    directly keeps Starlette's receive wrapper off the stack of every idle socket.
    """
    gateway: Gateway = websocket.app.state.gateway
    device_id = websocket.path_params["device_id"]
    if gateway.draining:
        await _deny(websocket, gateway, 503, "gateway restarting; connect to another instance")
        return
    if not is_device_id(device_id):
        await _deny(websocket, gateway, 404, "no such device")
        return
    token = bearer(websocket.headers.get("authorization")) or websocket.query_params.get("token")
    if not token:
        await _deny(websocket, gateway, 401, "device token required")
        return
    try:
        exists, token_hash = await gateway.store.check_token(device_id, token)
    except REDIS_ERRORS:
        await _deny(websocket, gateway, 503, "presence store unavailable; retry")
        return
    if not exists:
        await _deny(websocket, gateway, 404, "no such device")
        return
    if token_hash is None:
        await _deny(websocket, gateway, 403, "token not valid for this device")
        return

    await websocket.accept()
    compat.release_handshake(websocket)
    session_id = secrets.token_urlsafe(12)
    session = DeviceSession(gateway.sessions, websocket, device_id, session_id)
    gateway.hub.add(session)
    listening = gateway.channels.subscribe(device_id)
    try:
        # the command channel is live before the desired state is read: a change made in
        # between is then either in the welcome or delivered after it, never lost
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(SUBSCRIBE_WAIT):
                await listening
        welcome = await gateway.presence.connect(device_id, session_id, token_hash)
    except Revoked:
        welcome = None
        session.close(disconnect.TOKEN_ROTATED)
    except REDIS_ERRORS:
        welcome = None
        session.close(disconnect.RESTARTING)
    accepted = welcome is not None
    next_message = receive if receive is not None else websocket.receive
    if welcome is None:
        session.close(disconnect.DELETED)
    else:
        session.welcome(
            welcome.desired, welcome.reported, welcome.reported_meta, welcome.version,
            welcome.commands,
        )  # fmt: skip
        gateway.commands.sent(device_id, welcome.commands)
    # this frame lives as long as the socket: keep nothing in it that is no longer needed
    del welcome, token, token_hash
    gateway.metrics.devices_connected.inc()
    code: int | None = None  # set by the disconnect that ends the loop
    try:
        while accepted and not session.writer.closed:
            message = await next_message()
            kind = message["type"]
            if kind == "websocket.receive":
                text = message.get("text")
                session.receive(text if text is not None else message.get("bytes"), text is None)
            elif kind == "websocket.disconnect":
                code = int(message.get("code") or 1005)
                break
    finally:
        gateway.metrics.devices_connected.dec()
        gateway.hub.remove(session)
        gateway.channels.unsubscribe(device_id)
        # the session's own close, else the peer's or the WebSocket layer's (frame_too_large)
        reason = session.close_reason or disconnect.ended_by(1000 if code is None else code)
        if accepted:
            gateway.presence.end(device_id, session_id, reason)
        if code is None:
            session.close(disconnect.NORMAL)
        else:  # closing already: another close frame would only cut the closing short
            session.ended()
        await session.writer.wait_closed()  # the close frame goes out before uvicorn drops TCP


routes: list[BaseRoute] = [WebSocketRoute("/ws/devices/{device_id}", device_socket)]
