"""The store against real servers: registry, shadow CAS, pages and stats.

Concurrency is real: many coroutines and the seed's own blocking classes (in threads) write
the same hash, and no write may be lost. Pub/sub checks end with a sentinel published by the
test itself, so "exactly one" is decided by ordering, never by waiting.
"""

from __future__ import annotations

import asyncio
import threading
import types
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import pytest
import redis
import redis.asyncio as aioredis
from backends import Client, all_keys, dbsize, single_node
from presence_feed import Listener

from gateway.auth import hash_device_token
from gateway.config import Settings
from gateway.errors import DeviceExists, DeviceNotFound, GatewayError
from gateway.keys import OWN_FIELDS, Keys
from gateway.metrics import Metrics
from gateway.presence import PresenceEngine
from gateway.shadow import BadKey, VersionConflict
from gateway.store import Store

TIMEOUT = 10.0  # the one generous bound every wait here is a multiple of


@pytest.fixture
def settings(backend_url: str) -> Settings:
    return Settings(redis_url=backend_url, heartbeat_timeout=5)


@pytest.fixture
def store(backend_client: Client, settings: Settings, layout: Keys) -> Store:
    return Store(backend_client, settings, layout)


@pytest.fixture
async def engine(
    backend_client: Client, store: Store, settings: Settings
) -> AsyncIterator[PresenceEngine]:
    yield PresenceEngine(backend_client, store, settings, Metrics(), on_stale=lambda *_: None)


@pytest.fixture
def sync_client(backend_url: str) -> Any:
    """A blocking client for the seed document's classes (single node only)."""
    with redis.Redis.from_url(backend_url) as client:
        yield client


# --- registry ----------------------------------------------------------------
async def test_register_returns_a_token_and_stores_only_its_hash(
    store: Store, backend_client: Client, layout: Keys
) -> None:
    device, token = await store.register("d1", "thermo", {"room": "kitchen"})
    assert len(token) >= 40
    assert device.device_id == "d1" and device.device_type == "thermo"
    assert device.metadata == {"room": "kitchen"}
    assert (device.status, device.version, device.presence_version) == ("offline", 0, 0)
    stored = await backend_client.hgetall(layout.state("d1"))
    assert stored[OWN_FIELDS.token_hash.encode()] == hash_device_token(token).encode()
    assert all(token.encode() not in value for value in stored.values())
    # the seed's fields, in the seed's format
    for field in (b"registered_at", b"status", b"last_seen", b"reported_state", b"desired_state"):
        assert field in stored
    assert orjson.loads(stored[b"desired_state"]) == {}
    # the seed document's sets: on single-node layouts only
    part = layout.of("d1")
    assert await backend_client.sismember(part.registered, "d1") == layout.seed_sets
    assert await backend_client.sismember(part.type_set("thermo"), "d1") == layout.seed_sets
    assert await backend_client.zscore(part.index, "d1") == 0
    assert await store.check_token("d1", token) == (
        True,
        stored[OWN_FIELDS.token_hash.encode()].decode(),
    )
    assert await store.check_token("d1", "wrong") == (True, None)
    assert await store.check_token("nobody", token) == (False, None)


async def test_register_twice_is_refused(store: Store) -> None:
    _, token = await store.register("d1", "thermo", {})
    with pytest.raises(DeviceExists) as caught:
        await store.register("d1", "other", {})
    assert caught.value.problem == "device-exists"
    assert await store.check_token("d1", token) == (True, hash_device_token(token))


@single_node  # the seed document's classes write across slots: one node only
async def test_register_refuses_an_id_the_seed_registered(
    store: Store, seed: types.SimpleNamespace, sync_client: Any
) -> None:
    await asyncio.to_thread(seed.DeviceStateManager(sync_client).register_device, "s1", "lamp")
    with pytest.raises(DeviceExists):
        await store.register("s1", "lamp", {})
    device = await store.require("s1")
    assert device.device_type == "lamp"


