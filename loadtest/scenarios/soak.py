"""Devices held online for a long time, optionally with desired changes: the moonshot.

With `--cluster` the gateways run on a local Valkey Cluster: the soak starts once every
replica has caught up, the Redis connections each gateway process holds are counted at
steady state, and with `--kill-primary-at` one primary is killed with SIGKILL mid-run; the
devices' sockets must stay open, none may be reported offline, and every accepted desired
change must reach its device.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

from redis.asyncio.cluster import RedisCluster

from gateway.redisconn import CLUSTER_CONCURRENCY
from loadtest import plots, stats
from loadtest.context import Ctx
from loadtest.localcluster import Failover, RunCluster, connection_metrics
from loadtest.producers import Sent, delivery, http_command_load
from loadtest.scenarios.connect import connect_phase

# the connections a gateway process may hold on a cluster: one pub/sub connection per primary
# (the broker's), plus this many for commands, however many devices it serves
# a gateway process's connections to one node: the commands in flight and the two kept for
# topology reads (GatewayCluster's bound), and its one pub/sub connection
PER_NODE_CONNECTIONS = CLUSTER_CONCURRENCY + 2 + 1
PROMOTED_WITHIN_S = 10.0


async def soak(ctx: Ctx, commands: bool = False) -> None:
    """Devices held online for --duration: online, memory.

    N devices heartbeating for --duration: online, memory and offline events over time.
    """
    opts, m = ctx.opts, ctx.result.metrics
    connect_s = await connect_phase(ctx)
    fleet = ctx.fleet
    assert fleet is not None
    n = len(ctx.ids)
    valkey = ctx.cluster.valkey
    if valkey is not None:
        ctx.phase = "waiting for the replicas to catch up"
        m["replica_sync_wait_s"] = round(await valkey.wait_in_sync(), 3)
    stop_watch = await ctx.watch_presence(set(ctx.ids)) if ctx.redis is not None else None
    since = time.time()
    online_max = fleet.total("online")
    rss0 = ctx.sampler.snapshot()
    beats0 = fleet.total("sent_heartbeat")
    mark = ctx.mark()
    ctx.phase = f"soaking {opts.duration:.0f} s"
    online_min = online_max
    command_task: asyncio.Task[Sent] | None = None
    if commands and opts.rate > 0:
        ctx.progress_key = "desired_ms"
        command_task = asyncio.create_task(
            http_command_load(
                ctx.cluster.base_urls, opts.api_key, ctx.ids, opts.rate, opts.duration
            )
        )
    started = time.monotonic()
    end = started + opts.duration
    # connections are counted at steady state: just before the kill, or halfway through
    steady_at = started + (opts.kill_primary_at or opts.duration / 2)
    counted = False
    failover: asyncio.Task[Failover] | None = None
    while time.monotonic() < end:
        await asyncio.sleep(min(1.0, max(0.0, end - time.monotonic())))
        online = fleet.total("online")
        online_max, online_min = max(online_max, online), min(online_min, online)
        if valkey is not None and not counted and time.monotonic() >= steady_at:
            counted = True
            m.update(connection_metrics(await valkey.connections(ctx.cluster.gateway_names)))
            if opts.kill_primary_at is not None:
                failover = asyncio.create_task(kill_primary(ctx, valkey))
    sent = await command_task if command_task is not None else None
    killed: Failover | None = None
    if failover is not None and valkey is not None:
        killed = await failover
        m.update(failover_metrics(killed))
        held = await valkey.connections(ctx.cluster.gateway_names)
        m.update(connection_metrics(held, "after_failover_"))
    redis_online = await ctx.online_in_redis() if ctx.redis is not None else -1
    if stop_watch is not None:
        await stop_watch()
    rss1 = ctx.sampler.snapshot()
    beats = fleet.total("sent_heartbeat") - beats0
    offline = ctx.offline_events(since)
    false_offline = sum(
        1
        for at, event in ctx.presence_log
        if at >= since
        and event.get("status") == "offline"
        and event.get("device_id") not in fleet.lost_sockets
    )
    per_conn = (rss1["gateway"].rss_bytes - ctx.rss_before_connect) / max(online_max, 1) / 1024
    m.update(
        {
            "connect_time_s": round(connect_s, 3),
            "max_online": online_max,
            "min_online_during_soak": online_min,
            "redis_online_set_at_end": redis_online,
            "offline_events": offline,
            "false_offline_events": false_offline,
            "devices_whose_socket_closed": len(fleet.lost_sockets),
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
        stats.at_most("offline events", 0, offline, "")
        if valkey is None
        else stats.at_most("false offline events (socket stayed open)", 0, false_offline, ""),
    ]
    if commands:
        await command_metrics(ctx, sent, killed)
    if valkey is not None:
        cluster_targets(ctx, valkey)
    plots.timeline(ctx, "online", f"{opts.result_name}: online and RSS", ["online"], "devices",
                   ["gateway_rss_mib", "redis_rss_mib"], "MiB")  # fmt: skip


async def command_metrics(ctx: Ctx, sent: Sent | None, killed: Failover | None) -> None:
    """Desired changes the API accepted against those the devices received, and latency;
    when some never arrived, when they were made and whether their devices were the killed
    primary's."""
    fleet, m = ctx.fleet, ctx.result.metrics
    assert fleet is not None
    sent = sent or Sent({}, [])
    accepted = set(sent.accepted)
    await fleet.wait_for(lambda: accepted <= fleet.received_seqs, 5.0)
    latency = stats.summary(fleet.samples.get("desired_ms", []), "command_ms")
    lost = delivery(sent.accepted, fleet.received_seqs, len(ctx.ids))
    missing = [ctx.ids[seq % len(ctx.ids)] for seq in lost.missing]
    if lost.missing:  # change k was made k / rate seconds into the window
        m["commands_missing_made_s"] = (
            f"{lost.missing[0] / ctx.opts.rate:.1f}–{lost.missing[-1] / ctx.opts.rate:.1f}"
        )
        m["commands_missing_devices"] = len(set(missing))
        if killed is not None:
            m["commands_missing_on_killed_primary"] = sum(d in killed.served for d in missing)
    m.update(
        {
            "commands_ok": sent.ok,
            "commands_refused": sum(sent.statuses.values()) - sent.ok,
            "command_statuses": ",".join(f"{k}:{v}" for k, v in sorted(sent.statuses.items())),
            "commands_received": fleet.total("probes"),
            "commands_missing": len(lost.missing),
            "commands_superseded": lost.superseded,
            # received although the API did not accept them (a refusal that wrote anyway)
            "commands_received_not_accepted": len(fleet.received_seqs - accepted),
            **latency,
        }
    )
    ctx.result.targets += [
        stats.at_most("command p99 while running", 1000, latency["command_ms_p99"], "ms"),
        stats.at_most("accepted desired changes missing", 0, len(lost.missing), ""),
    ]
    if m["max_online"] < len(ctx.ids):
        m["limited_by"] = limiting_factor(ctx)


