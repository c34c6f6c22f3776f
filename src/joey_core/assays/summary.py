"""Summaries of a baseline or a window: statistics, bins, counts and aggregated values."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

from joey_core.assays._checks import check_choice
from joey_core.assays.binning import (
    BinMode,
    Bins,
    as_values,
    bins_of_sorted,
    check_baseline,
    counts_of_sorted,
)

Aggregation = Literal["density", "cumulative"]
AGGREGATIONS: tuple[Aggregation, ...] = ("density", "cumulative")


@dataclass(frozen=True)
class Summary:
    """What an assay knows about one set of values.

    ``count`` is every value binned, NaN included; ``min``, ``max``, ``mean``, ``median`` and
    ``std`` (population, ``ddof=0`` as numpy's default) ignore NaN and are NaN when nothing else
    is left. ``bin_counts`` and ``aggregated_values`` follow the order of ``bins.edge_names``.
    """

    count: int
    min: float
    max: float
    mean: float
    median: float
    std: float
    bins: Bins
    bin_counts: tuple[int, ...]
    aggregation: Aggregation
    aggregated_values: tuple[float, ...]

    @classmethod
    def of_counts(
        cls,
        counts: npt.ArrayLike,
        bins: Bins,
        aggregation: Aggregation,
        *,
        count: int,
        stats: tuple[float, float, float, float, float],
    ) -> Summary:
        """A summary of bin ``counts``, its values aggregated; ``stats`` are min, max, mean, median, std."""
        lowest, highest, mean, median, std = stats
        return cls(
            count=count,
            min=lowest,
            max=highest,
            mean=mean,
            median=median,
            std=std,
            bins=bins,
            bin_counts=tuple(int(c) for c in np.asarray(counts).tolist()),
            aggregation=aggregation,
            aggregated_values=tuple(aggregate(counts, aggregation).tolist()),
        )

    @property
    def edges(self) -> tuple[float, ...]:
        return self.bins.upper_edges

    @property
    def edge_names(self) -> tuple[str, ...]:
        return self.bins.edge_names


def aggregate(counts: npt.ArrayLike, aggregation: Aggregation) -> npt.NDArray[np.float64]:
    """Densities (count / total) or their running sum."""
    check_choice("aggregation", aggregation, AGGREGATIONS)
    values = np.asarray(counts, dtype=np.float64)
    total = values.sum()
    if total <= 0:
        raise ValueError("cannot aggregate bin counts that are all zero")
    density = values / total
    return np.cumsum(density) if aggregation == "cumulative" else density


def _summarize(
    x: npt.NDArray[np.float64], ordered: npt.NDArray[np.float64], bins: Bins, aggregation: Aggregation
) -> Summary:
    """Summary of ``x``, given also sorted: one sort serves the bins, the median and min/max."""
    check_choice("aggregation", aggregation, AGGREGATIONS)
    if x.size == 0:
        raise ValueError("no values to summarize")
    counts = counts_of_sorted(ordered, bins)
    present = ordered[: int(np.searchsorted(ordered, np.nan, side="left"))]  # NaN sorts last
    if present.size == 0:
        lowest = highest = mean = median = std = math.nan
    else:
        # np.median's own rule (the mean of the middle one or two), without its copy and partition.
        middle = present[(present.size - 1) // 2 : present.size // 2 + 1]
        lowest, highest, median = float(present[0]), float(present[-1]), float(middle.mean())
        # Mean and std in the input's order: a sum's last bits depend on the order of its terms,
        # and these should equal what np.mean / np.std give on the same values.
        unordered = x if present.size == x.size else x[~np.isnan(x)]
        mean, std = float(unordered.mean()), float(unordered.std())
    return Summary.of_counts(
        counts, bins, aggregation, count=int(x.size), stats=(lowest, highest, mean, median, std)
    )


def summarize(values: npt.ArrayLike, bins: Bins, *, aggregation: Aggregation = "density") -> Summary:
    """Summary of ``values`` (e.g. a window) binned with ``bins`` taken from the baseline."""
    x = as_values(values, "values")
    return _summarize(x, np.sort(x), bins, aggregation)


def baseline_summary(
    baseline: npt.ArrayLike,
    *,
    num_bins: int = 5,
    bin_mode: BinMode = "quantile",
    edges: Sequence[float] | None = None,
    outlier_bins: bool = True,
    aggregation: Aggregation = "density",
) -> Summary:
    """Summary of a baseline with the bins derived from it; windows are then binned with
    ``summary.bins`` (see :func:`joey_core.assays.binning.bin_counts`)."""
    x = check_baseline(baseline)
    ordered = np.sort(x)
    bins = bins_of_sorted(ordered, num_bins, bin_mode, edges, outlier_bins)
    return _summarize(x, ordered, bins, aggregation)
