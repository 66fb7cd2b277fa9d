"""The document's Node.js classes beside the store and the presence engine, node field names.

The mirror of the Python classes' tests in test_seedcode.py, test_store.py and
test_presence.py, with the gateway's single-node layout speaking the Node.js classes' hash
fields (`GATEWAY_SEED_SCHEMA=node`). The classes run exactly as the document writes them, in a
node process of their own (ioredis), loaded from the document at run time.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from presence_feed import Listener
from seedcode import NodeSeed

from gateway.config import Settings
from gateway.errors import DeviceExists, DeviceNotFound
from gateway.keys import Keys
from gateway.metrics import Metrics
from gateway.presence import PresenceEngine
from gateway.store import Store

pytestmark = pytest.mark.seed

TIMEOUT = 10.0  # the one generous bound every wait here is a multiple of
NODE = Keys.single(schema="node")


@pytest.fixture
def settings(redis_url: str) -> Settings:
    return Settings(redis_url=redis_url, heartbeat_timeout=5, seed_schema="node")


@pytest.fixture
def store(redis_client: aioredis.Redis, settings: Settings) -> Store:
    return Store(redis_client, settings, keys=NODE)


@pytest.fixture
async def engine(
    redis_client: aioredis.Redis, store: Store, settings: Settings
) -> AsyncIterator[PresenceEngine]:
    yield PresenceEngine(redis_client, store, settings, Metrics(), on_stale=lambda *_: None)


def node_engine(redis_url: str, client: aioredis.Redis, **overrides: Any) -> PresenceEngine:
    settings = Settings(redis_url=redis_url, seed_schema="node", **overrides)
    store = Store(client, settings, keys=NODE)
    return PresenceEngine(client, store, settings, Metrics(), lambda *_: None, db=0)


async def wait_until(check: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        await asyncio.sleep(0.02)


async def wait_until_gone(client: aioredis.Redis, key: str) -> None:
    """Wait for a key's TTL to run out on the server (bounded by TIMEOUT)."""
    async with asyncio.timeout(TIMEOUT):
        while True:
            remaining = await client.pttl(key)
            if remaining == -2:  # no such key
                return
            await asyncio.sleep(max(remaining, 20) / 1000)


async def end(engine: PresenceEngine, device_id: str, session: str) -> int:
    waiter = engine.end(device_id, session, "closed")
    await engine.flush()
    return await waiter


async def beat(engine: PresenceEngine, device_id: str, session: str) -> int:
    waiter = engine.beat(device_id, session, ack=True)
    assert waiter is not None
    await engine.flush()
    return await waiter


# --- the classes themselves (test_seedcode.py) ------------------------------------------
async def test_node_heartbeat_makes_a_device_online(node_seed: NodeSeed) -> None:
    assert await node_seed.call("manager", "registerDevice", "n-1", "thermo") is True
    beat = await node_seed.call("manager", "deviceHeartbeat", "n-1", {"t": 1})
    assert beat == {"deviceId": "n-1", "status": "online", "wasOffline": True}
    state = await node_seed.call("manager", "getDeviceState", "n-1")
    assert state["status"] == "online"
    assert state["reportedState"] == {"t": 1}


async def test_node_classes_load_from_the_document(
    node_seed: NodeSeed, redis_client: aioredis.Redis
) -> None:
    """Both documented classes run: the manager answers, the detector listens (its start
    enables keyspace notifications), and their logging does not disturb the harness."""
    await redis_client.config_set("notify-keyspace-events", "")
    assert await node_seed.call("manager", "getOnlineDevices") == []
    assert await node_seed.call("detector", "start") is None
    flags = (await redis_client.config_get("notify-keyspace-events"))["notify-keyspace-events"]
    assert set("Ex") <= set(flags)
    with pytest.raises(RuntimeError, match=r"Node\.js class raised"):
        await node_seed.call("manager", "noSuchMethod")


