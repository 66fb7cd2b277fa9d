"""The presence engine against real servers: every transition published exactly once.

Engines are built directly and flushed by hand, so each step is deterministic; the loops are
tested separately with `run()` in a task. Pub/sub checks end with a sentinel published by the
test, so "exactly one" and "none" are decided by message order, never by waiting.
"""

from __future__ import annotations

import asyncio
import random
import time
import types
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
import pytest
import redis
import redis.asyncio as aioredis
from backends import Client, connect, dbsize, primaries, single_node
from presence_feed import Listener
from servers import RedisServer

from gateway.config import Settings
from gateway.keys import OWN_FIELDS, Keys
from gateway.lastseen import INDEX_STEP
from gateway.metrics import Metrics
from gateway.presence import RESUMED, STALE, UNKNOWN, WRITTEN, PresenceEngine, cancel_and_wait
from gateway.store import Store

TIMEOUT = 10.0  # the one generous bound every wait here is a multiple of

EngineFactory = Callable[..., Awaitable[PresenceEngine]]


def brief(events: list[dict[str, Any]]) -> list[tuple[str, str, int | None, str | None]]:
    """(device, status, version, reason) of each presence event."""
    return [(e["device_id"], e["status"], e.get("version"), e.get("reason")) for e in events]


class StaleLog:
    """The on_stale callback: records every (device, session, code)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, int]] = []

    def __call__(self, device_id: str, session: str, code: int) -> None:
        self.calls.append((device_id, session, code))


@pytest.fixture
def stale() -> StaleLog:
    return StaleLog()


@pytest.fixture
async def make_engine(
    backend_url: str, layout: Keys, stale: StaleLog
) -> AsyncIterator[EngineFactory]:
    """`await make_engine(**settings)`: an engine on its own new client (closed after the test)."""
    clients: list[Client] = []

    async def build(**overrides: Any) -> PresenceEngine:
        values: dict[str, Any] = {"heartbeat_timeout": 2.0, **overrides}
        settings = Settings(redis_url=backend_url, **values)
        client = await connect(backend_url)
        clients.append(client)
        store = Store(client, settings, layout)
        return PresenceEngine(client, store, settings, Metrics(), stale, db=0)

    yield build
    for client in clients:
        await client.aclose()


@pytest.fixture
async def engine(make_engine: EngineFactory) -> PresenceEngine:
    return await make_engine()


async def members(client: Client, layout: Keys, name: str) -> set[bytes]:
    """The union of one fleet list (`online`, `registered`) over every partition: the
    gateway's index, which the seed document's set matches where it is kept (one node)."""
    index = {"online": "index_online", "registered": "index"}[name]
    found: set[bytes] = set()
    for part in layout.parts:
        indexed = set(await client.zrange(getattr(part, index), 0, -1))
        if layout.seed_sets:
            assert await client.smembers(getattr(part, name)) == indexed, name
        found |= indexed
    return found


async def zcard(client: Client, layout: Keys, name: str) -> int:
    """The size of one fleet index (`index_online`, `online_seen`) over every partition."""
    return sum([await client.zcard(getattr(part, name)) for part in layout.parts])


async def register(engine: PresenceEngine, *ids: str, device_type: str = "t") -> None:
    for device_id in ids:
        await engine.store.register(device_id, device_type, {})


async def wait_until_gone(client: Client, key: str) -> None:
    """Wait for a key's TTL to run out on the server (bounded by TIMEOUT)."""
    async with asyncio.timeout(TIMEOUT):
        while True:
            remaining = await client.pttl(key)
            if remaining == -2:  # no such key
                return
            await asyncio.sleep(max(remaining, 20) / 1000)


async def end(engine: PresenceEngine, device_id: str, session: str, reason: str = "closed") -> int:
    waiter = engine.end(device_id, session, reason)
    await engine.flush()
    return await waiter


async def beat(
    engine: PresenceEngine, device_id: str, session: str, reported: dict[str, Any] | None = None
) -> int:
    encoded = None if reported is None else orjson.dumps(reported)
    waiter = engine.beat(device_id, session, encoded, ack=True)
    assert waiter is not None
    await engine.flush()
    return await waiter


