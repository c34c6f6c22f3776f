"""Drift scoring offline, with Wallaroo's assay semantics: ``from joey.assays import score``.

The same math scores live assays in the services; it lives in :mod:`joey_core.assays`, whose
documentation states the binning and metric rules.
"""

from joey_core.assays import (
    AGGREGATIONS,
    BIN_MODES,
    METRICS,
    PSI_ZERO_SUBSTITUTE,
    Aggregation,
    AssayResult,
    BinMode,
    Bins,
    Metric,
    Scores,
    Status,
    Summary,
    aggregate,
    baseline_summary,
    bin_counts,
    make_bins,
    score,
    score_counts,
    status_of,
    summarize,
)

__all__ = [
    "AGGREGATIONS",
    "BIN_MODES",
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
