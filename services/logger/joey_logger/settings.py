"""Settings of the logger service."""

from __future__ import annotations

from pydantic import Field

from joey_core import topics
from joey_core.settings import DatabaseSettings, ServiceSettings


class LoggerSettings(ServiceSettings, DatabaseSettings):
    batch_size: int = Field(default=2000, ge=1)
    """Most log rows written to the sink in one transaction (a batch record holds many); about that many
    rows' worth of records are consumed at a time."""

    batch_timeout_ms: int = Field(default=200, ge=1)
    """Longest wait for a batch to fill before the records at hand are written."""

    logger_group: str = topics.LOGGER_GROUP
    """Consumer group of the loggers; loggers feeding different sinks need groups of their own."""

    metrics_port: int | None = None
    """Port of the Prometheus endpoint; none when unset."""

    sink: str = "postgres"
    """Name of the registered LogSink the records are written to."""

    retry_backoff_max_s: float = Field(default=10.0, gt=0)
    """Longest pause before a batch is retried while the sink is unavailable."""
