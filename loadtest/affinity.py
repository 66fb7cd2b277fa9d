"""Which cores the gateways and Redis run on, and which the load generator runs on.

On a small machine a load generator that shares cores with the gateway measures its own
queueing as the gateway's latency: two 2-core machines measured the same commit's p99 at 8.8 ms
and 359 ms. So the run splits the cores it may use: the first half (the larger, when odd) for
the gateways and Redis it started, the rest for itself and its worker processes, which
inherit the coordinator's affinity. Linux only; a run on one core is not pinned.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Split:
    server: tuple[int, ...]  # gateways and Redis
    generator: tuple[int, ...]  # this process and its workers


def split(cpus: Sequence[int]) -> Split | None:
    """The server's and the generator's cores of *cpus*; None with fewer than two."""
    ordered = sorted(cpus)
    if len(ordered) < 2:
        return None
    half = (len(ordered) + 1) // 2
    return Split(tuple(ordered[:half]), tuple(ordered[half:]))


def available() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def pin(pid: int, cpus: Sequence[int]) -> bool:
    """Every thread of *pid* onto *cpus* (threads it starts later inherit); False if gone."""
    pinned = False
    for task in _tasks(pid):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.sched_setaffinity(task, cpus)
            pinned = True
    return pinned


def _tasks(pid: int) -> list[int]:
    try:
        return [int(entry.name) for entry in Path(f"/proc/{pid}/task").iterdir()]
    except OSError:
        return [pid]


def cpu_list(cpus: Sequence[int]) -> str:
    return ("CPU " if len(cpus) == 1 else "CPUs ") + ", ".join(str(c) for c in cpus)


def describe(chosen: Split, redis_pinned: bool) -> str:
    server = "gateways and Redis" if redis_pinned else "gateways (Redis not started here: unpinned)"
    return (
        f"{server} on {cpu_list(chosen.server)}, "
        f"load generator (coordinator and workers) on {cpu_list(chosen.generator)}"
    )
