"""Bin edges fixed from a baseline, and the binning of any values with them.

Layout with outlier bins (``N + 2`` bins)::

    bin 0        left outlier     x < baseline min, and every NaN
    bin k        interior, 1..N   e[k-1] < x <= e[k], e[0] = baseline min (bin 1 also holds x == min)
    bin N + 1    right outlier    x > e[N]

Without outlier bins there are ``N`` bins: values below the baseline min and NaN go to the
first bin, values above the last edge to the last one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Literal

import numpy as np
import numpy.typing as npt

from joey_core.assays._checks import check_choice, check_num_bins

BinMode = Literal["quantile", "equal", "provided"]
BIN_MODES: tuple[BinMode, ...] = ("quantile", "equal", "provided")

LEFT_OUTLIER = "left_outlier"
RIGHT_OUTLIER = "right_outlier"


@dataclass(frozen=True)
class Bins:
    """Edges derived from a baseline; every window of an assay is binned with the same ones.

    ``edges`` are the right-closed upper edges ``e[1..N]`` of the interior bins, ``names`` their
    names; ``lower`` is the baseline min (``e[0]``), below which values are left outliers.
    """

    lower: float
    edges: tuple[float, ...]
    names: tuple[str, ...]
    outlier_bins: bool = True

    def __post_init__(self) -> None:
        # Checked here too, so that bins rebuilt from a stored summary are as sound as new ones.
        if not math.isfinite(self.lower):
            raise ValueError(f"the lower edge (baseline min) must be finite, got {self.lower}")
        check_edges(self.edges, len(self.edges))
        if len(self.names) != len(self.edges):
            raise ValueError(f"{len(self.edges)} edges but {len(self.names)} edge names")

    @property
    def count(self) -> int:
        """Number of bins, outlier bins included."""
        return len(self.edges) + 2 if self.outlier_bins else len(self.edges)

    @property
    def upper_edges(self) -> tuple[float, ...]:
        """Upper edge of every bin: the left outlier's is the baseline min (exclusive), the right's +inf."""
        if self.outlier_bins:
            return (self.lower, *self.edges, math.inf)
        return self.edges

    @property
    def edge_names(self) -> tuple[str, ...]:
        """Name of every bin, in the order of :attr:`upper_edges`."""
        if self.outlier_bins:
            return (LEFT_OUTLIER, *self.names, RIGHT_OUTLIER)
        return self.names


def as_values(values: npt.ArrayLike, what: str) -> npt.NDArray[np.float64]:
    """``values`` as a 1-D float64 array (no copy when it already is one)."""
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{what} must be one-dimensional, got shape {array.shape}")
    return array


def check_baseline(values: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """The baseline as an array; empty or non-finite baselines give no meaningful edges."""
    baseline = as_values(values, "baseline")
    if baseline.size == 0:
        raise ValueError("baseline is empty")
    if not np.isfinite(baseline).all():
        bad = int(np.count_nonzero(~np.isfinite(baseline)))
        raise ValueError(f"baseline contains {bad} non-finite value(s) (NaN or inf); remove them first")
    return baseline


def check_edges(edges: Sequence[float], num_bins: int) -> tuple[float, ...]:
    """Provided edges: exactly ``num_bins`` finite values in non-decreasing order."""
    values = tuple(float(edge) for edge in edges)
    if len(values) != num_bins:
        raise ValueError(f"expected {num_bins} edges (one per bin, num_bins={num_bins}), got {len(values)}")
    if not all(math.isfinite(edge) for edge in values):
        raise ValueError(f"edges must be finite, got {list(values)}")
    if any(b < a for a, b in pairwise(values)):
        raise ValueError(f"edges must be sorted in non-decreasing order, got {list(values)}")
    return values


def _percent(k: int, num_bins: int) -> str:
    return format(round(100 * k / num_bins, 2), "g")


def _edge_names(bin_mode: BinMode, num_bins: int) -> tuple[str, ...]:
    ks = range(1, num_bins + 1)
    if bin_mode == "quantile":
        return tuple(f"q_{_percent(k, num_bins)}" for k in ks)
    prefix = "e" if bin_mode == "equal" else "p"
    return tuple(f"{prefix}_{k}" for k in ks)


def bins_of_sorted(
    baseline: npt.NDArray[np.float64],
    num_bins: int,
    bin_mode: BinMode,
    edges: Sequence[float] | None,
    outlier_bins: bool,
) -> Bins:
    """Bins of a checked baseline sorted ascending; quantiles of sorted data cost one pass."""
    check_num_bins(num_bins)
    check_choice("bin_mode", bin_mode, BIN_MODES)
    if (edges is not None) != (bin_mode == "provided"):
        raise ValueError("edges are required with bin_mode='provided' and only allowed with it")
    lowest, highest = float(baseline[0]), float(baseline[-1])
    ks = np.arange(1, num_bins + 1)
    interior: npt.NDArray[np.floating]
    if bin_mode == "quantile":
        interior = np.quantile(baseline, ks / num_bins, method="hazen")
    elif bin_mode == "equal":
        interior = lowest + ks * ((highest - lowest) / num_bins)
    else:
        assert edges is not None  # checked above; narrows the type
        interior = np.asarray(check_edges(edges, num_bins))
    if bin_mode != "provided":
        # Rounding in min + N*(max-min)/N may miss max; the last edge must be max exactly, or the
        # baseline max itself would land in the right outlier bin.
        interior[-1] = highest
    return Bins(lowest, tuple(interior.tolist()), _edge_names(bin_mode, num_bins), outlier_bins)


def make_bins(
    baseline: npt.ArrayLike,
    *,
    num_bins: int = 5,
    bin_mode: BinMode = "quantile",
    edges: Sequence[float] | None = None,
    outlier_bins: bool = True,
) -> Bins:
    """Bins for ``baseline``: quantile (Hazen) or equal-width edges, or the ``edges`` provided."""
    return bins_of_sorted(np.sort(check_baseline(baseline)), num_bins, bin_mode, edges, outlier_bins)


def counts_of_sorted(values: npt.NDArray[np.float64], bins: Bins) -> npt.NDArray[np.int64]:
    """:func:`bin_counts` of values already sorted ascending (NaN last, as ``np.sort`` leaves them).

    Sorted, a bin's count is a difference of two positions found by binary search, whatever the
    number of bins; numpy's vectorised sort is several times faster than searching every value.
    """
    # numpy orders NaN after every number in searches as in sorts: this finds the first NaN.
    valid = values[: int(np.searchsorted(values, np.nan, side="left"))]
    nan = values.size - valid.size
    below = int(np.searchsorted(valid, bins.lower, side="left"))
    # Values at or above the min, up to each edge; 0 for provided edges below the min.
    upto = np.maximum(np.searchsorted(valid, np.asarray(bins.edges), side="right") - below, 0)
    interior = np.diff(upto, prepend=0)
    above = valid.size - below - int(upto[-1])
    if bins.outlier_bins:
        return np.concatenate(([below + nan], interior, [above])).astype(np.int64)
    interior[0] += below + nan
    interior[-1] += above
    return interior.astype(np.int64)


def bin_counts(values: npt.ArrayLike, bins: Bins) -> npt.NDArray[np.int64]:
    """How many of ``values`` fall in each bin (``bins.count`` integers).

    Counts of consecutive chunks add up to the counts of the whole, so a streaming assayer can
    bin a window piece by piece. An empty ``values`` gives all zeros.
    """
    return counts_of_sorted(np.sort(as_values(values, "values")), bins)
