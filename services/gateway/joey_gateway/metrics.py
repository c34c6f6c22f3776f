"""Prometheus metrics of the gateway. Labels stay low-cardinality: workspace and pipeline of deployed
pipelines only (a request naming an unknown model is counted without them), never request ids."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

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
IN_FLIGHT = Gauge(
    "joey_gateway_requests_in_flight",
    "Requests of a pipeline in flight at this gateway; at JOEY_PIPELINE_CONCURRENCY more are refused (429)",
    _LABELS,
)
STALE_ANSWERS = Counter(
    "joey_gateway_stale_answers",
    "Requests served on an old answer of the registry (kind: catalog, auth) because it could not answer",
    ("kind",),
)
REPLY_READERS = Gauge(
    "joey_gateway_reply_readers",
    "Pipelines whose outputs this gateway reads; one idle for JOEY_STREAM_IDLE_S is closed",
)
CATALOG_STALE = Gauge(
    "joey_gateway_catalog_stale",
    "1 while the registry cannot answer and the last known catalog is served, else 0",
)