async def kill_primary(ctx: Ctx, valkey: RunCluster) -> Failover:
    """SIGKILL the primary serving most of the run's devices; its CPU so far stays counted."""
    assert isinstance(ctx.redis, RedisCluster)
    node, served = await valkey.busiest_primary(ctx.redis, ctx.keys, ctx.ids)
    ctx.phase = f"primary {node.address} killed; waiting for its replica"
    failover = await valkey.kill_primary(
        node, served, on_kill=lambda pid: ctx.sampler.retire("redis", pid)
    )
    ctx.phase = f"soaking {ctx.opts.duration:.0f} s (after the failover)"
    return failover


def failover_metrics(failover: Failover) -> dict[str, Any]:
    return {
        "killed_primary": failover.victim,
        "killed_primary_devices": len(failover.served),
        "killed_primary_replica_lag_bytes": failover.replica_lag_bytes,
        "replica_promoted_s": None
        if failover.promoted_s is None
        else round(failover.promoted_s, 3),
    }


def cluster_targets(ctx: Ctx, valkey: RunCluster) -> None:
    """Connections per gateway process, and the failover when there was one."""
    m, targets = ctx.result.metrics, ctx.result.targets
    m["cluster_primaries"] = valkey.primaries
    m["cluster_node_timeout_ms"] = valkey.node_timeout_ms
    for prefix, when in (("", "steady"), ("after_failover_", "after the failover")):
        on_one_node = m.get(f"{prefix}redis_connections_per_gateway_node_max")
        if on_one_node is None:
            continue
        targets += [
            stats.at_most(
                f"Redis connections per gateway process and node ({when}, busiest)",
                PER_NODE_CONNECTIONS,
                on_one_node,
                "",
            ),
            stats.at_most(
                f"pub/sub connections per gateway process ({when}, busiest)",
                valkey.primaries,
                m[f"{prefix}redis_pubsub_connections_per_gateway_max"],
                "",
            ),
        ]
    if ctx.opts.kill_primary_at is not None:
        promoted = m.get("replica_promoted_s")
        measured = math.nan if promoted is None else float(promoted)  # NaN: never promoted
        targets.append(
            stats.at_most("replica promoted after kill -9", PROMOTED_WITHIN_S, measured, "s")
        )


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
