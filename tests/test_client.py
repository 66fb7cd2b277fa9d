"""The Python device client against a real gateway on real sockets (both Redis engines).

Waits poll an observable condition under one generous timeout; nothing asserts how fast.
"""

from __future__ import annotations

import asyncio
import random
import re
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from live import LiveGateway, live_gateway

from gateway import disconnect
from gateway.client import (
    DEFAULT_MAX_FRAME_BYTES,
    DeviceClient,
    DeviceRejected,
    FrameTooLarge,
    backoff_delay,
)
from gateway.embedded import find_free_port

TIMEOUT = 10.0  # every wait in this file is bounded by a multiple of this
HEARTBEAT = 3.0  # the gateway's heartbeat timeout for these tests


async def device(gw: LiveGateway, device_id: str) -> dict[str, Any]:
    async with gw.client() as http:
        response = await http.get(f"/api/devices/{device_id}")
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


async def patch_desired(gw: LiveGateway, device_id: str, state: dict[str, Any]) -> None:
    async with gw.client() as http:
        response = await http.patch(f"/api/devices/{device_id}/desired", json={"state": state})
    assert response.status_code == 200, response.text


async def until(condition: Callable[[], Awaitable[bool]], what: str) -> None:
    """Poll *condition* until true; fail after TIMEOUT."""
    try:
        async with asyncio.timeout(TIMEOUT):
            while True:
                if await condition():
                    return
                await asyncio.sleep(0.05)
    except TimeoutError:
        pytest.fail(f"timed out waiting for {what}")


class Desired:
    """An on_desired callback that records every call, for the test to await."""

    def __init__(self) -> None:
        self.calls: asyncio.Queue[tuple[dict[str, Any], dict[str, Any]]] = asyncio.Queue()

    async def __call__(self, desired: dict[str, Any], delta: dict[str, Any]) -> None:
        await self.calls.put((desired, delta))

    async def next(self) -> tuple[dict[str, Any], dict[str, Any]]:
        async with asyncio.timeout(TIMEOUT):
            return await self.calls.get()


async def test_connects_and_gets_welcome(redis_url: str) -> None:
    async with live_gateway(redis_url, heartbeat_timeout=HEARTBEAT) as gw:
        token = await gw.register("sensor-1")
        async with asyncio.timeout(TIMEOUT), DeviceClient(gw.ws_url, "sensor-1", token) as client:
            assert client.connected.is_set()
            assert client.session == gw.gateway.hub.sessions["sensor-1"].session
            assert client.heartbeat_timeout == HEARTBEAT
            assert client.desired == {}
            assert client.reported == {}
            assert (await device(gw, "sensor-1"))["status"] == "online"
        assert not client.connected.is_set()

        async def offline() -> bool:
            return bool((await device(gw, "sensor-1"))["status"] == "offline")

        await until(offline, "offline after a clean close")


async def test_report_acks_with_increasing_versions(redis_url: str) -> None:
    async with live_gateway(redis_url, heartbeat_timeout=HEARTBEAT) as gw:
        token = await gw.register("sensor-2")
        async with asyncio.timeout(TIMEOUT), DeviceClient(gw.ws_url, "sensor-2", token) as client:
            first = await client.report({"temp": 20, "fw": {"major": 1, "minor": 2}})
            second = await client.report({"temp": 21, "fw": {"minor": None}})
            assert second > first
            assert client.version == second
            expected = {"temp": 21, "fw": {"major": 1}}
            assert client.reported == expected
            assert (await device(gw, "sensor-2"))["reported_state"] == expected
            shadow = await client.get()
            assert shadow["reported_state"] == expected
            assert shadow["version"] == second


async def test_heartbeat_carries_a_changed_document_and_keeps_the_device_online(
    redis_url: str,
) -> None:
    async with live_gateway(redis_url, heartbeat_timeout=1.0) as gw:
        token = await gw.register("sensor-3")
        async with asyncio.timeout(TIMEOUT), DeviceClient(gw.ws_url, "sensor-3", token) as client:
            client.set_reported({"mode": "eco"})

            async def written() -> bool:
                return bool((await device(gw, "sensor-3"))["reported_state"] == {"mode": "eco"})

            await until(written, "the heartbeat to write the reported document")
            # Three heartbeat timeouts plus the detection slack: only heartbeats keep it online.
            await asyncio.sleep(3 * 1.0 + 2.0)
            state = await device(gw, "sensor-3")
            assert state["status"] == "online"
            assert client.session == gw.gateway.hub.sessions["sensor-3"].session


