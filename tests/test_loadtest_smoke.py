"""The load test instrument works: tiny real runs against a live gateway process.

Each run starts its own gateway (`--start-gateways 1`) on a private embedded valkey, on
loopback, with 20 devices for a few seconds. No timing is asserted: only that the run
completed, counted every device online, and wrote a result JSON in the documented schema,
outside the repository unless told otherwise.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS_MD = REPO_ROOT / "docs" / "benchmarks.md"
DEVICES = 20
RUN_TIMEOUT = 150


def run_loadtest(out: Path, *args: str) -> dict[str, object]:
    completed = subprocess.run(
        [sys.executable, "-m", "loadtest", *args, "--devices", str(DEVICES),
         "--start-gateways", "1", "--no-live", "--out", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    results = sorted(out.glob("*.json"))
    assert len(results) == 1, results
    data: dict[str, object] = orjson.loads(results[0].read_bytes())
    for key in ("scenario", "started_at", "command", "machine", "params", "metrics", "targets"):
        assert key in data, key
    assert str(data["command"]).startswith("python -m loadtest ")
    for plot in data["plots"]:  # type: ignore[attr-defined]
        assert (out / plot).is_file()
    return data


@pytest.mark.timeout(RUN_TIMEOUT + 30)
def test_idle_run_counts_every_device_online(tmp_path: Path) -> None:
    data = run_loadtest(tmp_path, "idle", "--duration", "2")
    metrics = data["metrics"]
    assert isinstance(metrics, dict)
    assert data["scenario"] == "idle"
    assert metrics["online"] == DEVICES
    assert metrics["all_online"] is True
    assert metrics["gateway_rss_per_connection_kib"] is not None


@pytest.mark.timeout(RUN_TIMEOUT + 30)
def test_ingest_run_writes_every_reported_state(tmp_path: Path) -> None:
    data = run_loadtest(tmp_path, "ingest", "--rate", "100", "--duration", "3")
    metrics = data["metrics"]
    assert isinstance(metrics, dict)
    assert metrics["online_after_connect"] == DEVICES
    assert metrics["reported_state_checked"] == DEVICES
    assert metrics["reported_state_verified"] == DEVICES
    assert metrics["gateway_counted_frames"] == metrics["fleet_sent_frames"]


@pytest.mark.timeout(RUN_TIMEOUT + 30)
def test_fanout_run_counts_every_presence_event_on_every_dashboard(tmp_path: Path) -> None:
    data = run_loadtest(tmp_path, "fanout", "--dashboards", "5", "--rate", "100", "--duration", "3")
    metrics = data["metrics"]
    assert isinstance(metrics, dict)
    assert metrics["events"] == "presence"
    assert metrics["events_in_window"] > 0  # the producer wrote presence events in the window
    assert metrics["stream_trimmed_before_counted"] is False
    assert metrics["dashboards_with_every_event"] == 5
    assert metrics["dashboard_frames_out_of_order"] == 0
    assert metrics["event_ms_count"] > 0  # the sampled dashboard measured latencies


@pytest.mark.timeout(RUN_TIMEOUT + 30)
def test_desired_latency_reports_the_gateways_own_relay_latency(tmp_path: Path) -> None:
    data = run_loadtest(tmp_path, "desired-latency", "--rate", "20", "--duration", "3")
    metrics = data["metrics"]
    assert isinstance(metrics, dict)
    assert metrics["lost"] == 0
    assert metrics["state_updates_received"] > 0
    # every relayed command was timed by the gateway itself, beside the client's figure
    assert metrics["gateway_relay_count"] == metrics["state_updates_received"]
    assert metrics["gateway_relay_ms_p99"] is not None
    assert data["valid"] is True
    cpus = data["cpus"]
    assert isinstance(cpus, dict) and cpus["pinning"]


def repository_files() -> set[Path]:
    """Every file under loadtest/ and docs/ (where results and the page used to land)."""
    found: set[Path] = set()
    for top in (REPO_ROOT / "loadtest", REPO_ROOT / "docs"):
        for root, dirs, files in os.walk(top):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            found.update(Path(root, name) for name in files)
    return found


@pytest.mark.timeout(2 * RUN_TIMEOUT)
def test_a_smoke_run_lands_outside_the_repository_and_leaves_the_page_alone(
    tmp_path: Path,
) -> None:
    page = BENCHMARKS_MD.read_bytes()
    files = repository_files()
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path)}
    try:
        for command in (
            ["idle", "--devices", str(DEVICES), "--duration", "1", "--start-gateways", "1",
             "--no-live"],
            ["report"],
        ):  # fmt: skip
            completed = subprocess.run(
                [sys.executable, "-m", "loadtest", *command],
                cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT,
                check=False,
            )  # fmt: skip
            assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
        assert len(list((tmp_path / "presence-gateway" / "loadtest").glob("idle-*.json"))) == 1
        assert repository_files() == files  # nothing new in the repository's loadtest/, docs/
        assert BENCHMARKS_MD.read_bytes() == page  # the page shows published runs only
    finally:
        BENCHMARKS_MD.write_bytes(page)
        for stray in repository_files() - files:
            stray.unlink()
