"""How a fleet is spread over worker processes, gateways and loopback source addresses.

Limits of a machine like the one the published figures come from: a process may open at most
20,000 files, and one source address has ~28,000 ephemeral ports toward one gateway port.
"""

from __future__ import annotations

import math
from dataclasses import replace
from urllib.parse import urlsplit

from loadtest.options import Options
from loadtest.sim import LATENCY_DASHBOARDS, Gateway, WorkerSpec

PER_WORKER = 15_000  # sockets per worker process, under the 20,000 open-files limit
PER_SOURCE = 25_000  # devices per loopback source address (~28,000 ephemeral ports)
PER_GATEWAY = 16_000  # device sockets per gateway process (same open-files limit)
# dashboards per worker process: a batch reaches every dashboard at once, and one process
# reads its dashboards' frames one after another, so fewer per process keeps that queue short
DASHBOARDS_PER_WORKER = 125


def worker_count(opts: Options, sockets: int, dashboards: int = 0) -> int:
    if opts.workers > 0:
        return opts.workers
    return max(1, math.ceil(sockets / PER_WORKER), math.ceil(dashboards / DASHBOARDS_PER_WORKER))


def source_addrs(opts: Options, sockets: int) -> list[str]:
    k = opts.source_addrs
    if k < 0:  # auto
        k = math.ceil(sockets / PER_SOURCE) if sockets > PER_SOURCE else 0
    return [f"127.0.0.{2 + i}" for i in range(k)]


def gateway_addresses(opts: Options, started_ports: list[int]) -> list[Gateway]:
    if started_ports and not opts.gateway:
        return [("127.0.0.1", port) for port in started_ports]
    return [(urlsplit(u).hostname or "127.0.0.1", urlsplit(u).port or 80) for u in opts.gateway]


def worker_specs(
    opts: Options,
    template: WorkerSpec,
    devices: list[tuple[str, str]],
    dashboards: int,
    stalled: bool,
) -> list[WorkerSpec]:
    """Devices (id, token) and dashboards dealt round-robin over workers, gateways, sources.

    Each worker's spec is *template* (gateways, intervals, reconnect, ...) with its share.
    """
    sockets = len(devices) + dashboards + int(stalled)
    workers = worker_count(opts, sockets, dashboards)
    sources = source_addrs(opts, sockets) or [""]
    gateways = len(template.gateways)
    specs = [replace(template, index=w, devices=[], dashboards=[]) for w in range(workers)]
    for i, (device_id, token) in enumerate(devices):
        specs[i % workers].devices.append(
            (device_id, token, i % gateways, sources[i % len(sources)])
        )
    sampled_every = max(1, dashboards // LATENCY_DASHBOARDS)
    for j in range(dashboards + int(stalled)):
        stalled_one = j == dashboards
        specs[j % workers].dashboards.append(
            (j % gateways, sources[j % len(sources)], stalled_one,
             not stalled_one and j % sampled_every == 0)
        )  # fmt: skip
    return specs