@pytest.mark.parametrize("missing", ["node", "document"])
def test_a_clone_without_node_passes_with_the_reason_shown_but_ci_fails(
    tmp_path: Path, missing: str
) -> None:
    """Without node and npm on PATH, or without the document, the Node.js tests are skipped
    with the reason shown; under CI=true the same run fails."""
    command = [
        sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-n", "0",
        str(Path(__file__)), "-k", "node_heartbeat_makes_a_device_online",
    ]  # fmt: skip
    base = {k: v for k, v in os.environ.items() if k != "CI"}
    if missing == "node":
        base["PATH"] = str(Path(sys.executable).parent)  # the venv's scripts: no node, no npm
        reason = "node and npm not found"
    else:
        base["GATEWAY_SEED_DOC"] = str(tmp_path / "missing.txt")
        reason = f'Redis" not found at {tmp_path / "missing.txt"}'
    elsewhere = subprocess.run(command, env=base, capture_output=True, text=True, check=False)
    assert elsewhere.returncode == 0, elsewhere.stdout
    assert reason in elsewhere.stdout
    in_ci = subprocess.run(
        command, env=base | {"CI": "true"}, capture_output=True, text=True, check=False
    )
    assert in_ci.returncode == 1, in_ci.stdout
    assert "CI=true: a missing part is a failure" in in_ci.stdout


# --- the store (test_store.py) -------------------------------------------------------------
async def test_register_writes_the_node_fields(
    store: Store, node_seed: NodeSeed, redis_client: aioredis.Redis
) -> None:
    before = time.time()
    device, _ = await store.register("d1", "thermo", {"room": "kitchen"})
    stored = await redis_client.hgetall("device:state:d1")
    for field in (b"deviceId", b"deviceType", b"registeredAt", b"status", b"lastSeen"):
        assert field in stored
    assert not {b"device_id", b"device_type", b"last_seen", b"desired_state"} & set(stored)
    # milliseconds in the hash, seconds in the API
    assert before * 1000 - 1 <= int(stored[b"registeredAt"]) <= time.time() * 1000 + 1
    assert before - 0.01 <= device.registered_at <= time.time() + 0.01
    state = await node_seed.call("manager", "getDeviceState", "d1")
    assert state is not None
    assert (state["deviceId"], state["status"], state["metadata"]) == (
        "d1",
        "offline",
        {"room": "kitchen"},
    )
    assert (state["reportedState"], state["desiredState"], state["lastSeen"]) == ({}, {}, 0)


async def test_register_refuses_an_id_the_node_classes_registered(
    store: Store, node_seed: NodeSeed
) -> None:
    await node_seed.call("manager", "registerDevice", "s1", "lamp")
    with pytest.raises(DeviceExists):
        await store.register("s1", "lamp", {})
    device = await store.require("s1")
    assert device.device_type == "lamp"


async def test_get_reads_a_node_device(store: Store, node_seed: NodeSeed) -> None:
    before = time.time()
    await node_seed.call("manager", "registerDevice", "s1", "lamp", {"floor": 2})
    await node_seed.call("manager", "deviceHeartbeat", "s1", {"on": True})
    device = await store.require("s1")
    assert (device.status, device.reported_state, device.metadata) == (
        "online",
        {"on": True},
        {"floor": 2},
    )
    # the classes write milliseconds; the store reads seconds
    assert before - 0.01 <= device.last_seen <= time.time() + 0.01
    assert before - 0.01 <= device.registered_at <= device.last_seen
    assert await store.get("missing") is None
    with pytest.raises(DeviceNotFound):
        await store.require("missing")


class InterleavingRedis(aioredis.Redis):
    """A real client that awaits a hook right after its next HMGET: a writer between read
    and compare-and-set."""

    hook: Callable[[], Awaitable[object]] | None = None

    async def hmget(self, *args: Any, **kwargs: Any) -> Any:
        result = await super().hmget(*args, **kwargs)
        hook, self.hook = self.hook, None
        if hook is not None:
            await hook()
        return result


async def test_node_write_between_our_read_and_write_is_not_lost(
    redis_url: str, settings: Settings, node_seed: NodeSeed
) -> None:
    client = InterleavingRedis.from_url(redis_url)
    assert isinstance(client, InterleavingRedis)
    try:
        store = Store(client, settings, keys=NODE)
        await store.register("d1", "t", {})
        for round_ in range(10):
            client.hook = lambda r=round_: node_seed.call(
                "manager", "setDesiredState", "d1", {f"node{r}": r}
            )
            await store.patch_section("d1", "desired", {f"ours{round_}": round_})
            assert client.hook is None, "the interleaving hook never ran"
        desired = (await store.require("d1")).desired_state
        assert desired == {f"{who}{r}": r for r in range(10) for who in ("node", "ours")}
    finally:
        await client.aclose()