@pytest.mark.parametrize(
    ("device_id", "device_type", "kind"),
    [("a:b", "t", "invalid-device-id"), ("a*", "t", "invalid-device-id"),
     ("x" * 129, "t", "invalid-device-id"), ("ok", "t t", "invalid-device-type")],
)  # fmt: skip
async def test_register_refuses_bad_names_before_writing(
    store: Store, backend_client: Client, device_id: str, device_type: str, kind: str
) -> None:
    with pytest.raises(GatewayError) as caught:
        await store.register(device_id, device_type, {})
    assert caught.value.problem == kind
    assert await dbsize(backend_client) == 0


async def test_register_validates_metadata(store: Store, backend_client: Client) -> None:
    with pytest.raises(BadKey):
        await store.register("d1", "t", {"": 1})
    assert await dbsize(backend_client) == 0


@single_node  # the seed document's classes write across slots: one node only
async def test_get_reads_a_seed_device(
    store: Store, seed: types.SimpleNamespace, sync_client: Any
) -> None:
    manager = seed.DeviceStateManager(sync_client)
    await asyncio.to_thread(manager.register_device, "s1", "lamp", {"floor": 2})
    await asyncio.to_thread(manager.device_heartbeat, "s1", {"on": True})
    device = await store.require("s1")
    assert (device.status, device.reported_state, device.metadata) == (
        "online",
        {"on": True},
        {"floor": 2},
    )
    assert await store.get("missing") is None
    with pytest.raises(DeviceNotFound):
        await store.require("missing")


async def test_delete_removes_every_key_and_index_entry(
    store: Store, engine: PresenceEngine, backend_client: Client, layout: Keys
) -> None:
    await store.register("keep", "thermo", {})
    await store.register("d1", "solo", {})
    await store.patch_section("d1", "desired", {"a": 1})
    await engine.connect("d1", "s1", "")
    part = layout.of("d1")
    zsets = (part.index, part.index_online, part.online_seen)
    # the seed document's sets are kept on single-node layouts only
    plain_sets = (part.registered, part.online, part.type_set("solo")) if layout.seed_sets else ()
    for zset in zsets:  # the names are right: each held the device before
        assert await backend_client.zscore(zset, "d1") is not None, zset
    for plain_set in plain_sets:
        assert await backend_client.sismember(plain_set, "d1"), plain_set
    assert await backend_client.sismember(part.types, "solo")
    assert await backend_client.hget(part.online_by_type, "solo") == b"1"
    before = await all_keys(backend_client)
    await store.delete("d1")
    after = await all_keys(backend_client)
    assert {k for k in before if "d1" in k} == {
        layout.state("d1"), layout.heartbeat("d1"), layout.history("d1"),
    }  # fmt: skip
    assert {k for k in after if "d1" in k} == set()
    for zset in (*zsets, part.offline_seen):
        assert await backend_client.zscore(zset, "d1") is None, zset
    for plain_set in plain_sets:
        assert not await backend_client.sismember(plain_set, "d1"), plain_set
    assert not await backend_client.sismember(part.types, "solo")
    assert await backend_client.hget(part.online_by_type, "solo") is None
    assert part.index_type("solo") in before and part.index_type("solo") not in after
    assert await backend_client.hget(part.retired_versions, "d1") == b"2"
    assert await store.get("d1") is None
    assert (await store.require("keep")).device_id == "keep"
    stats = await store.stats()
    assert (stats["registered"], stats["online"]) == (1, 0)
    assert set(stats["by_type"]) == {"thermo"}


async def test_delete_unknown_device_is_not_found(store: Store) -> None:
    with pytest.raises(DeviceNotFound):
        await store.delete("ghost")


async def test_presence_version_survives_delete_and_re_register(
    store: Store, engine: PresenceEngine, backend_client: Client, layout: Keys
) -> None:
    await store.register("d1", "t", {})
    welcome = await engine.connect("d1", "s1", "")
    assert welcome is not None and welcome.presence_version == 1
    await store.delete("d1")  # offline (deleted): version 2
    device, _ = await store.register("d1", "t", {})
    assert device.presence_version == 2
    assert await backend_client.hget(layout.of("d1").retired_versions, "d1") is None
    welcome = await engine.connect("d1", "s2", "")
    assert welcome is not None and welcome.presence_version == 3


