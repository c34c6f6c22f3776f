from __future__ import annotations

import math

import numpy as np
import pytest

from joey_core.assays import Bins, bin_counts, make_bins

NAN = math.nan


def test_quantile_edges_are_hazen_quantiles_worked_by_hand() -> None:
    # Hazen: the q-quantile sits at 1-based position n*q + 1/2, interpolated linearly.
    # n = 10, q = 0.2 -> position 2.5, halfway between 2 and 3.
    bins = make_bins(np.arange(1.0, 11.0), num_bins=5)
    assert bins.edges == (2.5, 4.5, 6.5, 8.5, 10.0)
    assert bins.lower == 1.0
    # n = 4: positions 1.5, 2.5, 3.5 -> between 1 and 2, 2 and 4, 4 and 8; the last edge is the max.
    assert make_bins([8.0, 1.0, 4.0, 2.0], num_bins=4).edges == (1.5, 3.0, 6.0, 8.0)


@pytest.mark.parametrize("num_bins", [1, 2, 3, 5, 7, 10, 64])
@pytest.mark.parametrize("size", [1, 2, 9, 1000, 1001])
def test_quantile_edges_equal_numpy_hazen(num_bins: int, size: int) -> None:
    baseline = np.random.default_rng(size * 100 + num_bins).lognormal(size=size)
    expected = np.quantile(baseline, np.arange(1, num_bins + 1) / num_bins, method="hazen")
    edges = make_bins(baseline, num_bins=num_bins).edges
    assert edges == tuple(expected.tolist())
    assert edges[-1] == baseline.max()


def test_edge_names() -> None:
    assert make_bins([1.0, 2.0], num_bins=5).edge_names == (
        "left_outlier",
        "q_20",
        "q_40",
        "q_60",
        "q_80",
        "q_100",
        "right_outlier",
    )
    assert make_bins([1.0, 2.0], num_bins=3, outlier_bins=False).edge_names == ("q_33.33", "q_66.67", "q_100")
    assert make_bins([1.0, 2.0], num_bins=2, bin_mode="equal").edge_names == (
        "left_outlier",
        "e_1",
        "e_2",
        "right_outlier",
    )
    provided = make_bins([1.0, 2.0], num_bins=2, bin_mode="provided", edges=[1.5, 2.0], outlier_bins=False)
    assert provided.edge_names == ("p_1", "p_2")


def test_upper_edges_bound_every_bin() -> None:
    bins = make_bins([0.0, 10.0], num_bins=2, bin_mode="equal")
    assert bins.upper_edges == (0.0, 5.0, 10.0, math.inf)
    assert bins.count == 4
    inner = make_bins([0.0, 10.0], num_bins=2, bin_mode="equal", outlier_bins=False)
    assert inner.upper_edges == (5.0, 10.0)
    assert inner.count == 2


def test_equal_edges() -> None:
    assert make_bins([3.0, 0.0, 10.0], num_bins=5, bin_mode="equal").edges == (2.0, 4.0, 6.0, 8.0, 10.0)


def test_last_equal_edge_is_the_max_exactly() -> None:
    # 0.1 + 3 * ((1.0 - 0.1) / 3) rounds to 0.9999999999999999: the max would become an outlier.
    assert 0.1 + 3 * ((1.0 - 0.1) / 3) < 1.0
    bins = make_bins([0.1, 0.5, 1.0], num_bins=3, bin_mode="equal")
    assert bins.edges[-1] == 1.0
    assert bin_counts([0.1, 0.5, 1.0], bins).tolist() == [0, 1, 1, 1, 0]


def test_interior_bins_are_right_closed_and_hold_the_min() -> None:
    bins = make_bins([0.0, 10.0], num_bins=5, bin_mode="equal")  # edges 2, 4, 6, 8, 10
    window = [0.0, 2.0, np.nextafter(2.0, 3.0), 4.0, 10.0]
    #                      left  (0,2] (2,4] (4,6] (6,8] (8,10] right
    assert bin_counts(window, bins).tolist() == [0, 2, 2, 0, 0, 1, 0]


def test_outliers_and_non_finite_values() -> None:
    bins = make_bins([0.0, 10.0], num_bins=2, bin_mode="equal")  # edges 5, 10
    window = [np.nextafter(0.0, -1.0), -math.inf, NAN, 0.0, np.nextafter(10.0, 11.0), math.inf, NAN]
    # Below the min, -inf and both NaN on the left; just above the max and +inf on the right.
    assert bin_counts(window, bins).tolist() == [4, 1, 0, 2]


def test_without_outlier_bins_extremes_and_nan_go_to_the_end_bins() -> None:
    bins = make_bins([0.0, 10.0], num_bins=2, bin_mode="equal", outlier_bins=False)
    assert bin_counts([-5.0, NAN, 0.0, 5.0, 5.5, 10.0, 99.0], bins).tolist() == [4, 3]


