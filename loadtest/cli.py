"""`python -m loadtest COMMAND [options]`: scenarios, benchmarks, the suite, publish, report."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import secrets
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from loadtest import report, results
from loadtest.options import Options
from loadtest.run import run
from loadtest.scenarios import SCENARIOS

FALLBACKS: dict[str, Any] = {
    "devices": 100,
    "dashboards": 0,
    "duration": 10.0,
    "heartbeat_interval": 20.0,
    "rate": 100.0,
    "start_gateways": 1,
    "connect_concurrency": 256,
}

# benchmarks with their own options, run as `python -m loadtest NAME [options]`
BENCHMARKS: dict[str, tuple[str, str]] = {
    "bench-store": ("loadtest.bench_store", "Heartbeats/s through the presence engine's batches"),
    "bench-api": ("loadtest.bench_api", "REST API latency over HTTP on a loaded fleet"),
    "bench-dashboard": ("loadtest.bench_dashboard", "Dashboard first paint and scroll (Chromium)"),
    "redis-cost": ("loadtest.redis_cost", "Redis instructions per heartbeat (callgrind)"),
    "fleet": ("loadtest.fleet", "Load a registered fleet straight into Redis"),
    "memory": ("loadtest.memory", "Redis memory per registered device, by key kind"),
    "baseline": ("loadtest.baseline", "The guide's DeviceStateManager and BulkStateQuery"),
    "migrate": ("loadtest.bench_migrate", "gateway migrate --apply on a loaded fleet, timed"),
    "mqtt": ("loadtest.bench_mqtt", "MQTT devices through Mosquitto beside WebSocket devices"),
    "events": ("loadtest.bench_events", "Presence events to webhook endpoints and SSE readers"),
    "commands": ("loadtest.bench_commands", "Command round trip at 1,000/s, then an offline drain"),
    "cluster-loop": ("loadtest.cluster_loop", "Small cluster moonshots, a primary killed in each"),
}
OWN = {
    "suite": "Every benchmark at its target's size (~1.5 hours)",
    "publish": "Copy runs into loadtest/published/, regenerate page",
    "report": "Regenerate docs/benchmarks.md from published runs",
}


def commands() -> dict[str, str]:
    """Every command with its line of help."""
    scenarios = {s.name: s.summary for s in SCENARIOS.values()}
    return {**scenarios, **{name: line for name, (_, line) in BENCHMARKS.items()}, **OWN}


def build_parser() -> argparse.ArgumentParser:
    listing = "\n".join(f"  {name:<17}{line}" for name, line in commands().items())
    parser = argparse.ArgumentParser(
        prog="python -m loadtest",
        usage="python -m loadtest COMMAND [options]",
        description="Load tests and benchmarks for the presence gateway (loopback only).\n\n"
        f"commands:\n{listing}",
        epilog=f"Runs write their results to {results.results_dir()}\n"
        "(outside the repository; --out to change). docs/benchmarks.md shows only runs\n"
        "published with `publish`. `python -m loadtest COMMAND --help`: a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", help=argparse.SUPPRESS)
    common = scenario_options()
    for scenario in SCENARIOS.values():
        sub.add_parser(scenario.name, parents=[common], description=scenario.summary)
    for name in BENCHMARKS:
        sub.add_parser(name, add_help=False)  # parsed by the benchmark's own parser
    suite = sub.add_parser("suite", description=OWN["suite"])
    suite.add_argument("--publish", action="store_true", help="publish each run, then report")
    publish = sub.add_parser("publish", description=OWN["publish"])
    publish.add_argument("results", nargs="+", type=Path, help="result JSON files")
    publish.add_argument("--force", action="store_true", help="publish a run marked not valid")
    publish.add_argument("--docs", type=Path, default=results.BENCHMARKS_MD, help="page to write")
    page = sub.add_parser("report", description=OWN["report"])
    page.add_argument(
        "--from", dest="source", type=Path, default=results.PUBLISHED_DIR,
        help="results to show (default loadtest/published/; your own runs: the results dir)",
    )  # fmt: skip
    page.add_argument("--docs", type=Path, default=results.BENCHMARKS_MD, help="page to write")
    return parser


def scenario_options() -> argparse.ArgumentParser:
    """The options every scenario takes (defaults per scenario: `loadtest.scenarios`)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--devices", type=int, help="simulated devices (N)")
    parser.add_argument("--dashboards", type=int, help="dashboards (fanout)")
    parser.add_argument("--duration", type=float, help="seconds of the measured phase")
    parser.add_argument("--workers", type=int, default=0, help="worker processes (0: auto)")
    parser.add_argument(
        "--source-addrs", type=int, default=-1,
        help="bind devices to 127.0.0.2..127.0.0.(K+1) (-1: auto, 0: none)",
    )  # fmt: skip
    target = parser.add_mutually_exclusive_group()
    target.add_argument(
        "--gateway", action="append", default=[],
        help="URL of an already running gateway (repeatable); loopback only",
    )  # fmt: skip
    target.add_argument("--start-gateways", type=int, help="start G gateway processes")
    parser.add_argument("--redis-url", help="Redis for started gateways / for reading results")
    parser.add_argument(
        "--cluster", action="store_true",
        help="run the started gateways on a local Valkey Cluster (3 primaries, 3 replicas) "
        "instead of one private Redis",
    )  # fmt: skip
    parser.add_argument(
        "--kill-primary-at", type=float, metavar="SECONDS",
        help="with --cluster (soak, moonshot): kill -9 one primary this many seconds into "
        "the measured phase",
    )  # fmt: skip
    parser.add_argument("--heartbeat-interval", type=float, help="device heartbeat seconds")
    parser.add_argument(
        "--heartbeat-timeout", type=float, help="GATEWAY_HEARTBEAT_TIMEOUT of started gateways"
    )
    parser.add_argument(
        "--offline-grace", type=float, help="GATEWAY_OFFLINE_GRACE of started gateways"
    )
    parser.add_argument("--rate", type=float, help="messages/s (ingest, fanout) or changes/s")
    parser.add_argument(
        "--out", type=Path, default=results.results_dir(),
        help=f"results directory (default {results.results_dir()}, outside the repository)",
    )  # fmt: skip
    parser.add_argument("--api-key", help="admin key (started gateways get it; default random)")
    parser.add_argument("--connect-concurrency", type=int, help="in-flight handshakes per worker")
    parser.add_argument(
        "--drop", choices=["abort", "silent", "mixed"], default="mixed",
        help="offline-lag: how devices vanish (mixed: half each)",
    )  # fmt: skip
    parser.add_argument(
        "--frame", choices=["heartbeat", "report"], default="heartbeat",
        help="payload frame: heartbeat with reported_state, or report (acked)",
    )  # fmt: skip
    parser.add_argument(
        "--no-stalled-dashboard", action="store_true", help="fanout: no stalled dashboard"
    )
    parser.add_argument(
        "--events", choices=["presence", "state"], default="presence",
        help="fanout: presence transitions written to Redis (default), or device state reports",
    )  # fmt: skip
    parser.add_argument(
        "--no-pin", action="store_true",
        help="do not split the cores between the started gateways and Redis and the generator",
    )  # fmt: skip
    parser.add_argument("--no-live", action="store_true", help="no live progress view")
    return parser


