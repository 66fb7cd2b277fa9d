"""`python -m loadtest suite`: every figure in docs/benchmarks.md, at its target's size."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from loadtest import report, results

SUITE: tuple[tuple[str, ...], ...] = (
    ("bench-store", "--devices", "10000", "--seconds", "10"),
    ("bench-store", "--cluster", "--devices", "10000", "--seconds", "10"),
    ("redis-cost", "--devices", "10000", "--rounds", "2", "--seed-rounds", "1", "--cluster"),
    ("memory", "--devices", "1000000"),
    ("bench-api", "--devices", "1000000", "--repeat", "50", "--warmup", "5"),
    ("bench-dashboard", "--devices", "100000"),
    ("idle", "--devices", "15000", "--duration", "30"),
    ("connect-storm", "--devices", "10000"),
    ("ingest", "--devices", "5000", "--rate", "25000", "--duration", "30"),
    ("desired-latency", "--devices", "10000", "--rate", "1000", "--duration", "60"),
    ("fanout", "--devices", "1000", "--dashboards", "500", "--rate", "1000", "--duration", "300"),
    ("offline-lag", "--devices", "1000", "--heartbeat-timeout", "5"),
    ("reconnect-storm", "--devices", "10000", "--start-gateways", "2"),
    ("moonshot",),
    # unpinned: seven gateways and six cluster nodes do not fit the one core pinning gives them
    ("moonshot", "--cluster", "--kill-primary-at", "300", "--no-pin"),
)


def suite(run_command: Callable[[Sequence[str]], Path | None], publish: bool) -> None:
    """Every benchmark in turn (about an hour here); with *publish*, publish them all and
    regenerate the page, else say how to."""
    written: list[Path] = []
    for command in SUITE:
        print(f"\n=== python -m loadtest {' '.join(command)}", flush=True)
        try:
            path = run_command(command)
        except SystemExit as exc:  # one failed run is reported; the others still run
            print(f"=== exit {exc.code}", flush=True)
            continue
        if path is not None:
            written.append(path)
    if not publish:
        print("\nresults:", *written, sep="\n  ")
        print("publish them with: python -m loadtest publish RESULT.json ...")
        return
    for path in written:
        try:
            print(f"published {results.publish(path)}")
        except results.PublishError as exc:
            print(f"not published: {exc}")
    print(f"wrote {report.generate()}")
