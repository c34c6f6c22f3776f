"""Domain types of the registry: plain dataclasses, free of protobuf and gRPC. Model versions and
their tensor specs are the shared ``joey_core.models`` types, which convert themselves to the wire."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from joey_core.models import ArtifactFile, ModelConfig, ModelVersion, TensorSpec, specs_from_json
from joey_core.topics import PipelineTopics


@dataclass(frozen=True)
class Workspace:
    name: str
    created_at: datetime
    role: str = ""
    """The caller's role in it ("owner" or "collaborator"); empty for a platform admin who is no member."""


@dataclass(frozen=True)
class User:
    username: str
    email: str
    admin: bool
    active: bool
    created_at: datetime


@dataclass(frozen=True)
class TokenInfo:
    name: str
    kind: str  # "session" or "api"
    created_at: datetime
    expires_at: datetime | None
    last_used_at: datetime | None


@dataclass(frozen=True)
class Member:
    username: str
    role: str


@dataclass(frozen=True)
class AuditEntry:
    time: datetime
    username: str
    action: str
    workspace: str
    target: str
    outcome: str
    message: str


@dataclass(frozen=True)
class AuditQuery:
    username: str
    workspace: str
    action: str
    start: datetime | None
    end: datetime | None
    limit: int


@dataclass(frozen=True)
class Model:
    workspace: str
    name: str
    versions: tuple[ModelVersion, ...]  # oldest first
    tags: tuple[str, ...] = ()  # sorted


@dataclass(frozen=True)
class UploadHeader:
    workspace: str
    name: str
    framework: str
    inputs: tuple[TensorSpec, ...] = ()
    """The declared signature, for frameworks whose artifact carries none (python)."""
    outputs: tuple[TensorSpec, ...] = ()
    sample_input: Mapping[str, Any] | None = None
    """Native frameworks: rows the conversion is verified on, by input name."""
    description: str = ""
    source: str = ""
    metadata_json: str = ""
    artifacts: tuple[ArtifactFile, ...] = ()
    """The extra files whose bytes follow the model's, in this order."""


@dataclass(frozen=True)
class Lineage:
    """What a model version says of where it came from."""

    description: str = ""
    source: str = ""
    metadata: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelSearch:
    """Filters of a model search; None matches anything."""

    search_term: str | None = None
    tag: str | None = None
    framework: str | None = None
    uploaded_after: datetime | None = None


@dataclass(frozen=True)
class PipelineSearch:
    search_term: str | None = None
    tag: str | None = None


InputMapping = tuple[tuple[str, str], ...]
"""(model input, source name) pairs, sorted by input: protobuf maps carry no order."""


def input_mapping(mapping: Mapping[str, str]) -> InputMapping:
    return tuple(sorted(mapping.items()))


@dataclass(frozen=True)
class StepRef:
    """A model step as the user wrote it; version 0 means the latest."""

    model: str
    version: int
    input_mapping: InputMapping = ()


@dataclass(frozen=True)
class ResolvedStep:
    """A model step resolved to a concrete, content-addressed artifact."""

    model: str
    version: int
    sha256: str
    framework: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    # Only inputs fed from another name: an identity entry would make an equal pipeline differ.
    input_mapping: InputMapping = ()
    config: ModelConfig = ModelConfig()

    @classmethod
    def of(cls, mv: ModelVersion) -> ResolvedStep:
        return cls(mv.name, mv.version, mv.sha256, mv.runtime, mv.inputs, mv.outputs, config=mv.config)

    def source(self, input_name: str) -> str:
        """The name this model's input is fed from."""
        return dict(self.input_mapping).get(input_name, input_name)

    def to_json(self) -> dict[str, Any]:
        # Stored without a "kind", as every model step stored before validations steps existed,
        # and without an empty "input_mapping", so steps stored before mappings compare equal.
        data: dict[str, Any] = {
            "model": self.model,
            "version": self.version,
            "sha256": self.sha256,
            "framework": self.framework,
            "inputs": [s.to_json() for s in self.inputs],
            "outputs": [s.to_json() for s in self.outputs],
        }
        if self.input_mapping:
            data["input_mapping"] = dict(self.input_mapping)
        if config := self.config.to_json():
            data["config"] = config
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ResolvedStep:
        return cls(
            model=data["model"],
            version=int(data["version"]),
            sha256=data["sha256"],
            framework=data["framework"],
            inputs=specs_from_json(data["inputs"]),
            outputs=specs_from_json(data["outputs"]),
            input_mapping=input_mapping(data.get("input_mapping", {})),
            config=ModelConfig.from_json(data.get("config", {})),
        )


