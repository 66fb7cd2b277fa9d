"""The dashboard WebSocket (contract §6, docs/dashboard.md) over real sockets, every backend.

"Every event, exactly once" is always judged against the fleet log itself: the ids a dashboard
received after its snapshot cursor must equal an XRANGE of `devices:events` over the same span.
On a cluster the log is one stream per partition: event ids are `<partition>:<stream id>`,
cursors are opaque positions, and order is guaranteed per partition (so per device), which is
what these tests compare; on one node that is the whole stream in order. Waits are bounded by
multiples of TIMEOUT; nothing sleeps and hopes.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import socket
import time
from collections.abc import AsyncIterator
from typing import Any, NamedTuple

import httpx
import orjson
import pytest
from backends import Client
from live import ADMIN_KEY, READ_KEY, LiveGateway, live_gateway
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from gateway.eventlog import Position, format_id

TIMEOUT = 5.0
Frame = dict[str, Any]
StreamId = tuple[int, int]


# --- helpers ------------------------------------------------------------------------


def sid(value: str) -> StreamId:
    ms, _, seq = value.partition("-")
    return int(ms), int(seq or 0)


def where(event_id: str) -> tuple[int, StreamId]:
    """(partition, stream id) of an event id: `ms-seq` on one node, `p:ms-seq` on a cluster."""
    partition, _, entry = event_id.rpartition(":")
    return int(partition or 0), sid(entry)


def by_partition(ids: list[str]) -> dict[int, list[str]]:
    """Event ids per partition, each partition's in the order given."""
    grouped: dict[int, list[str]] = {}
    for event_id in ids:
        grouped.setdefault(where(event_id)[0], []).append(event_id)
    return grouped


def ids_of(events: list[Frame]) -> list[str]:
    return [e["id"] for e in events]


def text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def open_dashboard(gw: LiveGateway, key: str | None = ADMIN_KEY, **kwargs: Any) -> connect:
    query = f"?token={key}" if key is not None else ""
    kwargs.setdefault("max_size", None)
    return connect(f"{gw.ws_url}/ws/dashboard{query}", open_timeout=TIMEOUT, **kwargs)


def open_device(gw: LiveGateway, device_id: str, token: str) -> connect:
    return connect(
        f"{gw.ws_url}/ws/devices/{device_id}",
        additional_headers={"Authorization": f"Bearer {token}"},
        open_timeout=TIMEOUT,
    )


async def receive(ws: ClientConnection, within: float = TIMEOUT) -> Frame:
    return dict(orjson.loads(await asyncio.wait_for(ws.recv(), within)))


async def snapshot(ws: ClientConnection) -> Frame:
    first = await receive(ws)
    assert first["type"] == "snapshot", first
    return first


async def close_code(ws: ClientConnection, within: float = TIMEOUT) -> int | None:
    """Read until the gateway closes the socket; its close code."""
    async with asyncio.timeout(within):
        with contextlib.suppress(ConnectionClosed):
            while True:
                await ws.recv()
    return ws.close_code


def behind(received: list[Frame], wanted: list[str]) -> dict[int, tuple[str, StreamId]]:
    """The partitions of *wanted* whose last event has not arrived, nor a later one (a state
    event may be superseded within a batch): partition → (that event, newest received)."""
    newest: dict[int, StreamId] = {}
    for event in received:
        partition, entry = where(event["id"])
        newest[partition] = max(newest.get(partition, (0, 0)), entry)
    return {
        partition: (ids[-1], newest.get(partition, (0, 0)))
        for partition, ids in by_partition(wanted).items()
        if newest.get(partition, (0, 0)) < where(ids[-1])[1]
    }


class Received(NamedTuple):
    events: list[Frame]
    frames: int  # how many `events` frames carried them
    cursor: str  # the last frame's: where a dashboard that stops here resumes


