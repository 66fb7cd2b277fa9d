"""`python -m loadtest redis-cost` counts real server instructions: a tiny run under callgrind.

No figure is asserted beyond what must hold whatever the machine: every variant was counted,
a heartbeat that writes state and history costs more than one that only renews presence.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import orjson
import pytest
from servers import skip_or_fail

from loadtest import redis_cost


@pytest.mark.timeout(240)
def test_a_tiny_run_counts_instructions_for_every_variant_and_the_seed(tmp_path: Path) -> None:
    if shutil.which("valgrind") is None:
        skip_or_fail("valgrind is not installed (Debian package valgrind)")
    redis_cost.main(
        ["--devices", "20", "--rounds", "1", "--seed-rounds", "1", "--out", str(tmp_path)]
    )
    [result] = tmp_path.glob("redis_cost-*.json")
    metrics = orjson.loads(result.read_bytes())["metrics"]
    changing = metrics["gateway_changing_instructions_per_heartbeat"]
    bare = metrics["gateway_bare_instructions_per_heartbeat"]
    assert metrics["seed_instructions_per_heartbeat"] > 0
    assert changing > bare > 0
    assert metrics["gateway_changing_to_seed_ratio"] == round(
        changing / metrics["seed_instructions_per_heartbeat"], 2
    )
