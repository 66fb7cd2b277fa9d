"""How long `gateway migrate` takes on a fleet of the previous stored layout.

A fleet is loaded with the gateway's own scripts (`loadtest.fleet`), then turned back into the
previous layout by the same migration step run in reverse (the gateway's own field names
back to the previous release's, one atomic script per key, as the upgrade does), so the
fleet is exactly what the previous release would have left. Then a dry run and `--apply`
(`Migration`, as `gateway migrate` runs it) are timed on it.

    python -m loadtest migrate --devices 100000
"""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from gateway.keys import Keys, layout_migration, layout_version
from gateway.migrate import layout
from gateway.migrate.runner import DEFAULT_BATCH, Migration
from gateway.migrate.steps import STEPS
from loadtest import fleet, results


async def to_previous_layout(url: str, keys: Keys, batch: int) -> None:
    client = Redis.from_url(url)
    step = STEPS[0]
    pairs = step.args
    back = replace(step, args=tuple(x for a, b in zip(pairs[::2], pairs[1::2], strict=True)
                                    for x in (b, a)))  # fmt: skip
    try:
        await Migration(client, keys, apply=True, batch=batch, say=lambda _: None).run_step(back)
        await client.delete(layout_version(keys), layout_migration(keys))
        assert await layout.stored(client, keys) == layout.FIRST
    finally:
        await client.aclose()


async def timed(url: str, keys: Keys, apply: bool, batch: int) -> tuple[float, int]:
    client = Redis.from_url(url)
    try:
        started = time.perf_counter()
        outcome = await Migration(client, keys, apply=apply, batch=batch, say=print).run()
        return time.perf_counter() - started, outcome.steps[0].changed
    finally:
        await client.aclose()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m loadtest migrate")
    parser.add_argument("--devices", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=DEFAULT_BATCH)
    parser.add_argument(
        "--out", type=Path, help=f"results directory (default {results.results_dir()})"
    )
    args = parser.parse_args(argv)
    started_at = fleet.now_iso()
    keys = Keys()
    with fleet.PrivateRedis() as server:
        fleet.load_fleet(server.url, args.devices, 0.5, state_writes="script", quiet=True)
        asyncio.run(to_previous_layout(server.url, keys, args.batch))
        dry_seconds, would = asyncio.run(timed(server.url, keys, False, args.batch))
        seconds, converted = asyncio.run(timed(server.url, keys, True, args.batch))
        assert would == converted == args.devices, (would, converted)
        document = fleet.write_result(
            "migrate",
            started_at=started_at,
            command=fleet.command_line("loadtest.bench_migrate", argv),
            redis_url=server.url,
            params={
                "devices": args.devices,
                "batch": args.batch,
                "step": STEPS[0].title,
                "how": "a fleet loaded by loadtest.fleet (half online), turned back into the "
                "previous layout by the step run in reverse; then Migration as `gateway "
                "migrate` runs it: a dry run, then --apply, each timed on the wall clock",
            },
            metrics={
                "dry_run_seconds": round(dry_seconds, 2),
                "apply_seconds": round(seconds, 2),
                "devices_per_second": round(converted / seconds),
                "apply_to_dry_run_ratio": round(seconds / dry_seconds, 2),
            },
            targets=[],
            out_dir=args.out,
        )
    fleet.print_summary(document)
    return document


if __name__ == "__main__":
    main()
