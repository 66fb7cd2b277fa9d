"""One run from start to result: cores chosen, processes up, the scenario, everything stopped.

The run is bounded by a time budget; whatever it started is stopped in `finally`. Its JSON
result says where each side ran and whether the load generator kept up: a run whose
generator was saturated is marked not valid (`valid: false`, `invalid_reason`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from loadtest import affinity, generator, results, stats
from loadtest.cluster import Cluster
from loadtest.context import Ctx
from loadtest.options import Options
from loadtest.progress import Progress
from loadtest.scenarios import SCENARIOS
from loadtest.sim import raise_nofile


def time_budget(opts: Options) -> float:
    """The hard bound of one run: setup and connect allowance plus the scenario's own time."""
    per_device = (opts.devices + opts.dashboards) / 200
    extra = (opts.heartbeat_timeout or 60) + (opts.offline_grace or 0) + 60
    if opts.cluster:  # start, replicas catching up, a failover: each bounded at 30 s
        extra += 3 * 30
    return 120 + per_device + opts.duration * 1.2 + extra


def choose_cpus(opts: Options) -> tuple[affinity.Split | None, str]:
    """The cores of each side, or None and why the run is not pinned."""
    if not opts.pin:
        return None, "not pinned (--no-pin)"
    if opts.start_gateways <= 0:
        return None, "not pinned: the gateways were not started by this run"
    chosen = affinity.split(affinity.available())
    if chosen is None:
        return None, "not pinned: one CPU available"
    return chosen, ""


async def run(opts: Options) -> Path:
    """Run one scenario; returns the JSON result path."""
    raise_nofile()
    opts.out.mkdir(parents=True, exist_ok=True)
    chosen, unpinned = choose_cpus(opts)
    own_cpus = affinity.available()
    if chosen is not None:  # before anything starts: workers inherit the coordinator's cores
        affinity.pin(os.getpid(), chosen.generator)
    cluster = Cluster(opts, chosen)
    ctx = Ctx(opts, cluster, len(chosen.generator) if chosen else len(own_cpus))
    started_at = results.now_iso()
    error: str | None = None
    try:
        error = await _bounded(ctx)
    finally:
        if chosen is not None:
            affinity.pin(os.getpid(), own_cpus)
    cpus: dict[str, Any] = {"pinning": unpinned}
    if chosen is not None:
        cpus = {
            "pinning": affinity.describe(chosen, cluster.redis_pinned),
            "server": list(chosen.server),
            "generator": list(chosen.generator),
        }
    return _write(ctx, started_at, error, cpus)


async def _bounded(ctx: Ctx) -> str | None:
    """The scenario within its time budget; the error that ended it early, if any."""
    progress: asyncio.Task[None] | None = None
    budget = time_budget(ctx.opts)
    try:
        async with asyncio.timeout(budget):
            await ctx.setup()
            progress = asyncio.create_task(Progress(ctx).run())
            await SCENARIOS[ctx.opts.scenario].runner(ctx)
    except TimeoutError:
        return f"run exceeded its time budget of {budget:.0f} s"
    finally:
        ctx.phase = "stopping"
        if ctx.fleet is not None and len(ctx.fleet.finals) < len(ctx.fleet.specs):
            await ctx.fleet.stop()
        if progress is not None:
            progress.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await progress
        if ctx.redis is not None:
            await ctx.redis.aclose()
        await ctx.cluster.close()
    return None


def _write(ctx: Ctx, started_at: str, error: str | None, cpus: dict[str, Any]) -> Path:
    opts, result = ctx.opts, ctx.result
    if error:
        result.metrics["error"] = error
        result.targets.append(stats.target("completed", "within budget", 0, "", False))
    result.metrics.setdefault("devices", len(ctx.ids))
    for key, value in ctx.fleet_metrics().items():
        result.metrics.setdefault(key, value)
    invalid = _judge_generator(ctx)
    params = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(opts).items()}
    params.pop("command", None)
    params.pop("live", None)
    params["api_key"] = "***"
    document = {
        "scenario": opts.result_name,
        "started_at": started_at,
        "command": opts.command,
        "machine": results.machine(ctx.cluster.redis_version),
        "params": params,
        "cpus": cpus,
        "generator": ctx.load.document(),
        "valid": invalid is None,
        "invalid_reason": invalid,
        "metrics": result.metrics,
        "targets": result.targets,
        "plots": result.plots,
    }
    return results.write_result(document, opts.out, ctx.stem)


def _judge_generator(ctx: Ctx) -> str | None:
    """A target on the busiest generator process; why the run is not valid, or None."""
    if not ctx.load.windows:
        ctx.result.metrics["generator_cpu_util_peak"] = None  # no window long enough to judge
        return None
    name, share = ctx.load.busiest
    ctx.result.metrics["generator_cpu_util_peak"] = round(share, 3)
    ctx.result.targets.append(
        stats.at_most(
            f"load generator CPU ({name}, busiest)",
            generator.SATURATED * 100,
            round(share * 100, 1),
            "% of a core",
        )
    )
    return ctx.load.saturated()
