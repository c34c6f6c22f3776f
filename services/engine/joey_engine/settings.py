"""Settings of the engine service."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr

from joey_core.settings import ServiceSettings


class EngineSettings(ServiceSettings):
    cache_dir: Path = Field(default_factory=lambda: Path.home() / ".cache" / "joey" / "artifacts")
    """Where model artifacts fetched from the registry are kept, one file per sha256."""

    service_token: SecretStr | None = None
    """The registry's JOEY_SERVICE_TOKEN: the engine presents it to download artifacts."""

    max_batch_size: int = Field(default=256, ge=1)
    """Most input records run through the models in one batch."""

    max_batch_delay_ms: int = Field(default=5, ge=0)
    """How long a replica waits for more records after the first one of a batch arrived."""

    heartbeat_interval_s: float = Field(default=1.0, gt=0)
    """How often replica and service heartbeats (and slot leases) are refreshed."""

    intra_op_threads: int = Field(default=1, ge=0)
    """onnxruntime intra-op threads per model; parallelism comes from replicas (0 = onnxruntime's default)."""

    metrics_port: int = Field(default=0, ge=0)
    """Port of the Prometheus metrics endpoint; 0 disables it."""

    workspaces: list[str] = Field(default_factory=list)
    """Serve only the deployments of these workspaces (all when empty), e.g. to give workspaces their own
    engines."""

    load_retry_max_s: float = Field(default=30.0, gt=0)
    """Longest wait between attempts to fetch and load a deployment that failed to load."""

    python_step_timeout_s: float = Field(default=30.0, gt=0, le=120)
    """Longest a python step may take over one batch; past it its process is killed and restarted, and
    the batch's records fail. Capped well under Kafka's max.poll.interval (5 min): a replica that polls
    no more for that long leaves its consumer group."""

    python_step_start_timeout_s: float = Field(default=60.0, gt=0)
    """Longest a python step's process may take to start and import the user's file."""