async def test_desired_change_reaches_on_desired(redis_url: str) -> None:
    async with live_gateway(redis_url, heartbeat_timeout=HEARTBEAT) as gw:
        token = await gw.register("lamp-1")
        seen = Desired()
        async with (
            asyncio.timeout(2 * TIMEOUT),
            DeviceClient(
                gw.ws_url, "lamp-1", token, on_desired=seen, reported={"led": "off"}
            ) as client,
        ):
            await patch_desired(gw, "lamp-1", {"led": "on", "color": {"r": 255}})
            desired, delta = await seen.next()
            assert desired == {"led": "on", "color": {"r": 255}}
            assert delta == {
                "led": {"desired": "on", "reported": "off"},
                "color": {"r": {"desired": 255, "reported": None}},
            }
            assert client.desired == desired
            await client.report({"led": "on", "color": {"r": 255}})
            await patch_desired(gw, "lamp-1", {"color": None})
            desired, delta = await seen.next()
            assert desired == {"led": "on"}
            assert delta == {}


async def test_a_change_published_the_node_classes_way_reaches_on_desired(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    """The Node.js classes of the reference document publish `desiredState`, not
    `desired_state`: the client takes either."""
    async with live_gateway(redis_url, heartbeat_timeout=HEARTBEAT) as gw:
        token = await gw.register("lamp-2")
        seen = Desired()
        async with (
            asyncio.timeout(2 * TIMEOUT),
            DeviceClient(gw.ws_url, "lamp-2", token, on_desired=seen) as client,
        ):
            message = {"type": "state_update", "desiredState": {"led": "on"}, "timestamp": 1}
            await redis_client.publish("device:lamp-2:commands", orjson.dumps(message))
            desired, delta = await seen.next()
            assert desired == {"led": "on"} and client.desired == {"led": "on"}
            assert delta == {"led": {"desired": "on", "reported": None}}


async def test_a_slow_callback_does_not_block_the_reader(redis_url: str) -> None:
    async with live_gateway(redis_url, heartbeat_timeout=HEARTBEAT) as gw:
        token = await gw.register("lamp-3")
        entered, release = asyncio.Event(), asyncio.Event()

        async def slow(desired: dict[str, Any], delta: dict[str, Any]) -> None:
            entered.set()
            await release.wait()

        client = DeviceClient(gw.ws_url, "lamp-3", token, on_desired=slow)
        async with asyncio.timeout(TIMEOUT), client:
            await patch_desired(gw, "lamp-3", {"led": "on"})
            await entered.wait()
            assert await client.report({"led": "on"}) > 0  # acked while the callback waits
            assert (await client.get())["delta"] == {}
            release.set()


async def test_desired_changed_while_away_arrives_with_the_welcome(redis_url: str) -> None:
    async with live_gateway(redis_url, heartbeat_timeout=HEARTBEAT) as gw:
        token = await gw.register("lamp-2")
        async with asyncio.timeout(TIMEOUT), DeviceClient(gw.ws_url, "lamp-2", token) as client:
            await client.report({"led": "off"})
        await patch_desired(gw, "lamp-2", {"led": "on"})

        seen = Desired()
        # The device rebooted with a newer local document than the gateway holds.
        # Heartbeats are rare here, so only the resume can carry the document before the report.
        rebooted = DeviceClient(
            gw.ws_url, "lamp-2", token, on_desired=seen, reported={"led": "off", "fw": "2.0"},
            heartbeat_fraction=0.9,
        )  # fmt: skip
        async with asyncio.timeout(TIMEOUT), rebooted:
            desired, delta = await seen.next()
            assert desired == {"led": "on"}
            assert delta == {"led": {"desired": "on", "reported": "off"}}
            assert rebooted.desired == {"led": "on"}
            # The ack follows the write, and the resume went out before the report could.
            await rebooted.report({"boot": 2})
            expected = {"led": "off", "fw": "2.0", "boot": 2}
            assert (await device(gw, "lamp-2"))["reported_state"] == expected
            assert rebooted.reported == expected


async def test_a_report_over_the_frame_limit_is_refused_before_it_is_sent(
    redis_url: str,
) -> None:
    async with live_gateway(redis_url, heartbeat_timeout=HEARTBEAT) as gw:
        token = await gw.register("big-1")
        client = DeviceClient(gw.ws_url, "big-1", token, backoff_min=0.05, backoff_max=0.1)
        async with asyncio.timeout(2 * TIMEOUT), client:
            assert client.max_frame_bytes == gw.gateway.settings.max_frame_bytes  # announced
            session = client.session
            with pytest.raises(FrameTooLarge) as refused:
                await client.report({"blob": "x" * 100_000})
            assert refused.value.limit == DEFAULT_MAX_FRAME_BYTES
            assert refused.value.size > 100_000
            with pytest.raises(FrameTooLarge):
                client.set_reported({"blob": "x" * 100_000})
            # nothing was sent: the same session goes on, and nothing of the blob was kept
            assert await client.report({"temp": 20}) > 0
            assert (client.session, client.connects) == (session, 1)
            assert client.reported == {"temp": 20}
            assert (await device(gw, "big-1"))["reported_state"] == {"temp": 20}


async def test_the_frame_limit_comes_from_the_welcome(redis_url: str) -> None:
    async with live_gateway(redis_url, heartbeat_timeout=HEARTBEAT, max_frame_bytes=4096) as gw:
        token = await gw.register("big-2")
        async with asyncio.timeout(TIMEOUT), DeviceClient(gw.ws_url, "big-2", token) as client:
            assert client.max_frame_bytes == 4096
            with pytest.raises(FrameTooLarge):
                await client.report({"blob": "x" * 5000})
            assert await client.report({"blob": "x" * 3000}) > 0
            assert client.connects == 1


async def test_a_frame_closed_with_1009_is_never_sent_again(redis_url: str) -> None:
    # The gateway announces 64 KiB, but a smaller limit is enforced in front of it (a proxy).
    options = {"ws_max_size": 4096}
    async with live_gateway(redis_url, heartbeat_timeout=HEARTBEAT, server_options=options) as gw:
        token = await gw.register("big-3")
        client = DeviceClient(gw.ws_url, "big-3", token, backoff_min=0.05, backoff_max=0.1)
        async with asyncio.timeout(3 * TIMEOUT), client:
            await client.report({"temp": 20})
            with pytest.raises(FrameTooLarge) as refused:  # sent, and closed with 1009
                await client.report({"blob": "x" * 5000})
            await asyncio.wait_for(client.connected.wait(), TIMEOUT)
            assert 4096 <= client.max_frame_bytes < refused.value.size
            # no reconnect loop: the frame is neither re-sent on resume nor sendable again
            await asyncio.sleep(1.0)
            assert client.connects == 2
            with pytest.raises(FrameTooLarge):
                await client.report({"blob": "x" * 5000})
            assert await client.report({"temp": 21}) > 0
            assert client.connects == 2
            assert client.reported == {"temp": 21}
            assert (await device(gw, "big-3"))["reported_state"] == {"temp": 21}


def protocol_doc_example() -> str:
    """The runnable `on_desired` example in docs/protocol.md."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "protocol.md").read_text()
    section = doc.split("### Example: a device that follows its desired state", 1)[1]
    found = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert found, "no python example under the heading"
    return found.group(1)


async def test_the_on_desired_example_in_the_protocol_doc_runs(
    redis_url: str, tmp_path: Path
) -> None:
    script = tmp_path / "lamp.py"
    script.write_text(protocol_doc_example())
    async with live_gateway(redis_url, heartbeat_timeout=HEARTBEAT) as gw:
        token = await gw.register("lamp-7")
        lamp = await asyncio.create_subprocess_exec(
            sys.executable, str(script), gw.ws_url, "lamp-7", token,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert lamp.stdout is not None
        try:
            async with asyncio.timeout(2 * TIMEOUT):
                assert (await lamp.stdout.readline()).startswith(b"connected, session ")
                await patch_desired(gw, "lamp-7", {"led": "on"})
                line = await lamp.stdout.readline()
            assert line.decode().strip() == (
                "desired changed: {'led': {'desired': 'on', 'reported': None}}"
            )

            async def applied() -> bool:
                state = await device(gw, "lamp-7")
                return bool(state["reported_state"] == {"led": "on"})

            await until(applied, "the example to report the desired state applied")
        finally:
            if lamp.returncode is None:
                lamp.terminate()
            await lamp.communicate()


async def test_reconnects_after_gateway_restarting_close(redis_url: str) -> None:
    async with live_gateway(redis_url, heartbeat_timeout=HEARTBEAT) as gw:
        token = await gw.register("relay-1")
        seen = Desired()
        client = DeviceClient(gw.ws_url, "relay-1", token, on_desired=seen, backoff_min=0.1)
        async with asyncio.timeout(2 * TIMEOUT), client:
            first = client.session
            gw.gateway.hub.sessions["relay-1"].close(disconnect.RESTARTING)

            async def reconnected() -> bool:
                return client.connected.is_set() and client.session != first

            await until(reconnected, "a new session after 1012")
            assert client.connects == 2
            assert gw.gateway.hub.sessions["relay-1"].session == client.session
            # The new session is live both ways.
            await patch_desired(gw, "relay-1", {"on": True})
            desired, _ = await seen.next()
            assert desired == {"on": True}
            assert await client.report({"on": True}) > 0


async def test_retries_while_the_gateway_refuses_with_503(redis_url: str) -> None:
    async with live_gateway(redis_url, heartbeat_timeout=HEARTBEAT) as gw:
        token = await gw.register("relay-2")
        client = DeviceClient(gw.ws_url, "relay-2", token, backoff_min=0.05, backoff_max=0.2)
        async with asyncio.timeout(2 * TIMEOUT), client:
            gw.gateway.draining = True
            gw.gateway.hub.sessions["relay-2"].close(disconnect.RESTARTING)
            registry = gw.gateway.metrics.registry

            async def refused_twice() -> bool:
                value = registry.get_sample_value(
                    "gateway_handshakes_refused_total", {"status": "503"}
                )
                return (value or 0) >= 2

            await until(refused_twice, "two refused handshakes (503) while draining")
            assert not client.connected.is_set()
            gw.gateway.draining = False
            await asyncio.wait_for(client.connected.wait(), TIMEOUT)
            assert client.connects == 2


async def test_replaced_session_stops_with_4409(redis_url: str) -> None:
    async with live_gateway(redis_url, heartbeat_timeout=HEARTBEAT) as gw:
        token = await gw.register("twin-1")
        older = DeviceClient(gw.ws_url, "twin-1", token, backoff_min=0.05)
        newer = DeviceClient(gw.ws_url, "twin-1", token)
        async with asyncio.timeout(2 * TIMEOUT), older, newer:
            with pytest.raises(DeviceRejected) as refused:
                await older.wait()
            assert refused.value.code == disconnect.REPLACED.code
            assert not older.connected.is_set()
            # The older client stays down: the newer one keeps the device's only session.
            await asyncio.sleep(0.5)
            assert older.connects == 1
            assert newer.connected.is_set()
            assert gw.gateway.hub.sessions["twin-1"].session == newer.session
            assert (await device(gw, "twin-1"))["status"] == "online"


async def test_deleted_device_stops_with_1008(redis_url: str) -> None:
    async with live_gateway(redis_url, heartbeat_timeout=HEARTBEAT) as gw:
        token = await gw.register("gone-1")
        client = DeviceClient(gw.ws_url, "gone-1", token, backoff_min=0.05)
        async with asyncio.timeout(TIMEOUT), client:
            async with gw.client() as http:
                assert (await http.delete("/api/devices/gone-1")).status_code == 204
            with pytest.raises(DeviceRejected) as refused:
                await client.wait()
            assert refused.value.code == 1008


@pytest.mark.parametrize(
    ("device_id", "token", "status"),
    [("known-1", "wrong-token", 403), ("nobody", "some-token", 404), ("known-1", "", 401)],
)
async def test_refused_handshake_raises_without_retrying(
    redis_url: str, device_id: str, token: str, status: int
) -> None:
    async with live_gateway(redis_url, heartbeat_timeout=HEARTBEAT) as gw:
        await gw.register("known-1")
        client = DeviceClient(gw.ws_url, device_id, token, backoff_min=0.01, backoff_max=0.01)
        with pytest.raises(DeviceRejected) as refused:
            async with asyncio.timeout(TIMEOUT), client:
                pass
        assert refused.value.code == status
        assert refused.value.reason  # the gateway's detail, for the operator
        assert not client.connected.is_set()
        await asyncio.sleep(0.2)  # room for retries, had there been any
        refusals = gw.gateway.metrics.registry.get_sample_value(
            "gateway_handshakes_refused_total", {"status": str(status)}
        )
        assert refusals == 1


async def test_keeps_retrying_an_unreachable_gateway_until_cancelled() -> None:
    url = f"ws://127.0.0.1:{find_free_port()}"
    client = DeviceClient(url, "d-1", "t", backoff_min=0.01, backoff_max=0.05)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(1.0), client:
            pass
    assert not client.connected.is_set()
    async with asyncio.timeout(TIMEOUT):
        await client.wait()  # already ended by close(), and not by a rejection


def test_backoff_is_full_jitter_and_bounded() -> None:
    rng = random.Random(1234)
    for attempt in range(12):
        ceiling = min(30.0, 0.5 * 2**attempt)
        samples = [backoff_delay(attempt, 0.5, 30.0, rng) for _ in range(200)]
        assert all(0.0 <= delay <= ceiling for delay in samples)
        assert len(set(samples)) > 100  # jittered, not a fixed schedule
        # Full jitter spreads over the whole window, not just near its top.
        assert min(samples) < ceiling / 4 and max(samples) > ceiling * 3 / 4
    assert all(backoff_delay(10_000, 0.5, 30.0, rng) <= 30.0 for _ in range(100))
    assert backoff_delay(3, 0.0, 0.0, rng) == 0.0


def test_rejects_nonsense_settings() -> None:
    with pytest.raises(ValueError, match="heartbeat_fraction"):
        DeviceClient("ws://127.0.0.1:1", "d", "t", heartbeat_fraction=1.5)
    with pytest.raises(ValueError, match="backoff"):
        DeviceClient("ws://127.0.0.1:1", "d", "t", backoff_min=5, backoff_max=1)
