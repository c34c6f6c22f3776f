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


@dataclass(frozen=True)
class ModelVersion:
    """One upload of a model under its name."""

    workspace: str
    name: str
    version: int
    sha256: str
    size_bytes: int
    framework: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    created_at: datetime | None
    # Lineage, and the extra files the version carries (listed by ListModelArtifacts).
    description: str = ""
    source: str = ""
    """Where it came from: a training run id, a git commit."""
    metadata: Mapping[str, Any] = field(default_factory=dict, hash=False)
    """A JSON object of the user's."""
    artifact_count: int = 0
    artifact_bytes: int = 0

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
