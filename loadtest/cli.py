"""`python -m loadtest SCENARIO [options]` and `python -m loadtest report`."""

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

from loadtest import report
from loadtest.scenarios import DEFAULTS, SCENARIOS, Options, run

FALLBACKS: dict[str, Any] = {
    "devices": 100,
    "dashboards": 0,
    "duration": 10.0,
    "heartbeat_interval": 20.0,
    "rate": 100.0,
    "start_gateways": 1,
    "connect_concurrency": 256,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest",
        description="Load tests and benchmarks for the presence gateway (loopback only). "
        "`report` regenerates docs/benchmarks.md from the results.",
    )
    parser.add_argument("scenario", choices=[*SCENARIOS, "report"])
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
    parser.add_argument("--heartbeat-interval", type=float, help="device heartbeat seconds")
    parser.add_argument(
        "--heartbeat-timeout", type=float, help="GATEWAY_HEARTBEAT_TIMEOUT of started gateways"
    )
    parser.add_argument(
        "--offline-grace", type=float, help="GATEWAY_OFFLINE_GRACE of started gateways"
    )
    parser.add_argument("--rate", type=float, help="messages/s (ingest, fanout) or changes/s")
    parser.add_argument("--out", type=Path, default=report.RESULTS_DIR, help="results directory")
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
    parser.add_argument("--no-live", action="store_true", help="no live progress view")
    parser.add_argument("--docs", type=Path, default=report.BENCHMARKS_MD, help="(report) output")
    return parser


def options_from(args: argparse.Namespace, argv: Sequence[str]) -> Options:
    defaults = {**FALLBACKS, **DEFAULTS[args.scenario]}

    def pick(name: str) -> Any:
        value = getattr(args, name, None)
        return value if value is not None else defaults.get(name)

    start = pick("start_gateways") if not args.gateway else 0
    if args.gateway and not args.api_key:
        raise SystemExit("loadtest: --gateway needs --api-key (an admin key of that gateway)")
    return Options(
        scenario=args.scenario,
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
    console.print(f"result: {path}")
    for plot in data["plots"]:
        console.print(f"plot:   {path.parent / plot}")


# benchmarks with their own options, run as `python -m loadtest NAME [options]`
BENCHMARKS = {
    "bench-store": "loadtest.bench_store",
    "redis-cost": "loadtest.redis_cost",
    "bench-api": "loadtest.bench_api",
    "baseline": "loadtest.baseline",
    "fleet": "loadtest.fleet",
}


# every figure in docs/benchmarks.md, at the sizes the issues set: `python -m loadtest suite`
SUITE: tuple[tuple[str, ...], ...] = (
    ("bench-store", "--devices", "10000", "--seconds", "10"),
    ("redis-cost", "--devices", "2000", "--rounds", "5"),
    ("bench-api", "--devices", "1000000", "--repeat", "50", "--warmup", "5"),
    ("idle", "--devices", "15000", "--duration", "30"),
    ("connect-storm", "--devices", "10000"),
    ("ingest", "--devices", "5000", "--rate", "25000", "--duration", "30"),
    ("desired-latency", "--devices", "10000", "--rate", "1000", "--duration", "60"),
    ("fanout", "--devices", "1000", "--dashboards", "500", "--rate", "1000", "--duration", "300"),
    ("offline-lag", "--devices", "1000", "--heartbeat-timeout", "5"),
    ("reconnect-storm", "--devices", "10000", "--start-gateways", "2"),
    ("moonshot",),
)


def suite() -> None:
    """Run every benchmark in turn (about 45 minutes here), then regenerate the page."""
    for command in SUITE:
        print(f"\n=== python -m loadtest {' '.join(command)}", flush=True)
        try:
            main(list(command))
        except SystemExit as exc:  # one failed run is reported; the others still run
            print(f"=== exit {exc.code}", flush=True)
    print(f"wrote {report.generate(report.RESULTS_DIR, report.BENCHMARKS_MD)}")


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv == ["suite"]:
        suite()
        return
    if argv and argv[0] in BENCHMARKS:
        importlib.import_module(BENCHMARKS[argv[0]]).main(argv[1:])
        return
    args = build_parser().parse_args(argv)
    if args.scenario == "report":
        written = report.generate(args.out, args.docs)
        print(f"wrote {written}")
        return
    opts = options_from(args, argv)
    path = asyncio.run(run(opts))
    print_summary(path)
    data = orjson.loads(path.read_bytes())
    if "error" in data["metrics"]:
        raise SystemExit(1)
