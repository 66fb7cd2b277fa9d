"""Figures from samples: percentiles, pass/fail targets, and the gateways' own histograms."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


def percentile(values: Sequence[float], q: float, presorted: bool = False) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return math.nan
    ordered = values if presorted else sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return float(ordered[min(rank, len(ordered)) - 1])


def summary(values: Sequence[float], prefix: str) -> dict[str, float]:
    """`{prefix}_p50, _p90, _p99, _max, _count` of *values*."""
    ordered = sorted(values)
    return {
        f"{prefix}_p50": round(percentile(ordered, 50, True), 3),
        f"{prefix}_p90": round(percentile(ordered, 90, True), 3),
        f"{prefix}_p99": round(percentile(ordered, 99, True), 3),
        f"{prefix}_max": round(ordered[-1], 3) if ordered else math.nan,
        f"{prefix}_count": len(ordered),
    }


def target(name: str, text: str, measured: float, unit: str, ok: bool) -> dict[str, Any]:
    return {
        "name": name,
        "target": text,
        "measured": measured,
        "unit": unit,
        "ok": bool(ok) and not (isinstance(measured, float) and math.isnan(measured)),
    }


def at_most(name: str, limit: float, measured: float, unit: str) -> dict[str, Any]:
    return target(name, f"≤ {limit:g} {unit}".strip(), measured, unit, measured <= limit)


def at_least(name: str, limit: float, measured: float, unit: str) -> dict[str, Any]:
    return target(name, f"≥ {limit:g} {unit}".strip(), measured, unit, measured >= limit)


@dataclass
class Buckets:
    """A Prometheus histogram: cumulative counts by upper bound, its sum and its count."""

    cumulative: dict[float, float] = field(default_factory=dict)
    sum: float = 0.0
    count: float = 0.0

    def add(self, suffix: str, labels: Mapping[str, str], value: float) -> None:
        """Add one scraped sample (`_bucket`, `_sum` or `_count`) to the totals."""
        if suffix == "_bucket":
            bound = float(labels["le"])
            self.cumulative[bound] = self.cumulative.get(bound, 0.0) + value
        elif suffix == "_sum":
            self.sum += value
        elif suffix == "_count":
            self.count += value

    def since(self, earlier: Buckets) -> Buckets:
        """What was observed between *earlier* and this scrape."""
        return Buckets(
            {b: c - earlier.cumulative.get(b, 0.0) for b, c in self.cumulative.items()},
            self.sum - earlier.sum,
            self.count - earlier.count,
        )

    def quantile(self, q: float) -> float:
        """PromQL's `histogram_quantile`: linear inside the bucket that holds rank q·count."""
        if self.count <= 0:
            return math.nan
        rank = q * self.count
        low, below = 0.0, 0.0
        for bound, cumulative in sorted(self.cumulative.items()):
            if cumulative >= rank:
                if math.isinf(bound):  # past the last bound: all it can say is "above low"
                    return low
                inside = cumulative - below
                return low + (bound - low) * ((rank - below) / inside if inside else 1.0)
            low, below = bound, cumulative
        return low


def relay_summary(observed: Buckets, prefix: str = "gateway_relay") -> dict[str, float]:
    """The gateways' own relay latency in ms: exact count and mean, bucket-estimated p50/p99."""
    mean = observed.sum / observed.count * 1000 if observed.count else math.nan
    return {
        f"{prefix}_count": int(observed.count),
        f"{prefix}_ms_mean": round(mean, 3),
        f"{prefix}_ms_p50": round(observed.quantile(0.5) * 1000, 3),
        f"{prefix}_ms_p99": round(observed.quantile(0.99) * 1000, 3),
    }
