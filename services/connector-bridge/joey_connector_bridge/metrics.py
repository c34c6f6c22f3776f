"""Prometheus metrics of the connector-bridge. Labels stay low-cardinality: the kind, never a bridge name."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

ROWS_MOVED = Counter(
    "joey_bridge_rows_moved_total", "Rows a sink wrote or a source had acknowledged by Kafka.", ["kind"]
)
RETRIES = Counter(
    "joey_bridge_retries_total",
    "Steps retried because the external store or the broker refused them.",
    ["kind"],
)
UNDECODABLE = Counter(
    "joey_bridge_undecodable_total", "Records a sink skipped because they were not a pipeline's result."
)
RUNNING = Gauge("joey_bridge_running", "Bridges this process runs.", ["kind"])
REJECTED_SPECS = Counter(
    "joey_bridge_rejected_specs_total", "Records of joey.bridges ignored because they were not a bridge."
)
REFUSED = Counter(
    "joey_bridge_rows_refused_total", "Rows a sink's store refused for good (an HTTP 4xx), skipped."
)
