"""MQTT devices end to end: a private Mosquitto (password file, per-device ACL), real MQTT
clients as devices, real gateways bridging it into Redis. Presence is read back from the fleet
log (each event exactly once, in order), shadow and commands through the REST API.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from backends import Client, connect
from commanddevice import post_command, wait_status
from live import LiveGateway, live_gateway
from mosquitto import GATEWAY_PASSWORD, GATEWAY_USER, Mosquitto
from mqttdevice import MqttDevice

from gateway.client import DeviceClient, DeviceRejected
from gateway.embedded import find_free_port
from gateway.keys import Keys

REPO_ROOT = Path(__file__).resolve().parents[1]
DEVICES = [f"m{i}" for i in range(1, 41)] + ["ghost", "intruder"]
Event = dict[str, Any]


@pytest.fixture
def broker(tmp_path: Any) -> Iterator[Mosquitto]:
    """A broker of the test's own: nothing retained from another test, and it may be killed."""
    server = Mosquitto(DEVICES, tmp_path / "mosquitto").start()
    yield server
    server.kill()


@contextlib.asynccontextmanager
async def mqtt_gateway(
    redis_url: str, broker: Mosquitto, **overrides: Any
) -> AsyncIterator[LiveGateway]:
    async with live_gateway(
        redis_url,
        mqtt_url=broker.url,
        mqtt_username=GATEWAY_USER,
        mqtt_password=GATEWAY_PASSWORD,
        **overrides,
    ) as gw:
        await until(lambda: gw.gateway.mqtt is not None and gw.gateway.mqtt.connected)
        yield gw


async def until(predicate: Callable[[], bool], within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


async def presence(client: Client, layout: Keys, device_id: str) -> list[tuple[str, str]]:
    """(status, reason) of the device's presence events in the fleet log, oldest first."""
    rows = await client.xrange(layout.of(device_id).events, "-", "+")
    events = [orjson.loads(body[b"event"]) for _, body in rows]
    return [
        (e["status"], e["reason"])
        for e in events
        if e["type"] == "presence" and e["device_id"] == device_id
    ]


async def until_presence(
    client: Client, layout: Keys, device_id: str, expected: list[tuple[str, str]]
) -> None:
    deadline = time.monotonic() + 10
    while (found := await presence(client, layout, device_id)) != expected:
        if time.monotonic() > deadline or len(found) > len(expected):
            raise AssertionError(f"{device_id}: presence {found}, expected {expected}")
        await asyncio.sleep(0.02)


async def device(gw: LiveGateway, device_id: str) -> dict[str, Any]:
    async with gw.client() as http:
        response = await http.get(f"/api/devices/{device_id}")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def dropped(gw: LiveGateway, reason: str) -> float:
    async with httpx.AsyncClient(base_url=gw.base_url) as http:
        text = (await http.get("/metrics")).text
    for line in text.splitlines():
        if line.startswith(f'gateway_mqtt_dropped_total{{reason="{reason}"}}'):
            return float(line.split()[-1])
    return 0.0


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Client]:
    client = await connect(redis_url)
    yield client
    await client.aclose()


LAYOUT = Keys()


async def test_online_and_offline_by_status_and_by_will(
    redis_url: str, redis: Client, broker: Mosquitto
) -> None:
    async with mqtt_gateway(redis_url, broker) as gw:
        await gw.register("m1")
        await gw.register("m2")
        first = await MqttDevice(broker.port, "m1").connect()
        await until_presence(redis, LAYOUT, "m1", [("online", "connected")])
        assert (await device(gw, "m1"))["status"] == "online"
        await first.goodbye()
        await until_presence(
            redis, LAYOUT, "m1", [("online", "connected"), ("offline", "mqtt_offline")]
        )
        second = await MqttDevice(broker.port, "m2").connect()
        await until_presence(redis, LAYOUT, "m2", [("online", "connected")])
        await second.drop()  # no DISCONNECT: the broker publishes the Will
        await until_presence(
            redis, LAYOUT, "m2", [("online", "connected"), ("offline", "mqtt_will")]
        )
        assert (await device(gw, "m2"))["status"] == "offline"


