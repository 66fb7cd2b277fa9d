"""The seed's approach, measured on the same machine and Redis as the gateway.

The seed document's classes are loaded at run time from the document (`seedload.py`) and run
exactly as written: `DeviceStateManager.device_heartbeat` once per heartbeat on a synchronous
redis-py client (one EXISTS, then a MULTI pipeline, per call), and `BulkStateQuery`'s whole-set
queries on a loaded fleet, to contrast with the gateway's paged API.

    python -m loadtest.baseline --devices 1000000 --heartbeat-devices 10000 --seconds 10

`run_seed_heartbeats(redis_url, device_ids, seconds)` is the piece other scenarios call to
compute ratios in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import threading
import time
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import redis
from redis.asyncio import Redis as AsyncRedis

from gateway.config import Settings
from gateway.store import Store
from loadtest import fleet, results
from loadtest.seedload import add_seed_argument, load_seed

CHECK_EVERY = 64  # heartbeats between clock reads


def process_cpu_seconds() -> float:
    """User + system CPU seconds of this (client) process so far."""
    times = os.times()
    return times.user + times.system


def run_seed_heartbeats(
    redis_url: str,
    device_ids: Sequence[str],
    seconds: float,
    *,
    threads: int = 1,
    seed: types.SimpleNamespace | None = None,
    seed_doc: Path | None = None,
    cpu: Callable[[], float] | None = None,
    max_heartbeats: int | None = None,
) -> dict[str, Any]:
    """Call the seed's `device_heartbeat(device_id, reported)` in a loop for *seconds*.

    One call per heartbeat, as the seed writes it, cycling through *device_ids* with a reported
    state that changes every round (`{"temp": round, "hum": 40}`). With *threads* > 1 each
    thread has its own client and its own share of the devices. *cpu* reads the Redis server's
    CPU seconds (default: /proc of the server when local, else INFO cpu).
    """
    if not device_ids:
        raise ValueError("run_seed_heartbeats needs at least one device id")
    seed = seed or load_seed(seed_doc)
    read_cpu = cpu or fleet.target_for(redis_url).cpu_seconds
    threads = max(1, min(threads, len(device_ids)))
    shares = [list(device_ids[start::threads]) for start in range(threads)]
    counts = [0] * threads
    errors: list[BaseException] = []
    budget = None if max_heartbeats is None else max(1, max_heartbeats // threads)
    barrier = threading.Barrier(threads + 1)
    deadline = [0.0]

    def beat(slot: int) -> None:
        client = redis.Redis.from_url(redis_url)
        manager = seed.DeviceStateManager(client)
        ids = shares[slot]
        done, round_no = 0, 0
        try:
            barrier.wait()
            while True:
                round_no += 1
                reported = {"temp": round_no, "hum": 40}
                for start in range(0, len(ids), CHECK_EVERY):
                    for device_id in ids[start : start + CHECK_EVERY]:
                        manager.device_heartbeat(device_id, reported)
                    done += min(CHECK_EVERY, len(ids) - start)
                    if time.perf_counter() >= deadline[0] or (budget and done >= budget):
                        return
        except BaseException as exc:  # reported to the caller below
            errors.append(exc)
        finally:
            counts[slot] = done
            client.close()

    workers = [threading.Thread(target=beat, args=(slot,)) for slot in range(threads)]
    for worker in workers:
        worker.start()
    cpu_before, client_before = read_cpu(), process_cpu_seconds()
    started = time.perf_counter()
    deadline[0] = started + seconds
    barrier.wait()
    for worker in workers:
        worker.join()
    elapsed = time.perf_counter() - started
    redis_cpu = read_cpu() - cpu_before
    client_cpu = process_cpu_seconds() - client_before
    if errors:
        raise errors[0]
    total = sum(counts)
    return {
        "heartbeats": total,
        "seconds": elapsed,
        "heartbeats_per_second": total / elapsed,
        "threads": threads,
        "devices": len(device_ids),
        "redis_cpu_seconds": redis_cpu,
        "redis_cpu_seconds_per_1k": redis_cpu / (total / 1000) if total else 0.0,
        "client_cpu_seconds_per_1k": client_cpu / (total / 1000) if total else 0.0,
        "how": "the seed's DeviceStateManager.device_heartbeat(device_id, reported) called once "
        f"per heartbeat on a synchronous redis-py client, {threads} thread(s), cycling through "
        f"{len(device_ids):,} devices, reported state changing every round",
    }


def _timed(call: Callable[[], Any], repeat: int) -> tuple[list[float], Any]:
    durations, result = [], None
    for _ in range(repeat):
        started = time.perf_counter()
        result = call()
        durations.append(time.perf_counter() - started)
    return durations, result


def time_seed_queries(
    redis_url: str,
    seed: types.SimpleNamespace,
    device_type: str,
    stale_seconds: int,
    repeat: int,
    cpu: Callable[[], float],
) -> dict[str, float]:
    """Time BulkStateQuery's whole-set queries on the loaded fleet (*repeat* times each)."""
    client = redis.Redis.from_url(redis_url)
    try:
        query = seed.BulkStateQuery(client)
        metrics: dict[str, float] = {}
        for name, call in (
            (
                "seed_devices_by_type_include_state",
                lambda: query.get_devices_by_type(device_type, include_state=True),
            ),
            (
                "seed_devices_with_stale_state",
                lambda: query.get_devices_with_stale_state(stale_seconds),
            ),
        ):
            cpu_before = cpu()
            durations, result = _timed(call, repeat)
            redis_cpu = cpu() - cpu_before
            metrics[f"{name}_ms_median"] = statistics.median(durations) * 1000
            metrics[f"{name}_ms_max"] = max(durations) * 1000
            metrics[f"{name}_items"] = len(result)
            metrics[f"{name}_redis_cpu_seconds_per_call"] = redis_cpu / repeat
            print(
                f"  {name}: {len(result):,} items in "
                f"{statistics.median(durations) * 1000:,.0f} ms (median of {repeat})",
                flush=True,
            )
        return metrics
    finally:
        client.close()


