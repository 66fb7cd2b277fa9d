"""Device frames in: the rate one gateway process takes, and every reported state kept."""

from __future__ import annotations

import asyncio
import time

import orjson

from loadtest import plots, stats
from loadtest.context import Ctx
from loadtest.scenarios.connect import connect_phase

CONVERGE_S = 10.0  # at most, after the devices stop, for the last states to be written
READ_BACK = 5000  # devices whose last reported state is read back from Redis


async def ingest(ctx: Ctx) -> None:
    """Device frames/s with reported state, all kept.

    N devices send reported state at an aggregate --rate: msgs/s achieved, frames the gateways
    counted against those sent, every device's last state read back from Redis.
    """
    opts, m = ctx.opts, ctx.result.metrics
    n = opts.devices
    interval = n / opts.rate
    if interval < 1 / 40:
        print(f"warning: {opts.rate / n:.0f} msgs/s per device is near the gateway's rate limit")
    in_before = await ctx.cluster.metric("gateway_messages_in_total")
    await connect_phase(ctx, send_interval=interval)
    fleet = ctx.fleet
    assert fleet is not None
    ctx.progress_key = "handshake_ms"
    await asyncio.sleep(1.0)
    snap0 = fleet.snapshot("sent_payload", "sent_heartbeat")
    acks0 = fleet.total("acks")
    mark = ctx.mark()
    await asyncio.sleep(opts.duration)
    snap1 = fleet.snapshot("sent_payload", "sent_heartbeat")
    sent = sum(v1 - v0 for (_, v0), (_, v1) in zip(snap0, snap1, strict=True))
    achieved = fleet.rate(snap0, snap1)
    acks = fleet.total("acks") - acks0
    cost = ctx.cost(mark, sent)
    ctx.phase = "verifying"
    await fleet.stop()
    await asyncio.sleep(0.5)
    in_after = await ctx.cluster.metric("gateway_messages_in_total")
    total_sent = sum(c.get("sent_payload", 0) + c.get("sent_heartbeat", 0) for c in fleet.counters)
    last_seq: dict[str, int] = {}
    for final in fleet.finals.values():
        last_seq.update(final["last_seq"])
    verified, checked, behind, converged_s = await read_back(ctx, last_seq)
    m.update(
        {
            "requested_rate": opts.rate,
            "achieved_msgs_per_s": round(achieved, 1),
            "frame": opts.frame,
            "acks": acks,
            "gateway_counted_frames": in_after - in_before,
            "fleet_sent_frames": total_sent,
            "reported_state_checked": checked,
            "reported_state_verified": verified,
            "reported_state_behind": behind,
            "reported_state_converged_after_stop_s": converged_s,
            **cost,
        }
    )
    ctx.result.targets += [
        stats.at_least("achieved rate", opts.rate, round(achieved, 1), "msgs/s"),
        stats.at_least("gateway counted every frame", total_sent, in_after - in_before, "frames"),
        stats.at_least("last reported_state in Redis", checked, verified, "devices"),
    ]
    if opts.frame == "report":
        ctx.result.targets.append(stats.at_least("acks", sent * 0.99, acks, "acks"))
    plots.timeline(ctx, "rate", "ingest: messages/s", ["msgs_per_s"], "msgs/s",
                   ["gateway_rss_mib"], "gateway RSS MiB")  # fmt: skip


async def read_back(ctx: Ctx, last_seq: dict[str, int]) -> tuple[int, int, int, float | None]:
    """Devices whose stored `seq` is their last one: (verified, checked, behind, converged_s).

    A saturated gateway still has frames queued when the devices stop: this polls until its
    batches have written the last state of every device (bounded), and says how long it took.
    """
    redis = ctx.redis
    if redis is None:
        return 0, 0, 0, None
    ids = list(last_seq)[:READ_BACK]
    stopped = time.monotonic()
    while True:
        verified, checked, behind = 0, 0, 0
        async with redis.pipeline(transaction=False) as pipe:
            for device_id in ids:
                pipe.hget(ctx.keys.state(device_id), "reported_state")
            stored = await pipe.execute()
        for device_id, raw in zip(ids, stored, strict=True):
            checked += 1
            seq = orjson.loads(raw).get("seq", 0) if raw else 0
            verified += int(seq == last_seq[device_id])
            behind += int(seq < last_seq[device_id])
        if behind == 0 or time.monotonic() - stopped > CONVERGE_S:
            break
        await asyncio.sleep(0.5)
    converged_s = round(time.monotonic() - stopped + 0.5, 2) if behind == 0 else None
    return verified, checked, behind, converged_s
