"""Fleet events → dashboards: every event on every dashboard, and how late, at a given rate.

D dashboards (and one stalled dashboard that never reads) join; a producer writes presence
transitions straight into Redis with the gateway's own engine (`--events state`: the devices
report state instead). The window is fixed in stream-id milliseconds (Redis's clock, this
machine's) before it opens and sent to the workers, so each dashboard counts its in-window
events as frames arrive, and the stream is counted over exactly the same ids. Latency is the
receive time minus the event's stream-id millisecond; the gateways' own share, from the
batch's oldest event read off Redis to each dashboard's frame written, comes from their
`gateway_relay_seconds`.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from typing import Any

import redis.asyncio as aioredis

from gateway.dashboards import parse_id
from gateway.store import text
from loadtest import plots, stats
from loadtest.context import Ctx
from loadtest.producers import PresenceProducer
from loadtest.scenarios.connect import connect_phase
from loadtest.sim import stream_key

WARMUP_S = 2.0  # producing before the window opens, so it starts in a steady state
SETTLE_S = 30.0  # at most, after the window closes, for its last batches to arrive
STREAM_READ_S = 2.0  # the fleet stream is counted this often while the window runs
RELAY = "gateway_relay_seconds"
SLOW = "gateway_slow_clients_dropped_total"


class WindowCount:
    """The fleet stream's entries with ids in [start_ms, end_ms), counted as they are written.

    The stream keeps only the newest ~100,000 entries (`GATEWAY_EVENTS_MAXLEN`), fewer than a
    long window holds, so it is read while the window runs; `lost` says whether the trim ever
    overtook the reading (the count would then be short, and no dashboard could match it).
    """

    def __init__(self, redis: aioredis.Redis, stream: str, start_ms: int, end_ms: int) -> None:
        self.redis = redis
        self.stream = stream
        self.end = str(end_ms - 1)  # an end of only milliseconds takes every sequence in it
        self.start = f"{start_ms}-0"
        self.last: str | None = None
        self.count = 0
        self.lost = False

    async def read(self) -> None:
        oldest = await self.redis.xrange(self.stream, "-", "+", count=1)
        if oldest and parse_id(text(oldest[0][0])) > parse_id(self.last or self.start):
            self.lost = True
        while True:
            start = self.start if self.last is None else f"({self.last}"
            entries = await self.redis.xrange(self.stream, start, self.end, count=10_000)
            if not entries:
                return
            self.count += len(entries)
            self.last = text(entries[-1][0])
            if len(entries) < 10_000:
                return

    async def follow(self) -> None:
        while True:
            await asyncio.sleep(STREAM_READ_S)
            await self.read()


async def sleep_until(wall: float) -> None:
    await asyncio.sleep(max(0.0, wall - time.time()))


async def fanout(ctx: Ctx) -> None:
    """Fleet events → D dashboards: every event, p99.

    D dashboards and a stalled one, presence events at --rate: dashboards with every event,
    event → dashboard p99, the gateways' own relay latency, memory, the stalled one dropped.
    """
    opts, m = ctx.opts, ctx.result.metrics
    redis = ctx.need_redis()
    # its window is counted in one fleet log; the CLI refuses it --cluster
    assert isinstance(redis, aioredis.Redis), "fanout runs on one node"
    slow_before = await ctx.cluster.metric(SLOW, 'kind="dashboard"')
    producer = await start(ctx, redis)
    fleet = ctx.fleet
    assert fleet is not None
    # joined, not only connected: the snapshot (with its cursor) has arrived, and the events
    # after the cursor are then all sent as events
    await fleet.wait_for(
        lambda: fleet.total("dashboard_snapshot") >= opts.dashboards, 30 + opts.dashboards / 10
    )
    ctx.phase = f"producing {opts.fanout_events} events"
    ctx.progress_key = "event_ms"
    producing = asyncio.create_task(producer.run()) if producer is not None else None
    start_ms = int((time.time() + WARMUP_S) * 1000)
    end_ms = start_ms + int(opts.duration * 1000)
    low, high = stream_key(f"{start_ms}-0") - 1, stream_key(f"{end_ms}-0") - 1
    fleet.command("window", low=low, high=high)
    stream = WindowCount(redis, ctx.keys.part(0).events, start_ms, end_ms)
    await sleep_until(start_ms / 1000)
    ctx.phase = "measuring"
    rss0 = ctx.sampler.snapshot()["gateway"].rss_bytes
    relay_before = await ctx.cluster.histogram(RELAY, kind="dashboard")
    mark = ctx.mark()
    following = asyncio.create_task(stream.follow())
    await sleep_until(end_ms / 1000)
    cost = ctx.cost(mark, 0)
    rss1 = ctx.sampler.snapshot()["gateway"].rss_bytes
    ctx.phase = "settling"
    # until every dashboard has had an event past the window (the producer runs on), so a
    # late event is counted with its real latency rather than missed
    caught_up = await fleet.wait_for(
        lambda: fleet.total("dashboards_past_window") >= opts.dashboards, SETTLE_S
    )
    settle_s = time.perf_counter() - mark.at - cost["window_s"]
    relay = (await ctx.cluster.histogram(RELAY, kind="dashboard")).since(relay_before)
    for task in (following, producing):
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    await stream.read()
    slow_after = await ctx.cluster.metric(SLOW, 'kind="dashboard"')
    dashboards_online = fleet.total("dashboards_online")
    await fleet.stop()
    if producer is not None:
        await producer.finish()
        m["producer_max_behind"] = producer.max_behind
    m.update(
        {
            "events": opts.fanout_events,
            "dashboards": opts.dashboards,
            "dashboards_online_at_end": dashboards_online,
            "stream_trimmed_before_counted": stream.lost,
            "all_past_window_at_stop": caught_up,
            "settle_s": round(settle_s, 3),
            "stalled_dashboard": opts.stalled_dashboard,
            "stalled_dropped_by_gateway": slow_after - slow_before,
            "gateway_rss_growth_mib": round((rss1 - rss0) / 2**20, 2),
        }
    )
    figures(ctx, stream.count, cost, relay)


async def start(ctx: Ctx, redis: aioredis.Redis) -> PresenceProducer | None:
    """The dashboards' fleet, and the producer of presence events (None: devices report)."""
    opts = ctx.opts
    if opts.fanout_events != "presence":
        await connect_phase(
            ctx,
            send_interval=opts.devices / opts.rate,
            dashboards=opts.dashboards,
            stalled=opts.stalled_dashboard,
        )
        return None
    await ctx.register(opts.devices)
    await ctx.start_fleet(
        dashboards=opts.dashboards, stalled=opts.stalled_dashboard, with_devices=False
    )
    ctx.go()
    ctx.result.metrics["devices"] = len(ctx.ids)
    return PresenceProducer(redis, ctx.ids, opts.rate, opts.duration + 600)


