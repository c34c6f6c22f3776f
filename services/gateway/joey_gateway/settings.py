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
    """Threads serving gRPC calls; each waits for its reply, so this bounds concurrent gRPC requests."""

    metrics_port: int | None = None
    """Port of the Prometheus endpoint; none when unset."""
