"""Model versions and their tensor signatures: one type each, shared by the registry, the engine and
the SDK, converted from and to the wire format here."""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Self

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
BATCH_CONFIGS = ("single",)
"""Batch configs other than the default (batches): ``single`` runs the model one record per call."""
MAX_BATCH_DELAY_MS = 60_000
MAX_BATCH_SIZE_TARGET = 100_000


@dataclass(frozen=True)
class ModelConfig:
    """How the engine runs a model version (Wallaroo's ``model.configure``); None takes the engine's
    setting. A replica forms one batch for all the steps of its pipeline, so it waits at most the least
    ``max_batch_delay_ms`` and takes at most the least ``batch_size_target`` of them; a ``single``
    step then runs the model on each record of the batch alone."""

    batch_config: str | None = None
    max_batch_delay_ms: int | None = None
    batch_size_target: int | None = None

    def __post_init__(self) -> None:
        if self.batch_config is not None and self.batch_config not in BATCH_CONFIGS:
            raise ValueError(
                f"batch_config is {self.batch_config!r}: use 'single' (one record per call) or None (batches)"
            )
        _check_range("max_batch_delay_ms", self.max_batch_delay_ms, 0, MAX_BATCH_DELAY_MS)
        _check_range("batch_size_target", self.batch_size_target, 1, MAX_BATCH_SIZE_TARGET)

    @property
    def single(self) -> bool:
        return self.batch_config == "single"

    def __str__(self) -> str:
        """``batch_config=single, max_batch_delay_ms=2``; ``engine defaults`` when nothing is set."""
        return ", ".join(f"{k}={v}" for k, v in self.to_json().items()) or "engine defaults"

    @classmethod
    def from_proto(cls, config: pb.ModelConfig) -> ModelConfig:
        """Raise ValueError naming the field that is out of range."""
        return cls(
            config.batch_config or None,
            config.max_batch_delay_ms if config.HasField("max_batch_delay_ms") else None,
            config.batch_size_target if config.HasField("batch_size_target") else None,
        )

    def to_proto(self) -> pb.ModelConfig:
        return pb.ModelConfig(
            batch_config=self.batch_config or "",
            max_batch_delay_ms=self.max_batch_delay_ms,
            batch_size_target=self.batch_size_target,
        )

    def to_json(self) -> dict[str, Any]:
        """Only the fields set: a step of a model never configured stores (and compares) as before."""
        return {k: v for k, v in self.__dict__.items() if v is not None}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelConfig:
        return cls(**data)


def _check_range(name: str, value: int | None, low: int, high: int) -> None:
    if value is not None and not (
        isinstance(value, int) and not isinstance(value, bool) and low <= value <= high
    ):
        raise ValueError(f"{name} is {value!r}: it must be an integer from {low} to {high}, or None")


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
    config: ModelConfig = ModelConfig()
    # Lineage, and the extra files the version carries (listed by ListModelArtifacts).
    description: str = ""
    source: str = ""
    """Where it came from: a training run id, a git commit."""
    metadata: Mapping[str, Any] = field(default_factory=dict, hash=False)
    """A JSON object of the user's."""
    artifact_count: int = 0
    artifact_bytes: int = 0

    @property
    def runtime(self) -> str:
        """The framework engines run this version with."""
        return self.framework if self.framework in RUNTIMES else "onnx"

    @classmethod
    def from_proto(cls, mv: pb.ModelVersion) -> Self:
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
            ModelConfig.from_proto(mv.config),
            mv.description,
            mv.source,
            json.loads(mv.metadata_json) if mv.metadata_json else {},
            mv.artifact_count,
            mv.artifact_bytes,
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
            config=self.config.to_proto(),
            description=self.description,
            source=self.source,
            metadata_json=json.dumps(self.metadata, sort_keys=True),
            artifact_count=self.artifact_count,
            artifact_bytes=self.artifact_bytes,
        )


MAX_ARTIFACT_NAME_CHARS = 1024
MAX_ARTIFACT_NAME_PART_BYTES = 255  # what common filesystems take as one name


def artifact_name_problem(name: str) -> str | None:
    """What makes ``name`` unfit as the name of a model version's file, or None. A name is a relative
    path that stays inside whatever directory it is downloaded to, on POSIX and Windows alike: checked
    by the registry on upload and again by the SDK on download (it trusts no name it did not check)."""
    if not name:
        return "it is empty"
    if len(name) > MAX_ARTIFACT_NAME_CHARS:
        return f"it is longer than {MAX_ARTIFACT_NAME_CHARS} characters"
    if any(unicodedata.category(c) in ("Cc", "Cf") for c in name):
        return "it holds a control character"
    if "\\" in name or ":" in name:
        return "it holds a backslash or a colon (a Windows path or drive)"
    if name.startswith("/"):
        return "it is an absolute path"
    for part in name.split("/"):
        if part in ("", ".", ".."):
            return (
                f"it has an empty, '.' or '..' part ({part!r}): names are relative paths inside the version"
            )
        if len(part.encode()) > MAX_ARTIFACT_NAME_PART_BYTES:
            return f"a part is longer than {MAX_ARTIFACT_NAME_PART_BYTES} bytes"
    return None


@dataclass(frozen=True)
class ArtifactFile:
    """One extra file of a model version: its name (a relative path), size and sha256."""

    name: str
    size_bytes: int
    sha256: str

    @classmethod
    def from_proto(cls, f: pb.ArtifactFile) -> ArtifactFile:
        return cls(f.name, f.size_bytes, f.sha256)

    def to_proto(self) -> pb.ArtifactFile:
        return pb.ArtifactFile(name=self.name, size_bytes=self.size_bytes, sha256=self.sha256)
