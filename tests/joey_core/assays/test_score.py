from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from joey_core.assays import Status, baseline_summary, bin_counts, score, score_counts, status_of

NAN = math.nan
BASELINE = np.arange(1.0, 11.0)  # 5 quantile bins: edges 2.5, 4.5, 6.5, 8.5, 10
WINDOW = [0.0, 1.0, 3.0, 3.0, 11.0, NAN]
# Window bins: 0 and NaN left, 1 in (1, 2.5], both 3s in (2.5, 4.5], 11 right.
B = [0.0, 0.2, 0.2, 0.2, 0.2, 0.2, 0.0]
W = [1 / 3, 1 / 6, 1 / 3, 0.0, 0.0, 0.0, 1 / 6]


def psi_term(w: float, b: float) -> float:
    w, b = w or 0.005, b or 0.005
    return (w - b) * math.log(w / b)


def test_psi_by_hand() -> None:
    result = score(BASELINE, WINDOW)
    assert result.baseline_summary.bin_counts == (0, 2, 2, 2, 2, 2, 0)
    assert result.window_summary.bin_counts == (2, 1, 2, 0, 0, 0, 1)
    assert result.window_summary.aggregated_values == pytest.approx(W, rel=1e-15)
    expected = [
        (1 / 3 - 0.005) * math.log((1 / 3) / 0.005),
        (1 / 6 - 0.2) * math.log((1 / 6) / 0.2),
        (1 / 3 - 0.2) * math.log((1 / 3) / 0.2),
        (0.005 - 0.2) * math.log(0.005 / 0.2),
        (0.005 - 0.2) * math.log(0.005 / 0.2),
        (0.005 - 0.2) * math.log(0.005 / 0.2),
        (1 / 6 - 0.005) * math.log((1 / 6) / 0.005),
    ]
    assert result.scores == pytest.approx(expected, rel=1e-12)
    assert result.score == pytest.approx(sum(expected), rel=1e-12)
    assert result.score == pytest.approx(4.17797, abs=1e-5)
    assert result.metric == "psi"
    assert result.bin_index is None
    assert result.status == Status.ALERT == "Alert"


def test_sumdiff_by_hand() -> None:
    result = score(BASELINE, WINDOW, metric="sumdiff")
    differences = [1 / 3, 1 / 30, 2 / 15, 0.2, 0.2, 0.2, 1 / 6]  # |w - b|, no zero substitution
    assert result.scores == pytest.approx(differences, rel=1e-12)
    assert result.score == pytest.approx(0.5 * sum(differences), rel=1e-12)
    assert result.score == pytest.approx(19 / 30, rel=1e-12)
    assert result.bin_index is None


def test_maxdiff_by_hand_reports_the_bin() -> None:
    result = score(BASELINE, WINDOW, metric="maxdiff", alert_threshold=0.5, warning_threshold=0.3)
    assert result.score == pytest.approx(1 / 3, rel=1e-12)
    assert result.bin_index == 0
    assert result.status == Status.WARNING


def test_maxdiff_ties_report_the_first_bin() -> None:
    result = score_counts([1, 1, 0, 0], [0, 0, 1, 1], metric="maxdiff")
    assert result.scores == (0.5, 0.5, 0.5, 0.5)
    assert result.bin_index == 0


def test_zero_substitution_only_for_exact_zeros() -> None:
    # A density of 0.001 is used as is: substituting 0.005 would change both terms.
    result = score_counts([1, 999], [999, 1])
    assert result.score == pytest.approx(2 * 0.998 * math.log(999), rel=1e-12)
    tiny = score_counts([1, 9_999_999], [0, 10_000_000])
    b0, w0 = 1e-7, 0.005
    assert tiny.scores[0] == pytest.approx((w0 - b0) * math.log(w0 / b0), rel=1e-9)
    # Both zero: 0.005 on both sides, so the bin contributes nothing.
    assert score_counts([0, 4], [0, 4]).scores == (0.0, 0.0)


def test_bin_weights_are_normalised_and_weight_each_bin() -> None:
    baseline, window = [0, 5, 5, 0], [1, 3, 6, 0]  # densities b = 0 .5 .5 0, w = .1 .3 .6 0
    sumdiff = score_counts(baseline, window, metric="sumdiff", bin_weights=[1, 1, 2, 0])
    assert sumdiff.scores == pytest.approx([0.025, 0.05, 0.05, 0.0], rel=1e-12)
    assert sumdiff.score == pytest.approx(0.0625, rel=1e-12)

    # Unweighted, bin 1 has the largest difference (0.2); weighted 3:1, bin 0 does.
    assert score_counts(baseline, window, metric="maxdiff").bin_index == 1
    maxdiff = score_counts(baseline, window, metric="maxdiff", bin_weights=[3, 1, 0, 0])
    assert maxdiff.scores == pytest.approx([0.075, 0.05, 0.0, 0.0], rel=1e-12)
    assert (maxdiff.score, maxdiff.bin_index) == (pytest.approx(0.075, rel=1e-12), 0)

    psi = score_counts(baseline, window)
    weighted = score_counts(baseline, window, bin_weights=[0.5, 0.0, 1.5, 0.0])
    assert weighted.scores == pytest.approx([0.25 * psi.scores[0], 0.0, 0.75 * psi.scores[2], 0.0], rel=1e-12)
    assert weighted.score == pytest.approx(0.25 * psi.scores[0] + 0.75 * psi.scores[2], rel=1e-12)
    # Equal weights are not neutral: normalised to 1/4 each, they scale the score by 1/4.
    equal = score_counts(baseline, window, bin_weights=[7] * 4)
    assert equal.score == pytest.approx(psi.score / 4, rel=1e-12)


