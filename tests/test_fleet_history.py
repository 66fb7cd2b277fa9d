"""The dashboard's memory, server side, on every layout (one valkey, one redis, a cluster):
the fleet-counts series (one writer per step, bounded, downsampled), the fleet log read
backwards from a position, and the id-prefix search over the device indexes."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest
import redis.asyncio as aioredis
from live import LiveGateway, live_gateway
from redis.asyncio.cluster import RedisCluster

from gateway.backlog import Backlog
from gateway.config import Settings
from gateway.errors import DeviceExists
from gateway.eventlog import Position
from gateway.keys import Keys
from gateway.metrics import Metrics
from gateway.presence import PresenceEngine
from gateway.scripts import Scripts
from gateway.store import Store
from gateway.timeseries import TIERS, FleetSeries

Client = aioredis.Redis | RedisCluster
STEP = 10
PROBLEM = "application/problem+json"


@pytest.fixture
def store(backend_client: Client, layout: Keys) -> Store:
    return Store(backend_client, Settings(), layout, Scripts(layout))


@pytest.fixture
def engine(store: Store) -> PresenceEngine:
    return PresenceEngine(store.redis, store, store.settings, Metrics(), lambda *_: None)


@pytest.fixture
async def gw(backend_url: str) -> AsyncIterator[LiveGateway]:
    async with live_gateway(backend_url, fleet_sample_interval=1) as live:
        yield live


class Fleet:
    """Devices going online and offline through the gateway's own transitions."""

    def __init__(self, engine: PresenceEngine) -> None:
        self.engine = engine
        self.sessions: dict[str, str] = {}

    async def online(self, *ids: str) -> None:
        for device_id in ids:
            self.sessions[device_id] = uuid.uuid4().hex
            assert await self.engine.connect(device_id, self.sessions[device_id], "")

    async def offline(self, *ids: str) -> None:
        ends = [(device_id, self.sessions.pop(device_id)) for device_id in ids]
        await self.engine.end_now(ends, "closed", 0)


def series(store: Store, now: list[float], counts: Any = None) -> FleetSeries:
    """A sampler of the store's counts on a clock the test moves (*now*[0])."""
    return FleetSeries(store.redis, store.keys, counts or store.stats, STEP, lambda: now[0])


async def points(client: Client, keys: Keys, tier: str) -> list[dict[str, Any]]:
    rows = await client.zrange(keys.fleet_series(tier), 0, -1)
    return [orjson.loads(row) for row in rows]


# --- the fleet-counts series ------------------------------------------------------------
async def test_each_step_is_written_once_however_many_processes_sample_it(
    store: Store, backend_client: Client, layout: Keys
) -> None:
    for index in range(3):
        await store.register(f"s-{index}", "thermo" if index else "lamp", {})
    now = [1_800_000_000.0]
    samplers = [series(store, now) for _ in range(4)]  # four processes on one Redis
    for number in range(180_000_001, 180_000_008):
        won = await asyncio.gather(*(sampler.sample(number) for sampler in samplers))
        assert sorted(won) == [False, False, False, True], number
    hour = await points(backend_client, layout, "hour")
    assert [p["t"] for p in hour] == [n * STEP for n in range(180_000_001, 180_000_008)]
    assert hour[0]["registered"] == 3 and hour[0]["online"] == 0
    assert hour[0]["by_type"] == {
        "lamp": {"registered": 1, "online": 0},
        "thermo": {"registered": 2, "online": 0},
    }
    # 180,000,006 is a multiple of 6: the day has one point, the week none yet
    assert [p["t"] for p in await points(backend_client, layout, "day")] == [1_800_000_060]
    assert await points(backend_client, layout, "week") == []
    if layout.sharded:  # one slot for the whole series: its own tag, no partition's
        names = [layout.fleet_series(t.name) for t in TIERS] + [layout.fleet_claim(1)]
        assert {name.partition("}")[0] for name in names} == {"{fleet"}


