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
    """Longest a replica waits for more records after the first one of a batch arrived. It takes what
    has already arrived, and waits only while more keeps coming: a lone record on an idle pipeline is
    run at once, a stream of records in batches of up to ``max_batch_size``."""

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

    max_record_attempts: int = Field(default=3, ge=1)
    """Times a record may be in the batch of a replica that stopped (crashed, was killed) before it is
    dead-lettered: answered by an error record and a failure log instead of being run again."""

    redis_timeout_s: float = Field(default=2.0, gt=0)
    """Longest a replica waits for Redis (connecting, or one command) before going on without it."""

    attempt_notes_ttl_s: float = Field(default=86_400.0, gt=0)
    """How long the notes of records being processed outlive the last one taken; a note older than that
    is forgotten (its records are run again as new) so it cannot dead-letter records of a re-created
    topic or a broker that forgot its offsets."""

    max_delivery_rewinds: int = Field(default=30, ge=1)
    """Times in a row a batch the broker did not acknowledge is run again before the replica stops with
    an error (and restarts with a new producer): a broker that stays away shows as failing replicas."""

    delivery_retry_max_s: float = Field(default=10.0, gt=0)
    """Longest wait before a batch whose records the broker did not acknowledge is run again."""

    python_step_timeout_s: float = Field(default=30.0, gt=0, le=120)
    """Longest a python step may take over one batch; past it its process is killed and restarted, and
    the batch's records fail. Capped well under Kafka's max.poll.interval (5 min): a replica that polls
    no more for that long leaves its consumer group."""

    python_step_start_timeout_s: float = Field(default=60.0, gt=0)
    """Longest a python step's process may take to start and import the user's file."""

    sandbox_max_memory_mb: int = Field(default=2048, ge=64)
    """Address space of a python step's process (RLIMIT_AS), in MiB."""

    sandbox_max_cpu_s: int = Field(default=600, ge=1)
    """CPU seconds a python step's process may use over its life (RLIMIT_CPU); past it the kernel kills
    it and the runtime starts another."""

    sandbox_max_processes: int = Field(default=64, ge=1)
    """Processes and threads a python step may add to its user's count (RLIMIT_NPROC, counted per user)."""

    sandbox_max_file_mb: int = Field(default=64, ge=0)
    """Largest file a python step may write (RLIMIT_FSIZE), in MiB."""

    sandbox_user: str | None = None
    """User python steps run as when the engine runs as root (docs/security.md); it must be able to run
    ``sandbox_python``. Unset, a root engine's python steps run as root without capabilities."""

    sandbox_python: Path | None = None
    """Interpreter of python steps' processes, with numpy (and what the steps import); the engine's own
    when unset. Set it when ``sandbox_user`` cannot run the engine's (one under /root, say)."""
