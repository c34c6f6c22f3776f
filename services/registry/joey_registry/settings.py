"""Settings of the registry service (``JOEY_*`` environment variables)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, field_validator, model_validator

from joey_core.connections.sealing import Sealer
from joey_core.settings import DatabaseSettings, ServiceSettings, TlsServerSettings

# Anyone holding it downloads every artifact: long enough not to be guessed.
MIN_SERVICE_TOKEN_CHARS = 32


class RegistrySettings(ServiceSettings, DatabaseSettings, TlsServerSettings):
    artifact_store: str = "filesystem"
    """Name of the artifact store implementation (see joey_registry.artifacts.STORES)."""

    artifact_dir: Path = Path("~/.local/share/joey/artifacts")
    """Where the filesystem store keeps model artifacts, one file per sha256."""

    grpc_max_workers: int = Field(default=16, ge=1)
    """Threads serving gRPC calls; more than JOEY_UPLOAD_CONCURRENCY, so uploads never hold them all."""

    grpc_grace_s: float = Field(default=5.0, ge=0)
    """How long in-flight calls may finish after a shutdown signal."""

    max_upload_bytes: int = Field(default=2 * 1024**3, ge=1)
    """Largest model artifact accepted by UploadModel."""

    max_orchestration_bytes: int = Field(default=64 * 1024**2, ge=1)
    """Largest orchestration zip UploadOrchestration accepts."""

    max_orchestration_unpacked_bytes: int = Field(default=512 * 1024**2, ge=1)
    """Largest total size of an orchestration zip's files once extracted (a small zip can claim more)."""

    max_orchestration_files: int = Field(default=10_000, ge=1)
    """Most entries an orchestration zip may hold."""

    task_token_ttl_s: int = Field(default=24 * 3600, ge=60)
    """Lifetime of the token of a run without a timeout; a run with one gets its timeout plus a minute.
    Either way the token works only while its run is running."""

    max_artifacts: int = Field(default=1000, ge=0)
    """Extra files one model version may carry (notebooks, samples, code, test results)."""

    max_artifacts_bytes: int = Field(default=2 * 1024**3, ge=0)
    """Total size of the extra files of one model version."""

    upload_concurrency: int = Field(default=4, ge=1)
    """Uploads received and checked at once; one more is refused at once (RESOURCE_EXHAUSTED). Unset, 4
    or one less than JOEY_GRPC_MAX_WORKERS, whichever is fewer (1 with a single worker, which uploads
    then share with every other call)."""

    upload_per_caller: int = Field(default=2, ge=1)
    """Uploads one caller (user or token) may send at once, so that one caller cannot hold every slot."""

    upload_idle_timeout_s: float = Field(default=30.0, gt=0)
    """An upload that sends nothing for this long is cut off (DEADLINE_EXCEEDED) and its bytes dropped."""

    upload_deadline_s: float = Field(default=900.0, gt=0)
    """How long an upload may take to arrive, in all (2 GiB at about 2.5 MB/s)."""

    upload_check_memory_mb: int = Field(default=4096, ge=512)
    """Address space of the child process that checks an upload; also the largest tensor a model may
    declare or infer (a tiny file can describe a tensor of gigabytes)."""

    upload_check_cpu_s: int = Field(default=60, ge=1)
    """CPU seconds the child process that checks an upload may use."""

    upload_check_timeout_s: float = Field(default=120.0, gt=0)
    """Wall-clock time the child process that checks an upload may take."""

    conversion_memory_mb: int = Field(default=6144, ge=1024)
    """Address space of the child process that loads, converts and verifies a native model (sklearn,
    xgboost, lightgbm, pytorch): more than a check's, as torch alone maps gigabytes."""

    conversion_cpu_s: int = Field(default=300, ge=1)
    """CPU seconds a conversion may use, its framework's import included."""

    conversion_timeout_s: float = Field(default=600.0, gt=0)
    """Wall-clock time a conversion may take, loading, converting and verifying."""

    conversion_require_sandbox: bool = True
    """Refuse to convert (FAILED_PRECONDITION naming what is missing) when the conversion child cannot
    isolate its network, drop every capability, confine its filesystem (Landlock) or filter its system
    calls (seccomp); false converts without what is missing, the conversion log saying so."""

    conversion_max_file_bytes: int = Field(default=2 * 1024**3, ge=1 << 20)
    """Largest file a conversion child may write, its scratch files and the ONNX form (RLIMIT_FSIZE;
    the write fails). Not their total: docs/security.md."""

    conversion_max_processes: int = Field(default=512, ge=16)
    """Processes and threads a conversion child may have (RLIMIT_NPROC, in its own user namespace);
    the kernel exempts a root registry's child. torch starts a thread pool per core."""

    conversion_concurrency: int = Field(default=2, ge=1)
    """Conversions running at once (each holds a child process until verified); one more upload of a
    native model is refused (RESOURCE_EXHAUSTED)."""

    db_pool_size: int = Field(default=8, ge=1)
    """Maximum Postgres connections held by the registry."""

    publish_timeout_s: float = Field(default=15.0, gt=0)
    """How long a deploy waits for the broker to acknowledge the deployment spec."""

    reconcile_interval_s: float = Field(default=5.0, gt=0)
    """How often a change of a deployment whose publish failed is withdrawn from joey.deployments
    (Postgres's state published again) once the broker answers."""

    forget_replicas_after_s: float = Field(default=300.0, gt=0)
    """Dead replicas last seen longer ago than this drop out of the deployment status."""

    autoscale_interval_s: float = Field(default=2.0, gt=0)
    """How often the autoscaler looks at the queue age of autoscaled deployments."""

    admin_password: SecretStr | None = None
    """Password of the platform admin `admin`, created at start while no user exists (then required,
    at least 12 characters); ignored once users exist."""

    service_token: SecretStr | None = None
    """Shared secret the engines present to download artifacts, and nothing else (JOEY_SERVICE_TOKEN)."""

    session_ttl_s: int = Field(default=43200, gt=0)
    """Lifetime of a Login session token (default 12 h); a login may ask for less, never more."""

    login_concurrency: int = Field(default=2, ge=1)
    """Password hashes and checks (Argon2, slow and memory-hungry by design) that may run at once."""

    login_wait_s: float = Field(default=1.0, gt=0)
    """How long a login waits for a free hashing slot before it is refused (RESOURCE_EXHAUSTED)."""

    login_max_failures: int = Field(default=5, ge=1)
    """Wrong passwords for one username from one host, within the window, before logins back off."""

    login_failure_window_s: int = Field(default=900, gt=0)
    """How long a wrong password counts against its username and host (default 15 min)."""

    login_backoff_base_s: float = Field(default=1.0, gt=0)
    """After n wrong passwords (n at the limit or above), logins are refused for base * 2^n seconds,
    at most the window, without checking the password."""

    secret_key: SecretStr | None = None
    """Fernet keys sealing the secrets of data connections (JOEY_SECRET_KEY), comma-separated: the first
    seals, every one opens, so a new key goes first and an old one stays until rows are re-sealed (at
    start). Unset, connections with secrets are refused; `joey up` makes one in its state directory."""

    connection_test_hosts: str = ""
    """Hosts a connection test may reach, comma-separated: names, ``*.example.com``, addresses or
    networks (``10.0.0.0/8``), ``*`` for any. Empty (the default): tests of network connections are
    refused, since a test connects wherever a workspace member wrote (docs/security.md)."""

    connection_test_dirs: str = ""
    """Directories (comma-separated) under which a test of a ``files`` connection may look; empty: none."""

    connection_test_timeout_s: float = Field(default=10.0, gt=0, le=120)
    """How long one connection test may take, in all (it runs in a child process, killed past it)."""

    connection_test_concurrency: int = Field(default=2, ge=1)
    """Connection tests run at once; one more is refused at once (RESOURCE_EXHAUSTED)."""

    @field_validator("secret_key")
    @classmethod
    def _fernet_keys(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            Sealer(secret_keys(value))  # SecretKeyError (a ValueError) saying what a key must be
        return value

    @field_validator("service_token")
    @classmethod
    def _long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < MIN_SERVICE_TOKEN_CHARS:
            raise ValueError(
                f"JOEY_SERVICE_TOKEN is shorter than {MIN_SERVICE_TOKEN_CHARS} characters: "
                "use a long random secret (`joey up` makes one)"
            )
        return value

    @model_validator(mode="after")
    def _threads_left_for_other_calls(self) -> RegistrySettings:
        if "upload_concurrency" not in self.model_fields_set:
            # A configuration of few workers from before the upload pool keeps starting. The settings are
            # frozen once built; this is part of building them.
            object.__setattr__(self, "upload_concurrency", max(1, min(4, self.grpc_max_workers - 1)))
        elif self.upload_concurrency >= self.grpc_max_workers:
            raise ValueError(
                f"JOEY_UPLOAD_CONCURRENCY ({self.upload_concurrency}) must be below JOEY_GRPC_MAX_WORKERS "
                f"({self.grpc_max_workers}): uploads would take every thread that serves other calls"
            )
        return self

    @field_validator("artifact_dir")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()


def secret_keys(value: SecretStr | None) -> list[str]:
    """The Fernet keys of JOEY_SECRET_KEY, the sealing one first."""
    text = value.get_secret_value() if value is not None else ""
    return [k.strip() for k in text.split(",") if k.strip()]