def options_from(args: argparse.Namespace, argv: Sequence[str]) -> Options:
    defaults = {**FALLBACKS, **SCENARIOS[args.command].defaults}

    def pick(name: str) -> Any:
        value = getattr(args, name, None)
        return value if value is not None else defaults.get(name)

    start = pick("start_gateways") if not args.gateway else 0
    if args.gateway and not args.api_key:
        raise SystemExit("loadtest: --gateway needs --api-key (an admin key of that gateway)")
    check_cluster(args, float(pick("duration")), int(start))
    return Options(
        scenario=args.command,
        devices=int(pick("devices")),
        dashboards=int(pick("dashboards")),
        duration=float(pick("duration")),
        workers=args.workers,
        source_addrs=args.source_addrs,
        gateway=list(args.gateway),
        start_gateways=int(start),
        redis_url=args.redis_url,
        heartbeat_interval=float(pick("heartbeat_interval")),
        heartbeat_timeout=pick("heartbeat_timeout"),
        offline_grace=pick("offline_grace"),
        rate=float(pick("rate")),
        out=args.out,
        api_key=args.api_key or f"lt-{secrets.token_urlsafe(16)}",
        connect_concurrency=int(pick("connect_concurrency")),
        drop=args.drop,
        frame=args.frame,
        stalled_dashboard=not args.no_stalled_dashboard,
        fanout_events=args.events,
        live=not args.no_live,
        command=shlex.join(["python", "-m", "loadtest", *argv]),
        pin=not args.no_pin,
        cluster=args.cluster,
        kill_primary_at=args.kill_primary_at,
    )


