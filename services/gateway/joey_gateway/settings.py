"""Settings of the gateway service."""

from __future__ import annotations

from pydantic import Field

from joey_core.settings import ServiceSettings, TlsServerSettings


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
    """Threads serving gRPC calls; each waits for its reply, so this bounds concurrent gRPC requests. A call
    beyond them is answered RESOURCE_EXHAUSTED at once rather than queued."""

    http_workers: int = Field(default=32, ge=1)
    """Threads serving REST requests (each waits for its replies); a request beyond them waits for one."""

    http_max_connections: int = Field(default=256, ge=1)
    """Open REST connections and requests at once; one more is answered 503 at once."""

    pipeline_concurrency: int = Field(default=16, ge=1)
    """Requests of one pipeline in flight at once (REST and gRPC together); one more is answered 429 /
    RESOURCE_EXHAUSTED, so that a slow pipeline holds at most this many threads and the others keep serving.
    Keep it below JOEY_GRPC_WORKERS and JOEY_HTTP_WORKERS."""

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