# --- shadow writes -------------------------------------------------------------
async def test_patch_section_merges_and_versions_only_on_change(
    store: Store, backend_client: Client, layout: Keys
) -> None:
    await store.register("d1", "t", {})
    assert await store.patch_section("d1", "desired", {"l": {"on": True, "lvl": 3}}) == (
        (1, 1, 0),
        {"l": {"on": True, "lvl": 3}},
    )
    assert await store.patch_section("d1", "desired", {"l": {"lvl": None}, "x": [1]}) == (
        (2, 2, 0),
        {"l": {"on": True}, "x": [1]},
    )
    assert await store.patch_section("d1", "desired", {"l": {"on": True}}) == (
        (2, 2, 0),
        {"l": {"on": True}, "x": [1]},
    )
    assert await store.patch_section("d1", "desired", {"gone": None}) == (
        (2, 2, 0),
        {"l": {"on": True}, "x": [1]},
    )
    versions, _ = await store.patch_section("d1", "reported", {"l": {"on": False}})
    assert versions == (3, 2, 1)
    versions, metadata = await store.patch_section("d1", "metadata", {"room": "a"})
    assert (versions, metadata) == ((3, 2, 1), {"room": "a"})
    device = await store.require("d1")
    assert device.desired_state == {"l": {"on": True}, "x": [1]}
    assert device.reported_state == {"l": {"on": False}}
    assert set(device.desired_meta) == {"l", "x"}
    assert (await store.delta("d1"))["delta"] == {
        "l": {"on": {"desired": True, "reported": False}},
        "x": {"desired": [1], "reported": None},
    }
    history = await backend_client.llen(layout.history("d1"))
    assert history == 4  # three state changes and one metadata change


async def test_patch_section_refuses_stale_expected_version(store: Store) -> None:
    await store.register("d1", "t", {})
    await store.patch_section("d1", "desired", {"a": 1}, expected_version=0)
    with pytest.raises(VersionConflict) as caught:
        await store.patch_section("d1", "desired", {"a": 2}, expected_version=0)
    assert (caught.value.expected, caught.value.current) == (0, 1)
    assert (await store.require("d1")).desired_state == {"a": 1}
    assert await store.patch_section("d1", "desired", {"a": 2}, expected_version=1) == (
        (2, 2, 0),
        {"a": 2},
    )


async def test_patch_section_checks_the_section_version_apart(store: Store) -> None:
    await store.register("d1", "t", {})
    await store.patch_section("d1", "desired", {"a": 1})
    await store.patch_section("d1", "reported", {"t": 1})
    with pytest.raises(VersionConflict) as caught:
        await store.patch_section("d1", "desired", {"a": 2}, expected_section_version=0)
    conflict = caught.value
    assert (conflict.field, conflict.expected, conflict.current) == ("desired_version", 0, 1)
    assert conflict.versions == (2, 1, 1)
    assert (
        conflict.detail
        == "expected desired_version 0, but the desired state is at desired_version 1"
    )
    # a report moved the shadow, not the desired section: a desired_version still applies
    assert await store.patch_section("d1", "desired", {"a": 2}, expected_section_version=1) == (
        (3, 2, 1),
        {"a": 2},
    )
    with pytest.raises(VersionConflict) as caught:
        await store.patch_section("d1", "reported", {"t": 2}, expected_section_version=0)
    assert (caught.value.field, caught.value.current) == ("reported_version", 1)


async def test_patch_section_unknown_device(store: Store) -> None:
    with pytest.raises(DeviceNotFound):
        await store.patch_section("ghost", "desired", {"a": 1})


async def test_concurrent_patches_all_land(store: Store) -> None:
    await store.register("d1", "t", {})
    results = await asyncio.gather(
        *(store.patch_section("d1", "desired", {f"k{i}": i}) for i in range(20)),
        return_exceptions=True,
    )
    failures = [r for r in results if isinstance(r, BaseException)]
    assert failures == []
    device = await store.require("d1")
    assert device.desired_state == {f"k{i}": i for i in range(20)}
    assert (device.version, device.desired_version) == (20, 20)
    versions = sorted(r[0].version for r in results if not isinstance(r, BaseException))
    assert versions == list(range(1, 21))


