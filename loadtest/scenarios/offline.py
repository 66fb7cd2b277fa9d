"""Devices that vanish: how long after its last frame each one is published offline."""

from __future__ import annotations

import asyncio
import contextlib
import time

from loadtest import plots, stats
from loadtest.context import Ctx
from loadtest.scenarios.connect import connect_phase


async def offline_lag(ctx: Ctx) -> None:
    """Devices vanish: last frame → offline event lag.

    Devices drop (--drop abort or silent): from each one's last frame to its offline event,
    the lag past the heartbeat timeout, and missed offline events (must be 0).
    """
    opts, m = ctx.opts, ctx.result.metrics
    timeout = opts.heartbeat_timeout or 60.0
    interval = min(opts.heartbeat_interval, timeout / 3)
    await connect_phase(ctx, reconnect=False, heartbeat_interval=interval)
    fleet = ctx.fleet
    assert fleet is not None
    stop_watch = await ctx.watch_presence(set(ctx.ids))
    await asyncio.sleep(interval + 1)
    ctx.phase = f"dropped ({opts.drop}); waiting for offline"
    dropped_at = time.time()
    mark = ctx.mark()
    dropped = await fleet.drop(opts.drop)

    def seen() -> dict[str, float]:
        first: dict[str, float] = {}
        for at, event in ctx.presence_log:
            if at >= dropped_at - 1 and event.get("status") == "offline":
                first.setdefault(str(event.get("device_id")), at)
        return first

    deadline = time.monotonic() + timeout + 12
    while time.monotonic() < deadline and len(seen()) < len(dropped):
        ctx.presence_changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ctx.presence_changed.wait(), 0.5)
    offline = seen()
    await stop_watch()
    cost = ctx.cost(mark, len(dropped))
    for mode in ("abort", "silent"):
        after_last = [offline[i] - last for i, (last, how) in dropped.items()
                      if how == mode and i in offline]  # fmt: skip
        if not any(how == mode for _, how in dropped.values()):
            continue
        missed = sum(1 for i, (_, how) in dropped.items() if how == mode and i not in offline)
        latency = stats.summary(after_last, f"{mode}_offline_after_last_frame_s")
        lag = stats.summary([a - timeout for a in after_last], f"{mode}_lag_past_timeout_s")
        m.update({f"{mode}_devices": sum(1 for _, h in dropped.values() if h == mode),
                  f"{mode}_missed": missed, **latency, **lag})  # fmt: skip
        ctx.result.targets += [
            stats.at_most(f"{mode}: missed offline events", 0, missed, ""),
            stats.at_most(
                f"{mode}: offline after last frame (max)", timeout + 2,
                latency[f"{mode}_offline_after_last_frame_s_max"], "s",
            ),
        ]  # fmt: skip
        title = f"offline-lag ({mode}): last frame → offline event"
        plots.histogram(ctx, f"{mode}-lag", title, after_last, "s")
    m.update({"heartbeat_timeout_s": timeout, "heartbeat_interval_s": interval,
              "dropped": len(dropped), "offline_seen": len(offline), **cost})  # fmt: skip
