"""What the registry holds, as the SDK lists and describes it: models and pipelines with what each is,
how it runs and what uses it, in listings that print as tables and convert to DataFrames."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from google.protobuf.timestamp_pb2 import Timestamp

from joey_core.lazy import LazyModule
from joey_core.models import ArtifactFile, ModelConfig, ModelVersion, TensorSpec
from joey_core.topics import PipelineTopics
from joey_core.v1 import registry_pb2 as pb

if TYPE_CHECKING:
    import pandas as pd
else:
    pd = LazyModule("pandas")

Row = TypeVar("Row")

DELETE_PIPELINE_TIMEOUT_S = 600.0
"""How long a pipeline's deletion may take: its logs are deleted with it, in one transaction."""


def optional_time(ts: Timestamp) -> datetime | None:
    """A Timestamp as a UTC datetime; None for an unset one."""
    return ts.ToDatetime(tzinfo=UTC) if ts.seconds or ts.nanos else None


def _when(value: datetime | None) -> str:
    return f"{value:%Y-%m-%d %H:%M:%S} UTC" if value else "-"


def plural(count: int, noun: str, with_count: bool = True) -> str:
    """``1 version``, ``2 versions``; only the word when not ``with_count``."""
    word = noun if count == 1 else f"{noun}s"
    return f"{count} {word}" if with_count else word


def signature(specs: Iterable[TensorSpec]) -> str:
    """``features float32[-1,4], label int64[-1]``: names, dtypes and shapes (-1 = any size)."""
    return ", ".join(f"{s.name} {s.dtype}[{','.join(map(str, s.shape))}]" for s in specs)


def model_version_row(mv: ModelVersion) -> dict[str, Any]:
    return {
        "name": mv.name,
        "version": mv.version,
        "framework": mv.framework,
        "status": mv.status,
        "inputs": signature(mv.inputs),
        "outputs": signature(mv.outputs),
        "sha256": mv.sha256[:12],
        "size_bytes": mv.size_bytes,
        "artifacts": mv.artifact_count,
        "uploaded": mv.created_at,
    }


def tags_text(tags: Iterable[str]) -> str:
    return ",".join(tags) or "-"


class Listing(list[Row], Generic[Row]):
    """A list that prints as a table (in a terminal and in notebooks) and converts to a DataFrame.
    ``"name" in listing`` is true when an item has that name."""

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame([_row(item) for item in self])

    def names(self) -> list[str]:
        return [getattr(item, "name", None) or str(item) for item in self]

    def __contains__(self, item: object) -> bool:
        if isinstance(item, str):
            return item in self.names()
        return super().__contains__(item)

    def table(self) -> str:
        """The listing as a text table, times to the second in UTC; empty text for an empty listing."""
        if not self:
            return ""
        frame = self.to_frame()
        for column in frame.columns:
            if pd.api.types.is_datetime64_any_dtype(frame[column]):
                frame[column] = frame[column].dt.strftime("%Y-%m-%d %H:%M:%S UTC")
        return str(frame.to_string(index=False))

    def __repr__(self) -> str:
        return self.table() or "[]"

    def _repr_html_(self) -> str:
        return str(self.to_frame().to_html(index=False))


def _row(item: Any) -> dict[str, Any]:
    if isinstance(item, ModelVersion):
        return model_version_row(item)
    if isinstance(item, ArtifactFile):
        return {"name": item.name, "size_bytes": item.size_bytes, "sha256": item.sha256}
    row: dict[str, Any] = item.row()
    return row


@dataclass(frozen=True)
class ModelSummary:
    """A model with all its versions (oldest first); ``str()`` is its name, and ``version``,
    ``framework``, ``inputs``, ``outputs``, ``sha256``, ``size_bytes`` and ``created_at`` are its latest
    version's, so it reads like the ``ModelVersion`` that ``list_models()`` used to return. ``tags``
    are the model's when it was listed."""

    workspace: str
    name: str
    versions: tuple[ModelVersion, ...]
    tags: tuple[str, ...] = ()

    @classmethod
    def from_proto(
        cls,
        model: pb.Model,
        version: Callable[[pb.ModelVersion], ModelVersion] = ModelVersion.from_proto,
    ) -> ModelSummary:
        """``version`` makes each version (the client's, bound to it)."""
        return cls(model.workspace, model.name, tuple(map(version, model.versions)), tuple(model.tags))

    @property
    def latest(self) -> ModelVersion:
        if not self.versions:
            raise LookupError(f"model {self.name!r} has no versions left; upload one")
        return self.versions[-1]

    @property
    def version(self) -> int:
        return self.latest.version

    @property
    def framework(self) -> str:
        return self.latest.framework

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return self.latest.inputs

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return self.latest.outputs

    @property
    def sha256(self) -> str:
        return self.latest.sha256

    @property
    def size_bytes(self) -> int:
        return self.latest.size_bytes

    @property
    def created_at(self) -> datetime | None:
        return self.latest.created_at

    def __str__(self) -> str:
        return self.name

    def row(self) -> dict[str, Any]:
        if not self.versions:
            return dict.fromkeys(
                ("name", "versions", "latest", "framework", "inputs", "outputs", "tags", "uploaded"), "-"
            ) | {
                "name": self.name,
                "versions": 0,
                "tags": tags_text(self.tags),
                "uploaded": None,
            }
        latest = model_version_row(self.latest)
        return {
            "name": self.name,
            "versions": len(self.versions),
            "latest": self.version,
            "framework": self.framework,
            "inputs": latest["inputs"],
            "outputs": latest["outputs"],
            "tags": tags_text(self.tags),
            "uploaded": self.created_at,
        }