async def events_through(
    ws: ClientConnection, wanted: list[str], within: float = 3 * TIMEOUT
) -> Received:
    """Every event until those *wanted* have arrived (see `behind`)."""
    assert wanted, "nothing to wait for"
    events: list[Frame] = []
    frames = 0
    cursor = ""
    try:
        async with asyncio.timeout(within):
            while behind(events, wanted):
                frame = await receive(ws, within)
                if frame["type"] != "events":
                    continue
                frames += 1
                events += frame["events"]
                cursor = frame["cursor"]
    except TimeoutError:
        raise AssertionError(
            f"{len(events)} events in {frames} frames in {within} s, still behind in "
            f"(partition: (last wanted, newest received)) {behind(events, wanted)}"
        ) from None
    return Received(events, frames, cursor)


class Collector:
    """Reads a dashboard socket in the background: its events, and how many frames carried them."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.events: list[Frame] = []
        self.frames = 0
        self.others: list[Frame] = []
        self._changed = asyncio.Event()
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        try:
            async for raw in self.ws:
                frame = orjson.loads(raw)
                if frame["type"] == "events":
                    self.frames += 1
                    self.events += frame["events"]
                else:
                    self.others.append(frame)
                self._changed.set()
        except ConnectionClosed:
            pass
        finally:
            self._changed.set()

    async def through(self, wanted: list[str], within: float = 3 * TIMEOUT) -> list[Frame]:
        """Wait until the events *wanted* have arrived (see `behind`); every event so far."""
        assert wanted, "nothing to wait for"
        async with asyncio.timeout(within):
            while behind(self.events, wanted):
                if self._task.done():
                    raise AssertionError(f"socket closed ({self.ws.close_code}) early")
                self._changed.clear()
                await self._changed.wait()
        return self.events

    async def stop(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


async def stream_events(
    redis: Client, gw: LiveGateway, after: str, end: str | None = None
) -> list[Frame]:
    """The log's events after position *after* up to position *end* (default: the end),
    partition by partition, each in stream order (on one node: the stream in order)."""
    keys, log = gw.gateway.keys, gw.gateway.store.events
    start, upto = log.decode(after), None if end is None else log.decode(end)
    async with redis.pipeline(transaction=False) as pipe:
        for part in keys.parts:
            high = "+" if upto is None else format_id(upto[part.number])
            pipe.xrange(part.events, f"({format_id(start[part.number])}", high)
        replies = await pipe.execute()
    events = []
    for part, entries in zip(keys.parts, replies, strict=True):
        prefix = f"{part.number}:" if keys.sharded else ""  # the documented id forms
        events += [
            {"id": prefix + text(i), **orjson.loads(fields[b"event"])} for i, fields in entries
        ]
    return events


async def stream_ids(
    redis: Client, gw: LiveGateway, after: str, end: str | None = None
) -> list[str]:
    return ids_of(await stream_events(redis, gw, after, end))


async def last_id(gw: LiveGateway) -> str:
    """The log's position now (on one node: its last stream id)."""
    return await gw.gateway.store.last_event_id()


def advanced(gw: LiveGateway, position: str, ids: list[str]) -> str:
    """*position* moved past every event in *ids* (on one node: the last of them)."""
    moved = gw.gateway.store.events.decode(position)
    for event_id in ids:
        moved = moved.advanced(*where(event_id))
    return moved.encode()


async def trim_log(redis: Client, gw: LiveGateway) -> None:
    """Empty every partition's stream, as trimming a bounded log does to its oldest events."""
    for part in gw.gateway.keys.parts:
        await redis.xtrim(part.events, maxlen=0)


async def wait_stream_growth(redis: Client, gw: LiveGateway, after: str, count: int) -> list[str]:
    """Wait until at least *count* events follow *after* in the fleet log."""
    deadline = time.monotonic() + 3 * TIMEOUT
    while len(ids := await stream_ids(redis, gw, after)) < count:
        assert time.monotonic() < deadline, f"the stream did not grow by {count} events"
        await asyncio.sleep(0.02)
    return ids


async def cycle(gw: LiveGateway, device_id: str, token: str) -> None:
    """Connect a device and close it: an online and an offline presence event."""
    async with open_device(gw, device_id, token) as ws:
        assert (await receive(ws))["type"] == "welcome"


