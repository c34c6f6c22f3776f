"""What the registry says about a pipeline served as a model: deployed or not, ready, its tensors.

Answers are reused for ``status_cache_s`` so that readiness probes and requests do not each
cost a registry call. They are shared by every caller: each request is authorized before it asks, and the
registry is asked with that caller's token.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import grpc

from joey_core.v1 import registry_pb2 as pb
from joey_core.v1 import registry_pb2_grpc
from joey_gateway.errors import GatewayError, Status
from joey_gateway.registry_auth import bearer_metadata, refusal
from joey_gateway.tensors import oip_datatype


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
    )


class Catalog:
    def __init__(self, stub: registry_pb2_grpc.RegistryStub, cache_s: float) -> None:
        self._stub = stub
        self._cache_s = cache_s
        self._lock = threading.Lock()
        self._cached: dict[tuple[str, str], tuple[float, PipelineInfo]] = {}
        self._versions: dict[tuple[str, str, int], pb.PipelineVersion] = {}

    def pipeline(self, workspace: str, pipeline: str, token: str) -> PipelineInfo:
        """The pipeline's deployment; NOT_FOUND when it does not exist, UNAVAILABLE when undeployed.
        ``token`` is the caller's, already authorized to read ``workspace``."""
        key = (workspace, pipeline)
        with self._lock:
            cached = self._cached.get(key)
        if cached is not None and time.monotonic() - cached[0] < self._cache_s:
            info = cached[1]
        else:
            info = self._load(workspace, pipeline, bearer_metadata(token))
            with self._lock:
                self._cached[key] = (time.monotonic(), info)
        if info.status == "Undeployed":
            raise GatewayError(
                Status.UNAVAILABLE, f"pipeline {pipeline!r} is not deployed: deploy it to serve inferences"
            )
        return info

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
