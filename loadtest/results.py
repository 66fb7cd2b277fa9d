"""Where results go: a run's JSON and plots, and the runs published for `docs/benchmarks.md`.

A run writes into the results directory, outside the repository by default
(`$XDG_DATA_HOME/presence-gateway/loadtest`, i.e. `~/.local/share/presence-gateway/loadtest`),
so trying the load test never touches the published figures. `publish` copies a run (its JSON
and plots) into `loadtest/published/`, which is committed and is all the page is made from.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import platform
import shutil
from pathlib import Path
from typing import Any

import orjson

REPO_ROOT = Path(__file__).resolve().parents[1]
PUBLISHED_DIR = REPO_ROOT / "loadtest" / "published"
BENCHMARKS_MD = REPO_ROOT / "docs" / "benchmarks.md"

Loaded = tuple[Path, dict[str, Any]]


class PublishError(Exception):
    pass


def results_dir() -> Path:
    """The default results directory, outside the repository."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "presence-gateway" / "loadtest"


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def machine(redis_version: str | None) -> dict[str, Any]:
    model = platform.processor() or "unknown"
    mem_gib = 0.0
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / 2**20, 1)
                break
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "model": model,
        "mem_gib": mem_gib,
        "python": platform.python_version(),
        "redis_version": redis_version or "unknown",
    }


def _clean(value: Any) -> Any:
    """JSON has no NaN: unmeasurable numbers become null."""
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def write_result(result: dict[str, Any], out_dir: Path, stem: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{stem}.json"
    path.write_bytes(orjson.dumps(_clean(result), option=orjson.OPT_INDENT_2))
    return path


def load_results(directory: Path) -> list[Loaded]:
    """Every `*.json` under *directory* that is a result (has a `scenario`)."""
    found: list[Loaded] = []
    for path in sorted(directory.rglob("*.json")):
        try:
            data = orjson.loads(path.read_bytes())
        except (OSError, orjson.JSONDecodeError):
            continue
        if isinstance(data, dict) and isinstance(data.get("scenario"), str):
            found.append((path, data))
    return found


def latest_per_scenario(directory: Path) -> dict[str, Loaded]:
    latest: dict[str, Loaded] = {}
    for path, data in load_results(directory):
        name = data["scenario"]
        if name not in latest or str(data.get("started_at", "")) > str(
            latest[name][1].get("started_at", "")
        ):
            latest[name] = (path, data)
    return latest


def invalid_reason(data: dict[str, Any]) -> str | None:
    """Why a run's figures are not the gateway's (its generator was saturated), or None."""
    if data.get("valid", True) is not False:
        return None
    return str(data.get("invalid_reason") or "marked not valid")


def publish(result: Path, into: Path = PUBLISHED_DIR, force: bool = False) -> Path:
    """Copy *result* and its plots into *into*, replacing that scenario's published run.

    A run marked not valid is refused unless *force*: its latencies are the load generator's.
    """
    try:
        data = orjson.loads(result.read_bytes())
    except (OSError, orjson.JSONDecodeError) as exc:
        raise PublishError(f"{result}: not a readable result ({exc})") from exc
    if not isinstance(data, dict) or not isinstance(data.get("scenario"), str):
        raise PublishError(f"{result}: not a load-test result (no 'scenario')")
    reason = invalid_reason(data)
    if reason is not None and not force:
        raise PublishError(f"{result.name} is not valid ({reason}); --force publishes it anyway")
    if result.resolve().parent == into.resolve():
        return result
    into.mkdir(parents=True, exist_ok=True)
    for old_path, old in load_results(into):  # the folder holds what the page shows
        if old["scenario"] == data["scenario"]:
            for plot in old.get("plots", []):
                (old_path.parent / plot).unlink(missing_ok=True)
            old_path.unlink()
    for plot in data.get("plots", []):
        shutil.copy2(result.parent / plot, into / plot)
    shutil.copy2(result, into / result.name)
    return into / result.name
