"""Store-level heartbeat batching: the gateway's PresenceEngine against the seed, same Redis.

N devices are registered through the gateway's `Store` and each given a session with
`PresenceEngine.connect`. Then, round after round, every device beats once with a reported
state that changes every round (`{"temp": round, "hum": 40}`, so every heartbeat really
writes: reported state, per-leaf timestamps, shadow version, history), and `engine.flush()`
writes the round as one `heartbeat_batch.lua` call per chunk of 500 devices. Then, in the
same run and on the same Redis, the seed's `DeviceStateManager.device_heartbeat` runs once per
heartbeat over the same devices, and the two rates are compared.

With `--cluster` the same phases run on one node and then on a local 3-primary Valkey
Cluster (the gateway's cluster layout: one batch call per partition and chunk), in one run,
without the seed's phase (its pipelines cross slots, which a cluster refuses): heartbeats/s
and Redis CPU per heartbeat on each, and the ratios cluster/single.

    python -m loadtest.bench_store --devices 10000 --seconds 10
    python -m loadtest.bench_store --cluster --devices 10000 --seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from gateway import redisconn, shadow
from gateway.config import Settings
from gateway.device_session import document_to_write
from gateway.keys import Keys
from gateway.metrics import Metrics
from gateway.presence import CHUNK, PresenceEngine
from gateway.store import Store
from loadtest import fleet, procstat, results
from loadtest.baseline import process_cpu_seconds, run_seed_heartbeats
from loadtest.localcluster import RunCluster
from loadtest.seedload import add_seed_argument, load_seed

SESSION = "bench-store"
DEVICE_TYPE = "sensor"
SETUP_CONCURRENCY = 64
TARGET_RATE = 80_000
TARGET_RATIO = 40


def bench_device_id(index: int) -> str:
    return f"hb-{index:06d}"


async def _in_batches(calls: list[Any], size: int = SETUP_CONCURRENCY) -> list[Any]:
    results: list[Any] = []
    for start in range(0, len(calls), size):
        results += await asyncio.gather(*(call() for call in calls[start : start + size]))
    return results


async def layout_client(redis_url: str) -> tuple[Redis | RedisCluster, Keys]:
    """A client and the key names for *redis_url*: one node, or a cluster (`redis+cluster://`)."""
    if redisconn.is_cluster_url(redis_url):
        cluster = redisconn.connect_cluster(redis_url)
        await cluster.initialize()
        return cluster, Keys.cluster()
    return redisconn.connect(redis_url, max_connections=SETUP_CONCURRENCY + 4), Keys()


async def setup_devices(redis_url: str, device_ids: list[str]) -> dict[str, float]:
    """Register every device with Store.register and connect it with PresenceEngine.connect."""
    redis, keys = await layout_client(redis_url)
    settings = Settings()
    store = Store(redis, settings, keys)
    engine = PresenceEngine(redis, store, settings, Metrics(), lambda *_: None)
    try:
        await store.scripts.load(redis)
        started = time.perf_counter()
        await _in_batches(
            [
                (lambda d=device_id: store.register(d, DEVICE_TYPE, {"site": "bench"}))
                for device_id in device_ids
            ]
        )
        registered = time.perf_counter() - started
        started = time.perf_counter()
        welcomes = await _in_batches(
            [(lambda d=device_id: engine.connect(d, SESSION, "")) for device_id in device_ids]
        )
        connected = time.perf_counter() - started
        if any(welcome is None for welcome in welcomes):
            raise RuntimeError("a device registered a moment ago was unknown to connect")
    finally:
        await redis.aclose()
    return {"register_seconds": registered, "connect_seconds": connected}


VARIANTS = ("changing", "unchanged", "bare")


def beat_round(
    engine: PresenceEngine,
    device_ids: list[str],
    variant: str,
    round_no: int,
    written: dict[str, bytes],
    seen_at: float | None = None,
) -> dict[str, int]:
    """Note one heartbeat of every device on *engine* (written by its next flush).

    The reported state is `{"temp": round_no, "hum": 40}` for `changing`, the same every
    round for `unchanged` and `noop_report`, none for `bare`; returned so the caller can
    check what landed. As a device session does, a heartbeat whose document repeats the one
    last written (*written*, per device, kept by the caller across rounds) is a bare beat;
    `noop_report` sends it anyway, as a `report` frame that changes nothing does.
    """
    state = {"temp": round_no if variant == "changing" else 0, "hum": 40}
    meta = shadow.encode_stamps(shadow.stamp(state, time.time()))
    for device_id in device_ids:
        # encoded per device, as a gateway encodes each device's own frame
        if variant == "bare":
            engine.beat(device_id, SESSION, seen_at=seen_at)
            continue
        encoded = document_to_write(written.get(device_id, b""), state)
        if encoded is None and variant == "noop_report":
            encoded = orjson.dumps(state)
        if encoded is None:
            engine.beat(device_id, SESSION, seen_at=seen_at)
        else:
            written[device_id] = encoded
            engine.beat(device_id, SESSION, encoded, meta, seen_at=seen_at)
    return state


async def run_batched_heartbeats(
    redis_url: str,
    device_ids: list[str],
    seconds: float,
    max_heartbeats: int | None,
    cpu: Any,
    variant: str = "changing",
) -> dict[str, Any]:
    """Whole rounds of `engine.beat` for every device, each round written by `engine.flush()`.

    *variant*: `changing` — a reported state that changes every round (every heartbeat writes
    state, timestamps, versions, the device's history and the fleet log); `unchanged` — the
    same reported state every round (a device that reports its full state with each
    heartbeat: written once, then bare beats); `bare` — heartbeats with no state.
    """
    redis, keys = await layout_client(redis_url)
    settings = Settings()
    store = Store(redis, settings, keys)
    refused: list[tuple[str, int]] = []
    engine = PresenceEngine(
        redis,
        store,
        settings,
        Metrics(),
        lambda device, _session, code: refused.append((device, code)),
    )
    try:
        await store.scripts.load(redis)
        rounds = beats = 0
        written: dict[str, bytes] = {}
        round_times: list[float] = []
        cpu_before, client_before = cpu(), process_cpu_seconds()
        started = time.perf_counter()
        while True:
            rounds += 1
            round_started = time.perf_counter()
            state = beat_round(engine, device_ids, variant, rounds, written)
            await engine.flush()
            beats += len(device_ids)
            round_times.append(time.perf_counter() - round_started)
            elapsed = time.perf_counter() - started
            if elapsed >= seconds or (max_heartbeats is not None and beats >= max_heartbeats):
                break
        redis_cpu = cpu() - cpu_before
        client_cpu = process_cpu_seconds() - client_before
        # proof the writes happened: the last device's shadow moved once per round
        version, reported = await redis.hmget(
            store.keys.state(device_ids[-1]), ["version", "reported_state"]
        )
    finally:
        await redis.aclose()
    if refused:
        raise RuntimeError(f"{len(refused)} heartbeats refused (stale/unknown), e.g. {refused[0]}")
    expected_version = rounds if variant == "changing" else 0
    landed = orjson.loads(reported or b"{}") == state or variant == "bare"
    if int(version or 0) < expected_version or not landed:
        raise RuntimeError(f"reported state not written: version {version!r}, {reported!r}")
    return {
        "heartbeats": beats,
        "rounds": rounds,
        "seconds": elapsed,
        "heartbeats_per_second": beats / elapsed,
        "round_ms_median": sorted(round_times)[len(round_times) // 2] * 1000,
        "redis_cpu_seconds": redis_cpu,
        "redis_cpu_seconds_per_1k": redis_cpu / (beats / 1000),
        "client_cpu_seconds_per_1k": client_cpu / (beats / 1000),
        "last_device_version": int(version or 0),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.bench_store",
        description="heartbeats/s with reported state: PresenceEngine batching vs the seed",
    )
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument(
        "--seconds", type=float, default=10.0, help="duration of each phase (ours, then seed)"
    )
    parser.add_argument(
        "--max-heartbeats", type=int, help="stop the batched phase after this many heartbeats"
    )
    parser.add_argument(
        "--seed-seconds", type=float, help="seed phase duration (default --seconds)"
    )
    parser.add_argument("--seed-threads", type=int, default=1)
    parser.add_argument("--redis-url", help="an external, empty Redis (default: a private server)")
    parser.add_argument(
        "--cluster", action="store_true",
        help="the same phases on one node and on a local 3-primary Valkey Cluster in one run, "
        "and the ratio cluster/single (no seed phase)",
    )  # fmt: skip
    add_seed_argument(parser)
    parser.add_argument(
        "--out", type=Path, help=f"results directory (default {results.results_dir()})"
    )
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.devices < 1 or args.seconds <= 0:
        raise SystemExit("--devices must be ≥ 1 and --seconds > 0")
    if args.cluster:
        return compare_cluster(args, argv)
    seed = load_seed(args.seed_doc)
    started_at = fleet.now_iso()
    device_ids = [bench_device_id(index) for index in range(args.devices)]
    seed_seconds = args.seed_seconds or args.seconds
    with fleet.redis_target(args.redis_url) as server:
        print(f"bench_store: {server.description}", flush=True)
        setup = asyncio.run(setup_devices(server.url, device_ids))
        print(
            f"  {args.devices:,} devices registered in {setup['register_seconds']:.1f} s, "
            f"connected in {setup['connect_seconds']:.1f} s",
            flush=True,
        )
        runs = {}
        for variant in VARIANTS:
            runs[variant] = asyncio.run(
                run_batched_heartbeats(
                    server.url, device_ids, args.seconds, args.max_heartbeats,
                    server.cpu_seconds, variant,
                )
            )  # fmt: skip
            print(
                f"  gateway batching ({variant} state): "
                f"{runs[variant]['heartbeats_per_second']:,.0f} heartbeats/s",
                flush=True,
            )
        ours = runs["changing"]
        theirs = run_seed_heartbeats(
            server.url, device_ids, seed_seconds, threads=args.seed_threads, seed=seed,
            cpu=server.cpu_seconds,
        )  # fmt: skip
        print(
            f"  seed per call:    {theirs['heartbeats_per_second']:,.0f} heartbeats/s", flush=True
        )
        ratio = ours["heartbeats_per_second"] / theirs["heartbeats_per_second"]
        cpu_ratio = theirs["redis_cpu_seconds_per_1k"] / max(ours["redis_cpu_seconds_per_1k"], 1e-9)
        metrics = {
            **{
                f"gateway_{variant}_state_{name}": runs[variant][key]
                for variant in VARIANTS
                for name, key in (
                    ("heartbeats_per_second", "heartbeats_per_second"),
                    ("redis_cpu_seconds_per_1k", "redis_cpu_seconds_per_1k"),
                    ("client_cpu_seconds_per_1k", "client_cpu_seconds_per_1k"),
                )
            },
            "gateway_heartbeats_per_second": ours["heartbeats_per_second"],
            "gateway_heartbeats": ours["heartbeats"],
            "gateway_rounds": ours["rounds"],
            "gateway_seconds": ours["seconds"],
            "gateway_round_ms_median": ours["round_ms_median"],
            "gateway_redis_cpu_seconds_per_1k_heartbeats": ours["redis_cpu_seconds_per_1k"],
            "gateway_client_cpu_seconds_per_1k_heartbeats": ours["client_cpu_seconds_per_1k"],
            "seed_heartbeats_per_second": theirs["heartbeats_per_second"],
            "seed_heartbeats": theirs["heartbeats"],
            "seed_seconds": theirs["seconds"],
            "seed_redis_cpu_seconds_per_1k_heartbeats": theirs["redis_cpu_seconds_per_1k"],
            "seed_client_cpu_seconds_per_1k_heartbeats": theirs["client_cpu_seconds_per_1k"],
            "ratio_heartbeats_per_second": ratio,
            "ratio_redis_cpu_per_heartbeat": cpu_ratio,
            "setup_register_seconds": setup["register_seconds"],
            "setup_connect_seconds": setup["connect_seconds"],
        }
        document = fleet.write_result(
            "bench_store",
            started_at=started_at,
            command=fleet.command_line("loadtest.bench_store", argv),
            redis_url=server.url,
            params={
                "devices": args.devices,
                "seconds": args.seconds,
                "max_heartbeats": args.max_heartbeats,
                "seed_seconds": seed_seconds,
                "seed_threads": args.seed_threads,
                "chunk": CHUNK,
                "seed_doc": str(args.seed_doc),
                "redis": server.description,
                "redis_cpu_source": server.cpu_source,
                "setup": "devices registered with Store.register and given a session with "
                "PresenceEngine.connect (64 concurrent calls), before any timing",
                "gateway_phase": "three phases (changing, unchanged, bare state) of whole "
                "rounds: engine.beat(id, session, reported, meta) for every device with "
                'reported {"temp": round, "hum": 40} (changing: every heartbeat writes state, '
                "timestamps, version, a history entry and a fleet event), then await "
                f"engine.flush() (one heartbeat_batch.lua or report_batch.lua call per chunk "
                f"of {CHUNK}); rate = "
                "heartbeats / wall time of the phase, redis-py asyncio + hiredis, one process",
                "seed_phase": theirs["how"] + "; same Redis, after the gateway phase",
            },
            metrics=metrics,
            targets=[
                fleet.target(
                    "gateway heartbeats/s, reported state changing every heartbeat",
                    f"≥ {TARGET_RATE:,}/s",
                    round(ours["heartbeats_per_second"]),
                    "heartbeats/s",
                    ours["heartbeats_per_second"] >= TARGET_RATE,
                ),
                fleet.target(
                    "gateway heartbeats/s, reported state carried, unchanged",
                    f"≥ {TARGET_RATE:,}/s",
                    round(runs["unchanged"]["heartbeats_per_second"]),
                    "heartbeats/s",
                    runs["unchanged"]["heartbeats_per_second"] >= TARGET_RATE,
                ),
                fleet.target(
                    "ratio to the seed's device_heartbeat",
                    f"≥ {TARGET_RATIO}×",
                    round(ratio, 1),
                    "×",
                    ratio >= TARGET_RATIO,
                ),
            ],
            out_dir=args.out,
        )
    fleet.print_summary(document)
    return document


# --- one node against a cluster -------------------------------------------------------
# what the private single node runs with (fleet.PrivateRedis), so both sides do the same work
CLUSTER_AS_SINGLE = ("--appendonly", "no", "--notify-keyspace-events", "")


def phase(
    url: str,
    device_ids: list[str],
    args: argparse.Namespace,
    cpu: Callable[[], float],
    variant: str,
    side: str,
) -> dict[str, Any]:
    """One variant's phase on one Redis, printed as it ends."""
    run = asyncio.run(
        run_batched_heartbeats(url, device_ids, args.seconds, args.max_heartbeats, cpu, variant)
    )
    print(
        f"  {side}, {variant} state: {run['heartbeats_per_second']:,.0f} heartbeats/s, "
        f"Redis {run['redis_cpu_seconds_per_1k'] * 1000:.2f} CPU-µs per heartbeat",
        flush=True,
    )
    return run


def cluster_phases(
    device_ids: list[str], args: argparse.Namespace
) -> tuple[dict[str, float], dict[str, dict[str, Any]]]:
    """Setup and every phase on a local 3-primary cluster without replicas. Redis CPU is
    the sum over the primaries' /proc stat; each phase also notes the busiest one's share."""
    with tempfile.TemporaryDirectory(prefix="loadtest-bench-cluster-") as workdir:
        valkey = RunCluster(Path(workdir) / "cluster", replicas=0, extra_args=CLUSTER_AS_SINGLE)
        asyncio.run(valkey.start())
        try:
            print(f"bench_store: {valkey.primaries} primaries at {valkey.url}", flush=True)
            pids = asyncio.run(valkey.primary_pids())

            def each() -> list[float]:
                return [reading.cpu_s if (reading := procstat.read(pid)) else 0.0 for pid in pids]

            setup = asyncio.run(setup_devices(valkey.url, device_ids))
            runs: dict[str, dict[str, Any]] = {}
            for variant in VARIANTS:
                before = each()
                runs[variant] = phase(
                    valkey.url, device_ids, args, lambda: sum(each()), variant, "cluster"
                )
                spent = [after - start for after, start in zip(each(), before, strict=True)]
                runs[variant]["busiest_primary_share"] = max(spent) / max(sum(spent), 1e-9)
        finally:
            asyncio.run(valkey.stop())
    return setup, runs


def compare_cluster(args: argparse.Namespace, argv: list[str] | None) -> dict[str, Any]:
    """`--cluster`: every phase on one node, then on a 3-primary cluster; the ratios."""
    started_at = fleet.now_iso()
    device_ids = [bench_device_id(index) for index in range(args.devices)]
    with fleet.redis_target(args.redis_url) as server:
        print(f"bench_store: {server.description}", flush=True)
        setup = asyncio.run(setup_devices(server.url, device_ids))
        single = {
            variant: phase(server.url, device_ids, args, server.cpu_seconds, variant, "one node")
            for variant in VARIANTS
        }
        cluster_setup, cluster = cluster_phases(device_ids, args)
        metrics: dict[str, float] = {}
        for variant in VARIANTS:
            for side, runs in (("single", single), ("cluster", cluster)):
                run = runs[variant]
                metrics |= {
                    f"{side}_{variant}_heartbeats_per_second": run["heartbeats_per_second"],
                    f"{side}_{variant}_redis_cpu_seconds_per_1k": run["redis_cpu_seconds_per_1k"],
                    f"{side}_{variant}_client_cpu_seconds_per_1k": run["client_cpu_seconds_per_1k"],
                }
            metrics[f"cluster_{variant}_busiest_primary_cpu_share"] = cluster[variant][
                "busiest_primary_share"
            ]
            metrics[f"ratio_{variant}_heartbeats_per_second"] = (
                cluster[variant]["heartbeats_per_second"] / single[variant]["heartbeats_per_second"]
            )
            metrics[f"ratio_{variant}_redis_cpu_per_heartbeat"] = cluster[variant][
                "redis_cpu_seconds_per_1k"
            ] / max(single[variant]["redis_cpu_seconds_per_1k"], 1e-9)
        metrics |= {
            "single_setup_register_seconds": setup["register_seconds"],
            "single_setup_connect_seconds": setup["connect_seconds"],
            "cluster_setup_register_seconds": cluster_setup["register_seconds"],
            "cluster_setup_connect_seconds": cluster_setup["connect_seconds"],
        }
        document = fleet.write_result(
            "bench_store_cluster",
            started_at=started_at,
            command=fleet.command_line("loadtest.bench_store", argv),
            redis_url=server.url,
            params={
                "devices": args.devices,
                "seconds": args.seconds,
                "max_heartbeats": args.max_heartbeats,
                "chunk": CHUNK,
                "partitions": Keys.cluster().partitions,
                "redis": server.description,
                "cluster": "a local Valkey Cluster started for the run: 3 primaries, no "
                "replicas, persistence and keyspace events off as on the single node",
                "redis_cpu_source": f"single: {server.cpu_source}; cluster: the sum of every "
                "primary's /proc/PID/stat utime+stime",
                "phases": "the same three phases (changing, unchanged, bare state) as "
                "bench-store, on the single node, then on the cluster with the gateway's "
                "cluster layout (one heartbeat_batch.lua call per partition and chunk); "
                "wall-clock rates are noisy on a shared machine: compare the CPU per heartbeat",
            },
            metrics=metrics,
            targets=[],
            out_dir=args.out,
        )
    fleet.print_summary(document)
    return document


if __name__ == "__main__":
    main()
