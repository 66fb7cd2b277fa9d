"""`python -m loadtest --help` names every command, each with its one line of help."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
COMMANDS = (
    "idle", "connect-storm", "ingest", "desired-latency", "fanout", "offline-lag",
    "reconnect-storm", "soak", "moonshot",
    "bench-store", "bench-api", "redis-cost", "fleet", "baseline",
    "suite", "publish", "report",
)  # fmt: skip


def test_help_lists_every_command_with_a_line_each() -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "loadtest", "--help"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "COLUMNS": "80"},
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    for name in COMMANDS:
        line = re.search(rf"^  {re.escape(name)} +(\S.*)$", completed.stdout, re.MULTILINE)
        assert line is not None, f"{name} is not listed with its help:\n{completed.stdout}"
    assert "outside the repository" in completed.stdout  # and where the results go


def test_every_benchmark_command_reaches_its_own_options() -> None:
    for name in ("bench-store", "bench-api", "redis-cost", "fleet", "baseline"):
        completed = subprocess.run(
            [sys.executable, "-m", "loadtest", name, "--help"],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert completed.returncode == 0, (name, completed.stderr)
        assert "--out" in completed.stdout, name