async def test_node_and_gateway_writing_concurrently_lose_no_node_write(
    store: Store, node_seed: NodeSeed
) -> None:
    """The node process's writes race our patches; every one of them must survive ours.

    (The classes' own read-modify-write can drop ours: that race is theirs, not ours.)
    """
    await store.register("d1", "t", {})
    rounds = 60

    async def node_writer() -> None:
        for i in range(rounds):
            await node_seed.call("manager", "setDesiredState", "d1", {f"node{i}": i})

    async def our_writer() -> None:
        for i in range(rounds):
            await store.patch_section("d1", "desired", {f"ours{i}": i})

    await asyncio.gather(node_writer(), our_writer())
    desired = (await store.require("d1")).desired_state
    missing = [f"node{i}" for i in range(rounds) if desired.get(f"node{i}") != i]
    assert missing == []


async def test_a_desired_change_reaches_the_node_classes(
    store: Store, node_seed: NodeSeed, redis_client: aioredis.Redis
) -> None:
    """What the gateway publishes on the command channel is what the Node.js classes read
    back from the hash; and their delta sees it."""
    await store.register("d1", "t", {})
    async with Listener(redis_client, "device:d1:commands") as listener:
        await store.patch_section("d1", "desired", {"a": 1, "b": {"c": True}})
        messages = await listener.drain()
    assert [body["desired_state"] for _, body in messages] == [{"a": 1, "b": {"c": True}}]
    state = await node_seed.call("manager", "getDeviceState", "d1")
    assert state["desiredState"] == {"a": 1, "b": {"c": True}}
    delta = await node_seed.call("manager", "getStateDelta", "d1")
    assert delta["inSync"] is False and delta["delta"]["a"] == {"desired": 1}


async def test_a_semantically_unchanged_patch_of_a_node_document_is_no_change(
    store: Store, node_seed: NodeSeed
) -> None:
    await store.register("d1", "t", {})
    await node_seed.call("manager", "setDesiredState", "d1", {"a": 1})
    device = await store.require("d1")
    assert (device.desired_state, device.version, device.desired_version) == ({"a": 1}, 1, 1)
    # the classes' write is the one change (counted once); ours, the same document, is none
    assert await store.patch_section("d1", "desired", {"a": 1}) == ((1, 1, 0), {"a": 1})
    assert await store.patch_section("d1", "desired", {"a": 1}) == ((1, 1, 0), {"a": 1})


async def walk(store: Store, **query: Any) -> list[str]:
    page = await store.page(limit=100, **query)
    assert page.next_cursor is None
    return [item["device_id"] for item in page.items]


async def test_page_includes_node_devices_once_adopted(
    store: Store, engine: PresenceEngine, node_seed: NodeSeed
) -> None:
    await node_seed.call("manager", "registerDevice", "s1", "lamp")
    await node_seed.call("manager", "deviceHeartbeat", "s1")
    await node_seed.call("manager", "registerDevice", "s2", "lamp")
    await store.register("g1", "lamp", {})
    await engine.sweep()
    assert await walk(store) == ["g1", "s1", "s2"]
    assert await walk(store, status="online") == ["s1"]
    assert await walk(store, device_type="lamp", status="offline") == ["g1", "s2"]
    # the last-seen index holds seconds, so "not seen for an hour" excludes s1 alone
    assert await walk(store, stale_seconds=3600) == ["g1", "s2"]
    page = await store.page(limit=10, include_state=True, status="online")
    assert page.items[0]["last_seen"] == pytest.approx(time.time(), abs=5)
    assert (await store.stats())["by_type"]["lamp"] == {
        "registered": 3,
        "online": 1,
        "offline": 2,
    }