def test_nan_only_and_empty_values() -> None:
    bins = make_bins([0.0, 10.0], num_bins=2, bin_mode="equal")
    assert bin_counts([NAN, NAN], bins).tolist() == [2, 0, 0, 0]
    empty = bin_counts(np.array([]), bins)
    assert empty.tolist() == [0, 0, 0, 0]
    assert empty.dtype == np.int64


def test_provided_edges_bin_from_the_baseline_min() -> None:
    bins = make_bins([1.0, 9.0], num_bins=3, bin_mode="provided", edges=[0.5, 4.0, 8.0])
    assert bins.lower == 1.0
    # The first interior bin (1, 0.5] is empty: 0.7 is below the baseline min, 1.0 falls in (0.5, 4].
    # The baseline max 9.0 lies above the last provided edge, so it is a right outlier.
    assert bin_counts([0.7, 1.0, 4.0, 8.0, 9.0], bins).tolist() == [1, 0, 2, 1, 1]


def test_degenerate_baseline_puts_everything_in_the_first_interior_bin() -> None:
    bins = make_bins([3.0, 3.0, 3.0], num_bins=3)
    assert bins.edges == (3.0, 3.0, 3.0)
    assert bin_counts([2.0, 3.0, 3.0, 4.0], bins).tolist() == [1, 2, 0, 0, 1]


def test_counts_match_a_per_value_reference_and_add_up_over_chunks() -> None:
    rng = np.random.default_rng(42)
    baseline = rng.normal(size=500)
    for outlier_bins in (True, False):
        bins = make_bins(baseline, num_bins=6, outlier_bins=outlier_bins)
        window = rng.normal(0.3, 1.5, size=2000)
        window[rng.choice(window.size, 50, replace=False)] = NAN
        window[:5] = bins.edges[:5]  # values exactly on edges
        window[5] = bins.lower

        expected = np.zeros(bins.count, dtype=np.int64)
        for value in window:  # the rules, spelled out one value at a time
            if math.isnan(value) or value < bins.lower:
                index = 0
            else:
                index = sum(value > edge for edge in bins.edges) + (1 if outlier_bins else 0)
                index = min(index, bins.count - 1)
            expected[index] += 1
        assert bin_counts(window, bins).tolist() == expected.tolist()

        cuts = np.sort(rng.choice(window.size, 7))
        chunks = np.split(window, cuts)
        assert sum(bin_counts(chunk, bins) for chunk in chunks).tolist() == expected.tolist()


def test_integer_and_list_inputs() -> None:
    bins = make_bins([1, 2, 3, 4], num_bins=2)
    assert bins.edges == (2.5, 4.0)
    assert bin_counts([0, 1, 2, 3, 5], bins).tolist() == [1, 2, 1, 1]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"baseline": []}, "baseline is empty"),
        ({"baseline": [1.0, NAN]}, "baseline contains 1 non-finite"),
        ({"baseline": [1.0, math.inf, -math.inf]}, "baseline contains 2 non-finite"),
        ({"baseline": [[1.0, 2.0]]}, "baseline must be one-dimensional"),
        ({"num_bins": 0}, "num_bins must be at least 1"),
        ({"num_bins": 2.5}, "num_bins must be an integer"),
        ({"num_bins": True}, "num_bins must be an integer"),
        ({"bin_mode": "quantiles"}, "unknown bin_mode 'quantiles'"),
        ({"bin_mode": "provided"}, "edges are required with bin_mode='provided'"),
        ({"edges": [1.0, 2.0]}, "only allowed with it"),
        ({"bin_mode": "provided", "edges": [1.0]}, "expected 2 edges"),
        ({"bin_mode": "provided", "edges": [1.0, 2.0, 3.0]}, "expected 2 edges"),
        ({"bin_mode": "provided", "edges": [2.0, 1.0]}, "sorted in non-decreasing order"),
        ({"bin_mode": "provided", "edges": [1.0, math.inf]}, "edges must be finite"),
        ({"bin_mode": "provided", "edges": [NAN, 1.0]}, "edges must be finite"),
    ],
)
def test_bad_bins_are_explained(kwargs: dict[str, object], message: str) -> None:
    arguments: dict[str, object] = {"baseline": [1.0, 2.0, 3.0], "num_bins": 2, **kwargs}
    baseline = arguments.pop("baseline")
    with pytest.raises(ValueError, match=message):
        make_bins(baseline, **arguments)


def test_rebuilt_bins_are_checked() -> None:
    assert Bins(0.0, (1.0, 2.0), ("p_1", "p_2")).count == 4
    with pytest.raises(ValueError, match="sorted"):
        Bins(0.0, (2.0, 1.0), ("p_1", "p_2"))
    with pytest.raises(ValueError, match="2 edges but 1 edge names"):
        Bins(0.0, (1.0, 2.0), ("p_1",))
    with pytest.raises(ValueError, match="lower edge"):
        Bins(NAN, (1.0, 2.0), ("p_1", "p_2"))


def test_values_must_be_one_dimensional() -> None:
    with pytest.raises(ValueError, match="values must be one-dimensional"):
        bin_counts([[1.0]], make_bins([1.0, 2.0]))
