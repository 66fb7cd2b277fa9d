"""`python -m loadtest cluster-loop`: many small cluster moonshots, each with a primary killed.

A change lost once in a dozen failovers is invisible in any one run. This repeats a small
`moonshot --cluster --kill-primary-at` (a fresh cluster and fresh gateways each time) and
adds up what every run checks: desired changes accepted, and of them missing on their
devices; false offline events; when the replica was promoted; each run's desired → device
p99. One result (scenario `cluster-loop`) with every run's figures beside the totals.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

from loadtest import results, stats

RUN_METRICS = (
    "commands_ok", "commands_missing", "commands_refused", "false_offline_events",
    "replica_promoted_s", "killed_primary_devices", "command_ms_p50", "command_ms_p99",
    "command_ms_max", "commands_missing_made_s", "commands_missing_on_killed_primary",
)  # fmt: skip


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m loadtest cluster-loop")
    parser.add_argument("--runs", type=int, default=30, help="moonshots to run (30)")
    parser.add_argument("--devices", type=int, default=300)
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of each run")
    parser.add_argument("--kill-primary-at", type=float, default=6.0, metavar="SECONDS")
    parser.add_argument("--rate", type=float, default=20.0, help="desired changes/s")
    parser.add_argument("--start-gateways", type=int, default=2)
    parser.add_argument("--no-pin", action="store_true", help="see the moonshot's --no-pin")
    parser.add_argument(
        "--out", type=Path, help=f"results directory (default {results.results_dir()})"
    )
    return parser.parse_args(argv)


def moonshot_argv(args: argparse.Namespace, out: Path) -> list[str]:
    argv = [
        "moonshot", "--cluster", "--no-live",
        "--devices", str(args.devices), "--duration", f"{args.duration:g}",
        "--kill-primary-at", f"{args.kill_primary_at:g}", "--rate", f"{args.rate:g}",
        "--start-gateways", str(args.start_gateways), "--out", str(out),
    ]  # fmt: skip
    return [*argv, "--no-pin"] if args.no_pin else argv


def one_run(argv: list[str]) -> dict[str, Any]:
    """One moonshot, as its result document."""
    from loadtest.cli import build_parser, options_from
    from loadtest.run import run

    path = asyncio.run(run(options_from(build_parser().parse_args(argv), argv)))
    document: dict[str, Any] = orjson.loads(path.read_bytes())
    return document


def with_a_cluster(argv: list[str], attempts: int = 5) -> dict[str, Any]:
    """One run; a cluster that could not start (no run of free ports while the machine's
    sockets sit in TIME_WAIT) is started again a little later instead of counting as a run."""
    from gateway.config import StartupError

    for attempt in range(attempts):
        try:
            return one_run(argv)
        except StartupError as exc:
            if attempt == attempts - 1:
                raise
            print(f"[cluster-loop] the cluster did not start ({exc}); again", flush=True)
            time.sleep(5)
    raise AssertionError("unreachable")


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Totals over the runs' metrics (a run that failed counts as failed, not as clean)."""
    done = [r for r in runs if "error" not in r]

    def each(name: str) -> list[float]:
        return [float(r[name]) for r in done if isinstance(r.get(name), int | float)]

    p99s, promoted = each("command_ms_p99"), each("replica_promoted_s")
    return {
        "runs": len(runs),
        "runs_failed": len(runs) - len(done),
        "accepted": int(sum(each("commands_ok"))),
        "missing": int(sum(each("commands_missing"))),
        "runs_with_missing": sum(1 for r in done if r.get("commands_missing")),
        "refused": int(sum(each("commands_refused"))),
        "false_offline_events": int(sum(each("false_offline_events"))),
        "replica_promoted_s_median": statistics.median(promoted) if promoted else None,
        "replica_promoted_s_max": max(promoted, default=None),
        "command_ms_p99_median_run": round(statistics.median(p99s), 1) if p99s else None,
        "command_ms_p99_worst_run": max(p99s, default=None),
        "runs_with_p99_within_1s": sum(1 for p in p99s if p <= 1000),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    started_at = results.now_iso()
    runs: list[dict[str, Any]] = []
    machine: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="cluster-loop-") as scratch:
        for index in range(args.runs):
            try:
                document = with_a_cluster(moonshot_argv(args, Path(scratch)))
            except Exception as exc:  # one broken run is counted, the loop goes on
                runs.append({"error": f"{type(exc).__name__}: {exc}"})
                print(f"[cluster-loop] run {index + 1}/{args.runs}: failed: {exc}", flush=True)
                continue
            machine = machine or document.get("machine", {})
            m = document.get("metrics", {})
            run = {name: m.get(name) for name in RUN_METRICS if name in m}
            if "error" in m:
                run["error"] = m["error"]
            runs.append(run)
            print(f"[cluster-loop] run {index + 1}/{args.runs}: {orjson.dumps(run).decode()}")
    metrics = summarize(runs)
    document = {
        "scenario": "cluster-loop",
        "started_at": started_at,
        "command": "python -m loadtest cluster-loop "
        + " ".join(moonshot_argv(args, Path("OUT"))[3:]).replace(" --out OUT", "")
        + f" --runs {args.runs}",
        "machine": machine or results.machine(None),
        "params": {
            "runs": args.runs,
            "devices": args.devices,
            "duration": args.duration,
            "kill_primary_at": args.kill_primary_at,
            "rate": args.rate,
            "start_gateways": args.start_gateways,
        },
        "valid": True,
        "metrics": metrics,
        "targets": [
            stats.at_least(
                "runs completed", args.runs, metrics["runs"] - metrics["runs_failed"], ""
            ),
            stats.at_most("accepted desired changes missing, all runs", 0, metrics["missing"], ""),
            stats.at_most("false offline events, all runs", 0, metrics["false_offline_events"], ""),
        ],
        "plots": [],
        "runs_detail": runs,
    }
    stem = f"cluster-loop-{started_at.replace(':', '').replace('-', '')[:15]}"
    path = results.write_result(document, args.out or results.results_dir(), stem)
    print(f"[cluster-loop] {orjson.dumps(metrics).decode()}\nresult: {path}")
    return {**document, "path": str(path)}