async def test_a_coarse_point_keeps_the_lowest_and_highest_online_count(
    store: Store, engine: PresenceEngine, backend_client: Client, layout: Keys
) -> None:
    ids = [f"m-{index}" for index in range(4)]
    for device_id in ids:
        await store.register(device_id, "meter", {})
    fleet = Fleet(engine)
    now = [0.0]
    sampler = series(store, now)
    first = 60 * 3_000_000  # a multiple of 60: every tier takes a point here
    online_by_step = [1, 4, 2, 0, 3, 2]  # the online count before each of six steps
    await fleet.online(ids[0])
    assert await sampler.sample(first)
    for offset, want in enumerate(online_by_step, start=1):
        have = len(fleet.sessions)
        if want > have:
            await fleet.online(*[i for i in ids if i not in fleet.sessions][: want - have])
        elif want < have:
            await fleet.offline(*list(fleet.sessions)[: have - want])
        assert await sampler.sample(first + offset)
    day = await points(backend_client, layout, "day")
    assert [p["t"] for p in day] == [first * STEP, (first + 6) * STEP]
    latest = day[-1]
    assert (latest["online"], latest["online_min"], latest["online_max"]) == (2, 0, 4)
    assert latest["by_type"] == {"meter": {"registered": 4, "online": 2}}
    hour = await points(backend_client, layout, "hour")
    assert [p["online"] for p in hour] == [1, *online_by_step]
    assert all(p["online_min"] == p["online_max"] == p["online"] for p in hour)


async def test_the_series_stays_bounded_and_reads_only_its_span(
    store: Store, backend_client: Client, layout: Keys
) -> None:
    now = [0.0]

    async def counts() -> dict[str, Any]:
        return {"registered": 1, "online": 1, "offline": 0, "by_type": {}}

    sampler = series(store, now, counts)
    hour = TIERS[0]
    first = 190_000_000
    for number in range(first, first + hour.keep + 25):
        assert await sampler.sample(number)
    kept = await points(backend_client, layout, "hour")
    assert len(kept) == hour.keep  # trimmed at every write
    assert kept[-1]["t"] == (first + hour.keep + 24) * STEP
    now[0] = (first + hour.keep + 24) * STEP + 0.5
    document = orjson.loads(await sampler.read("hour"))
    assert document["step"] == STEP and document["span"] == STEP * hour.keep
    assert len(document["points"]) == hour.keep
    now[0] += 100 * STEP  # later: only what falls within the last hour
    assert len(orjson.loads(await sampler.read("hour"))["points"]) == hour.keep - 100


async def test_many_types_are_capped_per_point(store: Store, layout: Keys) -> None:
    for index in range(20):
        await store.register(f"t-{index:02d}", f"type-{index:02d}", {})
    await store.register("t-extra", "type-00", {})
    sampler = series(store, [0.0])
    assert await sampler.sample(200_000_000)
    [point] = await points(store.redis, layout, "hour")
    assert len(point["by_type"]) == 16 and "type-00" in point["by_type"]
    assert point["others"] == {"types": 4, "registered": 4, "online": 0}


async def test_the_history_endpoint_serves_the_points_the_gateway_samples(
    gw: LiveGateway,
) -> None:
    store = gw.gateway.store
    for index in range(3):
        await store.register(f"h-{index}", "thermo", {})
    async with gw.client() as http:
        async with asyncio.timeout(10):
            while True:
                response = await http.get("/api/stats/history", params={"range": "hour"})
                assert response.status_code == 200, response.text
                document = response.json()
                if len(document["points"]) >= 2 and document["points"][-1]["registered"] == 3:
                    break
                await asyncio.sleep(0.2)
        assert document["range"] == "hour" and document["step"] == 1
        times = [p["t"] for p in document["points"]]
        assert times == sorted(set(times))  # one point per step, oldest first
        for name in ("day", "week"):
            response = await http.get("/api/stats/history", params={"range": name})
            assert response.status_code == 200
            assert response.json()["step"] == {"day": 6, "week": 60}[name]
        refused = await http.get("/api/stats/history", params={"range": "year"})
        assert refused.status_code == 422 and refused.headers["content-type"] == PROBLEM
        assert refused.json()["parameter"] == "range"
    async with gw.client(None) as anonymous:
        assert (await anonymous.get("/api/stats/history")).status_code == 401


async def test_a_process_with_sampling_off_writes_no_point_but_serves_them(
    backend_url: str, backend_client: Client, layout: Keys
) -> None:
    async with live_gateway(backend_url, fleet_sample_interval=1, fleet_sampling=False) as quiet:
        await asyncio.sleep(2.5)  # two step boundaries at least
        assert await backend_client.exists(*(layout.fleet_series(t.name) for t in TIERS)) == 0
        sampler = live_gateway(backend_url, fleet_sample_interval=1)
        async with sampler, quiet.client() as http, asyncio.timeout(10):
            while True:  # the sampling process's points, served by the quiet one
                response = await http.get("/api/stats/history", params={"range": "hour"})
                assert response.status_code == 200, response.text
                if response.json()["points"]:
                    break
                await asyncio.sleep(0.2)


