"""docs/benchmarks.md: made from the published runs only, and honest about what a run was.

No servers here: the page is rendered from result files written in the documented schema.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import orjson

from loadtest import report, results

REPO_ROOT = Path(__file__).resolve().parents[1]


def idle_result(devices: int, **extra: Any) -> dict[str, Any]:
    return {
        "scenario": "idle",
        "started_at": "2030-01-01T00:00:00+00:00",
        "command": f"python -m loadtest idle --devices {devices}",
        "machine": {"cpus": 2},
        "params": {"devices": devices, "duration": 5.0},
        "metrics": {"online": devices, "gateway_rss_per_connection_kib": 15.0},
        "targets": [],
        "plots": [],
        **extra,
    }


def write(directory: Path, name: str, document: dict[str, Any]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_bytes(orjson.dumps(document))
    return path


def target_row(page: str, what: str) -> str:
    [row] = [line for line in page.splitlines() if f"| {what} |" in line]
    return row


def test_a_run_below_a_targets_size_says_so_instead_of_failing(tmp_path: Path) -> None:
    write(tmp_path, "idle-small.json", idle_result(300))
    page = report.render_markdown(tmp_path, tmp_path / "benchmarks.md")
    row = target_row(page, "idle sockets held by one process")
    assert "| 300  |" in row
    assert "below target size (devices 300 of 15,000)" in row
    assert "❌" not in row


def test_a_run_at_a_targets_size_passes_or_fails_it(tmp_path: Path) -> None:
    write(tmp_path, "idle-full.json", idle_result(15_000))
    page = report.render_markdown(tmp_path, tmp_path / "benchmarks.md")
    assert "✅" in target_row(page, "idle sockets held by one process")


def test_a_run_whose_generator_was_saturated_is_shown_not_valid(tmp_path: Path) -> None:
    reason = "load generator saturated: worker-0 used 97% of a core"
    write(tmp_path, "idle.json", idle_result(15_000, valid=False, invalid_reason=reason))
    page = report.render_markdown(tmp_path, tmp_path / "benchmarks.md")
    assert f"not valid ({reason})" in target_row(page, "idle sockets held by one process")
    assert f"**not valid:** {reason}" in page


def test_the_published_runs_make_the_committed_page(tmp_path: Path) -> None:
    page = report.render_markdown(results.PUBLISHED_DIR, results.BENCHMARKS_MD)
    assert page == results.BENCHMARKS_MD.read_text()


def test_publishing_replaces_the_scenarios_published_run(tmp_path: Path) -> None:
    runs, published = tmp_path / "runs", tmp_path / "published"
    (runs / "idle-new-memory.png").parent.mkdir(parents=True)
    (runs / "idle-new-memory.png").write_bytes(b"png")
    old = write(published, "idle-old.json", idle_result(15_000, plots=["idle-old-memory.png"]))
    (published / "idle-old-memory.png").write_bytes(b"png")
    new = write(runs, "idle-new.json", idle_result(15_000, plots=["idle-new-memory.png"]))
    assert results.publish(new, published) == published / "idle-new.json"
    assert sorted(p.name for p in published.iterdir()) == ["idle-new-memory.png", "idle-new.json"]
    assert not old.exists()


def test_a_run_marked_not_valid_is_published_only_when_forced(tmp_path: Path) -> None:
    run = write(tmp_path / "runs", "idle.json", idle_result(15_000, valid=False))
    published = tmp_path / "published"
    try:
        results.publish(run, published)
    except results.PublishError as exc:
        assert "not valid" in str(exc)
    else:
        raise AssertionError("a run marked not valid was published")
    assert not published.exists()
    results.publish(run, published, force=True)
    assert (published / "idle.json").is_file()


def test_results_go_outside_the_repository_by_default(monkeypatch: Any, tmp_path: Path) -> None:
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    assert not results.results_dir().resolve().is_relative_to(REPO_ROOT)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert results.results_dir() == tmp_path / "presence-gateway" / "loadtest"
    shutil.rmtree(tmp_path, ignore_errors=True)


def cluster_moonshot(kill_primary_at: float | None) -> dict[str, Any]:
    return {
        "scenario": "moonshot-cluster",
        "started_at": "2030-01-01T00:00:00+00:00",
        "command": "python -m loadtest moonshot --cluster",
        "machine": {"cpus": 2, "model": "a test CPU"},
        "params": {"devices": 100_000, "duration": 600, "kill_primary_at": kill_primary_at},
        "metrics": {"false_offline_events": 0, "commands_missing": 0, "commands_ok": 12_000,
                    "commands_received": 12_000, "redis_connections_per_gateway_max": 13,
                    "redis_connections_per_gateway_node_max": 6},
        "targets": [{"name": "Redis connections per gateway process and node (steady, busiest)",
                     "target": "≤ 11", "measured": 6, "unit": "", "ok": True}],
        "plots": [],
    }  # fmt: skip


def test_a_cluster_moonshot_counts_for_its_targets_only_with_a_primary_killed(
    tmp_path: Path,
) -> None:
    write(tmp_path, "moonshot-cluster.json", cluster_moonshot(None))
    page = report.render_markdown(tmp_path, tmp_path / "benchmarks.md")
    row = target_row(page, "moonshot on a cluster, a primary killed: false offline events")
    assert "below target size (no primary killed (--kill-primary-at))" in row
    write(tmp_path, "moonshot-cluster.json", cluster_moonshot(300))
    page = report.render_markdown(tmp_path, tmp_path / "benchmarks.md")
    assert "✅" in target_row(
        page, "moonshot on a cluster, a primary killed: accepted desired changes missing"
    )
    section = page.split("## On a Valkey Cluster", 1)[1].split("\n## ", 1)[0]
    assert "- machine: 2 CPUs (a test CPU)" in section
    assert "| 12,000 → 12,000 (0) |" in section
    assert "| 6 (13; n/a) | ≤ 11 ✅ |" in section