def test_weights_include_the_outlier_bins() -> None:
    result = score(BASELINE, WINDOW, metric="maxdiff", bin_weights=[0, 0, 0, 0, 0, 0, 1])
    assert result.bin_index == 6
    assert result.score == pytest.approx(1 / 6, rel=1e-12)


def test_cumulative_aggregation_by_hand() -> None:
    baseline, window = [0, 5, 5, 0], [1, 3, 6, 0]  # cumulative b = 0 .5 1 1, w = .1 .4 1 1
    sumdiff = score_counts(baseline, window, aggregation="cumulative", metric="sumdiff")
    assert sumdiff.scores == pytest.approx([0.1, 0.1, 0.0, 0.0], rel=1e-12, abs=1e-15)
    assert sumdiff.score == pytest.approx(0.1, rel=1e-12)
    psi = score_counts(baseline, window, aggregation="cumulative")
    assert psi.score == pytest.approx(psi_term(0.1, 0.0) + psi_term(0.4, 0.5), rel=1e-12)
    result = score(BASELINE, WINDOW, aggregation="cumulative", metric="maxdiff")
    assert result.window_summary.aggregated_values == pytest.approx(np.cumsum(W), rel=1e-12)
    assert result.baseline_summary.aggregated_values == pytest.approx(np.cumsum(B), rel=1e-12)
    assert result.score == pytest.approx(5 / 6 - 0.4, rel=1e-12)  # bin 2: 1/3 + 1/6 + 1/3 vs 0.4
    assert result.bin_index == 2


def test_without_outlier_bins() -> None:
    # Bins (.., 2.5] (2.5, 4.5] (4.5, 6.5] (6.5, 8.5] (8.5, ..]; the window is 1/2 1/3 0 0 1/6.
    result = score(BASELINE, WINDOW, outlier_bins=False, metric="sumdiff")
    assert result.window_summary.bin_counts == (3, 2, 0, 0, 1)
    assert result.score == pytest.approx(0.5 * (0.3 + 2 / 15 + 0.2 + 0.2 + 1 / 30), rel=1e-12)


def test_status_thresholds_and_their_boundaries() -> None:
    assert status_of(0.25, 0.25, None) == Status.OK  # equal to the threshold is not above it
    assert status_of(math.nextafter(0.25, 1.0), 0.25, None) == Status.ALERT
    assert status_of(0.2, 0.25, None) == Status.OK
    assert status_of(0.1, 0.25, 0.1) == Status.OK
    assert status_of(0.11, 0.25, 0.1) == Status.WARNING
    assert status_of(0.3, 0.25, 0.1) == Status.ALERT

    value = score_counts([1, 3], [3, 1]).score
    assert score_counts([1, 3], [3, 1], alert_threshold=value).status == "Ok"
    assert score_counts([1, 3], [3, 1], alert_threshold=math.nextafter(value, 0.0)).status == "Alert"
    assert score_counts([1, 3], [3, 1], alert_threshold=9, warning_threshold=value).status == "Ok"
    below = math.nextafter(value, 0.0)
    assert score_counts([1, 3], [3, 1], alert_threshold=9, warning_threshold=below).status == "Warning"
    assert score_counts([1, 1], [1, 1]).status == "Ok"  # identical distributions score 0


def test_a_window_below_min_count_keeps_its_score_but_is_not_judged() -> None:
    # One value scores PSI 4.16 against 5 quantile bins, as in the issue: too few to judge.
    one = score(BASELINE, [5.0], min_count=30)
    assert one.status == Status.NO_DATA == "NoData"
    by_hand = 4 * psi_term(0.0, 0.2) + psi_term(1.0, 0.2)  # four empty bins, all in (4.5, 6.5]
    assert one.score == score(BASELINE, [5.0]).score == pytest.approx(by_hand, rel=1e-12)
    assert round(by_hand, 2) == 4.16
    assert score(BASELINE, [5.0]).status == Status.ALERT  # Wallaroo's rule: min_count 0 by default
    # NaN values count, as they are binned; at min_count the window is judged.
    assert score(BASELINE, WINDOW, min_count=len(WINDOW)).status == Status.ALERT
    assert score(BASELINE, WINDOW, min_count=len(WINDOW) + 1).status == Status.NO_DATA
    assert score_counts([1, 1], [1, 1], min_count=3).status == Status.NO_DATA
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="min_count must be"):
            score_counts([1, 1], [1, 1], min_count=bad)  # type: ignore[arg-type]