# --- connect and disconnect -----------------------------------------------------
async def test_versions_only_increase_across_cycles_delete_and_re_register(
    engine: PresenceEngine, backend_client: Client, layout: Keys
) -> None:
    await register(engine, "d1")
    async with Listener(backend_client) as listener:
        for cycle in range(3):
            welcome = await engine.connect("d1", f"s{cycle}", "")
            assert welcome is not None
            assert (welcome.reason, welcome.presence_version) == ("connected", 2 * cycle + 1)
            assert await end(engine, "d1", f"s{cycle}") == 1
        await engine.connect("d1", "s9", "")
        await engine.store.delete("d1")
        await register(engine, "d1")
        await engine.connect("d1", "s10", "")
        events = await listener.presence()
    assert brief(events) == [
        ("d1", "online", 1, "connected"), ("d1", "offline", 2, "closed"),
        ("d1", "online", 3, "connected"), ("d1", "offline", 4, "closed"),
        ("d1", "online", 5, "connected"), ("d1", "offline", 6, "closed"),
        ("d1", "online", 7, "connected"), ("d1", "offline", 8, "deleted"),
        ("d1", "online", 9, "connected"),
    ]  # fmt: skip
    for event in events:
        assert event["type"] == "presence"
        assert isinstance(event["timestamp"], float) and event["stream_id"]
    stream = await backend_client.xrange(layout.of("d1").events)
    stream_presence = [orjson.loads(body[b"event"]) for _, body in stream]
    versions = [e["version"] for e in stream_presence if e["type"] == "presence"]
    assert versions == list(range(1, 10))


async def test_connect_of_unknown_device_writes_nothing(
    engine: PresenceEngine, backend_client: Client
) -> None:
    async with Listener(backend_client) as listener:
        assert await engine.connect("ghost", "s1", "") is None
        assert await listener.drain() == []
    assert await dbsize(backend_client) == 0


async def test_connect_welcome_carries_the_shadow(engine: PresenceEngine) -> None:
    await register(engine, "d1")
    await engine.store.patch_section("d1", "desired", {"a": 1})
    await engine.store.patch_section("d1", "reported", {"a": 0})
    welcome = await engine.connect("d1", "s1", "")
    assert welcome is not None
    assert orjson.loads(welcome.desired) == {"a": 1}
    assert orjson.loads(welcome.reported) == {"a": 0}
    assert welcome.version == 2


async def test_connect_checks_the_token_hash(engine: PresenceEngine) -> None:
    from gateway.auth import hash_device_token
    from gateway.presence import Revoked

    _, token = await engine.store.register("d1", "t", {})
    assert await engine.connect("d1", "s1", hash_device_token(token)) is not None
    await engine.store.rotate_token("d1")
    with pytest.raises(Revoked):
        await engine.connect("d1", "s2", hash_device_token(token))


async def test_second_session_replaces_and_kicks_the_first(
    engine: PresenceEngine, backend_client: Client, layout: Keys, stale: StaleLog
) -> None:
    await register(engine, "d1")
    async with Listener(backend_client) as listener:
        await engine.connect("d1", "old", "")
        await beat(engine, "d1", "old", {"t": 1})
        welcome = await engine.connect("d1", "new", "")
        assert welcome is not None and welcome.reason == "replaced"
        messages = await listener.drain()
    part = layout.of("d1")
    presence = [body for channel, body in messages if channel == part.presence_channel]
    kicks = [body for channel, body in messages if channel == part.control_channel]
    assert len(presence) + len(kicks) == len(messages)  # on the device's partition's channels
    assert brief(presence) == [("d1", "online", 1, "connected"), ("d1", "online", 2, "replaced")]
    assert kicks == [
        {"op": "kick", "device_id": "d1", "session": "old", "code": 4409, "reason": "replaced"}
    ]
    assert stale.calls == []
    assert await backend_client.hget(layout.state("d1"), OWN_FIELDS.session) == b"new"


