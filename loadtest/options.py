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
