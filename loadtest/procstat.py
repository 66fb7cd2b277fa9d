"""CPU-seconds and resident memory of given processes, read from /proc.

CPU time is utime + stime from `/proc/PID/stat` (fields 14 and 15, in clock ticks): on a shared,
noisy machine, CPU-seconds per unit of work compare between runs far better than wall time.
RSS comes from `/proc/PID/status` (`VmRSS`). Linux only; a vanished process reads as None.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
LISTEN = "0A"
ESTABLISHED = "01"


@dataclass(frozen=True, slots=True)
class Reading:
    cpu_s: float
    rss_bytes: int


def read(pid: int) -> Reading | None:
    """One process's CPU-seconds (user + system) and RSS now; None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # the command name (field 2) is in parentheses and may contain spaces
    fields = stat[stat.rindex(")") + 2 :].split()
    cpu = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    rss = 0
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * 1024
            break
    return Reading(cpu, rss)


def read_group(pids: list[int]) -> Reading:
    """The sum over several processes (e.g. every gateway process); missing ones count 0."""
    cpu, rss = 0.0, 0
    for pid in pids:
        reading = read(pid)
        if reading is not None:
            cpu += reading.cpu_s
            rss += reading.rss_bytes
    return Reading(cpu, rss)


def pids_listening(port: int) -> list[int]:
    """Processes (visible to us) holding a listening TCP socket on *port* (any address)."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                parts = line.split()
                local, state, inode = parts[1], parts[3], parts[9]
                if state == LISTEN and int(local.rsplit(":", 1)[1], 16) == port:
                    inodes.add(f"socket:[{inode}]")
    if not inodes:
        return []
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (entry / "fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) in inodes:
                        found.append(int(entry.name))
                        break
    return sorted(found)


def _address(hex_address: str) -> str:
    """`0100007F:1F90` (an IPv4 /proc/net/tcp address, little-endian) as `127.0.0.1:8080`."""
    host, port = hex_address.split(":")
    octets = bytes.fromhex(host)[::-1]
    return f"{'.'.join(str(b) for b in octets)}:{int(port, 16)}"


def tcp_connections(pid: int) -> set[tuple[str, str]]:
    """The established IPv4 TCP connections a process holds, as (local, remote) `ip:port`.

    Its sockets are the `socket:[inode]` links in `/proc/PID/fd`; their addresses come from
    the network namespace's table (`/proc/PID/net/tcp`). A vanished process holds none.
    """
    inodes: set[str] = set()
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                link = os.readlink(fd)
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
    found: set[tuple[str, str]] = set()
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
            parts = line.split()
            if parts[3] == ESTABLISHED and parts[9] in inodes:
                found.add((_address(parts[1]), _address(parts[2])))
    return found


@dataclass
class Sampler:
    """Named groups of pids sampled every *interval* seconds into a timeline.

    `groups` maps a name ("gateway", "redis") to pids; pids may be replaced while running
    (a restarted gateway), the CPU of a vanished process is kept in `retired_cpu`.
    """

    groups: dict[str, list[int]]
    interval: float = 1.0
    started: float = field(default_factory=time.monotonic)
    timeline: list[dict[str, float]] = field(default_factory=list)
    retired_cpu: dict[str, float] = field(default_factory=dict)
    _last: dict[int, float] = field(default_factory=dict)

    def snapshot(self) -> dict[str, Reading]:
        result: dict[str, Reading] = {}
        for name, pids in self.groups.items():
            cpu, rss = self.retired_cpu.get(name, 0.0), 0
            for pid in pids:
                reading = read(pid)
                if reading is None:
                    continue
                self._last[pid] = reading.cpu_s
                cpu += reading.cpu_s
                rss += reading.rss_bytes
            result[name] = Reading(cpu, rss)
        return result

    def retire(self, name: str, pid: int) -> None:
        """*pid* of group *name* is ending: keep its last CPU reading in the group's total."""
        reading = read(pid)
        cpu = reading.cpu_s if reading is not None else self._last.get(pid, 0.0)
        self.retired_cpu[name] = self.retired_cpu.get(name, 0.0) + cpu
        if pid in self.groups.get(name, []):
            self.groups[name].remove(pid)

    def sample(self, **extra: float) -> dict[str, float]:
        point: dict[str, float] = {"t": round(time.monotonic() - self.started, 3)}
        for name, reading in self.snapshot().items():
            point[f"{name}_cpu_s"] = round(reading.cpu_s, 3)
            point[f"{name}_rss_mib"] = round(reading.rss_bytes / 2**20, 2)
        point.update(extra)
        self.timeline.append(point)
        return point

    async def run(self) -> None:
        """Sample until cancelled."""
        while True:
            self.sample()
            await asyncio.sleep(self.interval)
