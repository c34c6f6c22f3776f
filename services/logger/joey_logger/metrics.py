"""Prometheus metrics of the logger. Labels stay low-cardinality: never a pipeline or request id."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

ROWS_WRITTEN = Counter("joey_logger_rows_written_total", "Log rows added to the sink.")
DUPLICATES_SKIPPED = Counter(
    "joey_logger_duplicates_skipped_total", "Log records skipped because their row already existed (replays)."
)
BATCHES = Counter(
    "joey_logger_batches_total",
    "Batches handled; outcome is committed, or retried (sink or dead-letter topic unavailable).",
    ["outcome"],
)
DEAD_LETTERED = Counter(
    "joey_logger_dead_lettered_total",
    "Log records sent to the dead-letter topic; reason is undecodable or rejected (by the sink).",
    ["reason"],
)
ASSAYS_FAILED = Counter(
    "joey_logger_assays_failed_total",
    "Assays this logger found it could not count and marked failed (they are then left out).",
)
BATCH_SECONDS = Histogram(
    "joey_logger_batch_seconds",
    "Time from a consumed batch to its committed offsets.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
STAGE_SECONDS = Counter(
    "joey_logger_stage_seconds_total",
    "Seconds spent per stage of a batch: consume (polling, idle waits included), decode, prepare (locks and "
    "the live assays), copy (rows straight to inference_logs with the assays' counting, or to the staging "
    "table), undone (a direct COPY rolled back: a replayed row), insert (INSERT ... ON CONFLICT from the "
    "staging table with the assays' counting, and the commit of the transaction), dead_letter, commit (of "
    "the offsets).",
    ["stage"],
)