async def test_a_stale_offline_after_a_newer_online_changes_nothing(
    redis_url: str, redis: Client, broker: Mosquitto
) -> None:
    async with mqtt_gateway(redis_url, broker) as gw:
        await gw.register("m3")
        old = await MqttDevice(broker.port, "m3", session="old").connect()
        await until_presence(redis, LAYOUT, "m3", [("online", "connected")])
        # the device reconnected (a new session) before the broker noticed the old connection
        # was gone: the old one's Will arrives after the new one's online
        await old.publish("status", old.status("online", session="new"), retain=True)
        await until_presence(redis, LAYOUT, "m3", [("online", "connected"), ("online", "replaced")])
        await old.publish("status", old.status("offline", will=True, session="old"))
        await old.publish("status", old.status("offline", session="old"))
        await old.report({"after": "stale offline"})  # handled after both offlines
        await until(lambda: True)
        deadline = time.monotonic() + 5
        while (await device(gw, "m3"))["reported_state"] != {"after": "stale offline"}:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        assert (await device(gw, "m3"))["status"] == "online"
        assert await presence(redis, LAYOUT, "m3") == [
            ("online", "connected"),
            ("online", "replaced"),
        ]
        assert await dropped(gw, "stale_session") >= 2
        await old.publish("status", old.status("offline", session="new"))
        await until_presence(
            redis,
            LAYOUT,
            "m3",
            [("online", "connected"), ("online", "replaced"), ("offline", "mqtt_offline")],
        )
        await old.close()


async def reported_becomes(gw: LiveGateway, device_id: str, expected: dict[str, Any]) -> None:
    deadline = time.monotonic() + 10
    while (found := (await device(gw, device_id))["reported_state"]) != expected:
        if time.monotonic() > deadline:
            raise AssertionError(f"{device_id}: reported {found}, expected {expected}")
        await asyncio.sleep(0.02)


async def test_reported_patches_reach_the_shadow_and_the_history(
    redis_url: str, broker: Mosquitto
) -> None:
    async with mqtt_gateway(redis_url, broker) as gw:
        await gw.register("m4")
        dev = await MqttDevice(broker.port, "m4").connect()
        await dev.report({"temp": 21.5, "fw": {"version": "1.0", "build": 7}})
        await dev.report({"fw": {"build": None}, "led": "on"})  # a merge patch: null deletes
        await reported_becomes(gw, "m4", {"temp": 21.5, "fw": {"version": "1.0"}, "led": "on"})
        async with gw.client() as http:
            history = (await http.get("/api/devices/m4/history")).json()["items"]
        states = [item for item in history if item.get("type") == "state"]
        assert states, history
        assert states[0]["state"] == {"temp": 21.5, "fw": {"version": "1.0"}, "led": "on"}
        shown = await device(gw, "m4")
        assert shown["shadow_metadata"]["reported"]["temp"]  # stamped like a report
        await dev.close()


async def test_desired_is_retained_for_a_device_that_connects_and_follows_each_change(
    redis_url: str, broker: Mosquitto
) -> None:
    async with mqtt_gateway(redis_url, broker) as gw:
        await gw.register("m5")
        async with gw.client() as http:
            response = await http.patch("/api/devices/m5/desired", json={"state": {"led": "on"}})
            assert response.status_code == 200, response.text
        dev = await MqttDevice(broker.port, "m5").connect()
        await dev.wait(lambda: bool(dev.desired))
        assert dev.desired[-1]["desired"] == {"led": "on"}
        assert dev.desired[-1]["delta"] == {"led": {"desired": "on", "reported": None}}
        await dev.report({"led": "on"})
        await reported_becomes(gw, "m5", {"led": "on"})
        async with gw.client() as http:
            response = await http.patch("/api/devices/m5/desired", json={"state": {"fan": 2}})
            assert response.status_code == 200, response.text
        await dev.wait(lambda: dev.desired[-1]["desired"] == {"led": "on", "fan": 2})
        assert dev.desired[-1]["delta"] == {"fan": {"desired": 2, "reported": None}}
        version = dev.desired[-1]["desired_version"]
        assert version >= 2
        # a device connecting now finds the latest desired retained, without asking
        late = await MqttDevice(broker.port, "m5", session="late").connect(online=False)
        await late.wait(lambda: bool(late.desired))
        assert late.retained_desired[0] is True
        assert late.desired[0]["desired"] == {"led": "on", "fan": 2}
        assert late.desired[0]["desired_version"] == version
        await late.close()
        await dev.close()


