"""The browser dashboard on a large fleet, measured in Chromium: first paint and scrolling.

A private Redis gets a fleet (`fleet.load_fleet`: register.lua, small states, connect.lua for
half the devices, so the fleet log holds their presence events) and an hour of the fleet-counts
series (one point per 10 s step, as the gateway's sampler writes them); then `python -m gateway
serve` runs against it, and Debian's Chromium (through Playwright) opens the dashboard:

- **first paint**: a fresh browser context (no cache) with a login cookie opens `/`, and the
  page marks (`performance.mark("dashboard-ready")`) the first frame in which the device list,
  the counts, the fleet's last hour and the latest presence events are all drawn; the time is
  from navigation start. Repeated `--loads` times.
- **scrolling**: the device list is scrolled by a fixed step every animation frame, first
  through the rows the page holds, then against the end of what is loaded, so the next pages
  of the fleet load while it scrolls; every frame's interval is recorded. A frame longer than
  50 ms is a visible stutter (jank).
- **search**: an id prefix typed into the search box, until the server's answer is listed
  (the box waits for a 200 ms pause in typing before it asks; that pause is included).

    python -m loadtest.bench_dashboard --devices 100000
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis

from gateway.config import Settings
from gateway.keys import Keys
from gateway.queries import Queries
from gateway.scripts import Scripts
from gateway.timeseries import TIERS, FleetSeries
from loadtest import fleet, results
from loadtest.bench_api import API_KEY, percentile, running_gateway

if TYPE_CHECKING:
    from playwright.async_api import ViewportSize

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"]
VIEWPORT: ViewportSize = {"width": 1400, "height": 900}
FIRST_PAINT_TARGET_MS = 1000.0
JANK_MS = 50.0
FRAME_MS = 1000 / 60
SEARCH_TIMEOUT_MS = 15000
STEP_SECONDS = 10

SCROLL = """async ({px, seconds, fromEnd}) => {
  const list = document.getElementById("device-list");
  if (fromEnd) list.scrollTop = list.scrollHeight;
  const rowsBefore = window.dashboard.state.view.length;
  const frames = [];
  const longTasks = [];
  const observer = new PerformanceObserver(
    (l) => longTasks.push(...l.getEntries().map((e) => e.duration)));
  observer.observe({type: "longtask"});
  let last = null;
  const end = performance.now() + seconds * 1000;
  await new Promise((resolve) => {
    const step = (t) => {
      if (last !== null) frames.push(t - last);
      last = t;
      list.scrollTop += px;
      if (t < end) requestAnimationFrame(step); else resolve();
    };
    requestAnimationFrame(step);
  });
  observer.disconnect();
  return {frames, longTasks, rowsBefore, rowsAfter: window.dashboard.state.view.length};
}"""

MARKS = """() => {
  const mark = (name) => (performance.getEntriesByName(name)[0] || {startTime: 0}).startTime;
  return {ready: mark("dashboard-ready"), fcp: mark("first-contentful-paint"),
          rows: window.dashboard.state.view.length};
}"""

SEARCH = """async ({prefix, timeout}) => {
  const input = document.getElementById("filter-text");
  const started = performance.now();
  input.value = prefix;
  input.dispatchEvent(new Event("input", {bubbles: true}));
  const found = await new Promise((resolve) => {
    const check = () => {
      const view = window.dashboard.state.view;
      const row = document.querySelector("#device-list .row[data-device-id]");
      if (view.length && view.every((id) => id.startsWith(prefix)) && row
          && row.dataset.deviceId.startsWith(prefix)) resolve(true);
      else if (performance.now() - started > timeout) resolve(false);
      else requestAnimationFrame(check);
    };
    requestAnimationFrame(check);
  });
  return {ms: performance.now() - started, rows: window.dashboard.state.view.length, found};
}"""


async def prefill_series(redis_url: str, keys: Keys) -> int:
    """An hour of the fleet-counts series, as the gateway's sampler would have written it."""
    client = aioredis.Redis.from_url(redis_url)
    try:
        queries = Queries(client, keys, Scripts(keys), Settings().ttl_ms)
        stats = await queries.stats()

        async def counts() -> dict[str, Any]:
            return stats

        series = FleetSeries(client, keys, counts, STEP_SECONDS)
        now = int(time.time() // STEP_SECONDS)
        written = 0
        for number in range(now - TIERS[0].keep, now):
            written += await series.sample(number)
        return written
    finally:
        await client.aclose()


def frame_summary(frames: list[float], prefix: str) -> dict[str, float]:
    dropped = sum(max(0, round(f / FRAME_MS) - 1) for f in frames)
    return {
        f"{prefix}_frames": len(frames),
        f"{prefix}_frame_ms_p50": statistics.median(frames),
        f"{prefix}_frame_ms_p99": percentile(frames, 99),
        f"{prefix}_frame_ms_max": max(frames),
        f"{prefix}_janky_frames": sum(1 for f in frames if f > JANK_MS),
        f"{prefix}_dropped_frames_pct": 100 * dropped / (len(frames) + dropped),
    }


async def measure(base_url: str, loads: int, seconds: float, prefix: str) -> dict[str, float]:
    # Playwright comes with the test extras; the other benchmarks do not need it
    from playwright.async_api import async_playwright

    metrics: dict[str, float] = {}
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            # sign in once: the cookie is what a reload presents
            context = await browser.new_context(viewport=VIEWPORT)
            page = await context.new_page()
            await page.goto(f"{base_url}/?token={API_KEY}")
            await page.wait_for_selector("body[data-ready='true']", timeout=60_000)
            signed_in = await context.storage_state()  # the login cookie
            await context.close()
            paints: list[float] = []
            contentful: list[float] = []
            for _ in range(loads):
                context = await browser.new_context(viewport=VIEWPORT, storage_state=signed_in)
                page = await context.new_page()
                await page.goto(base_url + "/")
                await page.wait_for_selector("body[data-ready='true']", timeout=60_000)
                marks = await page.evaluate(MARKS)
                paints.append(marks["ready"])
                contentful.append(marks["fcp"])
                metrics["first_paint_rows_listed"] = marks["rows"]
                await context.close()
            metrics.update(
                {
                    "first_paint_ms_median": statistics.median(paints),
                    "first_paint_ms_max": max(paints),
                    "first_paint_ms_min": min(paints),
                    "first_contentful_paint_ms_median": statistics.median(contentful),
                }
            )

            context = await browser.new_context(viewport=VIEWPORT, storage_state=signed_in)
            page = await context.new_page()
            await page.goto(base_url + "/")
            await page.wait_for_selector("body[data-ready='true']", timeout=60_000)
            await page.wait_for_timeout(500)
            steady = await page.evaluate(SCROLL, {"px": 120, "seconds": seconds, "fromEnd": False})
            metrics.update(frame_summary(steady["frames"], "scroll"))
            metrics["scroll_long_tasks"] = len(steady["longTasks"])
            paging = await page.evaluate(SCROLL, {"px": 240, "seconds": seconds, "fromEnd": True})
            metrics.update(frame_summary(paging["frames"], "paging_scroll"))
            metrics["paging_scroll_long_tasks"] = len(paging["longTasks"])
            metrics["paging_scroll_rows_loaded"] = paging["rowsAfter"] - paging["rowsBefore"]
            searched = await page.evaluate(SEARCH, {"prefix": prefix, "timeout": SEARCH_TIMEOUT_MS})
            if not searched["found"]:
                raise RuntimeError(f"the search for {prefix!r} listed nothing")
            metrics["search_ms"] = searched["ms"]
            metrics["search_rows"] = searched["rows"]
            chart_ms = await page.evaluate(
                "Number(document.getElementById('online-chart').dataset.drawMs)"
            )
            metrics["fleet_chart_draw_ms"] = chart_ms
            await context.close()
        finally:
            await browser.close()
    return metrics


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.bench_dashboard",
        description="First paint and scrolling of the browser dashboard on a large fleet",
    )
    parser.add_argument("--devices", type=int, default=100_000)
    parser.add_argument("--online-fraction", type=float, default=0.5)
    parser.add_argument("--loads", type=int, default=5, help="timed page loads")
    parser.add_argument("--seconds", type=float, default=8.0, help="of each scroll")
    parser.add_argument(
        "--out", type=Path, help=f"results directory (default {results.results_dir()})"
    )
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.devices < 1 or args.loads < 1:
        raise SystemExit("--devices and --loads must be ≥ 1")
    started_at = fleet.now_iso()
    with fleet.redis_target(None) as server:
        print(f"bench_dashboard: {server.description}", flush=True)
        loaded = fleet.load_fleet(server.url, args.devices, args.online_fraction)
        points = asyncio.run(prefill_series(server.url, Keys()))
        seconds = loaded["load_seconds"]
        print(f"  fleet loaded in {seconds:.1f} s; {points} series points", flush=True)
        with running_gateway(server.url) as gateway:
            print(f"  gateway pid {gateway.pid} on {gateway.base_url}", flush=True)
            # a hundred ids from the middle of the fleet, e.g. dev-00500 for dev-0050000…
            prefix = fleet.device_id(args.devices // 2)[:-2]
            metrics = asyncio.run(measure(gateway.base_url, args.loads, args.seconds, prefix))
            command = gateway.command
        metrics["fleet_load_seconds"] = loaded["load_seconds"]
        janky = metrics["scroll_janky_frames"] + metrics["paging_scroll_janky_frames"]
        metrics["janky_frames"] = janky
        targets = [
            fleet.target(
                "first paint at the fleet size (median of the loads)",
                f"≤ {FIRST_PAINT_TARGET_MS:g} ms",
                round(metrics["first_paint_ms_median"], 1),
                "ms",
                metrics["first_paint_ms_median"] <= FIRST_PAINT_TARGET_MS,
            ),
            fleet.target(
                "scroll frames longer than 50 ms",
                "≤ 0",
                metrics["janky_frames"],
                "",
                metrics["janky_frames"] == 0,
            ),
        ]
        document = fleet.write_result(
            "bench_dashboard",
            started_at=started_at,
            command=fleet.command_line("loadtest.bench_dashboard", argv),
            redis_url=server.url,
            params={
                "devices": args.devices,
                "online_fraction": args.online_fraction,
                "loads": args.loads,
                "scroll_seconds": args.seconds,
                "browser": f"{CHROMIUM} {' '.join(CHROMIUM_ARGS)}, viewport "
                f"{VIEWPORT['width']}×{VIEWPORT['height']}, driven by Playwright",
                "redis": server.description,
                "fleet": fleet.fleet_description(args.devices, args.online_fraction, 3600.0)
                + f"; an hour of the fleet-counts series ({points} points)",
                "gateway": "python " + " ".join(command[1:]),
                "first_paint": "navigation start to the frame with the list, the counts, the "
                "fleet's last hour and the latest presence events drawn (fresh context, no cache, "
                "login cookie)",
                "scroll": "120 px per animation frame through the loaded rows, then 240 px per "
                "frame against the end of what is loaded while the next pages load",
                "search": f"prefix {prefix!r} typed at once, until listed; includes the "
                "box's 200 ms pause before it asks the server",
            },
            metrics=metrics,
            targets=targets,
            out_dir=args.out,
        )
    fleet.print_summary(document)
    return document


if __name__ == "__main__":
    main()
