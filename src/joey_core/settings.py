"""Settings shared by every Joey process.

Each service subclasses :class:`CommonSettings` with its own fields. A settings object
is built once at start (``XSettings()`` reads ``JOEY_*`` environment variables) and
passed down; nothing below the entry points reads the environment.
"""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class CommonSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="JOEY_", frozen=True, extra="ignore")

    kafka_bootstrap: str = "127.0.0.1:9092"
    """Kafka bootstrap servers. The default is where `joey up` starts the embedded broker."""

    kafka_dev_timeouts: bool = True
    """Short consumer-group session timeouts (6 s / 0.5 s heartbeat) so groups form fast.
    Valid on real Kafka too; turn off for large production groups."""

    database_url: str = "postgresql://postgres@127.0.0.1:5432/joey"
    """Postgres database holding registry metadata and the inference log."""

    redis_url: str = "redis://127.0.0.1:6379/0"
    """Redis used for replica heartbeats."""

    redis_prefix: str = "joey"
    """Prefix of every Redis key, so several stacks can share one Redis."""

    registry_addr: str = "127.0.0.1:50051"
    """host:port of the registry's gRPC API."""

    logs_partitions: int = Field(default=8, ge=1)
    """Partitions of the joey.logs topic (created once; the embedded broker cannot add partitions)."""

    pipeline_partitions: int = Field(default=8, ge=1)
    """Partitions of each pipeline's topics; also the maximum replicas of a deployment."""

    log_level: str = "INFO"
