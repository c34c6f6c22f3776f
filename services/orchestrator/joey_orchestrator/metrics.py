"""Prometheus metrics of the orchestrator. Labels stay low-cardinality: statuses and kinds, never a name."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

RUNS_ENDED = Counter(
    "joey_task_runs_ended_total", "Runs this process ran to their end, by status.", ["status"]
)
RUNS_REAPED = Counter(
    "joey_task_runs_reaped_total", "Runs failed because their orchestrator's lease ran out."
)
RUNNING = Gauge("joey_task_runs_running", "Runs this process is running.")
FIRED = Counter("joey_task_schedule_fires_total", "Schedule instants this process fired.")
PACKAGED = Counter(
    "joey_orchestrations_packaged_total", "Orchestration versions packaged, by outcome.", ["status"]
)