def assert_delivered(received: list[Frame], written: list[Frame]) -> None:
    """Live delivery: every event in order, except that within a batch a state event may be
    superseded by a later one for the same device and section (it carries the whole section).
    So: an ordered subset of the log (per partition) holding every non-state event and, per
    device and section, the last state event."""
    ids = ids_of(received)
    assert_increasing(ids)
    by_id = {e["id"]: e for e in written}
    assert set(ids) <= set(by_id), "received events that are not in the stream"
    for event in received:
        assert event == by_id[event["id"]]
    must = [e["id"] for e in written if e["type"] != "state"]
    last_state: dict[tuple[str, str], str] = {}
    for e in written:
        if e["type"] == "state":
            last_state[(e["device_id"], e["section"])] = e["id"]
    must += last_state.values()
    missing = sorted(set(must) - set(ids), key=where)
    assert not missing, f"{len(missing)} events never delivered, first {missing[:3]}"


def assert_increasing(ids: list[str]) -> None:
    """Ids strictly increase within each partition (on one node: throughout)."""
    for partition, group in by_partition(ids).items():
        parsed = [where(i)[1] for i in group]
        assert parsed == sorted(set(parsed)), f"stream ids must strictly increase ({partition})"


def assert_same_log_order(received: list[str], written: list[str]) -> None:
    """The same events, in the log's order within each partition (on one node: the same list)."""
    assert by_partition(received) == by_partition(written)


@pytest.fixture
async def gw(backend_url: str) -> AsyncIterator[LiveGateway]:
    async with live_gateway(backend_url) as live:
        yield live


# --- snapshot and live events ------------------------------------------------------


async def test_snapshot_comes_first_with_devices_cursor_and_stats(gw: LiveGateway) -> None:
    store = gw.gateway.store
    tokens = {}
    for name in ("dash-a", "dash-b", "dash-c"):
        _, tokens[name] = await store.register(name, "thermo", {})
    async with open_device(gw, "dash-b", tokens["dash-b"]) as device:
        await receive(device)
        async with open_dashboard(gw) as ws:
            first = await snapshot(ws)
        assert first["cursor"] == await last_id(gw)
    by_id = {d["device_id"]: d for d in first["devices"]}
    assert set(by_id) == {"dash-a", "dash-b", "dash-c"}
    assert by_id["dash-b"]["status"] == "online"
    assert by_id["dash-a"]["status"] == by_id["dash-c"]["status"] == "offline"
    assert by_id["dash-a"]["device_type"] == "thermo"
    assert first["truncated"] is False
    stats = first["stats"]
    assert (stats["registered"], stats["online"], stats["offline"]) == (3, 1, 2)
    assert stats["by_type"]["thermo"]["online"] == 1


async def test_snapshot_cursor_is_the_stream_position(
    gw: LiveGateway, backend_client: Client
) -> None:
    await gw.gateway.store.register("pos-1", "thermo", {})
    async with open_dashboard(gw) as ws:
        first = await snapshot(ws)
    assert first["cursor"] == await last_id(gw)
    registered = await stream_ids(backend_client, gw, "0")
    assert len(registered) == 1
    assert first["cursor"] == advanced(gw, "0", registered)
    assert await stream_ids(backend_client, gw, first["cursor"]) == []


async def test_live_presence_and_state_events_arrive_batched_with_increasing_ids(
    gw: LiveGateway, backend_client: Client
) -> None:
    _, token = await gw.gateway.store.register("live-1", "thermo", {})
    async with open_dashboard(gw) as ws:
        cursor = (await snapshot(ws))["cursor"]
        async with open_device(gw, "live-1", token) as device:
            await receive(device)
            await device.send(
                orjson.dumps({"type": "report", "reported_state": {"t": 21.5}}).decode()
            )
            assert (await receive(device))["type"] == "ack"
        ids = await wait_stream_growth(backend_client, gw, cursor, 3)
        events = (await events_through(ws, ids)).events

    assert ids_of(events) == ids  # one device: one partition, in order
    assert_increasing(ids)
    keys = gw.gateway.keys
    prefix = f"{keys.partition('live-1')}:" if keys.sharded else ""
    assert all(i.startswith(prefix) and ":" not in i.removeprefix(prefix) for i in ids), ids
    online, state, offline = events
    assert (online["type"], online["device_id"], online["status"]) == (
        "presence",
        "live-1",
        "online",
    )
    assert online["reason"] == "connected"
    assert (state["type"], state["section"], state["state"]) == ("state", "reported", {"t": 21.5})
    assert (offline["type"], offline["status"], offline["reason"]) == (
        "presence",
        "offline",
        "closed",
    )
    assert offline["version"] > online["version"]


