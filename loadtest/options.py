"""What one run of `python -m loadtest SCENARIO` is asked to do, defaults filled in."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class Options:
    scenario: str
    devices: int
    dashboards: int
    duration: float
    workers: int
    source_addrs: int
    gateway: list[str]
    start_gateways: int
    redis_url: str | None
    heartbeat_interval: float
    heartbeat_timeout: float | None
    offline_grace: float | None
    rate: float
    out: Path
    api_key: str
    connect_concurrency: int
    drop: str
    frame: str
    stalled_dashboard: bool
    live: bool
    command: str
    device_type: str = "loadtest"
    fanout_events: str = "presence"  # fanout: presence transitions in Redis, or device state
    pin: bool = True  # gateways and Redis on some cores, the load generator on the others
    cluster: bool = False  # a local Valkey Cluster (3 primaries, 3 replicas) instead of one node
    kill_primary_at: float | None = None  # seconds into the measured phase: SIGKILL a primary

    @property
    def result_name(self) -> str:
        """What the result is filed and published under: a cluster run beside, never in
        place of, the scenario's single-node run."""
        return f"{self.scenario}-cluster" if self.cluster else self.scenario
