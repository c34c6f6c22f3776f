"""Drift scores between a baseline and a window, from their bin counts.

Every score goes through :func:`score_counts`, so a streaming assayer that adds up window
counts chunk by chunk gets exactly what :func:`score` gives for the whole window at once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

import numpy as np
import numpy.typing as npt

from joey_core.assays._checks import check_choice, check_min_count
from joey_core.assays.binning import BinMode
from joey_core.assays.summary import Aggregation, Summary, aggregate, baseline_summary, summarize

Metric = Literal["psi", "maxdiff", "sumdiff"]
METRICS: tuple[Metric, ...] = ("psi", "maxdiff", "sumdiff")

PSI_ZERO_SUBSTITUTE = 0.005
"""Stands in for an aggregated value that is exactly 0 in PSI, where ln(0) is undefined."""


class Status(StrEnum):
    OK = "Ok"
    WARNING = "Warning"
    ALERT = "Alert"
    NO_DATA = "NoData"
    """Fewer values than ``min_count``: the score is kept but not judged against the thresholds."""
    OPEN = "Open"
    """A window that has not closed yet (interactive runs): its score so far is provisional."""


JUDGED = (Status.OK, Status.WARNING, Status.ALERT)
"""The statuses of windows judged against the thresholds; NoData and Open ones are not."""
ALERTING = (Status.WARNING, Status.ALERT)
"""The statuses published as alerts."""


@dataclass(frozen=True)
class Scores:
    """The score of a window against a baseline.

    ``scores`` holds one value per bin (weighted, when weights are given): ``(w - b) * ln(w / b)``
    for PSI, ``|w - b|`` for MaxDiff and SumDiff. ``score`` is their sum for PSI, half their sum
    for SumDiff and their maximum for MaxDiff. ``bin_index`` is the bin of that maximum (the
    first one on ties) for MaxDiff and None for the other metrics, which have no single bin.
    """

    metric: Metric
    score: float
    scores: tuple[float, ...]
    bin_index: int | None
    status: Status


@dataclass(frozen=True)
class AssayResult:
    """:class:`Scores` of a window, with the summaries of the baseline and the window."""

    metric: Metric
    score: float
    scores: tuple[float, ...]
    bin_index: int | None
    status: Status
    baseline_summary: Summary
    window_summary: Summary


def status_of(score: float, alert_threshold: float, warning_threshold: float | None) -> Status:
    """Alert above the alert threshold, Warning above the warning threshold; equal is not above."""
    if score > alert_threshold:
        return Status.ALERT
    if warning_threshold is not None and score > warning_threshold:
        return Status.WARNING
    return Status.OK


def _counts(counts: npt.ArrayLike, what: str) -> npt.NDArray[np.int64]:
    array = np.asarray(counts)
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{what} counts must be a one-dimensional array of integers")
    if (array < 0).any():
        raise ValueError(f"{what} counts must not be negative")
    if array.sum() == 0:
        raise ValueError(f"{what} is empty (all bin counts are zero)")
    return array.astype(np.int64, copy=False)


def _weights(bin_weights: Sequence[float], num_bins: int) -> npt.NDArray[np.float64]:
    weights = np.asarray(bin_weights, dtype=np.float64)
    if weights.shape != (num_bins,):
        raise ValueError(
            f"bin_weights must have one weight per bin, outlier bins included: "
            f"expected {num_bins}, got {weights.size}"
        )
    if not np.isfinite(weights).all() or (weights < 0).any():
        raise ValueError(f"bin_weights must be finite and not negative, got {weights.tolist()}")
    total = weights.sum()
    if total == 0:
        raise ValueError("bin_weights are all zero")
    return weights / total


def _check_threshold(name: str, value: float | None) -> None:
    if value is not None and math.isnan(value):
        raise ValueError(f"{name} must be a number, got NaN")


def score_counts(
    baseline_counts: npt.ArrayLike,
    window_counts: npt.ArrayLike,
    *,
    aggregation: Aggregation = "density",
    metric: Metric = "psi",
    bin_weights: Sequence[float] | None = None,
    alert_threshold: float = 0.25,
    warning_threshold: float | None = None,
    min_count: int = 0,
) -> Scores:
    """Score a window's bin counts against the baseline's (both binned with the same bins).

    A window of fewer than ``min_count`` values gets its score all the same, but the status
    NoData: a handful of values scores high by chance alone (see docs/assays.md, "min_count").
    """
    check_choice("metric", metric, METRICS)
    _check_threshold("alert_threshold", alert_threshold)
    _check_threshold("warning_threshold", warning_threshold)
    check_min_count(min_count)
    baseline = _counts(baseline_counts, "baseline")
    window = _counts(window_counts, "window")
    if baseline.shape != window.shape:
        raise ValueError(f"baseline has {baseline.size} bins but the window has {window.size}")
    b = aggregate(baseline, aggregation)
    w = aggregate(window, aggregation)
    if metric == "psi":
        b = np.where(b == 0, PSI_ZERO_SUBSTITUTE, b)
        w = np.where(w == 0, PSI_ZERO_SUBSTITUTE, w)
        per_bin = (w - b) * np.log(w / b)
    else:
        per_bin = np.abs(w - b)
    if bin_weights is not None:
        per_bin = per_bin * _weights(bin_weights, per_bin.size)
    bin_index: int | None = None
    if metric == "maxdiff":
        bin_index = int(np.argmax(per_bin))
        total = float(per_bin[bin_index])
    else:
        total = float(per_bin.sum())
        if metric == "sumdiff":
            total *= 0.5
    status = status_of(total, alert_threshold, warning_threshold)
    if int(window.sum()) < min_count:
        status = Status.NO_DATA
    return Scores(metric, total, tuple(per_bin.tolist()), bin_index, status)


def score(
    baseline: npt.ArrayLike,
    window: npt.ArrayLike,
    *,
    num_bins: int = 5,
    bin_mode: BinMode = "quantile",
    edges: Sequence[float] | None = None,
    outlier_bins: bool = True,
    aggregation: Aggregation = "density",
    metric: Metric = "psi",
    bin_weights: Sequence[float] | None = None,
    alert_threshold: float = 0.25,
    warning_threshold: float | None = None,
    min_count: int = 0,
) -> AssayResult:
    """Drift of ``window`` from ``baseline``, binned with edges derived from the baseline.

    The same as :func:`joey_core.assays.summary.baseline_summary` (``num_bins``, ``bin_mode``,
    ``edges``, ``outlier_bins``), :func:`joey_core.assays.summary.summarize` of the window with the
    baseline's bins, and :func:`score_counts` (``metric``, ``bin_weights``, thresholds and
    ``min_count``, by default 0: every window is judged, as Wallaroo does) of the two summaries'
    counts. NaN is rejected in the baseline and counted in the left-most bin of the window. Bad
    arguments raise ValueError naming the problem.
    """
    # Cheap argument checks first, so a typo does not cost a pass over a million values.
    check_choice("metric", metric, METRICS)
    _check_threshold("alert_threshold", alert_threshold)
    _check_threshold("warning_threshold", warning_threshold)
    check_min_count(min_count)
    if np.size(window) == 0:
        raise ValueError("window is empty")
    base = baseline_summary(
        baseline,
        num_bins=num_bins,
        bin_mode=bin_mode,
        edges=edges,
        outlier_bins=outlier_bins,
        aggregation=aggregation,
    )
    current = summarize(window, base.bins, aggregation=aggregation)
    result = score_counts(
        base.bin_counts,
        current.bin_counts,
        aggregation=aggregation,
        metric=metric,
        bin_weights=bin_weights,
        alert_threshold=alert_threshold,
        warning_threshold=warning_threshold,
        min_count=min_count,
    )
    return AssayResult(
        metric=result.metric,
        score=result.score,
        scores=result.scores,
        bin_index=result.bin_index,
        status=result.status,
        baseline_summary=base,
        window_summary=current,
    )