async def test_ping_is_answered_with_pong(gw: LiveGateway) -> None:
    async with open_dashboard(gw) as ws:
        await snapshot(ws)
        await ws.send('{"type":"ping"}')
        assert await receive(ws) == {"type": "pong"}


# --- subscribe ------------------------------------------------------------------------


async def test_subscribe_filters_by_types_and_ids(gw: LiveGateway, backend_client: Client) -> None:
    store = gw.gateway.store
    _, token_a = await store.register("sub-a", "thermo", {})
    _, token_b = await store.register("sub-b", "thermo", {})
    async with open_dashboard(gw) as ws:
        await snapshot(ws)
        await ws.send(
            orjson.dumps({"type": "subscribe", "types": ["presence"], "ids": ["sub-a"]}).decode()
        )
        assert await receive(ws) == {"type": "subscribed", "types": ["presence"], "ids": ["sub-a"]}
        start = await last_id(gw)
        await cycle(gw, "sub-b", token_b)  # other device: filtered out
        await store.patch_section("sub-a", "reported", {"x": 1})  # other type: filtered out
        await cycle(gw, "sub-a", token_a)
        await wait_stream_growth(backend_client, gw, start, 5)
        written = await stream_events(backend_client, gw, start)
        wanted = [e for e in written if e["type"] == "presence" and e["device_id"] == "sub-a"]
        # ordered delivery: once sub-a's last event is in, everything before it was judged
        events = (await events_through(ws, ids_of(wanted))).events
        await ws.send('{"type":"ping"}')
        assert await receive(ws) == {"type": "pong"}  # and nothing after it slipped through

    assert len(written) == 5
    assert events == wanted
    assert [e["status"] for e in events] == ["online", "offline"]


async def test_subscribe_by_type_only_then_clear(gw: LiveGateway, backend_client: Client) -> None:
    store = gw.gateway.store
    _, token = await store.register("sub-t", "thermo", {})
    async with open_dashboard(gw) as ws:
        await snapshot(ws)
        await ws.send('{"type":"subscribe","types":["state"]}')
        assert await receive(ws) == {"type": "subscribed", "types": ["state"], "ids": None}
        start = await last_id(gw)
        await cycle(gw, "sub-t", token)
        # the offline is written at the next tick: it must come before the state change, so
        # that the last event awaited below is the one the filter keeps
        await wait_stream_growth(backend_client, gw, start, 2)
        await store.patch_section("sub-t", "desired", {"led": "on"})
        await wait_stream_growth(backend_client, gw, start, 3)
        wanted = [e for e in await stream_events(backend_client, gw, start) if e["type"] == "state"]
        events = (await events_through(ws, ids_of(wanted))).events
        await ws.send('{"type":"ping"}')
        assert await receive(ws) == {"type": "pong"}
        assert events == wanted
        assert [e["section"] for e in events] == ["desired"]

        await ws.send('{"type":"subscribe"}')  # no lists: everything again
        assert await receive(ws) == {"type": "subscribed", "types": None, "ids": None}
        start = await last_id(gw)
        await cycle(gw, "sub-t", token)
        ids = await wait_stream_growth(backend_client, gw, start, 2)
        events = (await events_through(ws, ids)).events
        assert ids_of(events) == ids


async def test_subscribe_with_too_many_ids_is_refused(gw: LiveGateway) -> None:
    async with open_dashboard(gw) as ws:
        await snapshot(ws)
        ids = [f"d{i}" for i in range(5000)]
        await ws.send(orjson.dumps({"type": "subscribe", "ids": ids}).decode())
        reply = await receive(ws)
        assert reply["type"] == "error" and reply["code"] == "too_many_ids", reply
        await ws.send('{"type":"ping"}')  # still usable
        assert await receive(ws) == {"type": "pong"}


