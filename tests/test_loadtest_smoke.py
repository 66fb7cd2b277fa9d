"""The load test instrument works: tiny real runs against a live gateway process.

Each run starts its own gateway (`--start-gateways 1`) on a private embedded valkey, on
loopback, with 20 devices for a few seconds. No timing is asserted: only that the run
completed, counted every device online, and wrote a result JSON in the documented schema.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
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
