"""Devices held online for a long time, optionally with desired changes: the moonshot."""

from __future__ import annotations

import asyncio
import time

from loadtest import plots, stats
from loadtest.context import Ctx
from loadtest.producers import http_command_load
from loadtest.scenarios.connect import connect_phase


async def soak(ctx: Ctx, commands: bool = False) -> None:
    """Devices held online for --duration: online, memory.

    N devices heartbeating for --duration: online, memory and offline events over time.
    """
    opts, m = ctx.opts, ctx.result.metrics
    connect_s = await connect_phase(ctx)
    fleet = ctx.fleet
    assert fleet is not None
    n = len(ctx.ids)
    stop_watch = await ctx.watch_presence(set(ctx.ids)) if ctx.redis is not None else None
    since = time.time()
    online_max = fleet.total("online")
    rss0 = ctx.sampler.snapshot()
    beats0 = fleet.total("sent_heartbeat")
    mark = ctx.mark()
    ctx.phase = f"soaking {opts.duration:.0f} s"
    online_min = online_max
    command_task = None
    if commands and opts.rate > 0:
        ctx.progress_key = "desired_ms"
        command_task = asyncio.create_task(
            http_command_load(
                ctx.cluster.base_urls, opts.api_key, ctx.ids, opts.rate, opts.duration
            )
        )
    end = time.monotonic() + opts.duration
    while time.monotonic() < end:
        await asyncio.sleep(min(1.0, max(0.0, end - time.monotonic())))
        online = fleet.total("online")
        online_max, online_min = max(online_max, online), min(online_min, online)
    statuses = await command_task if command_task is not None else {}
    redis_online = await ctx.redis.scard(ctx.keys.online) if ctx.redis is not None else -1
    if stop_watch is not None:
        await stop_watch()
    rss1 = ctx.sampler.snapshot()
    beats = fleet.total("sent_heartbeat") - beats0
    offline = ctx.offline_events(since)
    per_conn = (rss1["gateway"].rss_bytes - ctx.rss_before_connect) / max(online_max, 1) / 1024
    m.update(
        {
            "connect_time_s": round(connect_s, 3),
            "max_online": online_max,
            "min_online_during_soak": online_min,
            "redis_online_set_at_end": redis_online,
            "offline_events": offline,
            "gateway_rss_before_connect_mib": round(ctx.rss_before_connect / 2**20, 2),
            "gateway_rss_start_mib": round(rss0["gateway"].rss_bytes / 2**20, 2),
            "gateway_rss_end_mib": round(rss1["gateway"].rss_bytes / 2**20, 2),
            "gateway_rss_per_connection_kib": round(per_conn, 2),
            "redis_rss_end_mib": round(rss1["redis"].rss_bytes / 2**20, 2),
            **ctx.cost(mark, beats),
            **ctx.fleet_metrics(),
        }
    )
    ctx.result.targets += [
        stats.at_least("max concurrently online", n, online_max, "devices"),
        stats.at_least("min online during soak", n, online_min, "devices"),
        stats.at_most("offline events", 0, offline, ""),
    ]
    if commands:
        sent_ok = sum(v for k, v in statuses.items() if k.startswith("2"))
        await fleet.wait_for(lambda: fleet.total("probes") >= sent_ok, 5.0)
        latency = stats.summary(fleet.samples.get("desired_ms", []), "command_ms")
        m.update({"commands_ok": sent_ok, "commands_received": fleet.total("probes"), **latency})
        ctx.result.targets.append(
            stats.at_most("command p99 while running", 1000, latency["command_ms_p99"], "ms")
        )
        if online_max < n:
            m["limited_by"] = limiting_factor(ctx)
    plots.timeline(ctx, "online", f"{opts.scenario}: online and RSS", ["online"], "devices",
                   ["gateway_rss_mib", "redis_rss_mib"], "MiB")  # fmt: skip


def limiting_factor(ctx: Ctx) -> str:
    """A best guess, from the errors seen, at what stopped more devices coming online."""
    assert ctx.fleet is not None
    errors = ctx.fleet.error_totals()
    if not errors:
        return "no connect errors: time (connect phase timed out) or CPU"
    name, count = errors.most_common(1)[0]
    hints = {
        "EMFILE": "open-files limit (20,000 per process): more workers/gateways",
        "EADDRNOTAVAIL": "ephemeral ports: more --source-addrs",
        "ECONNREFUSED": "a gateway was not accepting (crashed or restarting)",
        "timeout": "handshakes timing out: gateway or Redis CPU saturated",
        "http_503": "gateway refused (draining or Redis unavailable)",
    }
    return f"{name} ×{count}: {hints.get(name, 'see errors in metrics')}"


async def moonshot(ctx: Ctx) -> None:
    """100,000 devices, 7 gateways, 10 minutes, commands.

    `soak` at 100,000 devices with --rate desired changes through the API.
    """
    await soak(ctx, commands=True)