async def test_heartbeat_from_the_replaced_session_writes_nothing(
    engine: PresenceEngine, backend_client: Client, layout: Keys, stale: StaleLog
) -> None:
    await register(engine, "d1")
    await engine.connect("d1", "old", "")
    await beat(engine, "d1", "old", {"t": 1})
    await engine.connect("d1", "new", "")
    state, online_seen = layout.state("d1"), layout.of("d1").online_seen
    before = await backend_client.hgetall(state)
    seen_before = await backend_client.zscore(online_seen, "d1")
    assert seen_before is not None
    await asyncio.sleep(0.01)  # so a write of last_seen would show a different time
    async with Listener(backend_client) as listener:
        assert await beat(engine, "d1", "old", {"t": 2}) == STALE
        assert await listener.drain() == []
    assert await backend_client.hgetall(state) == before
    assert await backend_client.zscore(online_seen, "d1") == seen_before
    assert await backend_client.hget(layout.state("d1"), OWN_FIELDS.session) == b"new"
    assert stale.calls == [("d1", "old", STALE)]


async def test_disconnect_from_a_stale_session_does_nothing(
    engine: PresenceEngine, backend_client: Client, layout: Keys
) -> None:
    await register(engine, "d1")
    await engine.connect("d1", "old", "")
    await engine.connect("d1", "new", "")
    part = layout.of("d1")
    assert await backend_client.zscore(part.index_online, "d1") == 0
    assert await backend_client.sismember(part.online, "d1") == layout.seed_sets
    async with Listener(backend_client) as listener:
        assert await end(engine, "d1", "old") == 0
        assert await listener.drain() == []
        assert await backend_client.exists(layout.heartbeat("d1"))
        assert await end(engine, "d1", "new") == 1
        assert await end(engine, "d1", "new") == 0
        events = await listener.presence()
    assert brief(events) == [("d1", "offline", 3, "closed")]
    assert not await backend_client.exists(layout.heartbeat("d1"))
    assert not await backend_client.sismember(part.online, "d1")
    assert await backend_client.zscore(part.index_online, "d1") is None
    assert await backend_client.hget(layout.state("d1"), "status") == b"offline"


async def test_heartbeat_of_unknown_device_reports_unknown(
    engine: PresenceEngine, backend_client: Client, stale: StaleLog
) -> None:
    assert await beat(engine, "ghost", "s1") == UNKNOWN
    assert stale.calls == [("ghost", "s1", UNKNOWN)]
    assert await dbsize(backend_client) == 0


# --- offline grace --------------------------------------------------------------
async def test_reconnect_within_grace_publishes_nothing(
    make_engine: EngineFactory, backend_client: Client, layout: Keys
) -> None:
    engine = await make_engine(offline_grace=0.5, heartbeat_timeout=2)
    await register(engine, "d1")
    await engine.connect("d1", "s1", "")
    heartbeat = layout.heartbeat("d1")
    async with Listener(backend_client) as listener:
        assert await end(engine, "d1", "s1", "connection_lost") == 2
        assert await backend_client.hget(layout.state("d1"), OWN_FIELDS.linger_reason) is not None
        assert 0 < await backend_client.pttl(heartbeat) <= 500
        welcome = await engine.connect("d1", "s2", "")
        assert welcome is not None and welcome.reason == ""
        assert welcome.presence_version == 1
        assert await engine.expire(["d1"]) == 0
        assert await engine.sweep() == 0
        assert await listener.drain() == []
    assert await backend_client.pttl(heartbeat) > 1000
    assert await backend_client.hget(layout.state("d1"), OWN_FIELDS.linger_reason) is None


async def test_no_reconnect_goes_offline_once_with_the_kept_reason(
    make_engine: EngineFactory, backend_client: Client, layout: Keys
) -> None:
    engine = await make_engine(offline_grace=0.5, heartbeat_timeout=2)
    await register(engine, "d1")
    await engine.connect("d1", "s1", "")
    async with Listener(backend_client) as listener:
        assert await end(engine, "d1", "s1", "connection_lost") == 2
        assert await listener.drain() == []
        await wait_until_gone(backend_client, layout.heartbeat("d1"))
        assert await engine.sweep() == 1
        assert await engine.sweep() == 0
        assert await engine.expire(["d1"]) == 0
        events = await listener.presence()
    assert brief(events) == [("d1", "offline", 2, "connection_lost")]
    assert await backend_client.hget(layout.state("d1"), OWN_FIELDS.linger_reason) is None


