"""Prometheus metrics of the engine. Labels stay low-cardinality: workspace and pipeline, never records."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_LABELS = ("workspace", "pipeline")

RECORDS = Counter("joey_engine_records", "Input records processed", (*_LABELS, "outcome"))
BATCH_SIZE = Histogram(
    "joey_engine_batch_size",
    "Records per batch",
    _LABELS,
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
)
# Model steps of small models take well under a millisecond, so buckets start at 50 us.
STEP_SECONDS = Histogram(
    "joey_engine_step_seconds",
    "Time of one step (a model or a validations step's checks) on one batch",
    (*_LABELS, "step"),
    buckets=(5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0),
)
BATCH_SECONDS = Histogram(
    "joey_engine_batch_seconds",
    "Time from a batch's arrival to its offsets being committed",
    _LABELS,
    buckets=(1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
# Replicas are processes (see joey_engine.app): the gauge sums over the live ones.
REPLICAS = Gauge(
    "joey_engine_replicas", "Replicas running in this engine", _LABELS, multiprocess_mode="livesum"
)
REPLICA_FAILURES = Counter("joey_engine_replica_failures", "Replicas stopped by a fatal error", _LABELS)
DELIVERY_FAILURES = Counter(
    "joey_engine_delivery_failures",
    "Batches whose records the broker did not acknowledge (run again, or answered by bounded errors when "
    "refused for good)",
    _LABELS,
)
DEAD_LETTERED = Counter(
    "joey_engine_dead_lettered",
    "Records failed unrun because replicas processing them kept stopping",
    _LABELS,
)
OVERSIZED = Counter(
    "joey_engine_bounded_replies",
    "Records answered by a bounded error because their records could not be encoded or were too large",
    _LABELS,
)
REJECTED_DEPLOYMENTS = Counter(
    "joey_engine_rejected_deployments", "joey.deployments records ignored because they failed validation"
)