async def test_subscribe_with_unknown_type_is_an_error(gw: LiveGateway) -> None:
    async with open_dashboard(gw) as ws:
        await snapshot(ws)
        await ws.send('{"type":"subscribe","types":["weather"]}')
        reply = await receive(ws)
        assert reply["type"] == "error" and reply["code"] == "invalid_frame", reply


# --- resume ---------------------------------------------------------------------------


async def test_resume_after_reconnect_replays_exactly_the_missed_events(
    gw: LiveGateway, backend_client: Client
) -> None:
    store = gw.gateway.store
    tokens = {}
    for i in range(4):
        _, tokens[f"res-{i}"] = await store.register(f"res-{i}", "thermo", {})
    async with open_dashboard(gw) as ws:
        start = (await snapshot(ws))["cursor"]
        await cycle(gw, "res-0", tokens["res-0"])  # events this dashboard does see live
        ids = await wait_stream_growth(backend_client, gw, start, 2)
        live = await events_through(ws, ids)
        # the position it got to: past every event it saw (on one node, the last id it saw)
        seen = live.cursor
        assert seen == advanced(gw, start, ids_of(live.events))

    # away: N events, all of them missed
    for _ in range(2):
        before = await last_id(gw)
        await asyncio.gather(*(cycle(gw, name, token) for name, token in tokens.items()))
        await wait_stream_growth(backend_client, gw, before, 8)  # all offline before the next
    await store.patch_section("res-1", "reported", {"fw": "2.0"})
    missed = await wait_stream_growth(backend_client, gw, seen, 2 * 2 * 4 + 1)
    assert len(missed) == 17

    async with open_dashboard(gw) as ws:
        fresh = await snapshot(ws)
        assert fresh["cursor"] == advanced(gw, seen, missed)
        await ws.send(orjson.dumps({"type": "resume", "after": seen}).decode())
        replayed = (await events_through(ws, missed)).events
        await ws.send('{"type":"ping"}')  # nothing else queued before the pong: no duplicates
        assert await receive(ws) == {"type": "pong"}

    assert_same_log_order(ids_of(replayed), missed)
    assert sum(e["type"] == "presence" for e in replayed) == 16


async def test_resume_from_the_cursor_replays_nothing(gw: LiveGateway) -> None:
    await gw.gateway.store.register("res-now", "thermo", {})
    async with open_dashboard(gw) as ws:
        first = await snapshot(ws)
        await ws.send(orjson.dumps({"type": "resume", "after": first["cursor"]}).decode())
        await ws.send('{"type":"ping"}')
        assert await receive(ws) == {"type": "pong"}


async def test_resume_from_a_trimmed_id_gets_a_fresh_snapshot(
    gw: LiveGateway, backend_client: Client
) -> None:
    store = gw.gateway.store
    _, token = await store.register("gap-1", "thermo", {})
    async with open_dashboard(gw) as ws:
        seen = (await snapshot(ws))["cursor"]
    await cycle(gw, "gap-1", token)
    await wait_stream_growth(backend_client, gw, seen, 2)
    await trim_log(backend_client, gw)  # the missed events are gone
    await store.patch_section("gap-1", "reported", {"after": "trim"})

    async with open_dashboard(gw) as ws:
        fresh = await snapshot(ws)
        await ws.send(orjson.dumps({"type": "resume", "after": seen}).decode())
        again = await receive(ws)
        assert again["type"] == "snapshot" and again["reason"] == "resume_gap", again
        assert [d["device_id"] for d in again["devices"]] == ["gap-1"]
        assert again["cursor"] == fresh["cursor"]

        # a position from before the stream's oldest (on one node, the id 1-0): the same answer
        ancient = Position(((1, 0),) * gw.gateway.keys.partitions).encode()
        await ws.send(orjson.dumps({"type": "resume", "after": ancient}).decode())
        third = await receive(ws)
        assert third["type"] == "snapshot" and third["reason"] == "resume_gap", third

        # and live delivery goes on after the fresh snapshot
        start = await last_id(gw)
        await cycle(gw, "gap-1", token)
        ids = await wait_stream_growth(backend_client, gw, start, 2)
        events = (await events_through(ws, ids)).events
        assert ids_of(events) == ids