async def test_commands_go_out_on_the_commands_topic_and_results_come_back(
    redis_url: str, broker: Mosquitto
) -> None:
    async with mqtt_gateway(redis_url, broker) as gw:
        await gw.register("m6")
        async with gw.client() as http:
            queued = await post_command(http, "m6", name="reboot", params={"delay": 1})
            assert queued.status_code == 202, queued.text
        dev = await MqttDevice(broker.port, "m6").connect()
        await dev.wait(lambda: len(dev.commands) == 1)  # the queued one, right after online
        first = dev.commands[0]
        assert first["type"] == "command" and first["name"] == "reboot"
        assert first["session"] == f"mqtt:{dev.session}"
        async with gw.client() as http:
            live = await post_command(http, "m6", name="blink", params={})
            assert live.status_code == 202, live.text
            assert live.json()["status"] == "sent"
        await dev.wait(lambda: len(dev.commands) == 2)
        await dev.result(first["command_id"], result={"ok": True})
        await dev.result(dev.commands[1]["command_id"], "failed", error="no led")
        done = await wait_status(gw, "m6", first["command_id"], "succeeded")
        assert done["result"] == {"ok": True}
        failed = await wait_status(gw, "m6", dev.commands[1]["command_id"], "failed")
        assert failed["error"] == "no led"
        await asyncio.sleep(0.2)
        assert len(dev.commands) == 2, "a command was published twice"
        await dev.close()


async def test_unregistered_ids_and_hostile_payloads_change_nothing(
    redis_url: str, redis: Client, broker: Mosquitto
) -> None:
    async with mqtt_gateway(redis_url, broker) as gw:
        await gw.register("m7")
        await gw.register("m8")
        ghost = await MqttDevice(broker.port, "ghost").connect()  # a broker user, not registered
        await ghost.report({"x": 1})
        await until(lambda: True)
        dev = await MqttDevice(broker.port, "m7").connect()
        await until_presence(redis, LAYOUT, "m7", [("online", "connected")])
        await dev.report({"good": 1})
        await reported_becomes(gw, "m7", {"good": 1})
        before = await redis.hgetall(LAYOUT.state("m7"))
        await dev.publish("reported", b"{not json")
        await dev.publish("reported", b"[1, 2]")
        await dev.publish("reported", b'{"x": "' + b"y" * 70_000 + b'"}')  # over max_frame_bytes
        deep: dict[str, Any] = {"leaf": 1}
        for _ in range(12):  # over max_depth
            deep = {"d": deep}
        await dev.publish("reported", deep)
        await dev.publish("status", b'{"status": "online", "session": "bad session!"}')
        await dev.publish("status", b'{"status": "sideways", "session": "s"}')
        await dev.publish("commands/result", {"command_id": "nope", "status": "succeeded"})
        # the ACL: m7 cannot speak for m8 (the broker drops it; the gateway never sees it)
        await dev.publish("../m8/status", b"{}")
        intruder = MqttDevice(broker.port, "m8", username="intruder")
        await intruder.connect()
        await dev.report({"good": 2})  # handled after everything above
        await reported_becomes(gw, "m7", {"good": 2})
        after = await redis.hgetall(LAYOUT.state("m7"))
        changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
        own = {b"rv", b"v", b"rm", b"reported_state", b"last_seen"}
        assert changed <= own, changed  # only the good patch's write
        assert await redis.exists(LAYOUT.state("ghost")) == 0
        assert await presence(redis, LAYOUT, "m8") == []
        assert await presence(redis, LAYOUT, "ghost") == []
        assert (await device(gw, "m8"))["status"] == "offline"
        for reason in ("unregistered", "bad_json", "bad_payload", "oversize"):
            assert await dropped(gw, reason) >= 1, reason
        await intruder.close()
        await ghost.close()
        await dev.close()


