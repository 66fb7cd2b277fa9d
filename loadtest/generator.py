"""The load generator's own CPU, and whether it kept up with what it was asked to do.

A simulated device stamps and reads its frames on a worker process's event loop; when that
loop is saturated, frames wait in the worker, and the wait is measured as the gateway's
latency. So every measured window also reads the CPU-seconds of the coordinator (this process:
producers, the live view) and of each worker from /proc, and a run in which any of them used
more than 90 % of a core over a window, or in which they filled the cores they were pinned to,
is marked not valid: its latencies are the generator's, not the gateway's.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from loadtest import procstat

SATURATED = 0.9  # of one core
MIN_WINDOW_S = 1.0  # shorter windows are a few clock ticks: too coarse to judge

Readings = dict[str, float]  # process name → CPU-seconds


def read(workers: Mapping[int, int]) -> Readings:
    """CPU-seconds now of the coordinator and of each worker (by index → pid)."""
    pids = {"coordinator": os.getpid()}
    pids.update({f"worker-{index}": pid for index, pid in sorted(workers.items())})
    readings: Readings = {}
    for name, pid in pids.items():
        reading = procstat.read(pid)
        if reading is not None:
            readings[name] = reading.cpu_s
    return readings


@dataclass
class GeneratorLoad:
    """The busiest measured window of each generator process, as a share of one core."""

    cores: int  # the cores the generator may use (its pinned ones, or all)
    peak: dict[str, float] = field(default_factory=dict)
    total_peak: float = 0.0
    windows: int = 0

    def observe(self, start: Readings, end: Readings, seconds: float) -> None:
        if seconds < MIN_WINDOW_S:
            return
        self.windows += 1
        total = 0.0
        for name, cpu in end.items():
            if name in start:
                share = (cpu - start[name]) / seconds
                total += share
                self.peak[name] = max(self.peak.get(name, 0.0), share)
        self.total_peak = max(self.total_peak, total)

    @property
    def busiest(self) -> tuple[str, float]:
        if not self.peak:
            return "", 0.0
        return max(self.peak.items(), key=lambda item: item[1])

    def saturated(self) -> str | None:
        """Why the generator could not keep up, or None."""
        name, share = self.busiest
        if share > SATURATED:
            return f"load generator saturated: {name} used {share:.0%} of a core"
        if self.total_peak > SATURATED * self.cores:
            return (
                f"load generator saturated: its processes used {self.total_peak:.2f} of its "
                f"{self.cores} core{'s' if self.cores > 1 else ''}"
            )
        return None

    def document(self) -> dict[str, Any]:
        return {
            "cpu_util_peak": {name: round(share, 3) for name, share in self.peak.items()},
            "cpu_util_total_peak": round(self.total_peak, 3),
            "cores": self.cores,
            "windows_judged": self.windows,
            "saturated_above": SATURATED,
        }
