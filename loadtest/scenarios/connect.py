"""Connecting devices: the shared connect phase, idle sockets held, and a connect storm."""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

from loadtest import plots, stats
from loadtest.context import Ctx


async def connect_phase(ctx: Ctx, **fleet_kwargs: Any) -> float:
    """Register, start workers, connect every device; returns the connect time in seconds."""
    await ctx.register(ctx.opts.devices)
    await ctx.start_fleet(**fleet_kwargs)
    ctx.rss_before_connect = ctx.sampler.snapshot()["gateway"].rss_bytes
    started = ctx.go()
    ok = await ctx.wait_online(len(ctx.ids), within=120 + len(ctx.ids) / 100)
    elapsed = time.perf_counter() - started
    assert ctx.fleet is not None
    ctx.result.metrics.update(
        {
            "devices": len(ctx.ids),
            "online_after_connect": ctx.fleet.total("online"),
            "connect_time_s": round(elapsed, 3),
            "all_online": ok,
        }
    )
    ctx.phase = "running"
    return elapsed


async def idle(ctx: Ctx) -> None:
    """N idle sockets held: RSS per connection.

    Gateway RSS per connection, Redis RSS per device, connect time.
    """
    opts, m = ctx.opts, ctx.result.metrics
    await ctx.register(opts.devices)
    before = ctx.sampler.snapshot()
    await ctx.start_fleet()
    started = ctx.go()
    ok = await ctx.wait_online(len(ctx.ids), within=120 + len(ctx.ids) / 100)
    connect_s = time.perf_counter() - started
    fleet = ctx.fleet
    assert fleet is not None
    mark = ctx.mark()
    await asyncio.sleep(opts.duration)
    after = ctx.sampler.snapshot()
    online = fleet.total("online")
    beats = fleet.total("sent_heartbeat")
    n = max(online, 1)
    per_conn = (after["gateway"].rss_bytes - before["gateway"].rss_bytes) / n / 1024
    redis_per = (after["redis"].rss_bytes - before["redis"].rss_bytes) / n / 1024
    m.update(
        {
            "devices": len(ctx.ids),
            "online": online,
            "all_online": ok,
            "connect_time_s": round(connect_s, 3),
            "connects_per_s": round(online / connect_s, 1),
            "gateway_rss_before_mib": round(before["gateway"].rss_bytes / 2**20, 2),
            "gateway_rss_after_mib": round(after["gateway"].rss_bytes / 2**20, 2),
            "gateway_rss_per_connection_kib": round(per_conn, 2),
            "redis_rss_per_device_kib": round(redis_per, 2),
            **stats.summary(fleet.samples.get("handshake_ms", []), "handshake_ms"),
            **ctx.cost(mark, beats, "idle_"),
        }
    )
    ctx.result.targets += [
        stats.at_least("devices online", len(ctx.ids), online, "devices"),
        stats.at_most("gateway RSS per connection", 20, round(per_conn, 2), "KiB"),
    ]
    plots.timeline(ctx, "memory", "idle: RSS", ["gateway_rss_mib", "redis_rss_mib"], "MiB",
                   ["online"], "devices online")  # fmt: skip


async def connect_storm(ctx: Ctx) -> None:
    """N devices connect at once: handshakes/s, p99.

    Handshakes per second, and handshake → `welcome` p50/p99, bounded by --connect-concurrency.
    """
    opts, m = ctx.opts, ctx.result.metrics
    await ctx.register(opts.devices)
    await ctx.start_fleet()
    mark = ctx.mark()
    started = ctx.go()
    ok = await ctx.wait_online(len(ctx.ids), within=120 + len(ctx.ids) / 100)
    elapsed = time.perf_counter() - started
    fleet = ctx.fleet
    assert fleet is not None
    welcomed = fleet.total("welcomed")
    cost = ctx.cost(mark, welcomed)
    await asyncio.sleep(opts.duration)
    samples = fleet.samples.get("handshake_ms", [])
    latency = stats.summary(samples, "handshake_ms")
    rate = welcomed / elapsed if elapsed else math.nan
    m.update(
        {
            "devices": len(ctx.ids),
            "online": fleet.total("online"),
            "all_online": ok,
            "connect_time_s": round(elapsed, 3),
            "handshakes_per_s": round(rate, 1),
            "connect_concurrency_per_worker": opts.connect_concurrency,
            **latency,
            **cost,
        }
    )
    ctx.result.targets += [
        stats.at_least("devices online", len(ctx.ids), fleet.total("online"), "devices"),
        stats.at_least("handshake rate", 500, round(rate, 1), "/s"),
        stats.at_most("handshake p99", 2000, latency["handshake_ms_p99"], "ms"),
        stats.at_most("connect failures", 0, fleet.total("connect_failures"), ""),
    ]
    plots.histogram(ctx, "handshake", "connect-storm: handshake → welcome", samples, "ms")