async def time_gateway_pages(
    redis_url: str, device_type: str, stale_seconds: int, repeat: int
) -> dict[str, float]:
    """The gateway's answer to the same questions, in process (Store.page, one page of 1,000)."""
    client = AsyncRedis.from_url(redis_url)
    store = Store(client, Settings())
    metrics: dict[str, float] = {}
    try:
        for name, kwargs in (
            ("gateway_page_by_type_include_state", {"device_type": device_type}),
            ("gateway_page_stale", {"stale_seconds": float(stale_seconds)}),
        ):
            durations = []
            for _ in range(repeat):
                started = time.perf_counter()
                page = await store.page(include_state="type" in name, limit=1000, **kwargs)
                durations.append(time.perf_counter() - started)
            metrics[f"{name}_ms_median"] = statistics.median(durations) * 1000
            metrics[f"{name}_items"] = len(page.items)
    finally:
        await client.aclose()
    return metrics


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.baseline",
        description="the seed's heartbeat and bulk-query approach, on a private Redis",
    )
    parser.add_argument("--devices", type=int, default=1_000_000, help="fleet size to load")
    parser.add_argument("--online-fraction", type=float, default=0.5)
    parser.add_argument(
        "--heartbeat-devices", type=int, default=10_000, help="devices the seed heartbeats"
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="seed heartbeat duration")
    parser.add_argument("--threads", type=int, default=1, help="seed heartbeat threads")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each bulk query")
    parser.add_argument("--stale-seconds", type=int, default=60)
    parser.add_argument("--device-type", default=fleet.DEVICE_TYPES[0])
    parser.add_argument(
        "--redis-url",
        help="an external Redis (default: a private server); with --no-load it must hold a fleet",
    )
    parser.add_argument("--no-load", action="store_true", help="use the fleet already there")
    add_seed_argument(parser)
    parser.add_argument(
        "--out", type=Path, help=f"results directory (default {results.results_dir()})"
    )
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    seed = load_seed(args.seed_doc)
    started_at = fleet.now_iso()
    with fleet.redis_target(args.redis_url) as server:
        print(f"baseline: {server.description}", flush=True)
        params: dict[str, Any] = {
            "redis": server.description,
            "redis_cpu_source": server.cpu_source,
            "seed_doc": str(args.seed_doc),
            "devices": args.devices,
            "online_fraction": args.online_fraction,
            "heartbeat_devices": args.heartbeat_devices,
            "seconds": args.seconds,
            "threads": args.threads,
            "repeat": args.repeat,
            "stale_seconds": args.stale_seconds,
            "device_type": args.device_type,
        }
        metrics: dict[str, float] = {}
        if not args.no_load:
            loaded = fleet.load_fleet(server.url, args.devices, args.online_fraction)
            params["fleet"] = fleet.fleet_description(args.devices, args.online_fraction, 3600.0)
            metrics["fleet_load_seconds"] = loaded["load_seconds"]
            metrics["redis_used_memory_mib"] = loaded["redis_used_memory_mib"]
        metrics.update(
            time_seed_queries(
                server.url, seed, args.device_type, args.stale_seconds, args.repeat,
                server.cpu_seconds,
            )
        )  # fmt: skip
        metrics.update(
            asyncio.run(
                time_gateway_pages(server.url, args.device_type, args.stale_seconds, args.repeat)
            )
        )
        ids = [fleet.device_id(index) for index in range(min(args.heartbeat_devices, args.devices))]
        beats = run_seed_heartbeats(
            server.url, ids, args.seconds, threads=args.threads, seed=seed, cpu=server.cpu_seconds
        )
        params["heartbeats"] = beats.pop("how")
        params["timing"] = (
            "wall time (time.perf_counter) around each call in this process; the bulk queries "
            "run --repeat times each, median and max reported; gateway pages are Store.page "
            "in process (no HTTP), limit 1000"
        )
        metrics.update(
            {
                "seed_heartbeats_per_second": beats["heartbeats_per_second"],
                "seed_heartbeats": beats["heartbeats"],
                "seed_heartbeat_seconds": beats["seconds"],
                "seed_redis_cpu_seconds_per_1k_heartbeats": beats["redis_cpu_seconds_per_1k"],
                "seed_client_cpu_seconds_per_1k_heartbeats": beats["client_cpu_seconds_per_1k"],
            }
        )
        document = fleet.write_result(
            "baseline",
            started_at=started_at,
            command=fleet.command_line("loadtest.baseline", argv),
            redis_url=server.url,
            params=params,
            metrics=metrics,
            targets=[],
            out_dir=args.out,
        )
    fleet.print_summary(document)
    return document


if __name__ == "__main__":
    main()
