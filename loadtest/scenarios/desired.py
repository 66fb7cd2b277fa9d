"""Desired changes → devices: how long a change takes to reach its device's socket.

Changes are written the way `PATCH /api/devices/{id}/desired` writes them, by the store's
compare-and-set script (which publishes on the device's command channel), straight from this
process and without HTTP (see `producers.store_command_load`). Each carries a probe: its
creation time, which the device compares with its receive time (`desired_ms`); the gateway's
commit time is in the relayed message (`commit_ms`); and the gateways' own share, from the
message read off Redis to the frame written, comes from their `gateway_relay_seconds`.
"""

from __future__ import annotations

from loadtest import plots, stats
from loadtest.context import Ctx
from loadtest.producers import store_command_load
from loadtest.scenarios.connect import connect_phase

RELAY = "gateway_relay_seconds"


async def desired_latency(ctx: Ctx) -> None:
    """Desired change (store write) → device frame p99.

    --rate changes/s written by the store's script: change → device frame p50/p99, commit →
    frame, the gateways' own relay latency, and lost changes (must be 0).
    """
    opts, m = ctx.opts, ctx.result.metrics
    await connect_phase(ctx)
    fleet = ctx.fleet
    assert fleet is not None and ctx.cluster.redis_url is not None
    ctx.progress_key = "desired_ms"
    relay_before = await ctx.cluster.histogram(RELAY, kind="command")
    mark = ctx.mark()
    statuses = await store_command_load(ctx.cluster.redis_url, ctx.ids, opts.rate, opts.duration)
    sent_ok = statuses.get("200", 0)
    await fleet.wait_for(lambda: fleet.total("probes") >= sent_ok, 5.0)
    received = fleet.total("probes")
    cost = ctx.cost(mark, sent_ok)
    relay = (await ctx.cluster.histogram(RELAY, kind="command")).since(relay_before)
    samples = fleet.samples.get("desired_ms", [])
    latency = stats.summary(samples, "desired_ms")
    latency.update(stats.summary(fleet.samples.get("commit_ms", []), "commit_ms"))
    m.update(
        {
            "rate": opts.rate,
            "changes_via": "Store.patch_section (the API's write path, without HTTP)",
            "patches_ok": sent_ok,
            "patch_statuses": ",".join(f"{k}:{v}" for k, v in sorted(statuses.items())),
            "state_updates_received": received,
            "lost": max(0, sent_ok - received),
            **latency,
            **stats.relay_summary(relay),
            **cost,
        }
    )
    ctx.result.targets += [
        stats.at_most("lost desired changes", 0, max(0, sent_ok - received), ""),
        stats.at_most("desired → device p99", 10, latency["desired_ms_p99"], "ms"),
        stats.at_most("failed desired writes", 0, sum(statuses.values()) - sent_ok, ""),
    ]
    plots.histogram(ctx, "latency", "desired-latency: store write → state_update", samples, "ms")
