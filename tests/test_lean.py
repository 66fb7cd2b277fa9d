"""The lean Redis layout, pinned down on every backend (each single-node engine and the cluster).

What the lean layout saves must cost readers nothing: `last_seen` moves at most once a step in
Redis yet reads back to the millisecond, a repeated document writes nothing, history is a short
bounded list whose ids are the fleet log's, stale queries walk two last-seen indexes merged,
stamps are one number when uniform, and the seed document's classes still read what they read.
Times are controlled through the engine's `beat(..., seen_at=...)`, never by sleeping to a
second boundary; every wait is bounded by a multiple of TIMEOUT.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
import types
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

import orjson
import pytest
import redis
import redis.asyncio as aioredis
from backends import Client, all_keys, node_of, single_node
from live import LiveGateway, live_gateway
from seedcode import NodeSeed
from websockets.asyncio.client import ClientConnection, connect

from gateway.config import Settings
from gateway.eventlog import parse_id
from gateway.keys import OWN_FIELDS, Keys
from gateway.lastseen import INDEX_STEP, step_of
from gateway.metrics import Metrics
from gateway.presence import PresenceEngine, connect_call
from gateway.store import Store

TIMEOUT = 5.0  # the one bound every wait here is a multiple of
POLL = 0.02
HEARTBEAT_TIMEOUT = 10.0  # seconds: long enough that nothing expires while a test looks
TTL_MS = int(HEARTBEAT_TIMEOUT * 1000)
PROBLEMS = "https://presence-gateway.dev/problems/"

Json = dict[str, Any]


# --- helpers: the engine and Redis as it stands ---------------------------------------------
@pytest.fixture
def settings(backend_url: str) -> Settings:
    return Settings(redis_url=backend_url, heartbeat_timeout=HEARTBEAT_TIMEOUT)


@pytest.fixture
def store(backend_client: Client, settings: Settings, layout: Keys) -> Store:
    return Store(backend_client, settings, layout)


@pytest.fixture
def engine(backend_client: Client, store: Store, settings: Settings) -> PresenceEngine:
    return PresenceEngine(backend_client, store, settings, Metrics(), on_stale=lambda *_: None)


@dataclass(frozen=True)
class Seen:
    """A device's last seen as Redis holds it: the hash's field, its score in the online
    last-seen index, and when its heartbeat expires (epoch ms)."""

    last_seen: float
    score: float | None
    expires_at: int


async def seen_in_redis(client: Client, layout: Keys, device_id: str) -> Seen:
    raw = await client.hget(layout.state(device_id), "last_seen")
    score = await client.zscore(layout.of(device_id).online_seen, device_id)
    expires_at = await client.pexpiretime(layout.heartbeat(device_id))
    return Seen(float(raw or 0), score, int(expires_at))


async def hash_field(client: Client, key: str, name: str) -> bytes:
    value = await client.hget(key, name)
    assert isinstance(value, bytes), (key, name, value)
    return value


async def logged(client: Client, key: str, first: str = "-", last: str = "+") -> list[bytes]:
    """The `event` member of every fleet-log entry from *first* to *last*, in order."""
    rows = cast(list[tuple[bytes, dict[bytes, bytes]]], await client.xrange(key, first, last))
    return [body[b"event"] for _, body in rows]


async def renewed_after(client: Client, layout: Keys, device_id: str, since: int) -> Seen:
    """The device's last seen once its heartbeat's expiry has moved past *since* (bounded)."""
    deadline = time.monotonic() + TIMEOUT
    while (seen := await seen_in_redis(client, layout, device_id)).expires_at <= since:
        assert time.monotonic() < deadline, f"the heartbeat of {device_id} was not renewed"
        await asyncio.sleep(POLL)
    return seen


async def eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not await check():
        assert time.monotonic() < deadline, f"not within {TIMEOUT} s: {what}"
        await asyncio.sleep(POLL)


# --- helpers: a gateway and its devices -----------------------------------------------------
def text(kind: str, **fields: Any) -> str:
    return orjson.dumps({"type": kind, **fields}).decode()


async def api(gw: LiveGateway, method: str, path: str, **kwargs: Any) -> Any:
    async with gw.client() as http:
        response = await http.request(method, path, **kwargs)
    assert response.status_code < 300, (response.status_code, response.text)
    return response.json()


@contextlib.asynccontextmanager
async def device(gw: LiveGateway, device_id: str, token: str) -> AsyncIterator[ClientConnection]:
    """A device socket whose welcome has been read."""
    async with connect(
        f"{gw.ws_url}/ws/devices/{device_id}",
        additional_headers={"Authorization": f"Bearer {token}"},
        open_timeout=TIMEOUT,
    ) as ws:
        welcome = orjson.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
        assert welcome["type"] == "welcome", welcome
        yield ws


async def receive_type(ws: ClientConnection, kind: str) -> Json:
    """The next frame of *kind*, skipping others (bounded)."""
    async with asyncio.timeout(TIMEOUT):
        while True:
            frame: Json = orjson.loads(await ws.recv())
            if frame.get("type") == kind:
                return frame


request_ids = itertools.count()


async def synced(ws: ClientConnection) -> Json:
    """Send a `get` and read its answer: every earlier frame of the device is in Redis then."""
    request_id = next(request_ids)
    await ws.send(text("get", id=request_id))
    shadow = await receive_type(ws, "shadow")
    assert shadow["id"] == request_id, shadow
    return shadow


# --- last_seen moves at most once a step, and never back -------------------------------------
@pytest.mark.parametrize("reporting", [False, True], ids=["bare", "reporting"])
async def test_last_seen_moves_once_a_step_and_never_back(
    engine: PresenceEngine, backend_client: Client, layout: Keys, reporting: bool
) -> None:
    """Bare beats (heartbeat_batch) and beats with a new document (report_batch) alike."""
    await engine.store.register("d1", "t", {})
    assert await engine.connect("d1", "s", "") is not None
    documents = itertools.count()

    async def beat_at(seen_at: float) -> Seen:
        await asyncio.sleep(0.005)  # PEXPIRETIME counts milliseconds: let one pass
        reported = orjson.dumps({"n": next(documents)}) if reporting else None
        waiter = engine.beat("d1", "s", reported, ack=True, seen_at=seen_at)
        await engine.flush()
        assert waiter is not None and await waiter >= 0
        return await seen_in_redis(backend_client, layout, "d1")

    # a step after the connect's (in the near future: the engine takes the frame's word)
    first = step_of(time.time()) + 1
    at = first * INDEX_STEP + 0.25
    moved = await beat_at(at)
    assert (moved.last_seen, moved.score) == (at, at)

    # the same step again: the TTL is renewed, last_seen and its score stay
    renewed = await beat_at(at + 0.5)
    assert (renewed.last_seen, renewed.score) == (at, at)
    assert renewed.expires_at > moved.expires_at

    # a later step moves both
    later = await beat_at(at + INDEX_STEP)
    assert (later.last_seen, later.score) == (at + INDEX_STEP, at + INDEX_STEP)
    assert later.expires_at > renewed.expires_at

    # an older frame (an earlier step) and a late re-assert never move them back
    older = await beat_at(at + 0.5)
    assert (older.last_seen, older.score) == (at + INDEX_STEP, at + INDEX_STEP)
    late_frame = time.time() - 3
    late = await beat_at(late_frame)
    assert (late.last_seen, late.score) == (at + INDEX_STEP, at + INDEX_STEP)

    # nor forward to the moment of the write, when the re-assert renews a heartbeat key that
    # was lost (Redis restarted): it gets what was left of its TTL, last_seen stays
    await backend_client.delete(layout.heartbeat("d1"))
    lost = await beat_at(late_frame)
    assert (lost.last_seen, lost.score) == (at + INDEX_STEP, at + INDEX_STEP)
    assert abs(lost.expires_at - (late_frame * 1000 + TTL_MS)) < 100


async def test_a_lost_key_renewed_keeps_last_seen_in_the_node_classes_units(
    redis_client: aioredis.Redis,
) -> None:
    """The Node.js classes' layout keeps `lastSeen` in milliseconds: a renewal of a lost key
    in a step already written leaves it exactly as it was (one node by nature)."""
    settings = Settings(heartbeat_timeout=HEARTBEAT_TIMEOUT, seed_schema="node")
    store = Store(redis_client, settings)
    engine = PresenceEngine(redis_client, store, settings, Metrics(), on_stale=lambda *_: None)
    await store.register("d1", "t", {})
    assert await engine.connect("d1", "s", "") is not None
    state, heartbeat = store.keys.state("d1"), store.keys.heartbeat("d1")
    written = await hash_field(redis_client, state, "lastSeen")
    assert written.isdigit()  # milliseconds
    await redis_client.delete(heartbeat)
    late_frame = time.time() - 3
    engine.beat("d1", "s", seen_at=late_frame)
    await engine.flush()
    assert await hash_field(redis_client, state, "lastSeen") == written
    assert abs(await redis_client.pexpiretime(heartbeat) - (late_frame * 1000 + TTL_MS)) < 100


@pytest.mark.parametrize("grace", [0.0, 30.0], ids=["at-once", "after-a-grace"])
async def test_last_seen_never_steps_back_when_the_session_ends(
    backend_url: str, backend_client: Client, layout: Keys, grace: float
) -> None:
    """Within a step the hash trails the latest frame; ending the session writes what the
    heartbeat's expiry says, so the device's last seen reads the same before and after."""
    settings = Settings(
        redis_url=backend_url, heartbeat_timeout=HEARTBEAT_TIMEOUT, offline_grace=grace
    )
    store = Store(backend_client, settings, layout)
    engine = PresenceEngine(backend_client, store, settings, Metrics(), lambda *_: None)
    await store.register("d1", "t", {})
    assert await engine.connect("d1", "s", "") is not None
    stored = float(await hash_field(backend_client, layout.state("d1"), "last_seen"))
    await asyncio.sleep(0.05)
    # a frame of the connect's step: the TTL is renewed now, last_seen stays in the hash
    engine.beat("d1", "s", seen_at=stored)
    await engine.flush()
    before = (await store.require("d1")).last_seen
    assert before > stored  # read back from the heartbeat, past what the hash holds
    await engine.end_now([("d1", "s")], "closed", grace)
    after = float(await hash_field(backend_client, layout.state("d1"), "last_seen"))
    assert after == before
    assert (await store.require("d1")).last_seen == before


# --- reads put back what the step leaves out: last_seen to the millisecond -------------------
async def read_last_seen(gw: LiveGateway, device_id: str) -> list[float]:
    """last_seen as Store.get, GET /api/devices/{id} and a page item each say."""
    stored = await gw.gateway.store.get(device_id)
    assert stored is not None
    document = await api(gw, "GET", f"/api/devices/{device_id}")
    page = await api(gw, "GET", "/api/devices", params={"limit": 1000})
    (item,) = [item for item in page["items"] if item["device_id"] == device_id]
    return [stored.last_seen, document["last_seen"], item["last_seen"]]


async def test_reads_report_last_seen_to_the_millisecond(
    backend_url: str, backend_client: Client, layout: Keys
) -> None:
    async with live_gateway(backend_url, heartbeat_timeout=HEARTBEAT_TIMEOUT) as gw:
        token = await gw.register("r-1")
        async with device(gw, "r-1", token) as ws:
            # frames until one renewed the TTL in a step already written (the first, unless a
            # second boundary fell between it and the connect)
            for _ in range(int(TIMEOUT / POLL)):
                sent = time.time()
                await ws.send(text("heartbeat"))
                await synced(ws)
                seen = await seen_in_redis(backend_client, layout, "r-1")
                renewed = round((seen.expires_at - TTL_MS) / 1000, 3)
                if renewed > seen.last_seen:
                    break
                await asyncio.sleep(POLL)
            else:
                raise AssertionError("no frame renewed the TTL alone")
            first = await read_last_seen(gw, "r-1")
            await asyncio.sleep(0.05)
            second = await read_last_seen(gw, "r-1")
            # every reader, at any moment, says when the heartbeat was last renewed
            assert first == second == [renewed] * 3
            assert seen.last_seen < renewed <= time.time()
            assert renewed >= round(sent, 3)

        # offline: the stored value, as is
        async def offline() -> bool:
            return bool((await api(gw, "GET", "/api/devices/r-1"))["status"] == "offline")

        await eventually(offline, "the closed device is offline")
        stored = float(await hash_field(backend_client, layout.state("r-1"), "last_seen"))
        assert await read_last_seen(gw, "r-1") == [stored] * 3

        # a heartbeat another program wrote with a longer TTL says nothing of the past: its
        # expiry less the gateway's TTL would be in the future (much, or a little)
        for longer in (TTL_MS * 30, TTL_MS + 300):
            await backend_client.set(layout.heartbeat("r-1"), "1", px=longer)
            assert (await api(gw, "GET", "/api/devices/r-1"))["status"] == "online"
            assert await read_last_seen(gw, "r-1") == [stored] * 3
        assert stored <= time.time()


# --- a repeated document is a bare beat -------------------------------------------------------
@contextlib.asynccontextmanager
async def scripts_run(
    client: Client, key: str
) -> AsyncIterator[Callable[[], Awaitable[list[str]]]]:
    """The SHAs of the scripts that the server holding *key* runs meanwhile, in order (read
    from its slow log, told to keep every command for the while)."""
    async with node_of(client, key) as node:
        saved: dict[Any, Any] = await node.config_get("slowlog-*")
        await node.config_set("slowlog-max-len", 4096)
        await node.config_set("slowlog-log-slower-than", 0)
        await node.slowlog_reset()

        async def shas() -> list[str]:
            entries = await node.slowlog_get(4096)
            commands = [bytes(entry["command"]).split(b" ") for entry in reversed(entries)]
            return [words[1].decode() for words in commands if words[0].upper() == b"EVALSHA"]

        try:
            yield shas
        finally:
            for name, value in saved.items():
                await node.config_set(name, value)
            await node.slowlog_reset()


@dataclass(frozen=True)
class Written:
    """What a device's shadow writes leave in Redis: the hash's shadow fields, its history and
    its state events in the fleet log."""

    fields: list[bytes | str | None]
    history: list[bytes | str]
    state_events: list[bytes]


async def written(client: Client, layout: Keys, device_id: str) -> Written:
    fields = [OWN_FIELDS.version, OWN_FIELDS.reported_version, "reported_state",
              OWN_FIELDS.reported_meta]  # fmt: skip
    values = await client.hmget(layout.state(device_id), fields)
    history = await client.lrange(layout.history(device_id), 0, -1)
    mine: list[bytes] = []
    for raw in await logged(client, layout.of(device_id).events):
        event = orjson.loads(raw)
        if (event["type"], event["device_id"]) == ("state", device_id):
            mine.append(raw)
    return Written(list(values), list(history), mine)


async def test_a_repeated_document_writes_nothing_of_the_shadow(
    backend_url: str, backend_client: Client, layout: Keys
) -> None:
    async with live_gateway(backend_url, heartbeat_timeout=HEARTBEAT_TIMEOUT) as gw:
        scripts = gw.gateway.store.scripts
        token = await gw.register("w-1")
        document = {"t": 1, "u": {"v": 2}}
        async with device(gw, "w-1", token) as ws:
            await ws.send(text("heartbeat", reported_state=document))
            await synced(ws)
            before = await written(backend_client, layout, "w-1")
            assert before.fields[:2] == [b"1", b"1"] and len(before.state_events) == 1

            # the same document again: presence renewed (no other frame is sent meanwhile),
            # nothing of the shadow written, nor even handed to the script that compares
            async with scripts_run(backend_client, layout.state("w-1")) as ran:
                for _ in range(3):
                    expires_before = (await seen_in_redis(backend_client, layout, "w-1")).expires_at
                    await asyncio.sleep(0.005)  # PEXPIRETIME counts milliseconds: let one pass
                    await ws.send(text("heartbeat", reported_state=document))
                    await renewed_after(backend_client, layout, "w-1", expires_before)
                    assert await written(backend_client, layout, "w-1") == before
                shas = await ran()
            assert scripts.heartbeat_batch.sha in shas
            assert scripts.report_batch.sha not in shas

            # a different document is written once, however often it is repeated
            for _ in range(2):
                await ws.send(text("heartbeat", reported_state={"t": 2}))
                await synced(ws)
            changed = await written(backend_client, layout, "w-1")
            assert changed.fields[:3] == [b"2", b"2", b'{"t":2}']
            assert changed.history[1:] == before.history
            assert orjson.loads(changed.history[0])[1:] == ["s", "r", 2, {"t": 2}]
            assert changed.state_events[:-1] == before.state_events

            # a report whose merge changes nothing is acked with the current version
            await ws.send(text("report", reported_state={"t": 2}, id="same"))
            assert await receive_type(ws, "ack") == {"type": "ack", "id": "same", "version": 2}
            assert await written(backend_client, layout, "w-1") == changed


# --- history: a bounded list, newest first, with the fleet log's ids --------------------------
HISTORY_MAXLEN = 8
HISTORY_OVER = HISTORY_MAXLEN + HISTORY_MAXLEN // 8  # the longest the list may grow


def brief(item: Json) -> tuple[Any, ...]:
    """What a history item says, without its id and time."""
    if item["type"] == "presence":
        return ("presence", item["status"], item["version"])
    if item["type"] == "state":
        return ("state", item["section"], item["version"], item["state"])
    return ("metadata", item["metadata"])


def stream_id_of(event_id: str, layout: Keys, device_id: str) -> str:
    """The stream id an event id names, checking its partition on a cluster."""
    if layout.partitions == 1:
        return event_id
    partition, _, stream_id = event_id.partition(":")
    assert partition == str(layout.partition(device_id)), event_id
    return stream_id


async def test_history_is_bounded_newest_first_and_pages_with_the_log_ids(
    backend_url: str, backend_client: Client, layout: Keys
) -> None:
    async with live_gateway(
        backend_url, heartbeat_timeout=HEARTBEAT_TIMEOUT, history_maxlen=HISTORY_MAXLEN
    ) as gw:
        token = await gw.register("h-1")
        key = layout.history("h-1")
        lengths: list[int] = []

        async def desired(n: int) -> None:
            await api(gw, "PATCH", "/api/devices/h-1/desired", json={"state": {"n": n}})
            lengths.append(await backend_client.llen(key))

        for n in range(6):  # versions 1-6
            await desired(n)
        async with device(gw, "h-1", token) as ws:  # online, presence version 1
            for n in range(3):  # versions 7-9
                await ws.send(text("heartbeat", reported_state={"r": n}))
                await synced(ws)
        history = "/api/devices/h-1/history"

        async def offline() -> bool:  # presence version 2
            items = (await api(gw, "GET", history, params={"limit": 1}))["items"]
            return bool(items[0]["type"] == "presence" and items[0]["status"] == "offline")

        await eventually(offline, "the closed device's offline is in its history")
        await api(gw, "PATCH", "/api/devices/h-1", json={"metadata": {"site": "x"}})
        for n in range(6, 9):  # versions 10-12
            await desired(n)

        # 15 entries pushed: trimmed back to 8 whenever it grew past 9, so 9 are left
        assert lengths == [1, 2, 3, 4, 5, 6, 9, 8, 9]
        assert await backend_client.llen(key) == HISTORY_OVER
        page = await api(gw, "GET", history, params={"limit": 500})
        items = page["items"]
        assert page["next_before"] is None
        assert [brief(item) for item in items] == [
            ("state", "desired", 12, {"n": 8}),
            ("state", "desired", 11, {"n": 7}),
            ("state", "desired", 10, {"n": 6}),
            ("metadata", {"site": "x"}),
            ("presence", "offline", 2),
            ("state", "reported", 9, {"r": 2}),
            ("state", "reported", 8, {"r": 1}),
            ("state", "reported", 7, {"r": 0}),
        ]

        # pages with `before` give every entry once, newest first
        pages: list[list[Json]] = []
        before: str | None = None
        while before is not None or not pages:
            params = {"limit": 3} | ({"before": before} if before else {})
            page = await api(gw, "GET", history, params=params)
            pages.append(page["items"])
            before = page["next_before"]
            assert before is None or before == page["items"][-1]["id"]
        assert [len(items) for items in pages] == [3, 3, 2]
        assert [item for items in pages for item in items] == items

        # each id is the event's id in the fleet log, and its time the log's
        for item in items:
            stream_id = stream_id_of(item["id"], layout, "h-1")
            (raw,) = await logged(backend_client, layout.of("h-1").events, stream_id, stream_id)
            event = orjson.loads(raw)
            assert (event["type"], event["device_id"]) == (item["type"], "h-1"), event
            assert event.get("version") == item.get("version"), event
            assert item["timestamp"] == parse_id(stream_id)[0] / 1000
        presence = await api(gw, "GET", "/api/presence/events", params={"after": "0"})
        (offline_event,) = [event for event in items if event["type"] == "presence"]
        (logged_offline,) = [
            event
            for event in presence["items"]
            if event["device_id"] == "h-1" and event["status"] == "offline"
        ]
        assert logged_offline["id"] == offline_event["id"]
        assert logged_offline["version"] == offline_event["version"]


async def test_a_before_this_api_did_not_issue_is_refused(backend_url: str, layout: Keys) -> None:
    async with live_gateway(backend_url) as gw, gw.client() as http:
        await gw.register("h-2")
        not_issued = [
            "18446744073709551615-18446744073709551615",  # past any stream's last id
            f"{layout.partitions}:1-0",  # a partition this layout does not have
        ]
        if layout.partitions > 1:
            not_issued.append("1-0")  # a stream id without its partition
            other = (layout.partition("h-2") + 1) % layout.partitions
            not_issued.append(f"{other}:1-0")  # another partition's event
        cases = [(before, 400, "invalid-cursor") for before in not_issued]
        cases.append(("abc", 422, "invalid-request"))  # not even shaped like an id
        for before, status, kind in cases:
            response = await http.get("/api/devices/h-2/history", params={"before": before})
            assert response.status_code == status, (before, response.text)
            problem = response.json()
            assert problem["type"] == PROBLEMS + kind, (before, problem)
            assert problem["status"] == status


# --- stale queries: two last-seen indexes walked as one, oldest first -------------------------
STALE_TIMEOUT = 600.0  # the sweep leaves devices seen minutes ago alone: their scores stay put


def ids_in(layout: Keys, prefix: str, count: int, partitions: set[int]) -> list[str]:
    """*count* ids of the given partitions (every id on one node): ties share a partition."""
    ids = (f"{prefix}{n:03d}" for n in itertools.count())
    return list(itertools.islice((i for i in ids if layout.partition(i) in partitions), count))


async def walk(gw: LiveGateway, limit: int, **query: Any) -> list[Json]:
    items: list[Json] = []
    cursor = ""
    async with gw.client() as http:
        for _ in range(1000):
            params = {"limit": limit, "cursor": cursor, **query}
            response = await http.get("/api/devices", params=params)
            assert response.status_code == 200, response.text
            page = response.json()
            items += page["items"]
            if page["next_cursor"] is None:
                return items
            cursor = page["next_cursor"]
    raise AssertionError("the cursor walk never ended")


async def test_stale_queries_walk_both_indexes_oldest_first_each_device_once(
    backend_url: str, layout: Keys
) -> None:
    # no sweep: the devices below are last seen minutes ago by their hashes but renewed now
    # by their heartbeat keys, and the sweep's step over the seed's online set would re-score
    # the index from the keys (when its cursor happens to pass them)
    async with live_gateway(
        backend_url, heartbeat_timeout=STALE_TIMEOUT, sweep_interval=3600
    ) as gw:
        store, presence = gw.gateway.store, gw.gateway.presence
        # two partitions on a cluster (the walk goes from one to the next), one on one node
        partitions = {layout.partition("a"), layout.partition("b")}
        never = ids_in(layout, "never-", 3, partitions)
        ties = {
            (group, status): ids_in(layout, f"{status}-{group}-", count, partitions)
            for group, count in ((1, 7), (2, 2))
            for status in ("offline", "online")
        }
        for device_id in never:
            await store.register(device_id, "t", {})
            await asyncio.sleep(0.002)  # registered in distinct milliseconds
        for ids in ties.values():
            for device_id in ids:
                await store.register(device_id, "t", {})
        await store.register("fresh-on", "t", {})
        await store.register("fresh-off", "t", {})

        # last seen minutes ago, identically within each group, through the connect script
        seen_at = {1: float(int(time.time()) - 120) + 0.125, 2: float(int(time.time()) - 60)}
        for (group, status), ids in ties.items():
            for device_id in ids:
                call = connect_call(store, device_id, "s", "", seen_at[group])
                await call.script(store.redis, call.keys, call.args)
                if status == "offline":
                    assert await presence.end(device_id, "s", "closed") == 1
        for device_id in ("fresh-on", "fresh-off"):  # connected now: never stale
            call = connect_call(store, device_id, "s", "", time.time())
            await call.script(store.redis, call.keys, call.args)
        assert await presence.end("fresh-off", "s", "closed") == 1

        def in_order(statuses: set[str]) -> list[str]:
            """Partition by partition: never seen devices (offline; the latest registered
            first), then by last seen, the offline index before the online one, then by id."""
            rank: dict[str, tuple[int, str, int, str]] = {}
            if "offline" in statuses:
                rank |= {device_id: (0, "", -n, "") for n, device_id in enumerate(never)}
            for (group, status), ids in ties.items():
                if status in statuses:
                    rank |= {device_id: (group, status, 0, device_id) for device_id in ids}
            return sorted(
                rank, key=lambda device_id: (layout.partition(device_id), rank[device_id])
            )

        cases: list[tuple[dict[str, str], set[str]]] = [
            ({}, {"offline", "online"}),
            ({"status": "offline"}, {"offline"}),
            ({"status": "online"}, {"online"}),
        ]
        for query, statuses in cases:
            expected = in_order(statuses)
            for limit in (1, 2, 3, 4, 5, 1000):
                items = await walk(gw, limit, stale_seconds=30, **query)
                assert [item["device_id"] for item in items] == expected, (query, limit)
                assert {item["status"] for item in items} == statuses, (query, limit)
        last_seen = {
            item["device_id"]: item["last_seen"] for item in await walk(gw, 1000, stale_seconds=30)
        }
        for (group, _), ids in ties.items():
            assert {last_seen[device_id] for device_id in ids} == {seen_at[group]}
        assert {last_seen[device_id] for device_id in never} == {0}


# --- stamps: one number for a section written whole -------------------------------------------
def stamped(section: Json, at: float) -> Json:
    """Every leaf of *section* stamped *at*, as the API spells stamps out."""
    return {
        key: stamped(value, at) if isinstance(value, dict) and value else {"timestamp": at}
        for key, value in section.items()
    }


async def test_stamps_are_one_number_until_a_patch_stamps_leaves_apart(
    backend_url: str, backend_client: Client, layout: Keys
) -> None:
    async with live_gateway(backend_url, heartbeat_timeout=HEARTBEAT_TIMEOUT) as gw:
        token = await gw.register("st-1")
        state = layout.state("st-1")
        path = "/api/devices/st-1"

        async def stored(field: str) -> Any:
            return orjson.loads(await hash_field(backend_client, state, field))

        # desired, written whole by a patch of an empty section, then in part
        await api(gw, "PATCH", path + "/desired", json={"state": {"a": 1, "b": {"c": 2}}})
        whole = await stored(OWN_FIELDS.desired_meta)
        assert isinstance(whole, float)
        meta = (await api(gw, "GET", path))["shadow_metadata"]
        assert meta["desired"] == stamped({"a": 1, "b": {"c": 2}}, whole)
        await asyncio.sleep(0.002)  # a later millisecond
        await api(gw, "PATCH", path + "/desired", json={"state": {"b": {"c": 3}}})
        apart = await stored(OWN_FIELDS.desired_meta)
        assert apart["a"] == {"timestamp": whole}
        assert apart["b"]["c"]["timestamp"] > whole
        assert (await api(gw, "GET", path))["shadow_metadata"]["desired"] == apart

        # reported, written whole by a heartbeat, then in part by a report
        async with device(gw, "st-1", token) as ws:
            await ws.send(text("heartbeat", reported_state={"x": 1, "y": {"z": 2}}))
            await synced(ws)
            whole = await stored(OWN_FIELDS.reported_meta)
            assert isinstance(whole, float)
            meta = (await api(gw, "GET", path))["shadow_metadata"]
            assert meta["reported"] == stamped({"x": 1, "y": {"z": 2}}, whole)
        # a session that starts from stored stamps keeps the leaves it does not write
        async with device(gw, "st-1", token) as ws:
            await asyncio.sleep(0.002)
            await ws.send(text("report", reported_state={"x": 5}, id=1))
            await receive_type(ws, "ack")
            apart = await stored(OWN_FIELDS.reported_meta)
            assert apart["y"] == {"z": {"timestamp": whole}}
            assert apart["x"]["timestamp"] > whole
            assert (await api(gw, "GET", path))["shadow_metadata"]["reported"] == apart


# --- the seed document's readers beside the lean layout -------------------------------------
async def chatter(ws: ClientConnection) -> float:
    """Frames for more than a step (last_seen moved, though not with every frame); the time
    of the last, once it is in Redis."""
    last_frame = 0.0
    for _ in range(7):
        await asyncio.sleep(0.2)
        last_frame = time.time()
        await ws.send(text("heartbeat"))
    await synced(ws)
    return last_frame


@single_node  # the seed document's classes read across slots: one node only
async def test_seed_readers_see_a_gateway_device_online_and_seen_within_a_second(
    backend_url: str, seed: types.SimpleNamespace
) -> None:
    async with live_gateway(backend_url, heartbeat_timeout=HEARTBEAT_TIMEOUT) as gw:
        token = await gw.register("sd-1")
        await gw.register("sd-2")  # never connected
        async with device(gw, "sd-1", token) as ws:
            last_frame = await chatter(ws)
            with redis.Redis.from_url(backend_url) as client:
                manager = seed.DeviceStateManager(client)
                state = await asyncio.to_thread(manager.get_device_state, "sd-1")
                query = seed.BulkStateQuery(client)
                online = await asyncio.to_thread(
                    query.get_devices_by_status, seed.DeviceStatus.ONLINE
                )
                offline = await asyncio.to_thread(
                    query.get_devices_by_status, seed.DeviceStatus.OFFLINE
                )
                by_type = await asyncio.to_thread(query.get_devices_by_type, "thermo", True)
                gone = await asyncio.to_thread(
                    seed.OfflineDetector(client).check_for_offline_devices
                )
        assert state.status == seed.DeviceStatus.ONLINE
        assert abs(state.last_seen - last_frame) < INDEX_STEP
        assert (online, offline, gone) == (["sd-1"], ["sd-2"], [])
        (listed,) = [entry for entry in by_type if entry["device_id"] == "sd-1"]
        assert listed["status"] == "online"
        assert abs(listed["last_seen"] - last_frame) < INDEX_STEP


async def test_node_readers_see_a_gateway_device_online_and_seen_within_a_second(
    node_seed: NodeSeed, redis_url: str
) -> None:
    """The same through the document's Node.js classes, on their layout (one node only)."""
    async with live_gateway(
        redis_url, heartbeat_timeout=HEARTBEAT_TIMEOUT, seed_schema="node"
    ) as gw:
        token = await gw.register("nd-1")
        async with device(gw, "nd-1", token) as ws:
            last_frame = await chatter(ws)
            state = await node_seed.call("manager", "getDeviceState", "nd-1")
            online = await node_seed.call("manager", "getOnlineDevices")
    assert state["status"] == "online"
    assert abs(state["lastSeen"] / 1000 - last_frame) < INDEX_STEP
    assert online == ["nd-1"]


async def test_the_seed_sets_are_kept_on_one_node_only(
    backend_url: str, backend_client: Client, layout: Keys
) -> None:
    seed_sets = {
        name
        for part in layout.parts
        for name in (part.registered, part.online, part.type_set("lamp"))
    }
    async with live_gateway(backend_url, heartbeat_timeout=HEARTBEAT_TIMEOUT) as gw:
        token = await gw.register("ss-1", "lamp")
        async with device(gw, "ss-1", token) as ws:
            await synced(ws)
            kept = seed_sets & await all_keys(backend_client)
            if layout.partitions == 1:  # one node: the seed's classes read them
                assert kept == seed_sets
                for name in seed_sets:
                    assert await backend_client.smembers(name) == {b"ss-1"}, name
            else:  # a cluster: they could not run there, and nothing else reads them
                assert kept == set()
