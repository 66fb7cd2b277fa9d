"""A real MQTT device for tests (aiomqtt, MQTT 5): its status with a Last Will, reported
patches, command results; it records what the gateway publishes to it (desired, commands)."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
import time
from collections.abc import Callable
from typing import Any

import aiomqtt
import orjson
from mosquitto import device_password
from servers import HOST

WAIT = 10.0


class MqttDevice:
    def __init__(
        self,
        port: int,
        device_id: str,
        session: str | None = None,
        *,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        self.port = port
        self.device_id = device_id
        self.session = session or secrets.token_hex(6)
        self.username = username or device_id
        self.password = password or device_password(self.username)
        self.desired: list[dict[str, Any]] = []
        self.commands: list[dict[str, Any]] = []
        self.retained_desired: list[bool] = []
        self._client: aiomqtt.Client | None = None
        self._reader: asyncio.Task[None] | None = None

    def topic(self, kind: str) -> str:
        return f"devices/{self.device_id}/{kind}"

    def status(self, status: str, *, will: bool = False, session: str | None = None) -> bytes:
        message: dict[str, Any] = {"status": status, "session": session or self.session}
        if will:
            message["will"] = True
        return orjson.dumps(message)

    async def connect(self, *, online: bool = True) -> MqttDevice:
        """Connect (Will: offline, retained) and subscribe; then announce `online`."""
        client = aiomqtt.Client(
            HOST,
            self.port,
            username=self.username,
            password=self.password,
            identifier=f"{self.device_id}-{self.session}",
            protocol=aiomqtt.ProtocolVersion.V5,
            will=aiomqtt.Will(
                self.topic("status"), self.status("offline", will=True), qos=1, retain=True
            ),
        )
        await client.__aenter__()
        self._client = client
        await client.subscribe([(self.topic("desired"), 1), (self.topic("commands"), 1)])
        self._reader = asyncio.create_task(self._read(client))
        if online:
            await self.publish("status", self.status("online"), retain=True)
        return self

    async def _read(self, client: aiomqtt.Client) -> None:
        with contextlib.suppress(aiomqtt.MqttError):
            async for message in client.messages:
                assert isinstance(message.payload, bytes)
                body = orjson.loads(message.payload) if message.payload else {}
                if message.topic.matches(self.topic("desired")):
                    self.desired.append(body)
                    self.retained_desired.append(bool(message.retain))
                else:
                    self.commands.append(body)

    async def publish(
        self, kind: str, payload: bytes | dict[str, Any], retain: bool = False
    ) -> None:
        assert self._client is not None
        data = payload if isinstance(payload, bytes) else orjson.dumps(payload)
        await self._client.publish(self.topic(kind), data, qos=1, retain=retain)

    async def report(self, patch: dict[str, Any]) -> None:
        await self.publish("reported", patch)

    async def result(self, command_id: str, status: str = "succeeded", **rest: Any) -> None:
        await self.publish("commands/result", {"command_id": command_id, "status": status, **rest})

    async def goodbye(self) -> None:
        """The device's own offline, then a clean disconnect (the broker drops the Will)."""
        await self.publish("status", self.status("offline"), retain=True)
        await self.close()

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(aiomqtt.MqttError):
                await client.__aexit__(None, None, None)
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader

    async def drop(self) -> None:
        """The connection cut without a DISCONNECT: the broker publishes the Will."""
        assert self._client is not None
        sock = self._client._client.socket()  # paho's socket
        if isinstance(sock, socket.socket):
            sock.shutdown(socket.SHUT_RDWR)
        await asyncio.sleep(0.05)
        await self.close()

    async def wait(self, predicate: Callable[[], bool], within: float = WAIT) -> None:
        deadline = time.monotonic() + within
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.device_id}: not seen within {within}s")
            await asyncio.sleep(0.02)