async def test_a_grace_disconnect_then_a_later_expiry_says_expired(
    make_engine: EngineFactory, backend_client: Client, layout: Keys
) -> None:
    """After a reconnect inside the grace, the old reason must not leak into a later expiry."""
    engine = await make_engine(offline_grace=0.5, heartbeat_timeout=2)
    await register(engine, "d1")
    await engine.connect("d1", "s1", "")
    await end(engine, "d1", "s1", "connection_lost")
    await engine.connect("d1", "s2", "")
    assert await backend_client.delete(layout.heartbeat("d1")) == 1
    async with Listener(backend_client) as listener:
        assert await engine.expire(["d1"]) == 1
        events = await listener.presence()
    assert brief(events) == [("d1", "offline", 2, "expired")]


# --- expiry -----------------------------------------------------------------------
async def test_expire_publishes_one_offline_when_the_heartbeat_is_gone(
    engine: PresenceEngine, backend_client: Client, layout: Keys
) -> None:
    await register(engine, "d1", "d2")
    await engine.connect("d1", "s1", "")
    await engine.connect("d2", "s1", "")
    async with Listener(backend_client) as listener:
        assert await engine.expire(["d1", "d2"]) == 0  # both heartbeats still exist
        assert await backend_client.delete(layout.heartbeat("d1")) == 1
        assert await engine.expire(["d1", "d2", "d1", "ghost"]) == 1
        assert await engine.expire(["d1"]) == 0
        events = await listener.presence()
    assert brief(events) == [("d1", "offline", 2, "expired")]
    assert await members(backend_client, layout, "online") == {b"d2"}
    stats = await engine.store.stats()
    assert stats["by_type"]["t"]["online"] == 1


async def test_note_expired_is_handled_by_the_next_flush(
    engine: PresenceEngine, backend_client: Client, layout: Keys
) -> None:
    await register(engine, "d1")
    await engine.connect("d1", "s1", "")
    assert await backend_client.delete(layout.heartbeat("d1")) == 1
    async with Listener(backend_client) as listener:
        engine.note_expired("d1")
        await engine.flush()
        events = await listener.presence()
    assert brief(events) == [("d1", "offline", 2, "expired")]


async def test_sweep_finds_a_device_whose_heartbeat_ran_out(
    make_engine: EngineFactory, backend_client: Client, layout: Keys
) -> None:
    engine = await make_engine(heartbeat_timeout=1)
    await register(engine, "d1")
    await engine.connect("d1", "s1", "")
    async with Listener(backend_client) as listener:
        await wait_until_gone(backend_client, layout.heartbeat("d1"))
        went = 0
        async with asyncio.timeout(TIMEOUT):
            while not went:
                went = await engine.sweep()
        events = await listener.presence()
    assert brief(events) == [("d1", "offline", 2, "expired")]


async def test_two_engines_expiring_the_same_devices_publish_each_once(
    make_engine: EngineFactory, backend_client: Client, layout: Keys
) -> None:
    first, second = await make_engine(), await make_engine()
    ids = [f"dev-{i:03d}" for i in range(200)]
    await register(first, *ids)
    for device_id in ids:
        await first.connect(device_id, "s", "")
    assert await zcard(backend_client, layout, "index_online") == 200
    assert await backend_client.delete(*(layout.heartbeat(d) for d in ids)) == 200
    shuffled = random.Random(7).sample(ids, len(ids))
    async with Listener(backend_client) as listener:
        results = await asyncio.gather(
            first.expire(ids[:120]), second.expire(shuffled), first.sweep(),
            second.sweep(), first.expire(reversed(ids)), second.expire(ids[100:]),
        )  # fmt: skip
        events = await listener.presence()
    assert sum(results) == 200
    assert len(events) == 200
    assert sorted(e["device_id"] for e in events) == ids
    assert {(e["status"], e["version"], e["reason"]) for e in events} == {("offline", 2, "expired")}
    assert await members(backend_client, layout, "online") == set()
    assert await zcard(backend_client, layout, "index_online") == 0