@pytest.mark.parametrize("redis_server", ["valkey"], indirect=True)  # one engine: it is slow
async def test_broker_killed_and_restarted_no_false_offline_no_duplicate_events(
    redis_url: str, redis: Client, broker: Mosquitto
) -> None:
    async with mqtt_gateway(redis_url, broker, heartbeat_timeout=4) as gw:
        await gw.register("m9")
        dev = await MqttDevice(broker.port, "m9").connect()
        await until_presence(redis, LAYOUT, "m9", [("online", "connected")])
        bridge = gw.gateway.mqtt
        assert bridge is not None
        connects = bridge.connects
        broker.kill()
        await until(lambda: not bridge.connected)
        async with httpx.AsyncClient(base_url=gw.base_url) as http:
            ready = (await http.get("/readyz")).json()
        assert ready["mqtt"]["connected"] is False and ready["mqtt"]["error"]
        await asyncio.sleep(1.0)
        assert (await device(gw, "m9"))["status"] == "online"  # not declared offline
        await dev.close()
        broker.start()
        await until(lambda: bridge.connected and bridge.connects == connects + 1, within=15)
        # the device comes back on its own (its firmware reconnects) with the same session
        dev = await MqttDevice(broker.port, "m9", session=dev.session).connect()
        await dev.report({"after": "restart"})
        await reported_becomes(gw, "m9", {"after": "restart"})
        assert await presence(redis, LAYOUT, "m9") == [("online", "connected")]
        # lost for longer than the heartbeat timeout: the device's messages stopped arriving,
        # so it expires as any silent device does (the gateway can no longer tell)
        await dev.close()
        broker.kill()
        await until_presence(redis, LAYOUT, "m9", [("online", "connected"), ("offline", "expired")])


async def test_two_gateways_share_the_subscriptions_each_message_handled_once(
    redis_url: str, redis: Client, broker: Mosquitto
) -> None:
    async with mqtt_gateway(redis_url, broker) as one, mqtt_gateway(redis_url, broker) as two:
        await one.register("m10")
        dev = await MqttDevice(broker.port, "m10").connect()
        await until_presence(redis, LAYOUT, "m10", [("online", "connected")])
        for index in range(40):
            await dev.report({f"k{index}": index})
        expected = {f"k{index}": index for index in range(40)}
        await reported_becomes(one, "m10", expected)  # no patch lost between the processes
        counts = [await messages(gw, "reported") for gw in (one, two)]
        assert sum(counts) == 40, counts
        assert min(counts) > 0, counts  # both took their share
        async with one.client() as http:
            sent = await post_command(http, "m10", name="once", params={})
            assert sent.status_code == 202, sent.text
        await dev.wait(lambda: len(dev.commands) == 1)
        await asyncio.sleep(0.3)
        assert len(dev.commands) == 1  # one process holds the session and publishes
        await dev.drop()
        await until_presence(
            redis, LAYOUT, "m10", [("online", "connected"), ("offline", "mqtt_will")]
        )


async def messages(gw: LiveGateway, topic: str) -> float:
    async with httpx.AsyncClient(base_url=gw.base_url) as http:
        text = (await http.get("/metrics")).text
    for line in text.splitlines():
        if line.startswith(f'gateway_mqtt_messages_total{{topic="{topic}"}}'):
            return float(line.split()[-1])
    return 0.0


