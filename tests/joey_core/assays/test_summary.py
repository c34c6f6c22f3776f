from __future__ import annotations

import math

import numpy as np
import pytest

from joey_core.assays import aggregate, baseline_summary, make_bins, summarize

NAN = math.nan


def test_baseline_summary_by_hand() -> None:
    summary = baseline_summary([4.0, 1.0, 3.0, 2.0], num_bins=2)
    assert (summary.count, summary.min, summary.max, summary.mean, summary.median) == (4, 1.0, 4.0, 2.5, 2.5)
    # Population standard deviation (ddof=0): sqrt(((1.5)^2 + (0.5)^2) * 2 / 4).
    assert summary.std == pytest.approx(math.sqrt(1.25), rel=1e-15)
    # Hazen halfway quantile of 1..4: position 2.5 -> 2.5.
    assert summary.edges == (1.0, 2.5, 4.0, math.inf)
    assert summary.edge_names == ("left_outlier", "q_50", "q_100", "right_outlier")
    assert summary.bin_counts == (0, 2, 2, 0)
    assert summary.aggregation == "density"
    assert summary.aggregated_values == (0.0, 0.5, 0.5, 0.0)


def test_window_summary_uses_the_baseline_bins_and_ignores_nan_in_its_statistics() -> None:
    bins = make_bins([0.0, 10.0], num_bins=2, bin_mode="equal")
    summary = summarize([NAN, 1.0, 6.0, 20.0, NAN], bins, aggregation="cumulative")
    assert summary.bins is bins
    assert summary.count == 5  # every binned value, NaN included
    assert (summary.min, summary.max, summary.mean, summary.median) == (1.0, 20.0, 9.0, 6.0)
    assert summary.std == pytest.approx(np.std([1.0, 6.0, 20.0]), rel=1e-15)
    assert summary.bin_counts == (2, 1, 1, 1)
    assert summary.aggregated_values == pytest.approx((0.4, 0.6, 0.8, 1.0), rel=1e-15)


def test_all_nan_window_has_nan_statistics() -> None:
    summary = summarize([NAN, NAN], make_bins([0.0, 1.0], num_bins=1))
    assert summary.count == 2
    assert all(math.isnan(v) for v in (summary.min, summary.max, summary.mean, summary.median, summary.std))
    assert summary.bin_counts == (2, 0, 0)


@pytest.mark.parametrize("size", [1, 2, 3, 10, 1001])
def test_statistics_equal_numpy(size: int) -> None:
    values = np.random.default_rng(size).exponential(size=size)
    summary = summarize(values, make_bins(values))
    assert summary.median == np.median(values)
    assert summary.mean == values.mean()
    assert summary.std == values.std()
    assert (summary.min, summary.max) == (values.min(), values.max())


def test_aggregate() -> None:
    assert aggregate([1, 0, 3], "density").tolist() == [0.25, 0.0, 0.75]
    assert aggregate([1, 0, 3], "cumulative").tolist() == [0.25, 0.25, 1.0]
    with pytest.raises(ValueError, match="all zero"):
        aggregate([0, 0], "density")
    with pytest.raises(ValueError, match="unknown aggregation 'edges'"):
        aggregate([1], "edges")  # type: ignore[arg-type]


def test_summaries_reject_bad_input() -> None:
    bins = make_bins([0.0, 1.0])
    with pytest.raises(ValueError, match="no values to summarize"):
        summarize([], bins)
    with pytest.raises(ValueError, match="unknown aggregation 'sum'"):
        summarize([1.0], bins, aggregation="sum")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="baseline is empty"):
        baseline_summary([])
