"""`DeviceClient(on_command=...)`: handlers async or plain, failures, and never running a
command twice, against a real gateway and against a scripted one that repeats itself."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from commanddevice import post_command, wait_status
from live import LiveGateway, live_gateway
from websockets.asyncio.server import ServerConnection, serve

from gateway.client import DeviceClient
from gateway.embedded import find_free_port

TIMEOUT = 10.0


@pytest.fixture
async def gw(redis_url: str) -> AsyncIterator[LiveGateway]:
    async with live_gateway(redis_url) as gateway:
        yield gateway


async def test_an_async_handler_answers_queued_and_live_commands_in_order(gw: LiveGateway) -> None:
    token = await gw.register("cl-1")
    ran: list[str] = []

    async def handler(name: str, params: dict[str, Any]) -> dict[str, Any]:
        ran.append(name)
        return {"echo": params}

    async with gw.client() as http:
        queued = [(await post_command(http, "cl-1", name=f"q{i}", params={"i": i})).json()
                  for i in range(3)]  # fmt: skip
        async with DeviceClient(gw.ws_url, "cl-1", token, on_command=handler):
            live = await post_command(http, "cl-1", name="live", params={"x": 1}, wait=5)
            assert live.status_code == 200
            assert live.json()["result"] == {"echo": {"x": 1}}
            for index, made in enumerate(queued):
                done = await wait_status(gw, "cl-1", made["command_id"], "succeeded")
                assert done["result"] == {"echo": {"i": index}}
    assert ran == ["q0", "q1", "q2", "live"]


async def test_a_plain_handler_runs_off_the_event_loop(gw: LiveGateway) -> None:
    token = await gw.register("cl-2")
    threads: list[str] = []

    def handler(name: str, params: dict[str, Any]) -> dict[str, Any]:
        threads.append(threading.current_thread().name)
        return {"done": name}

    async with (
        DeviceClient(gw.ws_url, "cl-2", token, on_command=handler),
        gw.client() as http,
    ):
        response = await post_command(http, "cl-2", name="sync", wait=5)
    assert response.json()["status"] == "succeeded"
    assert response.json()["result"] == {"done": "sync"}
    assert threads and threads[0] != threading.main_thread().name


async def test_a_handler_that_raises_fails_the_command_with_its_message(gw: LiveGateway) -> None:
    token = await gw.register("cl-3")

    async def handler(name: str, params: dict[str, Any]) -> dict[str, Any] | None:
        if name == "explode":
            raise RuntimeError("valve is stuck")
        if name == "wrong":
            return "not a dict"  # type: ignore[return-value]
        return None

    async with (
        DeviceClient(gw.ws_url, "cl-3", token, on_command=handler),
        gw.client() as http,
    ):
        failed = (await post_command(http, "cl-3", name="explode", wait=5)).json()
        wrong = (await post_command(http, "cl-3", name="wrong", wait=5)).json()
        fine = (await post_command(http, "cl-3", name="fine", wait=5)).json()
    assert (failed["status"], failed["error"], failed["result"]) == (
        "failed", "valve is stuck", None
    )  # fmt: skip
    assert wrong["status"] == "failed" and "returns a dict or None" in wrong["error"]
    assert (fine["status"], fine["result"]) == ("succeeded", {})


async def test_a_connection_lost_while_the_handler_runs_runs_it_once(gw: LiveGateway) -> None:
    """The gateway sends the command again on the next connection; the handler that was
    still running answers it there, and is not started a second time."""
    token = await gw.register("cl-4")
    started = asyncio.Event()
    release = asyncio.Event()
    runs = 0

    async def handler(name: str, params: dict[str, Any]) -> dict[str, Any]:
        nonlocal runs
        runs += 1
        started.set()
        await release.wait()
        return {"runs": runs}

    device = DeviceClient(gw.ws_url, "cl-4", token, on_command=handler, backoff_min=0.05,
                          backoff_max=0.1)  # fmt: skip
    async with device, gw.client() as http:
        made = (await post_command(http, "cl-4", name="slow")).json()
        await asyncio.wait_for(started.wait(), TIMEOUT)
        first = device.connects
        assert device._ws is not None
        device._ws.transport.abort()  # the connection dies under the running handler
        device.connected.clear()
        await asyncio.sleep(0)
        await asyncio.wait_for(device.connected.wait(), TIMEOUT)
        assert device.connects > first
        release.set()
        done = await wait_status(gw, "cl-4", made["command_id"], "succeeded")
    assert runs == 1
    assert done["attempts"] == 2
    assert done["result"] == {"runs": 1}


class RepeatingGateway:
    """A scripted gateway: a welcome, then each command frame twice; it records results."""

    def __init__(self, commands: list[dict[str, Any]]) -> None:
        self.commands = commands
        self.results: list[dict[str, Any]] = []
        self.three = asyncio.Event()
        self.port = find_free_port()
        self.url = f"ws://127.0.0.1:{self.port}"

    async def handle(self, ws: ServerConnection) -> None:
        welcome = {"type": "welcome", "device_id": "rep", "session": "s1", "heartbeat_timeout": 60,
                   "max_frame_bytes": 65536, "desired_state": {}, "reported_state": {},
                   "delta": {}, "version": 0}  # fmt: skip
        await ws.send(orjson.dumps(welcome).decode())
        for frame in self.commands:
            for attempt in (1, 2):
                await ws.send(orjson.dumps({**frame, "attempt": attempt}).decode())
        with contextlib.suppress(Exception):
            async for raw in ws:
                message = orjson.loads(raw)
                if message.get("type") == "command_result":
                    self.results.append(message)
                    if len(self.results) >= len(self.commands):
                        self.three.set()


async def test_a_repeated_command_is_answered_from_the_first_result() -> None:
    frames = [{"type": "command", "command_id": f"c{i}", "name": "count", "params": {},
               "deadline": 0, "timeout": 30, "session": "s1"} for i in range(3)]  # fmt: skip
    scripted = RepeatingGateway(frames)
    runs: dict[str, int] = {}

    async def handler(name: str, params: dict[str, Any]) -> dict[str, Any]:
        runs[name] = runs.get(name, 0) + 1
        await asyncio.sleep(0.05)  # the repeat arrives while the first still runs
        return {"n": runs[name]}

    async with (
        serve(scripted.handle, "127.0.0.1", scripted.port),
        DeviceClient(scripted.url, "rep", "token", on_command=handler),
    ):
        await asyncio.wait_for(scripted.three.wait(), TIMEOUT)
        await asyncio.sleep(0.2)  # time for a second answer, which must not come
    assert runs == {"count": 3}
    assert [r["command_id"] for r in scripted.results] == ["c0", "c1", "c2"]
    assert [r["result"] for r in scripted.results] == [{"n": 1}, {"n": 2}, {"n": 3}]
