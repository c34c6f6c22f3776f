"""Window summaries kept incrementally: independent of order and splitting, exact where promised."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from joey_core.assays import make_bins, summarize
from joey_core.assays.streaming import (
    EXACT_MEDIAN_UP_TO,
    GAMMA,
    WindowCounts,
    exact_sum,
    exact_sum_of_squares,
)

RNG = np.random.default_rng(3)
BINS = make_bins(RNG.normal(0, 1, 1000), num_bins=5)


def exact(values: np.ndarray) -> Fraction:
    return sum((Fraction(v) for v in values.tolist()), Fraction(0))


def test_sums_are_exact_for_any_float() -> None:
    values = np.concatenate(
        [RNG.normal(0, 1e6, 500), [5e-324, -2.5e-310, 6.5e-157, 1e300, -1.7e308, 0.0, -0.0, 3.0]]
    )
    assert Fraction(exact_sum(values), 2**1126) == exact(values)
    squares = sum((Fraction(v) ** 2 for v in values.tolist()), Fraction(0))
    assert Fraction(exact_sum_of_squares(values), 2**2252) == squares


@pytest.mark.parametrize("value", [6.572268666826865e-157, 5e-324, 4e150, -1.7e308])
def test_extreme_values_have_a_summary(value: float) -> None:
    summary = WindowCounts.of([value] * 3, BINS).summary(BINS, "density")
    assert (summary.mean, summary.median, summary.std) == (value, value, 0.0)
    spread = WindowCounts.of([value, -value], BINS).summary(BINS, "density")
    assert spread.std == abs(value) and spread.mean == 0.0


def test_stored_counts_are_checked() -> None:
    counts = WindowCounts.of(RNG.normal(0, 1, 3000), BINS)
    data = counts.to_bytes()
    assert WindowCounts.from_bytes(data) == counts
    empty = WindowCounts.empty(BINS)
    assert WindowCounts.from_bytes(empty.to_bytes()) == empty
    for bad, reason in (
        (data[:20], "truncated"),
        (data[:-1], "truncated"),
        (data + b"\0", "trailing"),
        (b"\x07" + data[1:], "format"),
    ):
        with pytest.raises(ValueError, match=reason):
            WindowCounts.from_bytes(bad)


@pytest.mark.parametrize("size", [20_001, 1_300, EXACT_MEDIAN_UP_TO])
def test_the_summary_depends_only_on_the_values_not_their_order_or_pieces(size: int) -> None:
    values = RNG.normal(0.3, 2, size)
    whole = WindowCounts.of(values, BINS)
    pieces = WindowCounts.empty(BINS)
    for piece in np.array_split(values[RNG.permutation(values.size)], 13):
        part = WindowCounts.of(piece, BINS)
        pieces.merge(WindowCounts.from_bytes(part.to_bytes()))
    assert pieces == whole
    assert (whole.values is None) == (size > EXACT_MEDIAN_UP_TO)
    assert pieces.summary(BINS, "cumulative") == whole.summary(BINS, "cumulative")


def test_small_windows_have_numpys_median() -> None:
    values = RNG.normal(3, 2, EXACT_MEDIAN_UP_TO)
    assert WindowCounts.of(values, BINS).summary(BINS, "density").median == np.median(values)


def test_statistics_are_exact_and_the_median_close() -> None:
    for values in (RNG.normal(3, 2, 100_001), RNG.lognormal(0, 3, 50_000), -RNG.exponential(5, 40_000)):
        summary = WindowCounts.of(values, BINS).summary(BINS, "density")
        reference = summarize(values, BINS)
        assert summary.bin_counts == reference.bin_counts
        assert summary.aggregated_values == reference.aggregated_values
        assert (summary.count, summary.min, summary.max) == (values.size, values.min(), values.max())
        assert summary.mean == float(exact(values) / values.size)  # correctly rounded
        assert summary.std == pytest.approx(values.std(), rel=1e-13)
        assert summary.median == pytest.approx(np.median(values), rel=GAMMA - 1)


@pytest.mark.parametrize(
    "values",
    [[1, 2, 3, 4, 5], [1, 2, 3, 4], [0, 0, 1], [-2.5, -1, 7], [3] * 10 + [4], [-1.0, -1.001, -1.002], [7.5]],
)
def test_the_median_of_few_or_repeated_values_is_exact(values: list[float]) -> None:
    assert WindowCounts.of(values, BINS).summary(BINS, "density").median == np.median(values)
    # Also from the histogram alone, as when the window is too large to keep its values.
    counts = WindowCounts.of(values, BINS)
    counts.values = None
    assert counts.summary(BINS, "density").median == np.median(values)


def test_integers_keep_an_exact_median() -> None:
    values = RNG.integers(-50, 50, 10_000).astype(float)
    assert WindowCounts.of(values, BINS).summary(BINS, "density").median == np.median(values)


def test_nan_is_counted_in_the_left_bin_and_left_out_of_the_statistics() -> None:
    summary = WindowCounts.of([math.nan, 1.0, 2.0], BINS).summary(BINS, "density")
    assert summary.count == 3 and summary.bin_counts[0] >= 1
    assert (summary.mean, summary.median, summary.min) == (1.5, 1.5, 1.0)
    only_nan = WindowCounts.of([math.nan], BINS).summary(BINS, "density")
    assert only_nan.count == 1 and math.isnan(only_nan.mean) and math.isnan(only_nan.median)


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="finite"):
        WindowCounts.of([1.0, math.inf], BINS)
    with pytest.raises(ValueError, match="no values"):
        WindowCounts.empty(BINS).summary(BINS, "density")
    with pytest.raises(ValueError, match="merge"):
        WindowCounts.empty(BINS).merge(WindowCounts([0, 0]))