class InterleavingRedis(aioredis.Redis):
    """A real client that runs a hook right after its next HMGET: a writer between read and CAS."""

    hook: Callable[[], object] | None = None

    async def hmget(self, *args: Any, **kwargs: Any) -> Any:
        result = await super().hmget(*args, **kwargs)
        hook, self.hook = self.hook, None
        if hook is not None:
            await asyncio.to_thread(hook)
        return result


@single_node  # the seed document's classes write across slots: one node only
async def test_seed_write_between_our_read_and_write_is_not_lost(
    backend_url: str, settings: Settings, seed: types.SimpleNamespace, sync_client: Any
) -> None:
    client = InterleavingRedis.from_url(backend_url)
    assert isinstance(client, InterleavingRedis)
    try:
        store = Store(client, settings)
        await store.register("d1", "t", {})
        manager = seed.DeviceStateManager(sync_client)
        for round_ in range(10):
            client.hook = lambda r=round_: manager.set_desired_state("d1", {f"seed{r}": r})
            await store.patch_section("d1", "desired", {f"ours{round_}": round_})
            assert client.hook is None, "the interleaving hook never ran"
        desired = (await store.require("d1")).desired_state
        assert desired == {f"{who}{r}": r for r in range(10) for who in ("seed", "ours")}
    finally:
        await client.aclose()


@single_node  # the seed document's classes write across slots: one node only
async def test_seed_and_gateway_writing_concurrently_lose_no_seed_write(
    store: Store, seed: types.SimpleNamespace, backend_url: str
) -> None:
    """Threads of seed writes race our patches; every seed write must survive ours.

    (The seed's own read-modify-write can drop ours: that race is the seed's, not ours.)
    """
    await store.register("d1", "t", {})
    rounds = 60
    start = threading.Barrier(2)

    def seed_writer() -> None:
        with redis.Redis.from_url(backend_url) as client:
            manager = seed.DeviceStateManager(client)
            start.wait(TIMEOUT)
            for i in range(rounds):
                manager.set_desired_state("d1", {f"seed{i}": i})

    async def our_writer() -> None:
        await asyncio.to_thread(start.wait, TIMEOUT)
        for i in range(rounds):
            await store.patch_section("d1", "desired", {f"ours{i}": i})

    await asyncio.gather(asyncio.to_thread(seed_writer), our_writer())
    desired = (await store.require("d1")).desired_state
    missing = [f"seed{i}" for i in range(rounds) if desired.get(f"seed{i}") != i]
    assert missing == []


async def test_a_desired_change_is_published_to_the_device(
    store: Store, backend_client: Client, layout: Keys
) -> None:
    await store.register("d1", "t", {})
    async with Listener(backend_client, layout.commands("d1")) as listener:
        await store.patch_section("d1", "desired", {"a": 1})
        await store.patch_section("d1", "desired", {"a": 1})  # unchanged: nothing published
        await store.patch_section("d1", "reported", {"a": 2})  # not a command
        await store.patch_section("d1", "desired", {"b": {"c": True}})
        messages = await listener.drain()
    assert {channel for channel, _ in messages} == {layout.commands("d1")}
    bodies = [body for _, body in messages]
    assert [b["type"] for b in bodies] == ["state_update", "state_update"]
    assert [b["version"] for b in bodies] == [1, 3]
    assert bodies[0]["desired_state"] == {"a": 1}
    assert bodies[1]["desired_state"] == {"a": 1, "b": {"c": True}}
    assert all(isinstance(b["timestamp"], float) for b in bodies)


@single_node  # the seed document's classes write across slots: one node only
async def test_a_semantically_unchanged_patch_of_a_seed_document_is_no_change(
    store: Store, seed: types.SimpleNamespace, sync_client: Any
) -> None:
    await store.register("d1", "t", {})
    await asyncio.to_thread(seed.DeviceStateManager(sync_client).set_desired_state, "d1", {"a": 1})
    # the seed's write is the one change (counted once); ours, the same document, is none
    assert await store.patch_section("d1", "desired", {"a": 1}) == ((1, 1, 0), {"a": 1})
    assert await store.patch_section("d1", "desired", {"a": 1}) == ((1, 1, 0), {"a": 1})


