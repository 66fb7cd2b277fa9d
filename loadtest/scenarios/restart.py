"""A gateway restarted under its devices: how fast they are all back, and no false offline."""

from __future__ import annotations

import asyncio
import time

from loadtest import plots, stats
from loadtest.context import Ctx
from loadtest.scenarios.connect import connect_phase


async def reconnect_storm(ctx: Ctx) -> None:
    """Gateway restarted: time until all back, no offline.

    SIGTERM to gateway 0 and a restart on the same port while its devices reconnect: time
    until all are back, reconnect latency, false offline events (0 with a grace).
    """
    opts, m = ctx.opts, ctx.result.metrics
    if not ctx.cluster.started:
        raise SystemExit("loadtest: reconnect-storm restarts a gateway: use --start-gateways G")
    await connect_phase(ctx, rotate=len(ctx.cluster.ports) > 1)
    fleet = ctx.fleet
    assert fleet is not None
    stop_watch = await ctx.watch_presence(set(ctx.ids))
    await asyncio.sleep(1.0)
    ctx.presence.clear()
    reconnects0 = fleet.total("reconnected")
    disconnects0 = fleet.total("disconnects")
    ctx.phase = "restarting gateway 0"
    mark = ctx.mark()
    t_term = time.perf_counter()
    since = time.time()
    old_pid = ctx.cluster.processes[0].pid
    ctx.sampler.retire("gateway", old_pid)
    times: dict[str, float] = {}

    async def restart() -> None:
        await ctx.cluster.stop_gateway(0)
        times["down"] = time.perf_counter()
        await ctx.cluster.spawn(0)
        times["up"] = time.perf_counter()
        ctx.sampler.groups["gateway"] = ctx.cluster.gateway_pids

    restarting = asyncio.create_task(restart())
    n = len(ctx.ids)
    back = await fleet.wait_for(
        lambda: "down" in times and fleet.total("online") >= n and fleet.total("connecting") == 0,
        120,
    )
    t_back = time.perf_counter()
    await restarting
    t_down, t_up = times["down"], times["up"]
    ctx.phase = "settling (false offline check)"
    await asyncio.sleep((opts.offline_grace or 0) + 3 + opts.duration)
    await stop_watch()
    affected = fleet.total("disconnects") - disconnects0
    samples = fleet.samples.get("reconnect_s", [])
    false_offline = ctx.offline_events(since)
    m.update(
        {
            "gateways": len(ctx.cluster.ports),
            "offline_grace_s": opts.offline_grace,
            "gateway_stop_s": round(t_down - t_term, 3),
            "gateway_downtime_s": round(t_up - t_term, 3),
            "all_back": back,
            "all_back_after_sigterm_s": round(t_back - t_term, 3),
            "devices_disconnected": affected,
            "devices_reconnected": fleet.total("reconnected") - reconnects0,
            "false_offline_events": false_offline,
            "presence_events": ",".join(f"{k}:{v}" for k, v in sorted(ctx.presence.items())),
            **stats.summary(samples, "reconnect_s"),
            **ctx.cost(mark, affected),
        }
    )
    ctx.result.targets += [
        stats.at_least("devices back online", n, fleet.total("online"), "devices"),
        stats.at_most("all back after SIGTERM", 30, round(t_back - t_term, 3), "s"),
        stats.at_most("false offline events", 0, false_offline, ""),
    ]
    plots.timeline(ctx, "online", "reconnect-storm: devices online", ["online"], "devices",
                   ["gateway_rss_mib"], "gateway RSS MiB")  # fmt: skip
