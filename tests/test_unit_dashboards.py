"""Dashboard fan-out with real events and positions over in-memory sockets: coalescing,
shared frames, cursors, filters and dashboards out of step with the feed."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

import orjson
import pytest
from asgipeer import Peer, accepted, until
from redis.asyncio import Redis

from gateway import disconnect
from gateway.config import Settings
from gateway.dashboards import FRAME_EVENTS, Dashboard, DashboardHub, Event, close_all, coalesce
from gateway.eventlog import EventLog, Position, parse_id
from gateway.keys import Keys
from gateway.metrics import Metrics
from gateway.writer import Writer

pytestmark = pytest.mark.unit

PARTITIONS = 3


def event(
    partition: int,
    ms: int,
    kind: str = "presence",
    device: str = "d1",
    section: str = "",
    **more: Any,
) -> Event:
    entry_id = f"{ms}-0"
    body: dict[str, Any] = {"type": kind, "device_id": device, **more}
    if section:
        body["section"] = section
    return Event(partition, entry_id, f"{partition}:{entry_id}", orjson.dumps(body))


def ids(events: Sequence[Event]) -> list[str]:
    return [e.id for e in events]


def position(*ms: int) -> Position:
    return Position(tuple((m, 0) for m in ms))


class Screen:
    """One dashboard over an in-memory socket."""

    def __init__(self, dashboard: Dashboard, peer: Peer) -> None:
        self.dashboard = dashboard
        self.peer = peer

    async def frames(self) -> list[dict[str, Any]]:
        """Every frame it got: the socket is closed (normally) first, which sends the queue."""
        self.dashboard.writer.close(disconnect.NORMAL)
        await self.dashboard.writer.wait_closed()
        return [orjson.loads(f) for f in self.peer.frames]


async def screen(hub: DashboardHub, after: Position, limit: int = 64) -> Screen:
    """A dashboard attached to *hub*, that has been sent everything up to *after*."""
    peer = Peer()
    dashboard = Dashboard(Writer(await accepted(peer), limit), after)
    hub.dashboards.add(dashboard)
    return Screen(dashboard, peer)


def cursor(frame: dict[str, Any]) -> Position:
    return Position.decode(frame["cursor"], PARTITIONS)


def covers(at: Position, event_id: str) -> bool:
    """True when resuming from *at* would not deliver the event again."""
    partition, _, entry = event_id.partition(":")
    return at[int(partition)] >= parse_id(entry)


def end_of(events: Sequence[Event]) -> Position:
    at = Position.start(PARTITIONS)
    for e in events:
        at = at.advanced(e.partition, e.sid)
    return at


@pytest.fixture
async def hub() -> AsyncIterator[DashboardHub]:
    redis = Redis()  # never connected: delivery does no I/O
    yield DashboardHub(EventLog(redis, Keys.cluster(partitions=PARTITIONS)), Settings(), Metrics())
    await redis.aclose()


# --- coalescing --------------------------------------------------------------


def test_the_last_state_event_per_device_and_section_wins_and_presence_keeps_its_order() -> None:
    batch = [
        event(0, 1, "state", "d1", "reported", n=1),
        event(0, 2, "presence", "d1", status="online"),
        event(0, 3, "state", "d1", "reported", n=2),
        event(0, 4, "state", "d1", "desired", n=1),
        event(0, 5, "state", "d2", "reported", n=1),
        event(0, 6, "presence", "d1", status="offline"),
        event(0, 7, "registry", "d3"),
        event(0, 8, "state", "d1", "reported", n=3),
    ]
    kept = coalesce(batch)
    assert ids(kept) == ["0:2-0", "0:4-0", "0:5-0", "0:6-0", "0:7-0", "0:8-0"]
    assert orjson.loads(kept[-1].raw)["n"] == 3


def test_a_batch_without_repeated_state_is_kept_whole() -> None:
    batch = [event(0, 1, "state", "d1", "reported"), event(0, 2, "state", "d2", "reported")]
    batch += [event(0, 3, "presence"), event(0, 4, "presence")]
    assert ids(coalesce(batch)) == ids(batch)


# --- delivery ----------------------------------------------------------------


async def test_dashboards_in_step_share_one_frame_whose_cursor_covers_the_whole_batch(
    hub: DashboardHub,
) -> None:
    start = Position.start(PARTITIONS)
    first, second = await screen(hub, start), await screen(hub, start)
    warm_up = [event(0, 10), event(1, 11), event(2, 12)]
    hub.deliver(warm_up)  # now both are where the feed is
    batch = [
        event(0, 20, "state", "d1", "reported", n=1),
        event(1, 21, "presence", "d2"),
        event(0, 22, "state", "d1", "reported", n=2),  # the one above is coalesced away
        event(2, 23, "presence", "d3"),
    ]
    hub.deliver(batch)
    got_first, got_second = await first.frames(), await second.frames()
    assert got_first == got_second
    assert [[e["id"] for e in f["events"]] for f in got_first] == [
        ids(warm_up),
        ["1:21-0", "0:22-0", "2:23-0"],
    ]
    for frame, events in zip(got_first, (warm_up, batch), strict=True):
        assert all(covers(cursor(frame), e.id) for e in events)
    assert cursor(got_first[-1]) == end_of(warm_up + batch)
    assert first.dashboard.after == second.dashboard.after == end_of(warm_up + batch)


async def test_a_dashboard_not_in_step_never_gets_an_event_at_or_before_its_position(
    hub: DashboardHub,
) -> None:
    in_step = await screen(hub, Position.start(PARTITIONS))
    hub.deliver([event(0, 1), event(1, 1), event(2, 1)])
    # joined later, with a snapshot past some of the next batch in two partitions
    ahead = await screen(hub, position(5, 1, 9))
    batch = [event(0, 3), event(0, 5), event(0, 7), event(1, 2), event(2, 8), event(2, 9)]
    batch.append(event(2, 10))
    hub.deliver(batch)
    frames = await ahead.frames()
    got = [e["id"] for f in frames for e in f["events"]]
    assert got == ["0:7-0", "1:2-0", "2:10-0"]
    assert all(covers(cursor(f), i) for f in frames for i in (e["id"] for e in f["events"]))
    assert ahead.dashboard.after == position(7, 2, 10)
    everything = [e["id"] for f in await in_step.frames() for e in f["events"]]
    assert everything[3:] == ids(batch)


async def test_a_filtered_dashboard_gets_only_its_events_and_moves_past_the_rest(
    hub: DashboardHub,
) -> None:
    watcher = await screen(hub, Position.start(PARTITIONS))
    watcher.dashboard.types = frozenset({"presence"})
    watcher.dashboard.ids = frozenset({"d1", "d2"})
    batch = [
        event(0, 1, "presence", "d1"),
        event(1, 2, "state", "d1", "reported"),
        event(2, 3, "presence", "d9"),
        event(1, 4, "presence", "d2"),
        event(0, 5, "registry", "d2"),
    ]
    hub.deliver(batch)
    hub.deliver([event(2, 6, "presence", "d7")])  # nothing it wants: no frame, yet it moves on
    frames = await watcher.frames()
    assert [[e["id"] for e in f["events"]] for f in frames] == [["0:1-0", "1:4-0"]]
    assert cursor(frames[0]) == end_of(batch)  # a resume never replays what it filtered out
    assert watcher.dashboard.after == position(5, 4, 6)


async def test_a_batch_too_big_for_one_frame_is_split_and_each_cursor_stops_at_its_frame(
    hub: DashboardHub,
) -> None:
    batch = [event(i % PARTITIONS, 100 + i, device=f"d{i}") for i in range(2 * FRAME_EVENTS + 5)]
    watcher = await screen(hub, Position.start(PARTITIONS))
    hub.deliver(batch)
    frames = await watcher.frames()
    sizes = [len(f["events"]) for f in frames]
    assert sizes == [FRAME_EVENTS, FRAME_EVENTS, 5]
    for frame, following in zip(frames, [*frames[1:], None], strict=True):
        assert all(covers(cursor(frame), e["id"]) for e in frame["events"])
        if following is not None:  # resuming from this cursor must not skip the next frame
            assert not covers(cursor(frame), following["events"][0]["id"])
    assert cursor(frames[-1]) == end_of(batch)


async def test_a_closed_dashboard_is_dropped_at_the_next_batch(hub: DashboardHub) -> None:
    staying = await screen(hub, Position.start(PARTITIONS))
    leaving = await screen(hub, Position.start(PARTITIONS))
    leaving.dashboard.writer.close(disconnect.NORMAL)
    hub.deliver([event(0, 1)])
    assert hub.dashboards == {staying.dashboard}
    assert hub.metrics.registry.get_sample_value("gateway_dashboards_connected") == 1
    assert await leaving.frames() == []


async def test_a_dashboard_that_cannot_keep_up_is_closed_with_4408_and_the_others_keep_up(
    hub: DashboardHub,
) -> None:
    fast = await screen(hub, Position.start(PARTITIONS))
    slow = await screen(hub, Position.start(PARTITIONS), limit=1)
    slow.peer.reading.clear()
    batches = [[event(0, n, device=f"d{n}")] for n in range(1, 6)]
    for batch in batches:
        hub.deliver(batch)
        await until(lambda: slow.dashboard.writer.closed or slow.peer.waiting == 1)
    assert hub.dashboards == {fast.dashboard}
    await slow.dashboard.writer.wait_closed()
    assert slow.peer.closes == [(4408, "slow_consumer")]
    assert [f["events"][0]["id"] for f in await fast.frames()] == [b[0].id for b in batches]


async def test_replayed_history_is_flagged_as_replay(hub: DashboardHub) -> None:
    watcher = await screen(hub, Position.start(PARTITIONS))
    watcher.dashboard.send_events([event(1, 4)], replay=True)
    assert [(f["replay"], f["cursor"]) for f in await watcher.frames()] == [
        (True, position(0, 4, 0).encode())
    ]


async def test_close_all_closes_every_dashboard_as_gateway_restarting(hub: DashboardHub) -> None:
    screens = [await screen(hub, Position.start(PARTITIONS)) for _ in range(3)]
    close_all(hub)
    for s in screens:
        await s.dashboard.writer.wait_closed()
        assert s.peer.closes == [(1012, "gateway_restarting")]