@dataclass(frozen=True)
class ValidationsStep:
    """Named checks (name -> expression) over a record's inputs and the outputs of the model step
    before this one. Needs no resolving, so it is both what the user writes and what is stored.

    Checks are kept sorted by name: protobuf maps carry no order, so sorting is what makes the same
    checks compare equal (no new pipeline version) and reach engines in the same order every time.
    """

    checks: tuple[tuple[str, str], ...]

    @classmethod
    def of(cls, checks: Mapping[str, str]) -> ValidationsStep:
        return cls(tuple(sorted(checks.items())))

    def to_json(self) -> dict[str, Any]:
        return {"kind": "validations", "checks": dict(self.checks)}


@dataclass(frozen=True)
class ShadowRef:
    """A shadow step as the user wrote it: every model is fed every record, only the champion's
    outputs continue down the pipeline."""

    champion: StepRef
    challengers: tuple[StepRef, ...]


@dataclass(frozen=True)
class ShadowStep:
    """A resolved shadow step. Challengers keep their order as given; their outputs are keyed by
    model name, so their names differ from each other and from the champion's."""

    champion: ResolvedStep
    challengers: tuple[ResolvedStep, ...]

    def to_json(self) -> dict[str, Any]:
        # The champion's fields at the top level, as in a model step: the step reads as the model
        # step whose outputs continue, with challengers alongside.
        return {
            "kind": "shadow",
            **self.champion.to_json(),
            "challengers": [c.to_json() for c in self.challengers],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ShadowStep:
        return cls(
            champion=ResolvedStep.from_json(data),
            challengers=tuple(ResolvedStep.from_json(c) for c in data["challengers"]),
        )


@dataclass(frozen=True)
class RandomSplitRef:
    """A random split as the user wrote it: (weight, model) arms, and the record field whose value
    makes the assignment sticky ("" = always random)."""

    arms: tuple[tuple[float, StepRef], ...]
    hash_key: str = ""


@dataclass(frozen=True)
class KeySplitRef:
    """A key split as the user wrote it: the value of record field ``meta_key`` picks the model."""

    default: StepRef
    meta_key: str
    routes: tuple[tuple[str, StepRef], ...]
    """(value, model) pairs, sorted by value: protobuf maps carry no order."""


@dataclass(frozen=True)
class RandomSplitStep:
    """A resolved random split: one of ``arms`` serves each record, chosen with ``weights``."""

    arms: tuple[ResolvedStep, ...]
    weights: tuple[float, ...]
    hash_key: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": "random_split",
            "arms": [a.to_json() for a in self.arms],
            "weights": list(self.weights),
            "hash_key": self.hash_key,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RandomSplitStep:
        return cls(
            arms=tuple(ResolvedStep.from_json(a) for a in data["arms"]),
            weights=tuple(float(w) for w in data["weights"]),
            hash_key=data.get("hash_key", ""),
        )


@dataclass(frozen=True)
class KeySplitStep:
    """A resolved key split: ``arms[0]`` is the default model; routes name the other arms by model."""

    arms: tuple[ResolvedStep, ...]
    meta_key: str
    routes: tuple[tuple[str, str], ...]
    """(value, model name) pairs, sorted by value."""

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": "key_split",
            "arms": [a.to_json() for a in self.arms],
            "meta_key": self.meta_key,
            "routes": dict(self.routes),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> KeySplitStep:
        return cls(
            arms=tuple(ResolvedStep.from_json(a) for a in data["arms"]),
            meta_key=data["meta_key"],
            routes=tuple(sorted(data["routes"].items())),
        )


SplitStep = RandomSplitStep | KeySplitStep
Step = ResolvedStep | ValidationsStep | ShadowStep | RandomSplitStep | KeySplitStep
StepRequest = StepRef | ValidationsStep | ShadowRef | RandomSplitRef | KeySplitRef


def models_of(step: Step) -> tuple[ResolvedStep, ...]:
    """Every model a step runs: itself, a shadow step's champion and challengers, a split's arms."""
    if isinstance(step, ResolvedStep):
        return (step,)
    if isinstance(step, ShadowStep):
        return (step.champion, *step.challengers)
    if isinstance(step, RandomSplitStep | KeySplitStep):
        return step.arms
    return ()


def step_from_json(data: dict[str, Any]) -> Step:
    kind = data.get("kind", "model")
    if kind == "validations":
        return ValidationsStep.of(data["checks"])
    if kind == "shadow":
        return ShadowStep.from_json(data)
    if kind == "random_split":
        return RandomSplitStep.from_json(data)
    if kind == "key_split":
        return KeySplitStep.from_json(data)
    if kind == "model":
        return ResolvedStep.from_json(data)
    raise ValueError(f"stored pipeline step of unknown kind {kind!r}")


@dataclass(frozen=True)
class PipelineVersion:
    workspace: str
    pipeline: str
    version: int
    steps: tuple[Step, ...]
    created_at: datetime


@dataclass(frozen=True)
class Autoscale:
    """Scale between min and max replicas on the queue age reported by the replicas."""

    min_replicas: int
    max_replicas: int
    queue_age_threshold_s: float = 1.0
    scale_up_after_s: float = 10.0
    scale_down_after_s: float = 300.0

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Autoscale:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class Resources:
    """Per-replica requests for production manifests, as Kubernetes quantities ("1.5", "2Gi")."""

    cpus: str = ""
    memory: str = ""

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Resources:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class Deployment:
    workspace: str
    pipeline: str
    pipeline_version: int
    replicas: int
    """The current count; with autoscaling it moves between its min and max."""
    active: bool
    deployment_id: str
    topics: PipelineTopics
    updated_at: datetime
    autoscale: Autoscale | None = None
    resources: Resources | None = None


@dataclass(frozen=True)
class DeploymentSpec:
    """What engines run: an active deployment with its steps resolved (deployed_at = updated_at)."""

    deployment: Deployment
    steps: tuple[Step, ...]


@dataclass(frozen=True)
class Pipeline:
    workspace: str
    name: str
    versions: tuple[PipelineVersion, ...]  # oldest first
    deployment: Deployment | None
    status: str = ""
    """The deployment's status now; set by listings only (reading it costs heartbeat reads)."""
    tags: tuple[str, ...] = ()  # sorted

    @property
    def updated_at(self) -> datetime:
        """When it last changed: its newest version was created or its deployment changed."""
        times = [self.versions[-1].created_at]
        if self.deployment is not None:
            times.append(self.deployment.updated_at)
        return max(times)


@dataclass(frozen=True)
class ModelVersionUse:
    """A pipeline version whose steps use a model version; ``deployed`` when its pipeline's active
    deployment runs that pipeline version."""

    model_version: int
    pipeline: str
    pipeline_version: int
    deployed: bool


@dataclass(frozen=True)
class ModelDescription:
    model: Model
    uses: tuple[ModelVersionUse, ...]


@dataclass(frozen=True)
class DeletedModel:
    versions: tuple[int, ...]
    model_deleted: bool


@dataclass(frozen=True)
class DeletedPipeline:
    versions: int
    log_entries: int


@dataclass(frozen=True)
class ReplicaStatus:
    replica_id: str
    alive: bool
    pipeline_version: int
    loaded: bool
    partitions: tuple[int, ...]
    last_seen: datetime
    error: str
    queue_age_s: float = 0.0
    deployment_id: str = ""
    phase: str = ""
    """starting, loading, joining, running, retiring, stopping, failed or dead (see status.py)."""


@dataclass(frozen=True)
class DeploymentStatus:
    deployment: Deployment | None
    status: str
    ready: bool
    replicas: tuple[ReplicaStatus, ...]
    message: str


class LogValidity(enum.Enum):
    ALL = "all"
    OK = "ok"
    FAILED = "failed"


@dataclass(frozen=True)
class LogQuery:
    workspace: str
    pipeline: str
    limit: int = 0
    start: datetime | None = None
    end: datetime | None = None
    validity: LogValidity = LogValidity.ALL
    anomalies_only: bool = False
    page_token: str = ""

    @property
    def chronological(self) -> bool:
        """A time range reads oldest first; without one the newest rows come first."""
        return self.start is not None or self.end is not None


@dataclass(frozen=True)
class LogCursor:
    """Where a page ended: its last row in the query's (time, id) order."""

    time: datetime
    id: int


@dataclass(frozen=True)
class ModelRef:
    name: str
    version: int
    sha256: str


@dataclass(frozen=True)
class LogEntry:
    request_id: str
    time: datetime
    pipeline_version: int
    ok: bool
    error: str
    inputs_json: str
    outputs_json: str
    shadow_json: str
    check_failures: tuple[str, ...]
    models: tuple[ModelRef, ...]
    elapsed_ns: tuple[int, ...]
    input_partition: int
    input_offset: int
    raw_input: bytes


@dataclass(frozen=True)
class LogPage:
    entries: tuple[LogEntry, ...]
    total: int
    next_page_token: str = ""