async def test_websocket_and_mqtt_sessions_take_over_from_each_other(
    redis_url: str, redis: Client, broker: Mosquitto
) -> None:
    async with mqtt_gateway(redis_url, broker) as gw:
        token = await gw.register("m11")
        ws = DeviceClient(gw.ws_url, "m11", token, reported={"via": "ws"})
        await ws.__aenter__()
        await until_presence(redis, LAYOUT, "m11", [("online", "connected")])
        dev = await MqttDevice(broker.port, "m11").connect()  # MQTT takes over
        with pytest.raises(DeviceRejected) as rejected:
            await asyncio.wait_for(ws.wait(), 10)
        assert rejected.value.code == 4409
        await until_presence(
            redis, LAYOUT, "m11", [("online", "connected"), ("online", "replaced")]
        )
        await dev.report({"via": "mqtt"})
        await reported_becomes(gw, "m11", {"via": "mqtt"})
        assert (await device(gw, "m11"))["transport"] == "mqtt"
        async with DeviceClient(gw.ws_url, "m11", token, reported={"via": "ws again"}) as again:
            await until_presence(
                redis,
                LAYOUT,
                "m11",
                [("online", "connected"), ("online", "replaced"), ("online", "replaced")],
            )
            assert gw.gateway.hub.sessions["m11"].session == again.session
            assert (await device(gw, "m11"))["transport"] == "websocket"
            await dev.report({"via": "mqtt, replaced"})  # its session is over: dropped
            await until(lambda: True)
            await asyncio.sleep(1.3)  # past the hold for an online in flight
            assert await dropped(gw, "no_session") >= 1
            await dev.goodbye()  # an offline of the replaced session: fenced
            await asyncio.sleep(0.3)
            assert (await device(gw, "m11"))["status"] == "online"
        with contextlib.suppress(DeviceRejected):
            await ws.__aexit__(None, None, None)


async def test_on_the_cluster(cluster_url: str, broker: Mosquitto) -> None:
    client = await connect(cluster_url)
    layout = Keys.cluster()
    try:
        async with mqtt_gateway(cluster_url, broker) as gw:
            await gw.register("m12")
            dev = await MqttDevice(broker.port, "m12").connect()
            await until_presence(client, layout, "m12", [("online", "connected")])
            await dev.report({"on": "cluster"})
            await reported_becomes(gw, "m12", {"on": "cluster"})
            await dev.drop()
            await until_presence(
                client, layout, "m12", [("online", "connected"), ("offline", "mqtt_will")]
            )
    finally:
        await client.aclose()


@pytest.mark.parametrize(
    ("url", "status"),
    [("http://127.0.0.1:1883", 2), ("mqtt://127.0.0.1:{free}", 1)],
    ids=["wrong-url", "broker-down"],
)
def test_a_wrong_url_or_a_broker_down_at_start_is_one_line_naming_the_flag(
    url: str, status: int
) -> None:
    url = url.format(free=find_free_port())
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--port", str(find_free_port()),
         "--redis-url", "redis://127.0.0.1:1/0", "--mqtt-url", url],
        capture_output=True, text=True, timeout=30, cwd=REPO_ROOT,
        env={k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")},
    )  # fmt: skip
    assert done.returncode == status, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "--mqtt-url / GATEWAY_MQTT_URL" in lines[0], done.stderr


async def test_a_gateway_restart_keeps_mqtt_devices_and_catches_up_from_retained_statuses(
    redis_url: str, redis: Client, broker: Mosquitto
) -> None:
    async with mqtt_gateway(redis_url, broker) as gw:
        await gw.register("m13")
        await gw.register("m14")
        leaving = await MqttDevice(broker.port, "m13").connect()
        staying = await MqttDevice(broker.port, "m14").connect()
        await until_presence(redis, LAYOUT, "m13", [("online", "connected")])
        await until_presence(redis, LAYOUT, "m14", [("online", "connected")])
    # the gateway stopped: its MQTT devices are still connected to the broker, not offline
    assert await presence(redis, LAYOUT, "m14") == [("online", "connected")]
    await leaving.drop()  # gone while no gateway listens: only the retained Will says so
    async with mqtt_gateway(redis_url, broker):
        await until_presence(
            redis, LAYOUT, "m13", [("online", "connected"), ("offline", "mqtt_will")]
        )
        await asyncio.sleep(0.3)
        # the retained online of the current session is news already known: nothing
        assert await presence(redis, LAYOUT, "m14") == [("online", "connected")]
    await staying.close()