CONFIGS: list[dict[str, Any]] = [
    {},
    {"metric": "maxdiff", "num_bins": 7},
    {"metric": "sumdiff", "bin_mode": "equal", "aggregation": "cumulative"},
    {"metric": "psi", "bin_mode": "provided", "edges": [-1.0, 0.0, 0.5, 3.0], "num_bins": 4},
    {"metric": "maxdiff", "outlier_bins": False, "num_bins": 3, "bin_weights": [1, 2, 3]},
    {"metric": "psi", "num_bins": 10, "bin_weights": list(range(12)), "warning_threshold": 0.01},
]


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("config", CONFIGS)
def test_window_counts_added_chunk_by_chunk_score_the_same(seed: int, config: dict[str, Any]) -> None:
    rng = np.random.default_rng(seed)
    baseline = rng.normal(size=int(rng.integers(1, 3000)))
    window = rng.normal(rng.uniform(-1, 1), rng.uniform(0.5, 2), size=int(rng.integers(1, 3000)))
    window[rng.random(window.size) < 0.02] = NAN
    whole = score(baseline, window, **config)

    scoring_keys = ("metric", "aggregation", "bin_weights", "warning_threshold")
    scoring = {k: v for k, v in config.items() if k in scoring_keys}
    binning = {k: v for k, v in config.items() if k not in scoring}
    base = baseline_summary(baseline, aggregation=config.get("aggregation", "density"), **binning)
    counts = np.zeros(base.bins.count, dtype=np.int64)
    for chunk in np.array_split(window, int(rng.integers(1, 20))):  # some chunks may be empty
        counts += bin_counts(chunk, base.bins)
    streamed = score_counts(base.bin_counts, counts, **scoring)

    assert base == whole.baseline_summary
    assert tuple(counts.tolist()) == whole.window_summary.bin_counts
    assert (streamed.score, streamed.scores, streamed.bin_index, streamed.status) == (
        whole.score,
        whole.scores,
        whole.bin_index,
        whole.status,
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"window": []}, "window is empty"),
        ({"baseline": []}, "baseline is empty"),
        ({"baseline": [1.0, NAN]}, "baseline contains 1 non-finite"),
        ({"metric": "kl"}, "unknown metric 'kl'"),
        ({"aggregation": "edges"}, "unknown aggregation 'edges'"),
        ({"bin_mode": "fixed"}, "unknown bin_mode 'fixed'"),
        ({"num_bins": 0}, "num_bins must be at least 1"),
        ({"bin_mode": "provided"}, "edges are required"),
        ({"bin_mode": "provided", "edges": [3.0, 1.0], "num_bins": 2}, "sorted"),
        ({"bin_mode": "provided", "edges": [1.0, 2.0, 3.0], "num_bins": 2}, "expected 2 edges"),
        ({"bin_weights": [1.0] * 5}, "expected 7, got 5"),
        ({"bin_weights": [1.0] * 5, "outlier_bins": False, "num_bins": 4}, "expected 4, got 5"),
        ({"bin_weights": [1, 1, 1, -1, 1, 1, 1]}, "finite and not negative"),
        ({"bin_weights": [1, 1, 1, NAN, 1, 1, 1]}, "finite and not negative"),
        ({"bin_weights": [0] * 7}, "bin_weights are all zero"),
        ({"alert_threshold": NAN}, "alert_threshold must be a number"),
        ({"warning_threshold": NAN}, "warning_threshold must be a number"),
    ],
)
def test_bad_input_is_explained(kwargs: dict[str, Any], message: str) -> None:
    arguments: dict[str, Any] = {"baseline": BASELINE, "window": WINDOW, **kwargs}
    with pytest.raises(ValueError, match=message):
        score(arguments.pop("baseline"), arguments.pop("window"), **arguments)


@pytest.mark.parametrize(
    ("baseline", "window", "message"),
    [
        ([0, 0], [1, 1], "baseline is empty"),
        ([1, 1], [0, 0], "window is empty"),
        ([1, 1], [1, 1, 1], "baseline has 2 bins but the window has 3"),
        ([1.0, 1.0], [1, 1], "baseline counts must be a one-dimensional array of integers"),
        ([1, 1], [[1, 1]], "window counts must be a one-dimensional array of integers"),
        ([1, -1, 2], [1, 1, 1], "baseline counts must not be negative"),
    ],
)
def test_bad_counts_are_explained(baseline: list[Any], window: list[Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        score_counts(baseline, window)
