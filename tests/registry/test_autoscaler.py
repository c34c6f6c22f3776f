"""The autoscaling rule: one step at a time, after the signal held for its period, within bounds."""

from __future__ import annotations

from joey_registry.autoscaler import Trend, decide
from joey_registry.domain import Autoscale

CONFIG = Autoscale(
    min_replicas=1, max_replicas=3, queue_age_threshold_s=1.0, scale_up_after_s=10.0, scale_down_after_s=60.0
)


def run(replicas: int, samples: list[tuple[float, float]]) -> list[int]:
    """The replicas after each (time, queue age) sample, applying every decision."""
    trend = Trend("d1")
    seen = []
    for now, age in samples:
        replicas = decide(CONFIG, replicas, age, trend, now)
        seen.append(replicas)
    return seen


def test_scales_up_only_once_the_age_stayed_high_for_the_period() -> None:
    assert run(1, [(0, 5.0), (5, 5.0), (9.9, 5.0), (10, 5.0)]) == [1, 1, 1, 2]


def test_a_dip_below_the_threshold_restarts_the_period() -> None:
    assert run(1, [(0, 5.0), (8, 0.2), (9, 5.0), (12, 5.0), (19, 5.0)]) == [1, 1, 1, 1, 2]


def test_each_step_gets_a_full_period_and_max_is_a_ceiling() -> None:
    samples = [(t, 9.0) for t in range(0, 61, 5)]
    assert run(1, samples) == [1, 1, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3, 3]


def test_scales_down_after_the_quiet_period_to_the_minimum() -> None:
    samples = [(0, 0.0), (59, 0.3), (60, 0.0), (90, 0.0), (120, 0.0), (180, 0.0), (240, 0.0)]
    assert run(3, samples) == [3, 3, 2, 2, 1, 1, 1]


def test_the_threshold_itself_counts_as_quiet() -> None:
    assert run(2, [(0, 1.0), (60, 1.0)]) == [2, 1]


def test_out_of_bounds_counts_come_back_within_bounds() -> None:
    assert run(5, [(0, 0.5)]) == [3]
    assert run(0, [(0, 0.5)]) == [1]
