"""`python -m loadtest commands` works: a tiny real run, and the simulated device's answers.

The run starts its own gateway process on a private valkey (loopback), with 50 devices for a
few seconds: no timing is asserted, only what must hold at any size: every accepted command
final with its device's result, none lost, none answered twice, the queued ones delivered in
the order they were made.
"""

from __future__ import annotations

import multiprocessing
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from loadtest.sim import Device, Worker, WorkerSpec

REPO_ROOT = Path(__file__).resolve().parents[1]
DEVICES = 50
QUEUED = 3
RUN_TIMEOUT = 120


@pytest.mark.timeout(RUN_TIMEOUT + 30)
def test_a_small_run_loses_nothing_and_answers_nothing_twice(tmp_path: Path) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "loadtest", "commands", "--devices", str(DEVICES),
         "--rate", "50", "--duration", "3", "--queued", str(QUEUED), "--no-live",
         "--out", str(tmp_path)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    (path,) = tmp_path.glob("commands-*.json")
    data: dict[str, Any] = orjson.loads(path.read_bytes())
    assert data["scenario"] == "commands"
    assert data["params"]["devices"] == DEVICES
    m = data["metrics"]
    assert "error" not in m
    live, drain = m["live_accepted"], m["drain_accepted"]
    assert live >= 100 and m["live_post_statuses"] == f"202:{live}"
    assert m["live_accepted_as"] == f"sent:{live}"  # every device was connected
    assert drain == DEVICES * QUEUED and m["drain_accepted_as"] == f"queued:{drain}"
    assert m["offline_before_queueing"] is True
    # every accepted command read back, final, with the result its device gave
    assert m["accepted"] == live + drain == m["read_back"] == m["succeeded"]
    assert m["lost"] == 0 and m["wrong_result"] == 0 and m["unverified"] == 0
    # answered once: each result stored once, each ack for a result not acked before
    assert m["answered_twice"] == 0 and m["stored_twice"] == 0 and m["acked_twice"] == 0
    assert m["results_sent_by_devices"] == m["results_counted_by_gateway"] == live + drain
    assert m["live_command_acks"] == live and m["drain_command_acks"] == drain
    # the queued ones reached each device in the order they were made, after its reconnect
    assert m["drain_out_of_order"] == 0 and m["drain_complete"] is True
    assert m["drain_s"] is not None and 0 < m["drain_s"] < 60
    # the round trip of every live command, beside the gateway's own histogram
    assert m["round_trip_ms_count"] == live == m["gateway_command_count"]
    assert m["stored_ms_count"] == live
    assert 0 < m["round_trip_ms_p50"] <= m["round_trip_ms_p99"] <= m["round_trip_ms_max"]
    assert m["gateway_command_ms_p99"] is not None
    names = {t["name"] for t in data["targets"]}
    assert {"accepted commands lost", "commands answered twice"} <= names
    assert all(
        t["ok"]
        for t in data["targets"]
        if t["name"].startswith(("accepted", "commands answ", "queued"))
    )


async def test_a_simulated_device_runs_each_command_once_and_in_order() -> None:
    parent, child = multiprocessing.Pipe()
    try:
        worker = Worker(WorkerSpec(index=0, gateways=[], devices=[], dashboards=[]), child)
        device = Device("d-1", "token", 0, "")

        def command(command_id: str, seq: int) -> str | None:
            frame = {"type": "command", "command_id": command_id, "params": {"seq": seq}}
            return worker.handle(device, orjson.dumps(frame))

        first = command("c-1", 1)
        assert first is not None
        assert orjson.loads(first) == {
            "type": "command_result", "command_id": "c-1", "status": "succeeded",
            "result": {"echo": 1},
        }  # fmt: skip
        assert command("c-1", 1) == first  # a repeat: the same answer, not run again
        assert command("c-2", 0) is not None  # made before c-1, yet came after it
        counters = worker.stats.counters
        assert counters["commands_received"] == 3
        assert counters["commands_run"] == 2
        assert counters["commands_repeated"] == 1
        assert counters["commands_out_of_order"] == 1
        ack = {"type": "ack", "command_id": "c-1", "status": "succeeded"}
        worker.handle(device, orjson.dumps(ack))
        worker.handle(device, orjson.dumps(ack))  # a second ack: stored twice?
        assert counters["command_acks"] == 1
        assert counters["command_acks_unexpected"] == 1
    finally:
        parent.close()
        child.close()
