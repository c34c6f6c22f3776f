"""Prometheus metrics of the gateway. Labels stay low-cardinality: workspace and pipeline of deployed
pipelines only (a request naming an unknown model is counted without them), never request ids."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

_LABELS = ("workspace", "pipeline")

REQUESTS = Counter(
    "joey_gateway_requests",
    "Inference requests answered; outcome is ok or the failure (invalid_argument, deadline_exceeded, ...)",
    (*_LABELS, "outcome"),
)
REQUEST_SECONDS = Histogram(
    "joey_gateway_request_seconds",
    "Time from an inference request to its answer",
    _LABELS,
    buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
