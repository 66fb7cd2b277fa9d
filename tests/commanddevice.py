"""A scripted device for the command tests: a raw WebSocket and the frames it got, in order.

Its answers are the test's to send, so a test can answer late, twice, never, or drop the
connection between a command and its result. Every wait is bounded by TIMEOUT.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from typing import Any

import httpx
import orjson
from live import LiveGateway
from websockets.asyncio.client import ClientConnection, connect

TIMEOUT = 10.0
Frame = dict[str, Any]


class Device:
    """One connection of a device: `frames` holds everything received, in order."""

    def __init__(self, ws_url: str, device_id: str, token: str) -> None:
        self.url = f"{ws_url}/ws/devices/{device_id}"
        self.device_id = device_id
        self.token = token
        self.frames: list[Frame] = []
        self.ws: ClientConnection | None = None
        self._arrived = asyncio.Condition()
        self._reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Device:
        self.ws = await connect(
            self.url, additional_headers={"Authorization": f"Bearer {self.token}"},
            open_timeout=TIMEOUT,
        )  # fmt: skip
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        await self._stop_reader()

    def abort(self) -> None:
        """Cut the TCP connection without a close frame: a crashed device."""
        assert self.ws is not None
        sock = self.ws.transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.ws.transport.abort()

    async def _stop_reader(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader

    async def _read(self) -> None:
        assert self.ws is not None
        with contextlib.suppress(Exception):
            async for raw in self.ws:
                async with self._arrived:
                    self.frames.append(dict(orjson.loads(raw)))
                    self._arrived.notify_all()

    def of_type(self, kind: str) -> list[Frame]:
        return [frame for frame in self.frames if frame.get("type") == kind]

    def commands(self) -> list[Frame]:
        return self.of_type("command")

    async def wait_for(
        self, count: int, kind: str = "command", within: float = TIMEOUT
    ) -> list[Frame]:
        """The first *count* frames of *kind*, once that many arrived."""
        async with asyncio.timeout(within), self._arrived:
            await self._arrived.wait_for(lambda: len(self.of_type(kind)) >= count)
        return self.of_type(kind)[:count]

    def replies(self, command_id: str) -> list[Frame]:
        """The gateway's answers (acks and errors) to results for *command_id*."""
        return [
            f for f in self.frames
            if f.get("command_id") == command_id and f.get("type") in ("ack", "error")
        ]  # fmt: skip

    async def answer(self, command_id: str, status: str = "succeeded", **fields: Any) -> Frame:
        """Send a result and return the gateway's answer to it (an ack or an error)."""
        before = len(self.replies(command_id))
        await self.send(
            {"type": "command_result", "command_id": command_id, "status": status, **fields}
        )
        async with asyncio.timeout(TIMEOUT), self._arrived:
            await self._arrived.wait_for(lambda: len(self.replies(command_id)) > before)
        return self.replies(command_id)[-1]

    async def send(self, frame: Frame) -> None:
        assert self.ws is not None
        await self.ws.send(orjson.dumps(frame).decode())


async def post_command(http: httpx.AsyncClient, device_id: str, **body: Any) -> httpx.Response:
    params = {"wait": body.pop("wait")} if "wait" in body else None
    return await http.post(f"/api/devices/{device_id}/commands", json=body, params=params)


async def command(gw: LiveGateway, device_id: str, command_id: str) -> Frame:
    async with gw.client() as http:
        response = await http.get(f"/api/devices/{device_id}/commands/{command_id}")
    assert response.status_code == 200, response.text
    return dict(response.json())


async def wait_status(
    gw: LiveGateway, device_id: str, command_id: str, status: str, within: float = TIMEOUT
) -> Frame:
    """The command once it has *status* (polled; bounded)."""
    async with asyncio.timeout(within):
        while True:
            found = await command(gw, device_id, command_id)
            if found["status"] == status:
                return found
            await asyncio.sleep(0.05)