# --- the presence engine (test_presence.py) --------------------------------------------------
@pytest.mark.parametrize("node_detector", [True, False], ids=["node-detector", "alone"])
async def test_a_device_heartbeated_only_by_the_node_classes_gets_one_versioned_offline(
    redis_client: aioredis.Redis, redis_url: str, node_seed: NodeSeed, node_detector: bool
) -> None:
    """The classes announce online themselves (unversioned); when the key expires the engine
    publishes one versioned offline per device, whether or not the Node.js OfflineDetector
    (keyspace notifications) took the device out of `devices:online` first."""
    engine = node_engine(redis_url, redis_client, heartbeat_timeout=1)
    ids = ["s1", "s2", "s3"]
    await node_seed.set("manager", "heartbeatTimeout", 1)
    if node_detector:
        await node_seed.call("detector", "start")
    async with Listener(redis_client) as listener:
        for device_id in ids:
            await node_seed.call("manager", "registerDevice", device_id, "lamp")
            await node_seed.call("manager", "deviceHeartbeat", device_id, {"on": True})
        assert await engine.sweep() == 0  # adopted, still online
        for device_id in ids:
            assert await redis_client.zscore("devices:index:online", device_id) == 0
        assert (await engine.store.stats())["by_type"]["lamp"]["online"] == 3
        for device_id in ids:
            await wait_until_gone(redis_client, f"device:heartbeat:{device_id}")
        if node_detector:

            async def detector_done() -> bool:
                return await redis_client.scard("devices:online") == 0

            await wait_until(detector_done, "the Node.js detector marked them offline")
        went = 0
        async with asyncio.timeout(TIMEOUT):
            while went < len(ids):
                went += await engine.sweep()
        assert await engine.sweep() == 0
        events = await listener.presence()
    versioned = [e for e in events if "version" in e]
    assert sorted((e["deviceId"], e["status"], e["version"], e["reason"]) for e in versioned) == [
        (d, "offline", 1, "expired") for d in ids
    ]
    assert all(e["device_id"] == e["deviceId"] for e in versioned)
    unversioned = sorted((e["deviceId"], e["status"]) for e in events if "version" not in e)
    node_offline = [(d, "offline") for d in ids] if node_detector else []
    assert unversioned == sorted([(d, "online") for d in ids] + node_offline)
    assert (await engine.store.stats())["by_type"]["lamp"]["online"] == 0
    for device_id in ids:
        device = await engine.store.require(device_id)
        assert device.status == "offline" and device.reported_state == {"on": True}
        state = await node_seed.call("manager", "getDeviceState", device_id)
        assert state["status"] == "offline" and state["reportedState"] == {"on": True}


async def test_connect_of_a_node_online_device_publishes_nothing(
    engine: PresenceEngine, redis_client: aioredis.Redis, node_seed: NodeSeed
) -> None:
    await node_seed.call("manager", "registerDevice", "s1", "lamp")
    await node_seed.call("manager", "deviceHeartbeat", "s1")
    async with Listener(redis_client) as listener:
        welcome = await engine.connect("s1", "g1", "")
        assert welcome is not None and welcome.reason == ""
        assert await listener.drain() == []
    assert await end(engine, "s1", "g1") == 1  # and our offline is versioned
    assert (await engine.store.require("s1")).presence_version == 1


async def test_a_renewed_lapse_puts_the_device_back_in_the_node_online_set(
    engine: PresenceEngine, store: Store, redis_client: aioredis.Redis, node_seed: NodeSeed
) -> None:
    """The Node.js detector takes a lapsed device out of `devices:online` the moment its key
    expires, before our beat renews it; its readers must then see it online again."""
    await store.register("d1", "t", {})
    await engine.connect("d1", "s1", "")
    await node_seed.call("detector", "start")
    await redis_client.pexpire("device:heartbeat:d1", 1)

    async def detector_done() -> bool:
        return not await redis_client.sismember("devices:online", "d1")

    await wait_until(detector_done, "the Node.js detector took d1 out of devices:online")
    assert await node_seed.call("manager", "getOnlineDevices") == []
    await beat(engine, "d1", "s1")
    assert await node_seed.call("manager", "getOnlineDevices") == ["d1"]
    assert await redis_client.exists("device:heartbeat:d1")
    state = await node_seed.call("manager", "getDeviceState", "d1")
    assert state["status"] == "online"
    assert await redis_client.hget("device:state:d1", "status") == b"online"


async def test_heartbeats_write_last_seen_in_milliseconds(
    engine: PresenceEngine, store: Store, redis_client: aioredis.Redis, node_seed: NodeSeed
) -> None:
    await store.register("d1", "t", {})
    before = time.time()
    await engine.connect("d1", "s1", "")
    waiter = engine.beat("d1", "s1", orjson.dumps({"t": 20}), ack=True)
    assert waiter is not None
    await engine.flush()
    assert await waiter == 1
    state = await node_seed.call("manager", "getDeviceState", "d1")
    assert (state["status"], state["reportedState"]) == ("online", {"t": 20})
    assert before * 1000 - 1 <= state["lastSeen"] <= time.time() * 1000 + 1
    assert await redis_client.zscore("devices:online:seen", "d1") == pytest.approx(
        state["lastSeen"] / 1000, abs=0.002
    )