# --- pages and stats -----------------------------------------------------------
async def walk(store: Store, limit: int, **query: Any) -> list[str]:
    ids: list[str] = []
    cursor: str | None = None
    for _ in range(1000):
        page = await store.page(limit=limit, cursor=cursor, **query)
        ids += [item["device_id"] for item in page.items]
        cursor = page.next_cursor
        if cursor is None:
            return ids
    raise AssertionError("the cursor walk never ended")


def page_order(ids: set[str], layout: Keys) -> list[str]:
    """How a walk lists devices: by partition, then by id within each (one partition on one
    node: by id)."""
    return sorted(ids, key=lambda device_id: (layout.partition(device_id), device_id))


async def test_pages_return_every_device_exactly_once(
    store: Store, engine: PresenceEngine, layout: Keys
) -> None:
    everyone = {f"dev-{i:03d}" for i in range(37)}
    online = {f"dev-{i:03d}" for i in range(0, 37, 3)}
    kinds = {device_id: "even" if int(device_id[-3:]) % 2 == 0 else "odd" for device_id in everyone}
    for device_id in sorted(everyone):
        await store.register(device_id, kinds[device_id], {})
    for device_id in online:
        await engine.connect(device_id, "s", "")
    evens = {d for d in everyone if kinds[d] == "even"}
    cases: list[tuple[dict[str, Any], set[str]]] = [
        ({}, everyone),
        ({"status": "online"}, online),
        ({"status": "offline"}, everyone - online),
        ({"device_type": "even"}, evens),
        ({"device_type": "even", "status": "online"}, evens & online),
        ({"device_type": "even", "status": "offline"}, evens - online),
        ({"device_type": "none"}, set()),
    ]
    for query, expected in cases:
        for limit in (1, 7, 1000):
            ids = await walk(store, limit, **query)
            assert ids == page_order(expected, layout), (query, limit)
    page = await store.page(limit=5, include_state=True)
    assert {"reported_state", "desired_state", "metadata", "status"} <= set(page.items[0])
    statuses = {item["device_id"]: item["status"] for item in (await store.page(limit=100)).items}
    assert {d for d, s in statuses.items() if s == "online"} == online


async def test_page_refuses_bad_arguments(store: Store) -> None:
    for kwargs in ({"limit": 0}, {"limit": 1001}, {"cursor": "!!"}, {"device_type": "a:b"}):
        with pytest.raises(GatewayError):
            await store.page(**kwargs)


@single_node  # the seed document's classes write across slots: one node only
async def test_page_includes_seed_devices_once_adopted(
    store: Store, engine: PresenceEngine, seed: types.SimpleNamespace, sync_client: Any
) -> None:
    manager = seed.DeviceStateManager(sync_client)
    await asyncio.to_thread(manager.register_device, "s1", "lamp")
    await asyncio.to_thread(manager.device_heartbeat, "s1")
    await store.register("g1", "lamp", {})
    await engine.sweep()
    assert await walk(store, 10) == ["g1", "s1"]
    assert await walk(store, 10, status="online") == ["s1"]
    assert await walk(store, 10, device_type="lamp", status="offline") == ["g1"]


async def test_stats_count_registered_online_and_types(
    store: Store, engine: PresenceEngine
) -> None:
    for i in range(5):
        await store.register(f"a{i}", "alpha", {})
    for i in range(3):
        await store.register(f"b{i}", "beta", {})
    await engine.connect("a0", "s", "")
    await engine.connect("a1", "s", "")
    await engine.connect("b0", "s", "")
    await engine.connect("b0", "s2", "")  # replaced: still one online
    assert await store.stats() == {
        "registered": 8,
        "online": 3,
        "offline": 5,
        "by_type": {
            "alpha": {"registered": 5, "online": 2, "offline": 3},
            "beta": {"registered": 3, "online": 1, "offline": 2},
        },
    }
    engine.end("a0", "s", "closed")
    await engine.flush()
    stats = await store.stats()
    assert stats["online"] == 2
    assert stats["by_type"]["alpha"] == {"registered": 5, "online": 1, "offline": 4}