@dataclass(frozen=True)
class ModelUse:
    """A pipeline version that uses a model version; ``deployed`` when its pipeline runs it now."""

    model_version: int
    pipeline: str
    pipeline_version: int
    deployed: bool

    def __str__(self) -> str:
        return f"{self.pipeline} v{self.pipeline_version}" + (" (deployed)" if self.deployed else "")


@dataclass(frozen=True)
class ModelDescription:
    """A model's versions with their signatures, and the pipeline versions that use each."""

    model: ModelSummary
    uses: tuple[ModelUse, ...]

    @classmethod
    def from_proto(cls, d: pb.ModelDescription) -> ModelDescription:
        uses = tuple(ModelUse(u.model_version, u.pipeline, u.pipeline_version, u.deployed) for u in d.uses)
        return cls(ModelSummary.from_proto(d.model), uses)

    def used_by(self, version: int) -> tuple[ModelUse, ...]:
        return tuple(u for u in self.uses if u.model_version == version)

    def text(self, version: int | None = None) -> str:
        """What ``joey model describe`` prints: every version, or only ``version``."""
        model = self.model
        lines = [
            f"model {model.name} (workspace {model.workspace}), {plural(len(model.versions), 'version')}"
            + (f", tags {tags_text(model.tags)}" if model.tags else "")
        ]
        for mv in model.versions:
            if version and mv.version != version:
                continue
            users = self.used_by(mv.version)
            lines += [
                f"  version {mv.version}: {mv.framework}, {mv.size_bytes} bytes, sha256 {mv.sha256}, "
                f"uploaded {_when(mv.created_at)}",
                f"    inputs:  {signature(mv.inputs)}",
                f"    outputs: {signature(mv.outputs)}",
            ]
            if mv.config != ModelConfig():
                lines.append(f"    config:  {mv.config}")
            lines.append(f"    used by: {', '.join(map(str, users)) if users else 'no pipeline'}")
            lines += [
                f"    {label}: {value}"
                for label, value in (
                    ("description", mv.description),
                    ("source", mv.source),
                    ("metadata", json.dumps(mv.metadata) if mv.metadata else ""),
                    (
                        "artifacts",
                        f"{plural(mv.artifact_count, 'file')}, {mv.artifact_bytes} bytes"
                        if mv.artifact_count
                        else "",
                    ),
                )
                if value
            ]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.text()


@dataclass(frozen=True)
class PipelineSummary:
    """One pipeline of ``client.list_pipelines()``; ``str()`` is its name. ``replicas`` is the
    deployment's current count (None when not deployed), ``status`` what ``pipeline.status()`` says."""

    workspace: str
    name: str
    latest_version: int
    versions: int
    deployed: bool
    deployed_version: int | None
    replicas: int | None
    status: str
    updated_at: datetime | None
    tags: tuple[str, ...] = ()

    @classmethod
    def from_proto(cls, p: pb.Pipeline) -> PipelineSummary:
        d = p.deployment if p.HasField("deployment") else None
        deployed = d is not None and d.active
        return cls(
            workspace=p.workspace,
            name=p.name,
            latest_version=p.versions[-1].version if p.versions else 0,
            versions=len(p.versions),
            deployed=deployed,
            deployed_version=d.pipeline_version if d is not None and deployed else None,
            replicas=d.replicas if d is not None and deployed else None,
            status=p.status,
            updated_at=optional_time(p.updated_at),
            tags=tuple(p.tags),
        )

    def __str__(self) -> str:
        return self.name

    def row(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "latest": self.latest_version,
            "deployed": f"v{self.deployed_version}" if self.deployed else "no",
            "replicas": self.replicas if self.replicas is not None else "-",
            "status": self.status,
            "tags": tags_text(self.tags),
            "updated": self.updated_at,
        }


@dataclass(frozen=True)
class DeletedModel:
    name: str
    versions: tuple[int, ...]
    model_deleted: bool
    """Every version was deleted and the model with them (a new upload of the name starts at version 1)."""

    def __str__(self) -> str:
        if not self.versions:
            return f"deleted model {self.name} (it had no versions left)"
        gone = ", ".join(map(str, self.versions))
        return f"deleted model {self.name} {plural(len(self.versions), 'version', False)} {gone}" + (
            ", and the model" if self.model_deleted else ""
        )


@dataclass(frozen=True)
class DeletedPipeline:
    name: str
    versions: int
    log_entries: int

    def __str__(self) -> str:
        logged = plural(self.log_entries, "logged inference")
        return f"deleted pipeline {self.name}: {plural(self.versions, 'version')}, {logged}"


def topics_text(topics: PipelineTopics) -> str:
    return f"inputs {topics.inputs}, outputs {topics.outputs}, errors {topics.errors}"
