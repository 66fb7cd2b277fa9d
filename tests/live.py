"""A real uvicorn server running the gateway inside the test's event loop, on a free port.

Faster than a subprocess, still real sockets end to end; tests that kill or signal a gateway
use the `gateway_factory` subprocess fixture instead.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import uvicorn

from gateway.app import create_app
from gateway.cli import GatewayServer, uvicorn_config
from gateway.config import Settings
from gateway.embedded import find_free_port
from gateway.runtime import Gateway

ADMIN_KEY = "test-admin-key"
READ_KEY = "test-read-key"
START_TIMEOUT = 10.0


class LiveGateway:
    def __init__(self, server: uvicorn.Server, gateway: Gateway, port: int) -> None:
        self.server = server
        self.gateway = gateway
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}"
        self.ws_url = f"ws://127.0.0.1:{port}"

    async def register(self, device_id: str, device_type: str = "thermo") -> str:
        """Register a device through the API; its token."""
        async with self.client() as http:
            response = await http.post(
                "/api/devices", json={"device_id": device_id, "device_type": device_type}
            )
        assert response.status_code == 201, response.text
        return str(response.json()["token"])

    def client(self, key: str | None = ADMIN_KEY) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=10)


@contextlib.asynccontextmanager
async def live_gateway(
    redis_url: str, *, server_options: dict[str, Any] | None = None, **overrides: Any
) -> AsyncIterator[LiveGateway]:
    """Serve the gateway on 127.0.0.1 until the block ends (graceful shutdown then).

    *overrides* are settings; *server_options* override how uvicorn serves them.
    """
    port = find_free_port()
    settings = Settings(
        host="127.0.0.1",
        port=port,
        redis_url=redis_url,
        api_key=ADMIN_KEY,
        read_api_keys=(READ_KEY,),
        **overrides,
    )
    app = create_app(settings)
    config = uvicorn_config(app, settings, **({"log_level": "warning"} | (server_options or {})))
    server = GatewayServer(config)
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign,attr-defined,unused-ignore]
    task = asyncio.create_task(server.serve())
    gateway: Gateway = app.state.gateway
    try:
        async with asyncio.timeout(START_TIMEOUT):
            while not (server.started and gateway.started.is_set()):
                if task.done():
                    task.result()
                await asyncio.sleep(0.02)
        yield LiveGateway(server, gateway, port)
    finally:
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 15)
