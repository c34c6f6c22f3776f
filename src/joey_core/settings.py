"""Settings shared by every Joey process.

Each service subclasses :class:`ServiceSettings` with its own fields; the SDK and the CLI use
:class:`CommonSettings`. A settings object
is built once at start (``XSettings()`` reads ``JOEY_*`` environment variables) and
passed down; nothing below the entry points reads the environment.
"""

from __future__ import annotations

import os
import secrets
import socket

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class CommonSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="JOEY_", frozen=True, extra="ignore")

    kafka_bootstrap: str = "127.0.0.1:9092"
    """Kafka bootstrap servers. The default is where `joey up` starts the embedded broker."""

    kafka_dev_timeouts: bool = True
    """Short consumer-group session timeouts (4 s / 0.5 s heartbeat) so groups form fast.
    Valid on real Kafka too; turn off for large production groups."""

    database_url: str = "postgresql://postgres@127.0.0.1:5432/joey"
    """Postgres database holding registry metadata and the inference log."""

    redis_url: str = "redis://127.0.0.1:6379/0"
    """Redis: replica and service heartbeats, engine slot leases and the autoscaler's lease."""

    redis_prefix: str = "joey"
    """Prefix of every Redis key, so several stacks can share one Redis."""

    registry_addr: str = "127.0.0.1:50051"
    """host:port of the registry's gRPC API."""

    logs_partitions: int = Field(default=8, ge=1)
    """Partitions of the joey.logs topic (created once; the embedded broker cannot add partitions)."""

    pipeline_partitions: int = Field(default=8, ge=1)
    """Partitions of each pipeline's topics; also the maximum replicas of a deployment."""

    log_level: str = "INFO"


def default_instance_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class ServiceSettings(CommonSettings):
    """What every service process has: a name of its own and a heartbeat in Redis."""

    instance_id: str = Field(default_factory=default_instance_id)
    """Name of this process in heartbeats, consumer client ids and logs (`joey up` sets one per service)."""

    heartbeat_ttl_s: float = Field(default=5.0, gt=0)
    """How long a heartbeat (and an engine's slot lease) outlives its last refresh: an instance not
    heard from for this long counts as gone."""