# --- the fleet log read backwards -------------------------------------------------------
async def make_events(store: Store, engine: PresenceEngine, rounds: int) -> None:
    """Presence events with state events between them, on devices in many partitions."""
    fleet = Fleet(engine)
    ids = [f"ev-{index:02d}" for index in range(12)]
    for device_id in [*ids, "ev-busy"]:
        with contextlib.suppress(DeviceExists):
            await store.register(device_id, "thermo", {})
    for round_ in range(rounds):
        for device_id in ids:
            await fleet.online(device_id)
            await store.patch_section(device_id, "reported", {"round": round_})
            await fleet.offline(device_id)
            # one busy device: its partition holds more than one read, between the others
            await fleet.online("ev-busy")
            await fleet.offline("ev-busy")


async def presence_ids(store: Store) -> list[str]:
    """Every presence event id of the log, oldest first (through the forward reader)."""
    ids: list[str] = []
    after = "0-0"
    while True:
        items, last, _ = await store.events_after(after, 1000, frozenset({"presence"}))
        ids += [item["id"] for item in items]
        if last is None or last == after:
            return ids
        after = last


async def test_reading_back_from_a_position_pages_every_presence_event_once(
    store: Store, engine: PresenceEngine, layout: Keys
) -> None:
    await make_events(store, engine, rounds=3)
    everything = await presence_ids(store)
    assert len(everything) == 2 * 12 * 3 * 2
    # reads of 20 per partition: the busy one runs dry inside a page and is read again
    backlog = Backlog(store.events, budget=20 * layout.partitions)
    seen: list[str] = []
    upto: Position | None = await store.position()
    while upto is not None:
        page = await backlog.latest(upto, 50, frozenset({"presence"}))
        assert all(item["type"] == "presence" for item in page.items)
        seen += [item["id"] for item in page.items]
        upto = page.next
    assert len(seen) == len(set(seen))
    assert set(seen) == set(everything)
    # newest first across partitions too, by stream id (the nodes share this machine's clock)
    stamps = [tuple(map(int, event_id.rpartition(":")[2].split("-"))) for event_id in seen]
    assert stamps == sorted(stamps, reverse=True)
    # newest first within each partition (ids of different partitions do not order)
    by_partition: dict[str, list[str]] = {}
    for event_id in seen:
        partition, _, sid = event_id.rpartition(":")
        by_partition.setdefault(partition, []).append(sid)
    for sids in by_partition.values():
        numbers = [tuple(map(int, sid.split("-"))) for sid in sids]
        assert numbers == sorted(numbers, reverse=True)


async def test_before_and_after_a_position_join_without_gap_or_duplicate(
    store: Store, engine: PresenceEngine
) -> None:
    await make_events(store, engine, rounds=1)
    middle = await store.position()  # a snapshot's cursor
    await make_events_more(store, engine)
    older: list[str] = []
    upto: Position | None = middle
    backlog = Backlog(store.events)
    while upto is not None:
        page = await backlog.latest(upto, 50, frozenset({"presence"}))
        older += [item["id"] for item in page.items]
        upto = page.next
    newer: list[str] = []
    after = middle.encode()
    while True:
        items, last, gap = await store.events_after(after, 100, frozenset({"presence"}))
        assert not gap
        newer += [item["id"] for item in items]
        if last is None or last == after:
            break
        after = last
    assert len(older) == 48 and len(newer) == 12
    assert not set(older) & set(newer)
    assert set(older) | set(newer) == set(await presence_ids(store))


async def make_events_more(store: Store, engine: PresenceEngine) -> None:
    fleet = Fleet(engine)
    for index in range(6):
        device_id = f"ev-{index:02d}"
        await fleet.online(device_id)
        await fleet.offline(device_id)


async def test_a_sparse_page_stops_at_its_budget_and_goes_on_from_there(
    store: Store, engine: PresenceEngine, layout: Keys
) -> None:
    await store.register("quiet-1", "thermo", {})
    fleet = Fleet(engine)
    await fleet.online("quiet-1")
    for value in range(300):  # state events bury the presence event
        await store.patch_section("quiet-1", "reported", {"n": value})
    backlog = Backlog(store.events, budget=64)
    upto: Position | None = await store.position()
    pages = []
    while upto is not None:
        page = await backlog.latest(upto, 10, frozenset({"presence"}))
        pages.append(page)
        upto = page.next
    assert len(pages) > 3  # short pages, each within its budget, while more followed
    found = [item for page in pages for item in page.items]
    assert [(item["device_id"], item["status"]) for item in found] == [("quiet-1", "online")]