# --- the seed's own classes beside the engine ---------------------------------------
@single_node  # the seed document's classes write across slots: one node only
@pytest.mark.parametrize("seed_detector_first", [True, False])
async def test_a_device_heartbeated_only_by_the_seed_gets_one_versioned_offline(
    make_engine: EngineFactory,
    backend_client: Client,
    backend_url: str,
    seed: types.SimpleNamespace,
    seed_detector_first: bool,
) -> None:
    engine = await make_engine(heartbeat_timeout=1)
    ids = ["s1", "s2", "s3"]
    with redis.Redis.from_url(backend_url) as sync_client:
        manager = seed.DeviceStateManager(sync_client)
        manager.heartbeat_timeout = 1
        async with Listener(backend_client) as listener:
            for device_id in ids:
                await asyncio.to_thread(manager.register_device, device_id, "lamp")
                await asyncio.to_thread(manager.device_heartbeat, device_id, {"on": True})
            assert await engine.sweep() == 0  # adopted, still online
            for device_id in ids:
                assert await backend_client.zscore("devices:index:online", device_id) == 0
            assert (await engine.store.stats())["by_type"]["lamp"]["online"] == 3
            for device_id in ids:
                await wait_until_gone(backend_client, f"device:heartbeat:{device_id}")
            if seed_detector_first:
                found = await asyncio.to_thread(
                    seed.OfflineDetector(sync_client).check_for_offline_devices
                )
                assert sorted(found) == ids
            went = 0
            async with asyncio.timeout(TIMEOUT):
                while went < len(ids):
                    went += await engine.sweep()
            assert await engine.sweep() == 0
            events = await listener.presence()
    versioned = [e for e in events if "version" in e]
    assert sorted(brief(versioned)) == [(d, "offline", 1, "expired") for d in ids]
    assert (await engine.store.stats())["by_type"]["lamp"]["online"] == 0
    for device_id in ids:
        device = await engine.store.require(device_id)
        assert device.status == "offline" and device.reported_state == {"on": True}


@single_node  # the seed document's classes write across slots: one node only
async def test_connect_of_a_seed_online_device_publishes_nothing(
    engine: PresenceEngine, backend_client: Client, backend_url: str,
    seed: types.SimpleNamespace,
) -> None:  # fmt: skip
    with redis.Redis.from_url(backend_url) as sync_client:
        manager = seed.DeviceStateManager(sync_client)
        await asyncio.to_thread(manager.register_device, "s1", "lamp")
        await asyncio.to_thread(manager.device_heartbeat, "s1")
    async with Listener(backend_client) as listener:
        welcome = await engine.connect("s1", "g1", "")
        assert welcome is not None and welcome.reason == ""
        assert await listener.drain() == []
    assert await end(engine, "s1", "g1") == 1  # and our offline is versioned
    assert (await engine.store.require("s1")).presence_version == 1


# --- heartbeat batches ------------------------------------------------------------
async def test_heartbeat_writes_reported_and_versions_only_changes(
    engine: PresenceEngine, backend_client: Client, layout: Keys
) -> None:
    await register(engine, "d1")
    await engine.connect("d1", "s1", "")
    first_seen = float(await backend_client.hget(layout.state("d1"), "last_seen") or 0)
    assert first_seen > 0
    await asyncio.sleep(0.01)
    async with Listener(backend_client) as listener:
        assert await beat(engine, "d1", "s1", {"t": 20}) == 1
        assert await beat(engine, "d1", "s1", {"t": 20}) == 1
        assert await beat(engine, "d1", "s1") == 0  # no document: nothing of the shadow written
        assert await beat(engine, "d1", "s1", {"t": 21}) == 2
        assert await listener.drain() == []  # heartbeats are not presence transitions
    device = await engine.store.require("d1")
    assert (device.reported_state, device.version, device.status) == ({"t": 21}, 2, "online")
    assert device.last_seen > first_seen
    # the index trails the latest frame by under a second; reads refine it from the TTL
    indexed = await backend_client.zscore(layout.of("d1").online_seen, "d1")
    assert first_seen <= indexed <= device.last_seen <= indexed + INDEX_STEP + 1
    rows = await backend_client.lrange(layout.history("d1"), 0, -1)
    history = [orjson.loads(raw) for raw in rows]  # compact: [log id, kind, section, version, …]
    assert [(e[1], e[2], e[3], e[4]) for e in history if e[1] == "s"] == [
        ("s", "r", 2, {"t": 21}), ("s", "r", 1, {"t": 20}),
    ]  # fmt: skip


