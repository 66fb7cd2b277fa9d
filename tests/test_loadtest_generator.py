"""A run is not valid when its load generator could not keep up: the rule, on CPU readings.

The readings are CPU-seconds as `generator.read` takes them from /proc; the rule is pure.
"""

from __future__ import annotations

from loadtest import generator


def test_a_worker_above_ninety_percent_of_a_core_makes_the_run_not_valid() -> None:
    load = generator.GeneratorLoad(cores=1)
    load.observe({"coordinator": 1.0, "worker-0": 5.0}, {"coordinator": 1.1, "worker-0": 6.9}, 2.0)
    name, share = load.busiest
    assert name == "worker-0" and round(share, 3) == 0.95
    assert load.saturated() == "load generator saturated: worker-0 used 95% of a core"


def test_processes_filling_their_pinned_cores_together_make_it_not_valid() -> None:
    load = generator.GeneratorLoad(cores=1)
    load.observe({"coordinator": 0.0, "worker-0": 0.0}, {"coordinator": 0.5, "worker-0": 0.5}, 1.0)
    assert load.saturated() is not None
    spread = generator.GeneratorLoad(cores=2)
    spread.observe(
        {"coordinator": 0.0, "worker-0": 0.0}, {"coordinator": 0.5, "worker-0": 0.5}, 1.0
    )
    assert spread.saturated() is None


def test_a_window_too_short_to_judge_is_left_out() -> None:
    load = generator.GeneratorLoad(cores=1)
    load.observe({"worker-0": 0.0}, {"worker-0": 0.05}, 0.05)
    assert load.windows == 0
    assert load.saturated() is None


def test_the_coordinators_own_cpu_is_read_from_proc() -> None:
    readings = generator.read({})
    assert set(readings) == {"coordinator"}
    assert readings["coordinator"] > 0  # this very process has run