async def test_the_latest_endpoint_pages_back_and_refuses_what_it_did_not_issue(
    gw: LiveGateway,
) -> None:
    store = gw.gateway.store
    engine = PresenceEngine(
        gw.gateway.redis, store, gw.gateway.settings, Metrics(), lambda *_: None
    )
    await make_events(store, engine, rounds=2)
    everything = set(await presence_ids(store))
    async with gw.client() as http:
        seen: list[str] = []
        params: dict[str, Any] = {"limit": 10}
        while True:
            response = await http.get("/api/presence/latest", params=params)
            assert response.status_code == 200, response.text
            body = response.json()
            assert len(body["items"]) <= 10
            seen += [item["id"] for item in body["items"]]
            if body["next_upto"] is None:
                break
            params = {"limit": 10, "upto": body["next_upto"]}
        assert len(seen) == len(set(seen)) == len(everything)
        assert set(seen) == everything
        for bad, status in (("p1.AAAA", 400), ("9-9-9", 422), ("not a position", 422)):
            refused = await http.get("/api/presence/latest", params={"upto": bad})
            assert refused.status_code in (status, 400), (bad, refused.text)
            assert refused.headers["content-type"] == PROBLEM
        too_many = await http.get("/api/presence/latest", params={"limit": 1001})
        assert too_many.status_code == 422


# --- id-prefix search ---------------------------------------------------------------
async def walk(http: httpx.AsyncClient, **params: Any) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    cursor: str | None = None
    for _ in range(200):
        query = {**params, **({"cursor": cursor} if cursor else {})}
        response = await http.get("/api/devices", params=query)
        assert response.status_code == 200, response.text
        page = response.json()
        assert len(page["items"]) <= int(params.get("limit", 100))
        items += page["items"]
        cursor = page["next_cursor"]
        if cursor is None:
            return items
    raise AssertionError("the walk never ended")


async def test_a_prefix_search_pages_through_matching_ids_with_filters(gw: LiveGateway) -> None:
    store = gw.gateway.store
    names = [f"{head}-{index:02d}" for head in ("pump", "pumpkin", "valve", "PUMP")
             for index in range(15)]  # fmt: skip
    for index, name in enumerate(names):
        await store.register(name, "big" if index % 3 == 0 else "small", {})
    engine = PresenceEngine(
        gw.gateway.redis, store, gw.gateway.settings, Metrics(), lambda *_: None
    )
    online = {name for index, name in enumerate(names) if index % 4 == 0}
    await Fleet(engine).online(*sorted(online))

    def expected(prefix: str, status: str | None = None, kind: str | None = None) -> set[str]:
        return {
            name
            for index, name in enumerate(names)
            if name.startswith(prefix)
            and (status is None or (name in online) == (status == "online"))
            and (kind is None or ("big" if index % 3 == 0 else "small") == kind)
        }

    async with gw.client() as http:
        for prefix in ("pump", "pump-", "pumpk", "PUMP", "v", "x", "pump-07"):
            for status in (None, "online", "offline"):
                for kind in (None, "big"):
                    params: dict[str, Any] = {"prefix": prefix, "limit": 4}
                    if status:
                        params["status"] = status
                    if kind:
                        params["type"] = kind
                    found = await walk(http, **params)
                    ids = [item["device_id"] for item in found]
                    assert len(ids) == len(set(ids)), params
                    assert set(ids) == expected(prefix, status, kind), params
                    for item in found:
                        assert item["status"] == ("online" if item["device_id"] in online
                                                  else "offline")  # fmt: skip
        refused = await http.get("/api/devices", params={"prefix": "bad prefix"})
        assert refused.status_code == 422 and refused.json()["parameter"] == "prefix"
        mixed = await http.get("/api/devices", params={"prefix": "p", "stale_seconds": 1})
        assert mixed.status_code == 422 and mixed.json()["parameter"] == "prefix"
        forged = await http.get("/api/devices", params={"prefix": "p", "cursor": "e30x"})
        assert forged.status_code == 400
