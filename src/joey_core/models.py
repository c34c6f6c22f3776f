"""Model versions and their tensor signatures: one type each, shared by the registry, the engine and
the SDK, converted from and to the wire format here."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from joey_core.v1 import registry_pb2 as pb


@dataclass(frozen=True)
class TensorSpec:
    """A named input or output of a model: its dtype (``float32``, ...) and shape (-1 for any size)."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @classmethod
    def from_proto(cls, spec: pb.TensorSpec) -> TensorSpec:
        return cls(spec.name, spec.dtype, tuple(spec.shape))

    def to_proto(self) -> pb.TensorSpec:
        return pb.TensorSpec(name=self.name, dtype=self.dtype, shape=list(self.shape))

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TensorSpec:
        return cls(name=data["name"], dtype=data["dtype"], shape=tuple(int(d) for d in data["shape"]))


def specs_from_proto(specs: Any) -> tuple[TensorSpec, ...]:
    return tuple(TensorSpec.from_proto(s) for s in specs)


def specs_from_json(items: list[dict[str, Any]]) -> tuple[TensorSpec, ...]:
    return tuple(TensorSpec.from_json(item) for item in items)


READY = "ready"
CONVERTING = "converting"
ERROR = "error"
RUNTIMES = ("onnx", "python")
"""Frameworks engines run as they are; every other (native) framework is served as its ONNX form."""


@dataclass(frozen=True)
class ModelVersion:
    """One upload of a model under its name. A native model (sklearn, xgboost, ...) is converted to
    ONNX: ``sha256`` is the ONNX engines serve, ``source_sha256`` the file as uploaded."""

    workspace: str
    name: str
    version: int
    sha256: str
    size_bytes: int
    framework: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    created_at: datetime | None
    status: str = READY
    conversion_log: str = ""
    source_sha256: str = ""
    source_size_bytes: int = 0

    @property
    def runtime(self) -> str:
        """The framework engines run this version with."""
        return self.framework if self.framework in RUNTIMES else "onnx"

    @classmethod
    def from_proto(cls, mv: pb.ModelVersion) -> ModelVersion:
        stamp = mv.created_at
        return cls(
            mv.workspace,
            mv.name,
            mv.version,
            mv.sha256,
            mv.size_bytes,
            mv.framework,
            specs_from_proto(mv.inputs),
            specs_from_proto(mv.outputs),
            stamp.ToDatetime(tzinfo=UTC) if stamp.seconds or stamp.nanos else None,
            mv.status or READY,
            mv.conversion_log,
            mv.source_sha256,
            mv.source_size_bytes,
        )

    def to_proto(self) -> pb.ModelVersion:
        created = Timestamp()
        if self.created_at is not None:
            created.FromDatetime(self.created_at.astimezone(UTC))
        return pb.ModelVersion(
            workspace=self.workspace,
            name=self.name,
            version=self.version,
            sha256=self.sha256,
            size_bytes=self.size_bytes,
            framework=self.framework,
            inputs=[s.to_proto() for s in self.inputs],
            outputs=[s.to_proto() for s in self.outputs],
            created_at=created,
            status=self.status,
            conversion_log=self.conversion_log,
            source_sha256=self.source_sha256,
            source_size_bytes=self.source_size_bytes,
        )
