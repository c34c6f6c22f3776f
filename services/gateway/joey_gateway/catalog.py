"""What the registry says about a pipeline served as a model: deployed or not, ready, its tensors.

Answers are reused for ``status_cache_s`` so that readiness probes and requests do not each
cost a registry call. They are shared by every caller: each request is authorized before it asks, and the
registry is asked with that caller's token.

When the registry cannot answer (UNAVAILABLE or DEADLINE_EXCEEDED: it, its database or Redis is down), the
last answer it gave is used for at most ``stale_s`` after it was fetched, and asked again every ``cache_s``:
a blip of the control plane does not stop inference. Any other answer (a refusal such as NOT_FOUND, an
error) stands, and erases the old answer, so that no later outage brings it back.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import grpc

from joey_core.inputs import RecordInput, record_inputs
from joey_core.v1 import registry_pb2 as pb
from joey_core.v1 import registry_pb2_grpc
from joey_gateway import metrics
from joey_gateway.errors import GatewayError, Status
from joey_gateway.registry_auth import RegistryUnreachable, bearer_metadata, refusal
from joey_gateway.tensors import oip_datatype

log = logging.getLogger(__name__)


class NotDeployed(GatewayError):
    """The pipeline exists but is not deployed: UNAVAILABLE to OIP callers (a model server that is not
    serving), NOT_FOUND on the records endpoint (no deployment at that address, as Wallaroo answers)."""


@dataclass(frozen=True)
class TensorInfo:
    """Open Inference Protocol tensor metadata (OIP datatype, batched shape), not a model's TensorSpec."""

    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class PipelineInfo:
    workspace: str
    pipeline: str
    version: int
    """The deployed pipeline version."""
    ready: bool
    status: str
    message: str
    inputs: tuple[TensorInfo, ...]
    """The first model step's inputs, named by the record fields that feed them."""
    outputs: tuple[TensorInfo, ...]
    """The last model step's outputs."""
    record_inputs: tuple[RecordInput, ...] = ()
    """The first model step's inputs as the SDK shapes data for them (the records endpoint does too)."""

    def output_datatype(self, name: str) -> str | None:
        return next((t.datatype for t in self.outputs if t.name == name), None)


def _batched(spec: pb.TensorSpec, name: str) -> TensorInfo:
    # A record is one row: the batch dimension is variable whatever the model declares.
    shape = (-1, *[d if d >= 0 else -1 for d in spec.shape[1:]])
    return TensorInfo(name, oip_datatype(spec.dtype), shape)


def _info(status: pb.DeploymentStatus, version: pb.PipelineVersion | None) -> PipelineInfo:
    deployment = status.deployment
    # A split step has no model of its own: its first arm stands for it (the arms are interchangeable).
    models = [step.arms[0] if step.arms else step for step in version.steps] if version else []
    models = [step for step in models if step.model]
    inputs: tuple[TensorInfo, ...] = ()
    outputs: tuple[TensorInfo, ...] = ()
    if models:
        first, last = models[0], models[-1]
        inputs = tuple(_batched(s, first.input_mapping.get(s.name, s.name)) for s in first.inputs)
        outputs = tuple(_batched(s, s.name) for s in last.outputs)
    return PipelineInfo(
        deployment.workspace,
        deployment.pipeline,
        deployment.pipeline_version,
        status.ready,
        status.status,
        status.message,
        inputs,
        outputs,
        record_inputs(version) if version else (),
    )


@dataclass(frozen=True)
class _Cached:
    info: PipelineInfo
    fetched: float
    """monotonic time the registry gave it"""
    reuse_until: float
    """monotonic time the registry is asked again"""


class Catalog:
    def __init__(self, stub: registry_pb2_grpc.RegistryStub, cache_s: float, stale_s: float) -> None:
        self._stub = stub
        self._cache_s = cache_s
        self._stale_s = stale_s
        self._lock = threading.Lock()
        self._cached: dict[tuple[str, str], _Cached] = {}
        self._versions: dict[tuple[str, str, int], pb.PipelineVersion] = {}
        self._outage_since: float | None = None
        """When the registry first failed to answer and an old answer was used; logged once per outage."""

    def pipeline(self, workspace: str, pipeline: str, token: str) -> PipelineInfo:
        """The pipeline's deployment; NOT_FOUND when it does not exist, UNAVAILABLE when undeployed.
        ``token`` is the caller's, already authorized to read ``workspace``."""
        key = (workspace, pipeline)
        with self._lock:
            cached = self._cached.get(key)
        asked = time.monotonic()
        if cached is not None and asked < cached.reuse_until:
            info = cached.info
        else:
            try:
                info = self._load(workspace, pipeline, bearer_metadata(token))
            except RegistryUnreachable as exc:
                # Only when it could not answer: what it did answer (a refusal, an error) stands.
                if cached is None or asked - cached.fetched > self._stale_s:
                    raise
                info = self._last_known(key, cached, asked, exc)
            except GatewayError:
                with self._lock:
                    self._cached.pop(key, None)
                raise
            else:
                with self._lock:
                    self._cached[key] = _Cached(info, asked, asked + self._cache_s)
                    if self._outage_since is not None:
                        log.info(
                            "the registry answers again after %.1f s; the catalog is current",
                            asked - self._outage_since,
                        )
                        self._outage_since = None
                        metrics.CATALOG_STALE.set(0)
        if info.status == "Undeployed":
            raise NotDeployed(
                Status.UNAVAILABLE, f"pipeline {pipeline!r} is not deployed: deploy it to serve inferences"
            )
        return info

    def _last_known(
        self, key: tuple[str, str], cached: _Cached, asked: float, exc: GatewayError
    ) -> PipelineInfo:
        """The old answer, asked again after ``cache_s`` (not on every request while the registry is down)."""
        metrics.STALE_ANSWERS.labels("catalog").inc()
        with self._lock:
            self._cached[key] = _Cached(cached.info, cached.fetched, asked + self._cache_s)
            if self._outage_since is None:
                self._outage_since = asked
                metrics.CATALOG_STALE.set(1)
                log.warning(
                    "the registry cannot answer (%s): serving the last known catalog, each pipeline's for at "
                    "most %.0f s after it was fetched",
                    exc.message,
                    self._stale_s,
                )
        return cached.info

    def _load(self, workspace: str, pipeline: str, metadata: tuple[tuple[str, str], ...]) -> PipelineInfo:
        try:
            status = self._stub.GetDeploymentStatus(
                pb.GetDeploymentStatusRequest(workspace=workspace, pipeline=pipeline),
                metadata=metadata,
                timeout=10,
            )
            version = None
            number = status.deployment.pipeline_version
            if number:
                version = self._versions.get((workspace, pipeline, number))
                if version is None:
                    found = self._stub.GetPipeline(
                        pb.GetPipelineRequest(workspace=workspace, name=pipeline),
                        metadata=metadata,
                        timeout=10,
                    )
                    version = next((v for v in found.versions if v.version == number), None)
                    if version is not None:
                        # Pipeline versions never change once created.
                        self._versions[(workspace, pipeline, number)] = version
        except grpc.RpcError as exc:
            code = exc.code()  # type: ignore[attr-defined]
            if code == grpc.StatusCode.NOT_FOUND:
                raise GatewayError(
                    Status.NOT_FOUND, f"model {pipeline!r}: no such pipeline in workspace {workspace!r}"
                ) from None
            raise refusal(exc) from None
        return _info(status, version)
