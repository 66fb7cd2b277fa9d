"""Every scenario, by the name `python -m loadtest NAME` runs it under, with its defaults.

A scenario is a coroutine driving one run through its `Ctx`: it fills `ctx.result` with
metrics, targets and plots. Its docstring's first line is its one-line help.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from loadtest.context import Ctx
from loadtest.scenarios.connect import connect_storm, idle
from loadtest.scenarios.desired import desired_latency
from loadtest.scenarios.fanout import fanout
from loadtest.scenarios.ingest import ingest
from loadtest.scenarios.offline import offline_lag
from loadtest.scenarios.restart import reconnect_storm
from loadtest.scenarios.soak import moonshot, soak

Runner = Callable[[Ctx], Awaitable[None]]


@dataclass(frozen=True)
class Scenario:
    name: str
    runner: Runner
    defaults: dict[str, Any] = field(default_factory=dict)  # options not given on the command line
    on_cluster: bool = True  # runs with --cluster
    kills_primary: bool = False  # takes --kill-primary-at

    @property
    def summary(self) -> str:
        return (self.runner.__doc__ or self.name).strip().splitlines()[0].rstrip(".")


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("idle", idle, {"devices": 1000, "duration": 10.0}),
        Scenario(
            "connect-storm",
            connect_storm,
            {"devices": 1000, "duration": 2.0, "connect_concurrency": 512},
        ),
        Scenario("ingest", ingest, {"devices": 500, "duration": 15.0, "rate": 2000.0}),
        Scenario(
            "desired-latency", desired_latency, {"devices": 200, "duration": 15.0, "rate": 100.0}
        ),
        Scenario(
            "fanout",
            fanout,
            {"devices": 100, "dashboards": 20, "duration": 15.0, "rate": 200.0},
            on_cluster=False,  # its window is counted in the one fleet log of a single node
        ),
        Scenario(
            "offline-lag", offline_lag, {"devices": 200, "duration": 0.0, "heartbeat_timeout": 5.0}
        ),
        Scenario(
            "reconnect-storm",
            reconnect_storm,
            {"devices": 500, "duration": 5.0, "start_gateways": 2, "offline_grace": 10.0},
        ),
        Scenario("soak", soak, {"devices": 1000, "duration": 600.0}, kills_primary=True),
        Scenario(
            "moonshot",
            moonshot,
            {
                "devices": 100_000,
                "duration": 600.0,
                "start_gateways": 7,
                "heartbeat_interval": 30.0,
                "offline_grace": 15.0,
                "rate": 20.0,
                "connect_concurrency": 256,
            },
            kills_primary=True,
        ),
    )
}