async def test_latest_report_of_a_tick_wins_and_every_ack_settles(
    engine: PresenceEngine,
) -> None:
    await register(engine, "d1")
    await engine.connect("d1", "s1", "")
    waiters = [engine.beat("d1", "s1", orjson.dumps({"n": n}), ack=True) for n in range(5)]
    await engine.flush()
    assert [await w for w in waiters if w is not None] == [1] * 5
    assert (await engine.store.require("d1")).reported_state == {"n": 4}


async def test_heartbeat_after_a_detected_lapse_resumes(
    engine: PresenceEngine, backend_client: Client, layout: Keys
) -> None:
    await register(engine, "d1")
    await engine.connect("d1", "s1", "")
    assert await backend_client.delete(layout.heartbeat("d1")) == 1
    async with Listener(backend_client) as listener:
        assert await engine.expire(["d1"]) == 1
        waiter = engine.beat("d1", "s1", ack=True)
        await engine.flush()
        assert waiter is not None and await waiter == 0
        events = await listener.presence()
    assert brief(events) == [("d1", "offline", 2, "expired"), ("d1", "online", 3, "resumed")]
    part = layout.of("d1")
    assert await backend_client.exists(layout.heartbeat("d1"))
    assert await backend_client.sismember(part.online, "d1") == layout.seed_sets
    assert await backend_client.zscore(part.index_online, "d1") == 0
    assert (await engine.store.stats())["by_type"]["t"]["online"] == 1


async def test_resumed_code_is_reported_to_the_batcher(engine: PresenceEngine) -> None:
    await register(engine, "d1")
    await engine.connect("d1", "s1", "")
    assert await engine.redis.delete(engine.keys.heartbeat("d1")) == 1
    await engine.expire(["d1"])
    before = engine.metrics.transitions.labels("online", "resumed")._value.get()
    await beat(engine, "d1", "s1")
    assert engine.metrics.transitions.labels("online", "resumed")._value.get() == before + 1
    assert RESUMED == 2 and WRITTEN == 1


async def test_heartbeat_racing_an_undetected_lapse_publishes_no_second_online(
    engine: PresenceEngine, backend_client: Client, layout: Keys
) -> None:
    """A beat and the expiry in one tick: beats are written first, so the lapse was never
    announced offline; announcing `online` again would be a transition published twice."""
    await register(engine, "d1")
    await engine.connect("d1", "s1", "")
    assert await backend_client.delete(layout.heartbeat("d1")) == 1
    async with Listener(backend_client) as listener:
        engine.beat("d1", "s1")
        engine.note_expired("d1")
        await engine.flush()
        events = await listener.presence()
    assert brief(events) == []


async def test_connect_after_an_undetected_lapse_replaces_the_old_session(
    engine: PresenceEngine, backend_client: Client, layout: Keys
) -> None:
    await register(engine, "d1")
    await engine.connect("d1", "old", "")
    assert await backend_client.delete(layout.heartbeat("d1")) == 1
    async with Listener(backend_client) as listener:
        welcome = await engine.connect("d1", "new", "")
        messages = await listener.drain()
    assert welcome is not None
    part = layout.of("d1")
    kicks = [body for channel, body in messages if channel == part.control_channel]
    assert [k["session"] for k in kicks] == ["old"]
    presence = [body for channel, body in messages if channel == part.presence_channel]
    assert brief(presence) == [("d1", "online", 2, "replaced")]


# --- keyspace notifications -------------------------------------------------------
async def notify_flags(client: aioredis.Redis) -> str:
    reply = await client.config_get("notify-keyspace-events")
    value = next(iter(reply.values()))
    return value.decode() if isinstance(value, bytes) else str(value)


async def test_enable_notifications_keeps_existing_flags(
    engine: PresenceEngine, backend_client: Client
) -> None:
    """On every primary of a cluster: notifications are per node."""
    async with primaries(backend_client) as nodes:
        for start in ("Kg", "", "Ex", "KA"):
            for node in nodes:
                await node.config_set("notify-keyspace-events", start)
            assert await engine.enable_notifications() is True
            for node in nodes:
                flags = await notify_flags(node)
                assert set(start) <= set(flags.replace("A", "g$lshzxetd") + "A"), (start, flags)
                assert "E" in flags and ("x" in flags or "A" in flags), (start, flags)
        for node in nodes:
            await node.config_set("notify-keyspace-events", "Kg")
        await engine.enable_notifications()
        for node in nodes:
            assert set("KgEx") <= set(await notify_flags(node))


