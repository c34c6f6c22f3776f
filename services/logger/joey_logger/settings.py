"""Settings of the logger service."""

from __future__ import annotations

import os
import secrets
import socket

from pydantic import Field

from joey_core import topics
from joey_core.heartbeats import DEFAULT_TTL_S
from joey_core.settings import CommonSettings


def default_instance_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class LoggerSettings(CommonSettings):
    batch_size: int = Field(default=2000, ge=1)
    """Most log records written to the sink in one transaction."""

    batch_timeout_ms: int = Field(default=200, ge=1)
    """Longest wait for a batch to fill before the records at hand are written."""

    logger_group: str = topics.LOGGER_GROUP
    """Consumer group of the loggers; loggers feeding different sinks need groups of their own."""

    heartbeat_ttl_s: float = Field(default=DEFAULT_TTL_S, gt=0)
    """Lifetime of the service heartbeat in Redis; it is refreshed three times per TTL."""

    instance_id: str = Field(default_factory=default_instance_id)
    """Name of this logger process in heartbeats and logs."""

    metrics_port: int | None = None
    """Port of the Prometheus endpoint; none when unset."""

    sink: str = "postgres"
    """Name of the registered LogSink the records are written to."""

    retry_backoff_max_s: float = Field(default=10.0, gt=0)
    """Longest pause before a batch is retried while the sink is unavailable."""
