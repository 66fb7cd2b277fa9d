"""`loadtest cluster-loop`: the totals over its runs, and the moonshot each run is."""

from __future__ import annotations

import argparse
from pathlib import Path

from loadtest.cli import build_parser, options_from
from loadtest.cluster_loop import moonshot_argv, parse, summarize


def test_a_failed_run_or_a_miss_is_never_added_up_as_clean() -> None:
    runs = [
        {"commands_ok": 100, "commands_missing": 0, "command_ms_p99": 900.0,
         "replica_promoted_s": 2.0, "false_offline_events": 0},
        {"commands_ok": 120, "commands_missing": 7, "command_ms_p99": 1500.0,
         "replica_promoted_s": 3.0, "false_offline_events": 1},
        {"error": "RuntimeError: gateway 0 did not become ready"},
    ]  # fmt: skip
    totals = summarize(runs)
    assert totals["runs"] == 3 and totals["runs_failed"] == 1
    assert (totals["accepted"], totals["missing"], totals["runs_with_missing"]) == (220, 7, 1)
    assert totals["false_offline_events"] == 1
    assert totals["runs_with_p99_within_1s"] == 1
    assert totals["command_ms_p99_worst_run"] == 1500.0
    assert totals["replica_promoted_s_max"] == 3.0


def test_each_run_is_a_valid_cluster_moonshot_with_a_primary_killed(tmp_path: Path) -> None:
    args: argparse.Namespace = parse(
        ["--devices", "50", "--duration", "12", "--kill-primary-at", "4"]
    )
    argv = moonshot_argv(args, tmp_path)
    opts = options_from(build_parser().parse_args(argv), argv)
    assert opts.scenario == "moonshot" and opts.cluster
    assert (opts.devices, opts.duration, opts.kill_primary_at) == (50, 12.0, 4.0)
    assert opts.out == tmp_path