async def test_resume_when_the_whole_stream_was_trimmed_gets_a_fresh_snapshot(
    gw: LiveGateway, backend_client: Client
) -> None:
    store = gw.gateway.store
    _, token = await store.register("gap-2", "thermo", {})
    async with open_dashboard(gw) as ws:
        seen = (await snapshot(ws))["cursor"]
    await cycle(gw, "gap-2", token)
    await wait_stream_growth(backend_client, gw, seen, 2)
    await trim_log(backend_client, gw)  # nothing after the trim

    async with open_dashboard(gw) as ws:
        await snapshot(ws)
        await ws.send(orjson.dumps({"type": "resume", "after": seen}).decode())
        await ws.send('{"type":"ping"}')
        reply = await receive(ws)
        assert reply["type"] == "snapshot" and reply.get("reason") == "resume_gap", reply


@pytest.mark.parametrize("after", ["yesterday", "12-x", "", "-1", "1-2-3"])
async def test_resume_from_an_invalid_id_is_an_error(gw: LiveGateway, after: str) -> None:
    async with open_dashboard(gw) as ws:
        await snapshot(ws)
        await ws.send(orjson.dumps({"type": "resume", "after": after}).decode())
        reply = await receive(ws)
        assert reply["type"] == "error" and reply["code"] == "invalid_frame", reply
        await ws.send('{"type":"ping"}')
        assert await receive(ws) == {"type": "pong"}


# --- delivery under load --------------------------------------------------------------


async def test_dashboards_joining_during_a_burst_each_get_every_event_after_their_cursor(
    gw: LiveGateway, backend_client: Client
) -> None:
    store = gw.gateway.store
    names = [f"join-{i}" for i in range(8)]
    for name in names:
        await store.register(name, "thermo", {})
    stop = asyncio.Event()

    async def produce(name: str) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            await store.patch_section(name, "reported", {"n": n})
            await store.register(f"{name}-new-{n}", "thermo", {})  # never coalesced

    async with contextlib.AsyncExitStack() as stack:
        producers = [asyncio.create_task(produce(name)) for name in names]
        await asyncio.sleep(0.2)

        async def join(delay: float) -> ClientConnection:
            await asyncio.sleep(delay)
            return await stack.enter_async_context(open_dashboard(gw))

        sockets = await asyncio.gather(*(join(i * 0.015) for i in range(20)))
        cursors = [(await snapshot(ws))["cursor"] for ws in sockets]
        await asyncio.sleep(0.3)
        stop.set()
        await asyncio.gather(*producers)
        final = await last_id(gw)
        written = [await stream_events(backend_client, gw, c, final) for c in cursors]
        assert all(written), "events must have flowed after every snapshot"
        received = await asyncio.gather(
            *(events_through(ws, ids_of(w)) for ws, w in zip(sockets, written, strict=True))
        )

    assert len(set(cursors)) > 1, "the dashboards should have joined at different positions"
    for got, expected in zip(received, written, strict=True):
        assert_delivered(got.events, expected)


async def test_a_high_event_rate_is_coalesced_into_few_frames(
    gw: LiveGateway, backend_client: Client
) -> None:
    """2000 registrations (events that are never superseded) arrive whole, in few frames."""
    store = gw.gateway.store

    async def produce(worker: int) -> None:
        for n in range(40):
            await store.register(f"rate-{worker}-{n}", "thermo", {})

    async with open_dashboard(gw) as ws:
        cursor = (await snapshot(ws))["cursor"]
        collector = Collector(ws)
        began = time.monotonic()
        await asyncio.gather(*(produce(worker) for worker in range(50)))
        written = await stream_ids(backend_client, gw, cursor)
        events = await collector.through(written)
        elapsed = time.monotonic() - began
        await collector.stop()

    assert len(events) == 2000
    assert {e["type"] for e in events} == {"registered"}
    assert_same_log_order(ids_of(events), written)
    # at most one batch per interval (docs/dashboard.md): the first at once, then one per
    # interval that passed; one frame of margin for the clocks' granularity
    interval = gw.gateway.settings.dashboard_batch_interval
    assert collector.frames <= elapsed / interval + 2, (collector.frames, elapsed)
    assert collector.frames * 10 < len(events)


