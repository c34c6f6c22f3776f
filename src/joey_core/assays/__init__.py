"""Offline drift scoring with Wallaroo's assay semantics.

:func:`score` compares a window of values with a baseline in one call. A service that keeps a
baseline and scores windows as they stream in uses the same steps one at a time, and gets the
same numbers::

    base = baseline_summary(baseline_values, num_bins=5, bin_mode="quantile")
    counts = sum(bin_counts(chunk, base.bins) for chunk in window_chunks)
    scores = score_counts(base.bin_counts, counts, metric="psi")

The rules, in brief (details on each function):

* Edges come from the baseline: Hazen quantiles ``k/N`` (``q_20`` ... ``q_100``), equal widths
  ``min + k(max-min)/N`` (``e_1`` ... ``e_N``) or the ``N`` edges provided (``p_1`` ... ``p_N``);
  the last computed edge is the baseline max.
* Interior bins are right-closed, ``(e[k-1], e[k]]`` with ``e[0]`` the baseline min, the first
  one also holding the min. Outlier bins (``left_outlier``, ``right_outlier``) hold values below
  the min and above the last edge; without them those values go to the first and last bin.
* NaN is rejected in the baseline and counted in the left-most bin of a window.
* PSI replaces an aggregated value of exactly 0 by 0.005; SumDiff is half the summed absolute
  differences; MaxDiff is the largest one and reports its bin. Bin weights are normalised to
  sum 1 and multiply the per-bin scores, so even uniform weights scale the score by 1/bins.
* Status is Alert above the alert threshold, Warning above the warning threshold, else Ok;
  NoData when the window holds fewer than ``min_count`` values (0 offline, as in Wallaroo; 30
  by default for stored assays), whatever its score.
"""

from joey_core.assays.binning import BIN_MODES, BinMode, Bins, bin_counts, make_bins
from joey_core.assays.scoring import (
    ALERTING,
    JUDGED,
    METRICS,
    PSI_ZERO_SUBSTITUTE,
    AssayResult,
    Metric,
    Scores,
    Status,
    score,
    score_counts,
    status_of,
)
from joey_core.assays.summary import (
    AGGREGATIONS,
    Aggregation,
    Summary,
    aggregate,
    baseline_summary,
    summarize,
)

__all__ = [
    "AGGREGATIONS",
    "ALERTING",
    "BIN_MODES",
    "JUDGED",
    "METRICS",
    "PSI_ZERO_SUBSTITUTE",
    "Aggregation",
    "AssayResult",
    "BinMode",
    "Bins",
    "Metric",
    "Scores",
    "Status",
    "Summary",
    "aggregate",
    "baseline_summary",
    "bin_counts",
    "make_bins",
    "score",
    "score_counts",
    "status_of",
    "summarize",
]