def check_cluster(args: argparse.Namespace, duration: float, start_gateways: int) -> None:
    """Refuse `--cluster` and `--kill-primary-at` where they cannot be honoured."""
    scenario = SCENARIOS[args.command]
    if args.cluster:
        if args.gateway or args.redis_url:
            raise SystemExit(
                "loadtest: --cluster starts its own cluster and gateways: "
                "drop --gateway and --redis-url"
            )
        if start_gateways < 1:
            raise SystemExit("loadtest: --cluster needs --start-gateways of at least 1")
        if not scenario.on_cluster:
            raise SystemExit(
                f"loadtest: {scenario.name} counts its window in the fleet log of one node; "
                "it does not run with --cluster"
            )
    at = args.kill_primary_at
    if at is None:
        return
    if not args.cluster:
        raise SystemExit("loadtest: --kill-primary-at needs --cluster")
    if not scenario.kills_primary:
        killers = ", ".join(s.name for s in SCENARIOS.values() if s.kills_primary)
        raise SystemExit(f"loadtest: --kill-primary-at is for {killers}, not {scenario.name}")
    if not 0 < at < duration:
        raise SystemExit(
            f"loadtest: --kill-primary-at must fall inside the measured phase "
            f"(0 < SECONDS < --duration {duration:g}), got {at:g}"
        )


def print_summary(path: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    data = orjson.loads(path.read_bytes())
    console = Console()
    metrics = Table(title=f"{data['scenario']} — metrics")
    metrics.add_column("metric")
    metrics.add_column("value", justify="right")
    for key, value in data["metrics"].items():
        metrics.add_row(key, str(value))
    console.print(metrics)
    targets = Table(title="targets")
    for column in ("target", "goal", "measured", "ok"):
        targets.add_column(column)
    for t in data["targets"]:
        targets.add_row(
            t["name"], t["target"], f"{t['measured']} {t['unit']}", "✅" if t["ok"] else "❌"
        )
    console.print(targets)
    console.print(f"CPUs:   {data['cpus']['pinning']}")
    invalid = results.invalid_reason(data)
    if invalid is not None:
        console.print(f"[bold red]NOT VALID: {invalid}; its latencies are not the gateway's")
    console.print(f"result: {path}")
    for plot in data["plots"]:
        console.print(f"plot:   {path.parent / plot}")
    console.print(f"publish it (docs/benchmarks.md): python -m loadtest publish {path}")


def publish(paths: Sequence[Path], force: bool, docs: Path) -> None:
    for path in paths:
        try:
            print(f"published {results.publish(path, force=force)}")
        except results.PublishError as exc:
            raise SystemExit(f"loadtest: {exc}") from None
    print(f"wrote {report.generate(results.PUBLISHED_DIR, docs)}")


def run_command(argv: Sequence[str]) -> Path | None:
    """Run one scenario or benchmark; the path of its result (None for the others)."""
    argv = list(argv)
    if argv and argv[0] in BENCHMARKS:
        document = importlib.import_module(BENCHMARKS[argv[0]][0]).main(argv[1:])
        return Path(document["path"])
    args = build_parser().parse_args(argv)
    if args.command is None:
        build_parser().print_help()
        raise SystemExit(2)
    if args.command == "suite":
        from loadtest.suite import suite

        suite(run_command, args.publish)
        return None
    if args.command == "publish":
        publish(args.results, args.force, args.docs)
        return None
    if args.command == "report":
        print(f"wrote {report.generate(args.source, args.docs)}")
        return None
    path = asyncio.run(run(options_from(args, argv)))
    print_summary(path)
    if "error" in orjson.loads(path.read_bytes())["metrics"]:
        raise SystemExit(1)
    return path


def main(argv: Sequence[str] | None = None) -> None:
    run_command(sys.argv[1:] if argv is None else argv)
