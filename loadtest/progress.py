"""The live view of a run: sampled every second, drawn as a table (or a line without a TTY).

Each sample (`Sampler.sample`) goes on the run's timeline, which the plots are drawn from.
"""

from __future__ import annotations

import asyncio
import math
import sys
import time
from typing import Any

from loadtest import generator
from loadtest.context import Ctx
from loadtest.stats import percentile

LINE_EVERY = 5  # seconds between progress lines without a TTY


class Progress:
    def __init__(self, ctx: Ctx) -> None:
        self.ctx = ctx
        self.rate_now = 0.0
        self._last_sent = 0
        self._last_tick = time.monotonic()
        self._last_cpu: generator.Readings = {}

    def tick(self) -> dict[str, float]:
        """One sample: fleet counters, msgs/s and the busiest generator process since the last."""
        fleet = self.ctx.fleet
        now = time.monotonic()
        sent = 0
        extra: dict[str, float] = {}
        if fleet is not None:
            sent = fleet.total("sent_payload") + fleet.total("sent_heartbeat")
            extra = {
                "online": fleet.total("online"),
                "sent": sent,
                "errors": sum(fleet.error_totals().values()),
                "dash_events": fleet.total("dashboard_events"),
            }
        elapsed = max(now - self._last_tick, 1e-6)
        self.rate_now = (sent - self._last_sent) / elapsed
        cpu = generator.read(fleet.pids if fleet is not None else {})
        shares = [(v - self._last_cpu[k]) / elapsed for k, v in cpu.items() if k in self._last_cpu]
        self._last_sent, self._last_tick, self._last_cpu = sent, now, cpu
        extra["msgs_per_s"] = round(self.rate_now, 1)
        extra["generator_cpu_peak"] = round(max(shares, default=0.0), 3)
        return self.ctx.sampler.sample(**extra)

    def table(self) -> Any:
        from rich.table import Table

        ctx = self.ctx
        fleet = ctx.fleet
        point = ctx.sampler.timeline[-1] if ctx.sampler.timeline else {}
        table = Table(title=f"loadtest {ctx.opts.scenario} — {ctx.phase}")
        for column in ("elapsed", "connecting", "online", "msgs/s", "errors", "p99 so far",
                       "gw CPU s", "gw RSS MiB", "redis RSS MiB", "generator CPU"):  # fmt: skip
            table.add_column(column, justify="right")
        samples = fleet.samples.get(ctx.progress_key, []) if fleet else []
        p99 = percentile(samples[-20000:], 99) if samples else math.nan
        errors = sum(fleet.error_totals().values()) if fleet else 0
        table.add_row(
            f"{time.monotonic() - ctx.started:.0f} s",
            str(fleet.total("connecting") if fleet else 0),
            f"{fleet.total('online') if fleet else 0}/{len(ctx.ids)}",
            f"{self.rate_now:,.0f}",
            str(errors),
            f"{p99:.1f} ({ctx.progress_key})",
            f"{point.get('gateway_cpu_s', 0):.1f}",
            f"{point.get('gateway_rss_mib', 0):.0f}",
            f"{point.get('redis_rss_mib', 0):.0f}",
            f"{point.get('generator_cpu_peak', 0):.0%}",
        )
        return table

    async def run(self) -> None:
        """Sample every second until cancelled; a live table on a TTY, else a line every 5 s."""
        if self.ctx.opts.live and sys.stdout.isatty():
            await self._live()
        else:
            await self._lines()

    async def _live(self) -> None:
        from rich.live import Live

        with Live(self.table(), refresh_per_second=2, transient=False) as live:
            while True:
                self.tick()
                live.update(self.table())
                await asyncio.sleep(1.0)

    async def _lines(self) -> None:
        count = 0
        while True:
            point = self.tick()
            if count % LINE_EVERY == 0 and self.ctx.opts.live:
                print(
                    f"[{point['t']:6.0f}s] {self.ctx.phase}: online {point.get('online', 0)}"
                    f"/{len(self.ctx.ids)} msgs/s {point.get('msgs_per_s', 0)} "
                    f"errors {point.get('errors', 0)} "
                    f"busiest generator process {point.get('generator_cpu_peak', 0):.0%}",
                    flush=True,
                )
            count += 1
            await asyncio.sleep(1.0)