async def test_an_event_after_a_quiet_spell_is_sent_at_once(backend_url: str) -> None:
    """Batches are throttled from the previous one, not ticked: a lone event does not wait
    for the interval, and the next one within the interval waits for it."""
    async with live_gateway(backend_url, dashboard_batch_interval=60.0) as gw:
        store = gw.gateway.store
        async with open_dashboard(gw) as ws:
            await snapshot(ws)
            await store.register("quiet-1", "thermo", {})
            first = await receive(ws)  # within TIMEOUT: far less than the 60 s interval
            assert [e["device_id"] for e in first["events"]] == ["quiet-1"]
            await store.register("quiet-2", "thermo", {})
            with pytest.raises(TimeoutError):  # held for the rest of the interval
                await receive(ws, within=1.0)


async def test_state_events_within_a_batch_keep_each_devices_latest(
    gw: LiveGateway, backend_client: Client
) -> None:
    """Reports faster than the batch interval: the dashboard may skip superseded state events
    but always ends with every device's latest section, and never reorders."""
    store = gw.gateway.store
    names = [f"burst-{i}" for i in range(10)]
    for name in names:
        await store.register(name, "thermo", {})

    async def produce(name: str) -> None:
        for n in range(50):
            await store.patch_section(name, "reported", {"n": n})

    async with open_dashboard(gw) as ws:
        cursor = (await snapshot(ws))["cursor"]
        collector = Collector(ws)
        await asyncio.gather(*(produce(name) for name in names))
        written = await stream_events(backend_client, gw, cursor)
        events = await collector.through(ids_of(written))
        await collector.stop()

    assert len(written) == 500
    assert_delivered(events, written)
    latest = {e["device_id"]: e["state"] for e in events}
    assert latest == {name: {"n": 49} for name in names}


# --- auth and origin ------------------------------------------------------------------


async def test_missing_or_unknown_key_closes_with_4401(gw: LiveGateway) -> None:
    for key in (None, "wrong-key", ""):
        async with open_dashboard(gw, key) as ws:
            assert await close_code(ws) == 4401


async def test_the_read_key_is_enough(gw: LiveGateway) -> None:
    async with open_dashboard(gw, READ_KEY) as ws:
        assert (await snapshot(ws))["type"] == "snapshot"


async def test_the_login_cookie_authenticates_the_socket(gw: LiveGateway) -> None:
    async with httpx.AsyncClient(base_url=gw.base_url) as http:
        response = await http.post("/api/session", json={"api_key": READ_KEY})
        assert response.status_code == 204
        cookie = response.cookies["gateway_session"]
    async with connect(
        f"{gw.ws_url}/ws/dashboard",
        additional_headers={"Cookie": f"gateway_session={cookie}"},
        open_timeout=TIMEOUT,
    ) as ws:
        assert (await snapshot(ws))["type"] == "snapshot"
    async with connect(
        f"{gw.ws_url}/ws/dashboard",
        additional_headers={"Cookie": "gateway_session=forged"},
        open_timeout=TIMEOUT,
    ) as ws:
        assert await close_code(ws) == 4401


async def test_a_foreign_origin_is_refused_before_the_handshake(gw: LiveGateway) -> None:
    with pytest.raises(InvalidStatus) as refused:
        async with open_dashboard(gw, origin="https://evil.example"):  # type: ignore[arg-type]
            pass
    assert refused.value.response.status_code == 403


async def test_the_page_own_origin_is_accepted(gw: LiveGateway) -> None:
    async with open_dashboard(gw, origin=gw.base_url) as ws:  # type: ignore[arg-type]
        assert (await snapshot(ws))["type"] == "snapshot"


async def test_allowed_origins_admit_a_listed_origin(backend_url: str) -> None:
    async with live_gateway(backend_url, allowed_origins=("https://ops.example",)) as gw:
        async with open_dashboard(gw, origin="https://ops.example") as ws:  # type: ignore[arg-type]
            assert (await snapshot(ws))["type"] == "snapshot"
        with pytest.raises(InvalidStatus) as refused:
            async with open_dashboard(gw, origin="https://evil.example"):  # type: ignore[arg-type]
                pass
        assert refused.value.response.status_code == 403


