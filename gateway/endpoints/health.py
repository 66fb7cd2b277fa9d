"""Liveness, readiness and metrics."""

from __future__ import annotations

import asyncio

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from gateway.runtime import Gateway

READY_TIMEOUT = 1.0


async def healthz(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> JSONResponse:
    """Ready only when Redis answers now: a load balancer must not send devices here otherwise."""
    gateway: Gateway = request.app.state.gateway
    try:
        await asyncio.wait_for(gateway.redis.ping(), READY_TIMEOUT)
    except Exception as exc:  # any failure to answer is "not ready"
        return JSONResponse(
            {"status": "unavailable", "redis": str(exc) or type(exc).__name__}, status_code=503
        )
    if not gateway.started.is_set():
        return JSONResponse({"status": "starting"}, status_code=503)
    if gateway.mqtt is not None:
        # ready for WebSocket devices either way; the MQTT bridge's state is shown beside it
        return JSONResponse({"status": "ready", "mqtt": gateway.mqtt.state()})
    return JSONResponse({"status": "ready"})


async def metrics(request: Request) -> Response:
    gateway: Gateway = request.app.state.gateway
    return Response(gateway.metrics.render(), media_type="text/plain; version=0.0.4")


routes: list[BaseRoute] = [
    Route("/healthz", healthz),
    Route("/readyz", readyz),
    Route("/metrics", metrics),
]