async def test_enable_notifications_returns_false_when_config_is_forbidden(
    stale: StaleLog,
) -> None:
    server = RedisServer("valkey", extra_args=["--rename-command", "CONFIG", ""])
    server.start()
    try:
        client = aioredis.Redis.from_url(server.url)
        try:
            settings = Settings(redis_url=server.url)
            engine = PresenceEngine(
                client, Store(client, settings), settings, Metrics(), stale, db=0
            )
            assert await engine.enable_notifications() is False
            assert await client.ping()
        finally:
            await client.aclose()
    finally:
        server.stop()


# --- the loops ----------------------------------------------------------------------
async def test_run_flushes_beats_and_sweeps_offline(
    make_engine: EngineFactory, backend_client: Client, layout: Keys
) -> None:
    engine = await make_engine(heartbeat_timeout=1, sweep_interval=0.1)
    await register(engine, "d1")
    task = asyncio.create_task(engine.run())
    try:
        async with Listener(backend_client) as listener:
            await engine.connect("d1", "s1", "")
            started = time.monotonic()
            for n in range(3):
                waiter = engine.beat("d1", "s1", orjson.dumps({"n": n}), ack=True)
                assert waiter is not None
                assert await asyncio.wait_for(waiter, TIMEOUT) == n + 1
                await asyncio.sleep(0.3)
            # beats for longer than one timeout kept it online
            assert time.monotonic() - started > 0.9
            assert await backend_client.exists(layout.heartbeat("d1"))
            first = await listener.next()
            assert first[1]["status"] == "online"
            second = await listener.next()  # silence: the sweep loop takes it offline
            assert (second[0], second[1]["status"], second[1]["reason"]) == (
                layout.of("d1").presence_channel, "offline", "expired",
            )  # fmt: skip
            ended = engine.end("d1", "s1", "closed")
            assert await asyncio.wait_for(ended, TIMEOUT) == 0  # already offline
            assert await listener.presence() == []
    finally:
        await cancel_and_wait(task)


@single_node  # the seed document's classes write across slots: one node only
async def test_a_renewed_lapse_puts_the_device_back_in_the_seeds_online_set(
    engine: PresenceEngine, backend_client: Client, backend_url: str,
    seed: types.SimpleNamespace,
) -> None:  # fmt: skip
    """The seed's detector may remove a lapsed device from `devices:online` before our beat
    renews it; the seed's readers (BulkStateQuery) must then see it online again."""
    await register(engine, "d1")
    await engine.connect("d1", "s1", "")
    await backend_client.delete("device:heartbeat:d1")
    with redis.Redis.from_url(backend_url) as sync_client:
        found = await asyncio.to_thread(seed.OfflineDetector(sync_client).check_for_offline_devices)
        assert found == ["d1"]
        await beat(engine, "d1", "s1")
        online = await asyncio.to_thread(
            seed.BulkStateQuery(sync_client).get_devices_by_status, seed.DeviceStatus.ONLINE
        )
    assert await backend_client.exists("device:heartbeat:d1")
    assert online == ["d1"]
    assert await backend_client.hget("device:state:d1", "status") == b"online"


async def test_frames_that_arrive_while_a_tick_is_written_land_before_the_session_ends(
    engine: PresenceEngine, backend_client: Client, layout: Keys
) -> None:
    """A device's last frames and its close arrive while the previous tick is in flight: the
    close must not overtake them (it would clear the session the frames still need)."""
    await register(engine, "d1")
    await engine.connect("d1", "s1", "")
    engine.beat("d1", "s1", orjson.dumps({"seq": 1}))
    in_flight = asyncio.create_task(engine.flush())
    await asyncio.sleep(0)  # the tick has taken its batch and is waiting for Redis
    engine.beat("d1", "s1", orjson.dumps({"seq": 2}))
    ended = engine.end("d1", "s1", "closed")
    await in_flight
    await engine.flush()
    assert await ended == 1
    stored = await backend_client.hget(layout.state("d1"), "reported_state")
    assert orjson.loads(stored or b"{}") == {"seq": 2}