# --- misbehaving clients --------------------------------------------------------------


BAD_FRAMES: list[str | bytes] = ["not json", b"\x00\x01", '{"type":"launch"}', "[]"]


async def test_malformed_frames_are_answered_with_error_frames(backend_url: str) -> None:
    async with live_gateway(backend_url, malformed_tolerance=3) as gw, open_dashboard(gw) as ws:
        await snapshot(ws)
        for frame in BAD_FRAMES[:3]:
            await ws.send(frame)
            reply = await receive(ws)
            assert reply["type"] == "error" and reply["code"] and reply["message"], reply
        await ws.send('{"type":"ping"}')  # within tolerance: still served
        assert await receive(ws) == {"type": "pong"}
        await ws.send(BAD_FRAMES[3])
        with pytest.raises(ConnectionClosed):  # beyond tolerance: closed, no error frame
            await receive(ws)


async def test_too_many_malformed_frames_close_with_4400(backend_url: str) -> None:
    async with live_gateway(backend_url, malformed_tolerance=3) as gw, open_dashboard(gw) as ws:
        await snapshot(ws)
        for frame in BAD_FRAMES:
            await ws.send(frame)
        assert await close_code(ws) == 4400


async def _stalled_socket(gw: LiveGateway) -> socket.socket:
    """A dashboard whose reader never reads: the handshake by hand, then a tiny receive buffer."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", gw.port))
    key = base64.b64encode(os.urandom(16)).decode()
    request = (
        f"GET /ws/dashboard?token={ADMIN_KEY} HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{gw.port}\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    await loop.sock_sendall(sock, request.encode())
    head = b""
    async with asyncio.timeout(TIMEOUT):
        while not head.endswith(b"\r\n\r\n"):
            chunk = await loop.sock_recv(sock, 1)  # byte by byte: leave the frames unread
            assert chunk, "connection closed during the handshake"
            head += chunk
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


async def test_a_stalled_dashboard_is_dropped_and_the_others_keep_up(
    backend_url: str, backend_client: Client
) -> None:
    async with live_gateway(backend_url, dashboard_batch_interval=0.02) as gw:
        store = gw.gateway.store
        hub = gw.gateway.dashboards
        names = [f"stall-{i}" for i in range(4)]
        for name in names:
            await store.register(name, "thermo", {})
        blob = "x" * 8_000
        async with open_dashboard(gw) as ws:
            cursor = (await snapshot(ws))["cursor"]
            healthy = Collector(ws)
            stalled = await _stalled_socket(gw)
            try:
                async with asyncio.timeout(12 * TIMEOUT):
                    deadline = time.monotonic() + TIMEOUT
                    while len(hub.dashboards) < 2:  # the stalled one has joined the feed
                        assert time.monotonic() < deadline, "the stalled dashboard never joined"
                        await asyncio.sleep(0.02)
                    n = 0
                    while len(hub.dashboards) > 1:  # until the gateway drops the stalled one
                        n += 1
                        await asyncio.gather(
                            *(
                                store.patch_section(m, "reported", {"b": blob, "n": n})
                                for m in names
                            )
                        )
                written = await stream_events(backend_client, gw, cursor)
                events = await healthy.through(ids_of(written), within=2 * TIMEOUT)  # promptly
                # the dropped socket is closed by the gateway, not left half-open
                assert await _closed_by_peer(stalled)
            finally:
                stalled.close()
                await healthy.stop()
        dropped = gw.gateway.metrics.registry.get_sample_value(
            "gateway_slow_clients_dropped_total", {"kind": "dashboard"}
        )
    assert dropped == 1
    assert_delivered(events, written)


async def _closed_by_peer(sock: socket.socket) -> bool:
    """Drain what the gateway buffered; True once it has closed or reset the connection."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(3 * TIMEOUT):
        while True:
            try:
                if not await loop.sock_recv(sock, 1 << 20):
                    return True
            except ConnectionResetError:
                return True
