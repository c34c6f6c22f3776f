"""Settings of the gateway service."""

from __future__ import annotations

from pydantic import Field, model_validator

from joey_core.settings import ServiceSettings, TlsServerSettings

CONTROL_WORKERS = 4
"""Threads of each transport for health, metadata and token checks, beside the inference workers: a gateway
whose inference workers are all waiting on slow pipelines still answers its probes."""


class GatewaySettings(ServiceSettings, TlsServerSettings):
    oip_grpc_addr: str = "127.0.0.1:8081"
    """host:port the Open Inference Protocol gRPC service (inference.GRPCInferenceService) listens on."""

    oip_http_addr: str = "127.0.0.1:8080"
    """host:port the Open Inference Protocol REST API (/v2/...) listens on."""

    workspace: str = "default"
    """Workspace of the pipelines served by model name alone; `<workspace>.<pipeline>` names any other."""

    request_timeout_s: float = Field(default=30.0, gt=0)
    """Deadline of a request whose caller sets none; a caller's shorter deadline wins."""

    status_cache_s: float = Field(default=1.0, ge=0)
    """How long a pipeline's deployment status and metadata from the registry are reused."""

    auth_cache_s: float = Field(default=1.0, ge=0, le=1)
    """How long the registry's "yes" to a caller's token is reused; a revoked token is refused after at most
    this long. Refusals are never reused."""

    grpc_workers: int = Field(default=32, ge=1)
    """Threads serving gRPC inference calls; each waits for its reply, so this bounds concurrent gRPC
    requests. A call beyond them is answered RESOURCE_EXHAUSTED at once rather than queued. Health and
    metadata calls have a few threads of their own."""

    http_workers: int = Field(default=32, ge=1)
    """Threads serving REST inference requests (each waits for its replies); a request beyond them waits
    JOEY_WORKER_WAIT_S for one, then 503. Health, metadata and token checks have a few threads of their
    own."""

    http_max_connections: int = Field(default=256, ge=1)
    """Open REST connections and requests at once; one more is answered 503 at once."""

    pipeline_concurrency: int = Field(default=8, ge=1)
    """Requests of one pipeline in flight at once (REST and gRPC together); one more is answered 429 /
    RESOURCE_EXHAUSTED, so that a slow pipeline holds at most this many threads and the others keep serving.
    At most half of JOEY_GRPC_WORKERS and of JOEY_HTTP_WORKERS, so that one slow pipeline never holds them
    all (the default, a quarter, leaves room for three)."""

    worker_wait_s: float = Field(default=5.0, gt=0)
    """How long a REST request waits for a free worker thread before it is answered 503."""

    header_timeout_s: float = Field(default=10.0, gt=0)
    """A REST connection that has not sent a request's headers this long after it opened (or after its last
    answer) is closed: a client sending headers slowly (slowloris) holds no connection longer."""

    body_timeout_s: float = Field(default=30.0, gt=0)
    """The whole body of a REST request must arrive within this long after its headers, else 400."""

    max_request_bytes: int = Field(default=64 << 20, ge=1024)
    """Largest request body (REST, checked against Content-Length before reading) or message (gRPC); 413."""

    max_rows: int = Field(default=10_000, ge=1)
    """Rows (records) of one request: the first dimension of its inputs."""

    max_elements: int = Field(default=16_000_000, ge=1)
    """Elements of one input tensor (the product of its shape), checked before anything is allocated."""

    catalog_stale_s: float = Field(default=300.0, ge=0)
    """When the registry cannot answer (it, its database or Redis is down), the last deployment status and
    metadata it gave for a pipeline are used for at most this long after they were fetched; 0: never."""

    auth_outage_grace_s: float = Field(default=30.0, ge=0, le=300)
    """When the registry cannot answer (never when it refuses), a caller it authorized at most this long
    ago is still served; 0: fail closed at once. Callers it never authorized are refused."""

    metrics_port: int | None = None
    """Port of the Prometheus endpoint; none when unset."""

    @model_validator(mode="after")
    def _pipelines_share_the_workers(self) -> GatewaySettings:
        workers = min(self.http_workers, self.grpc_workers)
        if self.pipeline_concurrency > workers // 2:
            raise ValueError(
                f"JOEY_PIPELINE_CONCURRENCY {self.pipeline_concurrency} would let one or two slow pipelines "
                f"hold all {workers} workers: keep it at most half of JOEY_HTTP_WORKERS and JOEY_GRPC_WORKERS"
            )
        return self