def figures(ctx: Ctx, expected: int, cost: dict[str, Any], relay: stats.Buckets) -> None:
    """What each dashboard counted against the stream's *expected* count, and the targets."""
    opts, m = ctx.opts, ctx.result.metrics
    fleet = ctx.fleet
    assert fleet is not None
    counts: list[int] = []
    max_latency = 0.0
    for final in fleet.finals.values():
        counts += final["dash_counts"]
        max_latency = max(max_latency, final["dash_max_latency_ms"])
    complete = sum(1 for c in counts if c == expected)
    delivered = sum(counts)
    messages = expected + delivered
    cost["messages"] = messages
    for who in ("gateway", "redis"):
        cost[f"{who}_cpu_s_per_1k_msgs"] = round(cost[f"{who}_cpu_s"] * 1000 / max(messages, 1), 5)
    samples = fleet.samples.get("event_ms", [])
    latency = stats.summary(samples, "event_ms")
    rss_timeline = [p["gateway_rss_mib"] for p in ctx.sampler.timeline]
    rate = round(expected / opts.duration, 1)
    m.update(
        {
            "event_rate": rate,
            "events_in_window": expected,
            "events_delivered_in_window": delivered,
            "dashboards_with_every_event": complete,
            "min_events_per_dashboard": min(counts) if counts else 0,
            "max_events_per_dashboard": max(counts) if counts else 0,
            "dashboard_frames_out_of_order": fleet.error_totals().get("dashboard_out_of_order", 0),
            "event_ms_max_all_dashboards": round(max_latency, 3),
            "gateway_rss_max_mib": max(rss_timeline) if rss_timeline else math.nan,
            **latency,
            **stats.relay_summary(relay),
            **cost,
        }
    )
    ctx.result.targets += [
        stats.at_least("dashboards with every event", opts.dashboards, complete, "dashboards"),
        stats.at_least("events/s produced (stream)", round(0.95 * opts.rate, 1), rate, "/s"),
        stats.at_most("event → dashboard p99", 100, latency["event_ms_p99"], "ms"),
        stats.at_most("gateway RSS growth in window", 50, m["gateway_rss_growth_mib"], "MiB"),
        stats.at_most("frames out of order", 0, m["dashboard_frames_out_of_order"], ""),
    ]
    if opts.stalled_dashboard:
        dropped = m["stalled_dropped_by_gateway"]
        ctx.result.targets.append(stats.at_least("stalled dashboard dropped", 1, dropped, ""))
    plots.timeline(ctx, "rss", "fanout: gateway RSS", ["gateway_rss_mib"], "MiB",
                   ["dash_events"], "events received (all dashboards)")  # fmt: skip
    plots.histogram(ctx, "latency", "fanout: event stream id → dashboard", samples, "ms")
