"""Pipelines as the SDK sees them: the builder and its verbs (create, deploy, infer, logs), versions,
steps and deployment status."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
from google.protobuf.timestamp_pb2 import Timestamp

from joey.client import bulk
from joey.client.assays import timestamp
from joey.client.calls import JoeyError, RegistryCaller
from joey.client.catalog import (
    DELETE_PIPELINE_TIMEOUT_S,
    DeletedPipeline,
    ModelSummary,
    plural,
    topics_text,
)
from joey.client.inputs import InputError, RecordInput, deployed_inputs, to_records
from joey.client.log_export import LogExport, log_entry_row
from joey.client.streaming import Progress, check_rows, streams_of
from joey.client.tags import set_tag
from joey_core.lazy import LazyModule
from joey_core.models import ModelVersion
from joey_core.replies import Reply
from joey_core.results import replies_to_frame
from joey_core.topics import PipelineTopics
from joey_core.v1 import registry_pb2 as pb

if TYPE_CHECKING:
    import pandas as pd
else:
    pd = LazyModule("pandas")

StatusCallback = Callable[["DeploymentStatus"], None]

INFER_CHUNK_ROWS = 5_000
"""How many rows ``Pipeline.infer`` converts and encodes at a time: what it holds of a big input at once."""


def _time(ts: Timestamp) -> datetime | None:
    return ts.ToDatetime(tzinfo=UTC) if ts.seconds or ts.nanos else None


@dataclass(frozen=True)
class ModelStep:
    """A model step of a stored pipeline version, pinned to one artifact. ``inputs`` maps model
    inputs to the names they are fed from (record fields for the first model step, outputs of the
    previous model step otherwise); inputs not listed are fed by their own name."""

    model: str
    version: int
    sha256: str
    inputs: dict[str, str] = field(default_factory=dict, hash=False)

    def __str__(self) -> str:
        mapping = ", ".join(f"{name}<-{source}" for name, source in self.inputs.items())
        return f"{self.model}:{self.version}" + (f"({mapping})" if mapping else "")


@dataclass(frozen=True)
class ValidationsStep:
    """Named checks (name -> expression) flagging anomalies; kept sorted by name."""

    checks: dict[str, str] = field(hash=False)

    def __str__(self) -> str:
        return f"validations({', '.join(self.checks)})"


@dataclass(frozen=True)
class ShadowStep:
    """Every model sees every record; only the champion's outputs are the result and continue
    down the pipeline, each challenger's are kept with the inference as ``shadow.<model>.*``."""

    champion: ModelStep
    challengers: tuple[ModelStep, ...]

    def __str__(self) -> str:
        return f"shadow({self.champion} vs {', '.join(str(c) for c in self.challengers)})"


@dataclass(frozen=True)
class RandomSplitStep:
    """One of the arms (weight, model) serves each record, at random in proportion to the weights;
    with ``hash_key``, records carrying that field are assigned by its value, always to the same model."""

    arms: tuple[tuple[float, ModelStep], ...]
    hash_key: str = ""

    def __str__(self) -> str:
        arms = ", ".join(f"{weight:g}*{model}" for weight, model in self.arms)
        return f"random_split({arms}" + (f"; hash_key={self.hash_key})" if self.hash_key else ")")


@dataclass(frozen=True)
class KeySplitStep:
    """Each record is served by the model its ``meta_key`` field's value routes to, else ``default``."""

    default: ModelStep
    meta_key: str
    routes: dict[str, ModelStep] = field(hash=False)

    def __str__(self) -> str:
        routes = ", ".join(f"{value}->{model}" for value, model in self.routes.items())
        return f"key_split({self.meta_key}: {routes}; default {self.default})"


PipelineStep = ModelStep | ValidationsStep | ShadowStep | RandomSplitStep | KeySplitStep


def _model_step(step: pb.ResolvedStep) -> ModelStep:
    return ModelStep(step.model, step.version, step.sha256, dict(sorted(step.input_mapping.items())))


def _split_step(step: pb.ResolvedStep) -> RandomSplitStep | KeySplitStep:
    arms = [_model_step(arm) for arm in step.arms]
    if not step.meta_key:
        return RandomSplitStep(tuple(zip(step.weights, arms, strict=True)), step.hash_key)
    by_name = {arm.model: arm for arm in arms}
    routes = {value: by_name[step.routes[value]] for value in sorted(step.routes)}
    return KeySplitStep(arms[0], step.meta_key, routes)


def _pipeline_step(step: pb.ResolvedStep) -> PipelineStep:
    # A resolved validations step is the one with checks (and no model); a shadow step the one
    # with challengers; a split step the one with arms.
    if step.arms:
        return _split_step(step)
    if step.checks:
        return ValidationsStep(dict(sorted(step.checks.items())))
    if step.challengers:
        return ShadowStep(_model_step(step), tuple(_model_step(c) for c in step.challengers))
    return _model_step(step)


@dataclass(frozen=True)
class PipelineVersion:
    workspace: str
    pipeline: str
    version: int
    steps: tuple[PipelineStep, ...]
    created_at: datetime | None

    @classmethod
    def from_proto(cls, pv: pb.PipelineVersion) -> PipelineVersion:
        steps = tuple(_pipeline_step(s) for s in pv.steps)
        return cls(pv.workspace, pv.pipeline, pv.version, steps, _time(pv.created_at))


@dataclass(frozen=True)
class ReplicaStatus:
    replica_id: str
    alive: bool
    """Serving or about to: its heartbeat is current and its pipeline is deployed. A replica still
    draining after ``undeploy()`` is not alive: its phase is "stopping"."""
    pipeline_version: int
    loaded: bool
    partitions: tuple[int, ...]
    last_seen: datetime | None
    error: str
    queue_age_s: float = 0.0
    """The longest a record it took lately had waited in the inputs topic: the autoscaling signal."""
    deployment_id: str = ""
    phase: str = ""
    """"starting" (its engine fetches the models), "loading" (models and python step sandboxes),
    "joining" (waiting for partitions), "running", "retiring" (of a replaced deployment, serving until
    the new one is ready), "stopping" (its pipeline was undeployed), "failed" (see ``error``) or "dead"."""


@dataclass(frozen=True)
class Autoscale:
    """Scale a deployment between ``min_replicas`` and ``max_replicas`` on queue age: one replica more
    once records have waited longer than ``queue_age_threshold_s`` for ``scale_up_after_s``, one less
    after ``scale_down_after_s`` below it."""

    min_replicas: int
    max_replicas: int
    queue_age_threshold_s: float = 1.0
    scale_up_after_s: float = 10.0
    scale_down_after_s: float = 300.0

    def __post_init__(self) -> None:
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise ValueError(
                f"autoscaling needs 1 <= min_replicas <= max_replicas, got min {self.min_replicas} and "
                f"max {self.max_replicas}"
            )
        for name in ("queue_age_threshold_s", "scale_up_after_s", "scale_down_after_s"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"autoscaling {name} must be a positive number of seconds, got {value!r}")

    def to_proto(self) -> pb.AutoscaleConfig:
        return pb.AutoscaleConfig(**self.__dict__)


@dataclass(frozen=True)
class DeploymentStatus:
    """A pipeline's deployment as the replicas' heartbeats show it. ``status`` is "Running" (``ready``),
    "Starting", "Error" or "Undeployed"; ``message`` says what is missing, in words.

    For an undeployed pipeline, ``pipeline_version``, ``replicas_wanted`` and ``autoscale`` describe the
    last deployment (history; 0 and None when it was never deployed), ``undeployed_at`` says when it
    ended, and ``replicas`` lists only replicas still stopping."""

    status: str
    ready: bool
    pipeline_version: int
    replicas_wanted: int
    replicas: tuple[ReplicaStatus, ...]
    message: str
    deployment_id: str = ""
    autoscale: Autoscale | None = None
    undeployed_at: datetime | None = None

    @property
    def deployed(self) -> bool:
        return self.status != "Undeployed"

    def current_replicas(self) -> tuple[ReplicaStatus, ...]:
        """The replicas of the current deployment (not those of a replaced or undeployed one)."""
        if not self.deployed:
            return ()
        return tuple(r for r in self.replicas if r.deployment_id == self.deployment_id)

    @classmethod
    def from_proto(cls, st: pb.DeploymentStatus) -> DeploymentStatus:
        replicas = tuple(
            ReplicaStatus(
                r.replica_id,
                r.alive,
                r.pipeline_version,
                r.loaded,
                tuple(r.partitions),
                _time(r.last_seen),
                r.error,
                r.queue_age_s,
                r.deployment_id,
                r.phase,
            )
            for r in st.replicas
        )
        d = st.deployment
        autoscale = None
        if d.HasField("autoscale"):
            a = d.autoscale
            autoscale = Autoscale(
                a.min_replicas,
                a.max_replicas,
                a.queue_age_threshold_s,
                a.scale_up_after_s,
                a.scale_down_after_s,
            )
        undeployed_at = _time(d.updated_at) if st.HasField("deployment") and not d.active else None
        return cls(
            st.status,
            st.ready,
            d.pipeline_version,
            d.replicas,
            replicas,
            st.message,
            d.deployment_id,
            autoscale,
            undeployed_at,
        )


def step_request(step: pb.ResolvedStep) -> pb.PipelineStep:
    if step.arms and step.meta_key:
        by_name = {arm.model: _modelstep_request(arm) for arm in step.arms}
        routes = {value: by_name[model] for value, model in step.routes.items()}
        split = pb.KeySplitStep(
            default_model=by_name[step.arms[0].model], meta_key=step.meta_key, routes=routes
        )
        return pb.PipelineStep(key_split=split)
    if step.arms:
        pairs = zip(step.weights, step.arms, strict=True)
        arms = [pb.WeightedModel(weight=w, model=_modelstep_request(a)) for w, a in pairs]
        return pb.PipelineStep(random_split=pb.RandomSplitStep(arms=arms, hash_key=step.hash_key))
    if step.checks:
        return pb.PipelineStep(validations=pb.ValidationsStep(checks=step.checks))
    if step.challengers:
        shadow = pb.ShadowStep(
            champion=_modelstep_request(step), challengers=[_modelstep_request(c) for c in step.challengers]
        )
        return pb.PipelineStep(shadow=shadow)
    return pb.PipelineStep(model=_modelstep_request(step))


def _modelstep_request(step: pb.ResolvedStep) -> pb.ModelStep:
    return pb.ModelStep(model=step.model, version=step.version, input_mapping=step.input_mapping)


def _model_ref(
    model: ModelVersion | ModelSummary | str, version: int | None = None, inputs: dict[str, str] | None = None
) -> pb.ModelStep:
    """A ModelVersion pins that version, a ModelSummary (an item of ``list_models()``) its latest; a
    name takes ``version``, or the latest at create time."""
    if isinstance(model, ModelSummary):
        model = model.latest
    if isinstance(model, ModelVersion):
        return pb.ModelStep(model=model.name, version=model.version, input_mapping=inputs)
    return pb.ModelStep(model=model, version=version or 0, input_mapping=inputs)


def _named_ref(model: ModelVersion | ModelSummary | str, mappings: dict[str, dict[str, str]]) -> pb.ModelStep:
    """A ModelVersion or ModelSummary, or ``"name"`` / ``"name:version"``, with its input mapping
    from ``mappings``."""
    if isinstance(model, ModelVersion | ModelSummary):
        return _model_ref(model, inputs=mappings.get(model.name))
    # Model names cannot contain ":", so "name:version" is unambiguous.
    name, colon, version = model.partition(":")
    if colon and not (version.isdigit() and int(version) > 0):
        raise ValueError(f"expected 'name' or 'name:version' (a positive number), got {model!r}")
    return _model_ref(name, int(version) if colon else None, mappings.get(name))


@dataclass
class Pipeline:
    client: RegistryCaller
    name: str
    _steps: list[pb.PipelineStep] = field(default_factory=list)
    _version: int | None = None
    """The version last created or loaded; None until then."""
    _inputs: tuple[tuple[str, int], tuple[RecordInput, ...]] | None = field(
        default=None, repr=False, compare=False
    )
    """The record inputs ``infer`` last shaped data for, with the deployment and version they are of."""

    @property
    def workspace(self) -> str:
        return self.client.workspace

    @property
    def topics(self) -> PipelineTopics:
        from joey_core.topics import pipeline_topics

        return pipeline_topics(self.workspace, self.name)

    def add_model_step(
        self, model: ModelVersion | str, version: int | None = None, inputs: dict[str, str] | None = None
    ) -> Pipeline:
        """Append a model step: a ModelVersion pins that version; a name takes the latest at create time.

        ``inputs`` maps this model's input names to the names they are fed from: fields of the
        input record for the first model step, outputs of the previous model step for later ones,
        e.g. ``add_model_step("b", inputs={"x": "probabilities"})``. Inputs not listed are fed by
        their own name. The registry checks the mapping when the pipeline version is created.
        """
        self._steps.append(pb.PipelineStep(model=_model_ref(model, version, inputs)))
        return self

    def add_shadow_deploy(
        self,
        champion: ModelVersion | str,
        challengers: Sequence[ModelVersion | str],
        inputs: dict[str, dict[str, str]] | None = None,
    ) -> Pipeline:
        """Append a shadow step: the champion and every challenger see every record; only the
        champion's outputs are the result (``out.*``) and continue down the pipeline. Each
        challenger's outputs are kept with the inference (``shadow.<model>.<output>`` in results
        and logs), and a failing challenger (``shadow_errors.<model>``) never affects the result.

        A ModelVersion pins that version; a string is ``"name"`` (the latest at create time) or
        ``"name:version"``. Challengers must be models other than the champion and each other.
        ``inputs`` maps a model name to its input mapping, as in ``add_model_step``, e.g.
        ``inputs={"iris-b": {"features": "petals"}}``. The registry checks that every challenger
        can be fed from the same sources as the champion when the pipeline version is created.
        """
        if not challengers:
            raise ValueError("add_shadow_deploy needs at least one challenger, e.g. ['iris-b']")
        mappings = inputs or {}
        shadow = pb.ShadowStep(
            champion=_named_ref(champion, mappings),
            challengers=[_named_ref(c, mappings) for c in challengers],
        )
        self._steps.append(pb.PipelineStep(shadow=shadow))
        return self

    def add_random_split(
        self,
        arms: Sequence[tuple[float, ModelVersion | str]],
        hash_key: str | None = None,
        inputs: dict[str, dict[str, str]] | None = None,
    ) -> Pipeline:
        """Append an A/B split: each record is served by one of the ``(weight, model)`` arms, chosen
        at random in proportion to the weights (positive numbers, any scale), e.g.
        ``add_random_split([(2, "iris"), (1, "iris-b")])``. With ``hash_key="user_id"``, a record
        carrying that field is assigned by a stable hash of its value, so a value always goes to the
        same model (across replicas and restarts); records without it are assigned at random.

        The result names the model that served it in ``out._model_split`` (a list with several split
        steps). Models are given as in ``add_shadow_deploy``, each a different model; all arms must be
        fed from the same sources and produce the same outputs, which the registry checks when the
        pipeline version is created. ``inputs`` maps a model name to its input mapping.
        """
        mappings = inputs or {}
        weighted = []
        for arm in arms:
            if not (isinstance(arm, tuple | list) and len(arm) == 2):
                raise ValueError(f"each arm is a (weight, model) pair, e.g. (2, 'iris'), got {arm!r}")
            weight, model = arm
            weighted.append(pb.WeightedModel(weight=float(weight), model=_named_ref(model, mappings)))
        split = pb.RandomSplitStep(arms=weighted, hash_key=hash_key or "")
        self._steps.append(pb.PipelineStep(random_split=split))
        return self

    def add_key_split(
        self,
        default: ModelVersion | str,
        meta_key: str,
        options: dict[Any, ModelVersion | str],
        inputs: dict[str, dict[str, str]] | None = None,
    ) -> Pipeline:
        """Append a key split: each record is served by the model that the value of its ``meta_key``
        field maps to in ``options``, and by ``default`` when the field is missing or its value is not
        mapped, e.g. ``add_key_split("iris", "tier", {"gold": "iris-b"})``. Values compare as text: a
        string as is, anything else as its JSON text (``1`` matches ``"1"``, and a key ``True`` the
        value ``true``). Models and ``inputs`` as in ``add_random_split``; several values may route to
        the same model.
        """
        mappings = inputs or {}
        # Keys are matched as the engine compares record values: strings as is, others as JSON text.
        routes: dict[str, pb.ModelStep] = {}
        for value, model in options.items():
            key = (
                value if isinstance(value, str) else json.dumps(value, sort_keys=True, separators=(",", ":"))
            )
            routes[key] = _named_ref(model, mappings)
        split = pb.KeySplitStep(default_model=_named_ref(default, mappings), meta_key=meta_key, routes=routes)
        self._steps.append(pb.PipelineStep(key_split=split))
        return self

    def add_validations(self, **checks: str) -> Pipeline:
        """Append a validations step: each check is a named expression over ``in.<field>`` (the
        input record) and ``out.<field>`` (outputs of the model step before it), e.g.
        ``add_validations(too_sure="out.probabilities[0] > 0.99")``. A check that is true flags the
        record as an anomaly; the record is answered all the same. The registry compiles the
        expressions when the pipeline version is created."""
        if not checks:
            raise ValueError('add_validations needs at least one check, e.g. too_sure="out.score > 0.99"')
        self._steps.append(pb.PipelineStep(validations=pb.ValidationsStep(checks=checks)))
        return self

    def clear(self) -> Pipeline:
        self._steps.clear()
        return self

    def remove_step(self, index: int) -> Pipeline:
        """Drop the step at ``index`` (0-based, as in ``versions()[-1].steps``)."""
        self._step_at(index)
        del self._steps[index]
        return self

    def replace_with_model_step(
        self,
        index: int,
        model: ModelVersion | str,
        version: int | None = None,
        inputs: dict[str, str] | None = None,
    ) -> Pipeline:
        """Put a model step at ``index`` in place of the step there: the hot swap of a model. The next
        ``deploy()`` makes a new pipeline version and rolls it out with no pause in serving."""
        self._step_at(index)
        self._steps[index] = pb.PipelineStep(model=_model_ref(model, version, inputs))
        return self

    def _step_at(self, index: int) -> pb.PipelineStep:
        if not 0 <= index < len(self._steps):
            raise IndexError(f"pipeline {self.name!r} has {len(self._steps)} steps; no step at index {index}")
        return self._steps[index]

    def create(self) -> PipelineVersion:
        """Store the steps; a new pipeline version is made only when they changed."""
        request = pb.CreatePipelineRequest(workspace=self.workspace, name=self.name, steps=self._steps)
        version = PipelineVersion.from_proto(self.client.call("CreatePipeline", request))
        self._version = version.version
        return version

    def versions(self) -> list[PipelineVersion]:
        response = self.client.call(
            "GetPipeline", pb.GetPipelineRequest(workspace=self.workspace, name=self.name)
        )
        return [PipelineVersion.from_proto(v) for v in response.versions]

    def deploy(
        self,
        replicas: int | None = None,
        version: int | None = None,
        wait: bool = True,
        timeout: float = 120.0,
        on_status: StatusCallback | None = None,
        autoscale: Autoscale | None = None,
        cpus: str | float | None = None,
        memory: str | None = None,
    ) -> DeploymentStatus:
        """Deploy (creating a version from the current steps first) and wait until every replica is ready.

        On a running deployment the new version is rolled out while records keep flowing: its replicas
        join before the current ones leave, and each record is answered by one version. ``replicas``
        defaults to 1, or to ``autoscale.min_replicas``; it must be at least 1 (to stop serving,
        ``undeploy()``) and at most the partitions of the pipeline's topics. ``version`` deploys that
        stored version instead of the current steps. ``cpus``/``memory`` (e.g. 2, "4Gi") are
        per-replica hints for production manifests.

        While waiting, ``on_status(status)`` is called whenever the progress message changes, e.g.
        "0/2 replicas ready; 2 loading (starting 1 python step sandbox); ..." then "1/2 replicas ready;
        1 joining the consumer group; ...": a refused request raises before anything changed."""
        _check_positive("replicas", replicas, "to stop serving, undeploy() the pipeline")
        _check_positive("version", version, "leave it out to deploy the current steps or the latest version")
        _check_timeout(timeout)
        if version is None and self._steps:
            version = self.create().version
        elif version is None:
            self._require_stored_version()
        request = pb.DeployRequest(
            workspace=self.workspace,
            pipeline=self.name,
            pipeline_version=version or 0,
            replicas=replicas,
            autoscale=autoscale.to_proto() if autoscale else None,
            resources=(
                pb.ResourceHints(cpus="" if cpus is None else str(cpus), memory=memory or "")
                if cpus is not None or memory is not None
                else None
            ),
        )
        self.client.call("Deploy", request)
        return self.wait_ready(timeout, on_status) if wait else self.status()

    def _require_stored_version(self) -> None:
        """Deploying without steps deploys the latest stored version: say so when there is none."""
        try:
            self.client.call("GetPipeline", pb.GetPipelineRequest(workspace=self.workspace, name=self.name))
        except JoeyError as exc:
            if exc.code != "NOT_FOUND" or not exc.message.startswith(f"pipeline {self.name!r} "):
                raise
            raise JoeyError(
                "FAILED_PRECONDITION",
                f"pipeline {self.name!r} has no steps, and workspace {self.workspace!r} has no stored "
                f"version of it to deploy: add a step first, e.g. "
                f"client.build_pipeline({self.name!r}).add_model_step('my-model').deploy() "
                f"(CLI: joey pipeline create {self.name} --model MODEL)",
            ) from None

    def rollback(
        self,
        version: int | None = None,
        wait: bool = True,
        timeout: float = 120.0,
        on_status: StatusCallback | None = None,
    ) -> DeploymentStatus:
        """Roll the deployment back to ``version``, by default the version deployed before the current one,
        keeping its replicas and autoscaling; rolled out like any deploy, with no pause in serving."""
        _check_positive("version", version, "leave it out to roll back to the version deployed before")
        _check_timeout(timeout)
        request = pb.RollbackRequest(
            workspace=self.workspace, pipeline=self.name, pipeline_version=version or 0
        )
        self.client.call("Rollback", request)
        return self.wait_ready(timeout, on_status) if wait else self.status()

    def wait_ready(self, timeout: float = 120.0, on_status: StatusCallback | None = None) -> DeploymentStatus:
        """Wait until every replica is ready, calling ``on_status`` whenever the progress message changes;
        raises JoeyError when a replica fails, the pipeline is not deployed, or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        last_message = None
        while True:
            status = self.status()
            if on_status and status.message != last_message:
                on_status(status)
                last_message = status.message
            if status.ready:
                return status
            if not status.deployed:
                raise JoeyError("FAILED_PRECONDITION", f"pipeline {self.name!r} is {status.message}")
            if status.status == "Error" or time.monotonic() > deadline:
                raise JoeyError(
                    "DEADLINE_EXCEEDED" if status.status != "Error" else "ERROR",
                    f"pipeline {self.name} not ready: {status.status}: {status.message}",
                )
            # Replicas report each step of their start at once; polling often shows it as it happens.
            time.sleep(0.1)

    def status(self) -> DeploymentStatus:
        """The deployment as the replicas report it: see :class:`DeploymentStatus`."""
        request = pb.GetDeploymentStatusRequest(workspace=self.workspace, pipeline=self.name)
        return DeploymentStatus.from_proto(self.client.call("GetDeploymentStatus", request))

    def undeploy(self) -> None:
        """Stop serving: the replicas finish their batch, commit and leave (``status()`` lists them as
        stopping meanwhile). Refused (FAILED_PRECONDITION) when the pipeline is not deployed."""
        self.client.call("Undeploy", pb.UndeployRequest(workspace=self.workspace, pipeline=self.name))

    def infer(
        self,
        data: pa.Table | pd.DataFrame | np.ndarray | Sequence[dict[str, Any]] | dict[str, Any],
        timeout: float = 60.0,
        progress: Progress | None = None,
    ) -> pd.DataFrame | pa.Table:
        """Stream records through the pipeline's input topic and return one result row per record, in order.

        Failed records are returned too, with the reason in the ``error`` column. An Apache Arrow table
        (one record per row) gets an Arrow table back, with the columns of the DataFrame result.

        A DataFrame (or Arrow table) has a column per record field; when no column is named after the
        pipeline's input and that input is one vector of N numbers (or one number), a frame of exactly N
        numeric columns is packed into it, in the frame's column order. A numpy array, for a pipeline with
        one input, is one record per row of its first dimension. Packed values are converted for the
        input's dtype; NaN, inf and values the input cannot take raise InputError naming the row and
        column, as does data that fits neither way, before anything is sent.

        Any number of rows: they are converted, encoded and sent a chunk at a time (INFER_CHUNK_ROWS), so
        memory holds a chunk of the input and the results; ``progress(answered, total)`` is called as
        replies arrive. Calls reuse the client's producer and reply reader of the pipeline, and its
        deployment status (which refuses an undeployed pipeline at once and says whose inputs shape the
        data): it is fetched again once it is ``status_cache_s`` old (see :class:`joey.Client`), after a
        call that timed out or failed, when a reply comes from another version, and after this client
        deploys, undeploys or rolls the pipeline back. So for up to that long a pipeline undeployed by
        someone else is not refused at once: its records wait for the timeout.
        """
        streams = streams_of(self.client)
        key = (self.workspace, self.name)
        status = self._deployed_status()
        total, chunks = self._record_chunks(data, (status.deployment_id, status.pipeline_version))
        try:
            replies = streams.infer_chunks(self.topics, chunks, total, timeout, progress)
        except BaseException:
            streams.forget_status(key)  # a timeout or a failure: the deployment may have changed
            raise
        if any(_version_of(reply) not in (None, status.pipeline_version) for reply in replies):
            streams.forget_status(key)  # another version answers: its inputs may be shaped otherwise
        if isinstance(data, pa.Table):
            return pa.Table.from_pandas(replies_to_frame(replies), preserve_index=False)
        return replies_to_frame(replies)

    def _record_chunks(
        self,
        data: pa.Table | pd.DataFrame | np.ndarray | Sequence[dict[str, Any]] | dict[str, Any],
        deployed: tuple[str, int],
    ) -> tuple[int, Iterable[Sequence[Any]]]:
        """How many records ``data`` makes, and the records in chunks of INFER_CHUNK_ROWS rows, each
        made when it is sent. Every chunk is checked first (made and dropped), so that data the pipeline
        cannot take is refused before anything is sent."""

        def signature() -> tuple[RecordInput, ...]:
            return self._record_inputs(deployed)

        if isinstance(data, dict):
            data = [data]
        if not isinstance(data, pa.Table | pd.DataFrame | np.ndarray):
            rows = data if isinstance(data, Sequence) else list(data)
            check_rows(rows)
            return len(rows), (rows[i : i + INFER_CHUNK_ROWS] for i in range(0, len(rows), INFER_CHUNK_ROWS))
        if isinstance(data, np.ndarray) and data.ndim == 0:
            to_records(data, signature, self.name)  # refused, with the advice for an array
        frame = data
        total = len(frame)

        def pieces() -> Iterator[tuple[int, Any]]:
            # An empty frame is still checked: its columns may not fit.
            for start in range(0, max(total, 1), INFER_CHUNK_ROWS):
                if isinstance(frame, pa.Table):
                    yield start, frame.slice(start, INFER_CHUNK_ROWS)
                elif isinstance(frame, pd.DataFrame):
                    yield start, frame.iloc[start : start + INFER_CHUNK_ROWS]
                else:
                    yield start, frame[start : start + INFER_CHUNK_ROWS]

        for start, piece in pieces():
            try:
                to_records(piece, signature, self.name)
            except InputError:
                if start:
                    # A chunk's rows are numbered from its start: the whole data names the row as given.
                    to_records(frame, signature, self.name)
                raise
        return total, (to_records(piece, signature, self.name) for _, piece in pieces())

    def _record_inputs(self, deployed: tuple[str, int]) -> tuple[RecordInput, ...]:
        """The inputs of the deployed version, fetched once per deployment and version: a version's steps
        never change, and a new deployment or version (from any client) changes the key."""
        if self._inputs is None or self._inputs[0] != deployed:
            self._inputs = (deployed, deployed_inputs(self.client, self.name, deployed[1]))
        return self._inputs[1]

    def logs(
        self,
        limit: int = 100,
        start: datetime | str | None = None,
        end: datetime | str | None = None,
        valid: bool | None = None,
        anomalies_only: bool = False,
    ) -> pd.DataFrame:
        """Logged inferences: newest first without a time range, chronological with one.

        ``valid=False`` returns only failures, ``valid=True`` only successes; ``anomalies_only``
        only records that failed at least one validation check.
        """
        request = self._log_request(limit, start, end, valid, anomalies_only)
        return log_entries_to_frame(self.client.call("QueryLogs", request).entries)

    def log_count(
        self, start: datetime | str | None = None, valid: bool | None = None, anomalies_only: bool = False
    ) -> int:
        request = self._log_request(1, start, None, valid, anomalies_only)
        return int(self.client.call("QueryLogs", request).total)

    def export_logs(
        self,
        directory: str | Path,
        format: str = "parquet",
        start: datetime | str | None = None,
        end: datetime | str | None = None,
        valid: bool | None = None,
        file_prefix: str | None = None,
        page_size: int = 5000,
        rows_per_file: int = 100_000,
        progress: Callable[[int, int], None] | None = None,
        overwrite: bool = False,
        anomalies_only: bool = False,
    ) -> list[Path]:
        """Write every matching logged inference, oldest first, to ``<prefix>-00001.<format>``...
        in ``directory`` (created if missing) and return the files written (none if no rows match).

        Rows are read ``page_size`` at a time, so memory holds one page and one open file. Each file
        has at most ``rows_per_file`` rows; a Parquet file also ends early when rows do not fit its
        schema (see ``joey.client.log_export``). Columns are those of ``logs()``; JSON lines write time as
        ISO-8601. ``progress(rows_written, total)`` is called after each page; ``total`` is counted
        when the export starts, so rows logged meanwhile may take the count past it. Existing files
        with the same prefix and format are refused unless ``overwrite``, which replaces them.
        ``valid`` and ``anomalies_only`` filter as in ``logs()``.
        """
        if page_size < 1:
            raise ValueError(f"page_size must be at least 1, got {page_size}")
        export = LogExport(directory, format, file_prefix or self.name, rows_per_file, overwrite)
        # A start, even the earliest one, makes the registry return rows chronologically.
        first = start if start is not None else datetime.min.replace(tzinfo=UTC)
        request = self._log_request(page_size, first, end, valid, anomalies_only)
        return export.write(self._log_pages(request), progress)

    def _log_request(
        self,
        limit: int,
        start: datetime | str | None,
        end: datetime | str | None,
        valid: bool | None,
        anomalies_only: bool,
    ) -> pb.QueryLogsRequest:
        validity = {None: pb.LOG_VALIDITY_ALL, True: pb.LOG_VALIDITY_OK, False: pb.LOG_VALIDITY_FAILED}[valid]
        return pb.QueryLogsRequest(
            workspace=self.workspace,
            pipeline=self.name,
            limit=limit,
            validity=validity,
            anomalies_only=anomalies_only,
            start=None if start is None else timestamp(start),
            end=None if end is None else timestamp(end),
        )

    def _log_pages(self, request: pb.QueryLogsRequest) -> Iterator[tuple[Sequence[pb.LogEntry], int]]:
        while True:
            response = self.client.call("QueryLogs", request)
            yield response.entries, int(response.total)
            if not response.next_page_token:
                return
            request.page_token = response.next_page_token

    def describe(self) -> PipelineDescription:
        """Its stored versions and their steps, its deployment and status now, topics and assays."""
        found = self.client.call(
            "GetPipeline", pb.GetPipelineRequest(workspace=self.workspace, name=self.name)
        )
        status = DeploymentStatus.from_proto(
            self.client.call(
                "GetDeploymentStatus",
                pb.GetDeploymentStatusRequest(workspace=self.workspace, pipeline=self.name),
            )
        )
        assays = self.client.call(
            "ListAssays", pb.ListAssaysRequest(workspace=self.workspace, pipeline=self.name)
        )
        return PipelineDescription(
            self.workspace,
            self.name,
            tuple(PipelineVersion.from_proto(v) for v in found.versions),
            status,
            self.topics,
            tuple(sorted(a.definition.name for a in assays.assays)),
        )

    def tags(self) -> tuple[str, ...]:
        """The pipeline's tags now."""
        found = self.client.call(
            "GetPipeline", pb.GetPipelineRequest(workspace=self.workspace, name=self.name)
        )
        return tuple(found.tags)

    def add_tag(self, tag: str) -> tuple[str, ...]:
        """Tag the stored pipeline; adding a tag it has changes nothing. Returns its tags."""
        return set_tag(self.client, self.workspace, "pipeline", self.name, tag, add=True)

    def remove_tag(self, tag: str) -> tuple[str, ...]:
        """Untag the pipeline; removing a tag it has not changes nothing. Returns its tags."""
        return set_tag(self.client, self.workspace, "pipeline", self.name, tag, add=False)

    def delete(self) -> DeletedPipeline:
        """Delete the pipeline with its versions, deployment history and logged inferences, then its
        topics. Refused while it is deployed (undeploy first), for the few seconds its replicas take to
        stop after an undeploy (retry), or while assays watch it (delete them first). Waits up to 10
        minutes: deleting many logs takes a while."""
        # The logs go in the same transaction as the rest: many take a while.
        response = self.client.call(
            "DeletePipeline",
            pb.DeletePipelineRequest(workspace=self.workspace, name=self.name),
            timeout=DELETE_PIPELINE_TIMEOUT_S,
        )
        self._version = None
        return DeletedPipeline(self.name, response.version_count, response.log_entries)

    def infer_from_file(
        self,
        path: str | Path,
        data_format: str | None = None,
        timeout: float = 60.0,
        progress: Progress | None = None,
        chunk_rows: int = 10_000,
    ) -> pd.DataFrame | pa.Table:
        """Infer the records of a file, ``chunk_rows`` at a time, and return one result row per record in file
        order: a DataFrame for JSON, an Arrow table for Arrow IPC and Parquet (the columns of ``infer``).

        ``data_format`` is ``"json"`` (a JSON array of records, as pandas writes ``orient="records"``, one
        JSON object, which is one record, or JSON lines, one record per line), ``"arrow"`` (Arrow IPC, file or
        stream format; Feather v2) or ``"parquet"``; by default the suffix says (.json/.jsonl/.ndjson,
        .arrow/.arrows/.feather/.ipc, .parquet/.pq). Rows are shaped as ``infer`` shapes a DataFrame (one
        column per record field, or the feature columns packed into the pipeline's input); JSON records that
        name an input are sent as they are. Memory holds one chunk of input: a Parquet or Arrow file is read a
        batch at a time, JSON lines a chunk of lines at a time; a JSON array is one JSON value, read whole
        (use JSON lines for big files).

        The file is read through once before anything is sent: a file that cannot be read, is not of its
        format, or whose rows do not fit the pipeline's inputs raises InputFileError naming the file, the
        rows and the problem. ``timeout`` applies to each chunk as to one ``infer`` call; a row of a chunk
        with no reply in time is a row of the result with its error ("no reply from the pipeline within
        ...s"), and the file goes on, so the rows answered are never lost. ``progress(done, total)`` counts
        the whole file. A file that changes between the two readings (a different number of records) raises
        InputFileError.
        """
        return bulk.infer_from_file(self, path, data_format, timeout, progress, chunk_rows)

    def parallel_infer(
        self,
        data: pa.Table | pd.DataFrame | np.ndarray | Sequence[dict[str, Any]] | dict[str, Any],
        batch_size: int = 1000,
        num_parallel: int = 4,
        retries: int = 1,
        timeout: float = 60.0,
        progress: Progress | None = None,
        retry_timed_out: bool = False,
    ) -> pd.DataFrame | pa.Table:
        """Infer ``data`` (anything ``infer`` takes) as batches of ``batch_size`` rows, ``num_parallel``
        batches at once, and return one result row per record, in input order, with per-row errors.

        Rows known never to have reached the pipeline ("not sent to the pipeline: ...": refused by the
        producer or the broker, or purged unsent) are sent again, in new batches, up to ``retries`` times.
        Rows with no reply within ``timeout`` may have reached the pipeline (their reply late, or their
        record still on its way): they are retried only with ``retry_timed_out=True``, and are then maybe
        processed (and logged) twice; otherwise they keep their error ("no reply from the pipeline within
        ...s") and their request id, to be looked up in the logs. Rows the pipeline answered, with an
        error too, are never sent again, and each record has exactly one row in the result.

        Data that does not fit the pipeline's inputs raises InputError before anything is sent, naming
        the row as in ``data``; records are converted a batch at a time as batches are sent, so memory
        holds about ``2 * num_parallel`` batches. An error other than a timeout (the pipeline undeployed
        meanwhile), or an interrupt (Ctrl-C), cancels the batches not started yet and is raised.
        ``progress(done, total)`` as each batch completes, counting the rows whose result is final.
        """
        return bulk.parallel_infer(
            self,
            data,
            batch_size,
            num_parallel,
            retries,
            timeout,
            progress,
            retry_timed_out,
        )

    def _deployed_status(self) -> DeploymentStatus:
        """The deployment status calls work with (cached, see ``infer``); JoeyError when not deployed."""
        found = streams_of(self.client).status(
            (self.workspace, self.name), self.status, keep=lambda status: status.deployed
        )
        if not found.deployed:
            raise JoeyError("FAILED_PRECONDITION", f"pipeline {self.name!r} is not deployed: deploy it first")
        return found

    async def async_infer(
        self,
        data: pa.Table | pd.DataFrame | np.ndarray | Sequence[dict[str, Any]] | dict[str, Any],
        timeout: float = 60.0,
        progress: Progress | None = None,
    ) -> pd.DataFrame | pa.Table:
        """``infer`` as a coroutine: it runs in a worker thread (asyncio's default executor), so the event
        loop goes on meanwhile; calls awaited together (``asyncio.gather``) run at once, each with its own
        result. ``progress`` is called from the worker thread."""
        return await bulk.async_infer(self, data, timeout, progress)


def load_pipeline(client: RegistryCaller, found: pb.Pipeline) -> Pipeline:
    """A builder holding the steps of the stored pipeline's latest version, so ``deploy()`` redeploys them."""
    if not found.versions:
        return Pipeline(client, found.name)
    latest = found.versions[-1]
    return Pipeline(client, found.name, [step_request(s) for s in latest.steps], latest.version)


@dataclass(frozen=True)
class PipelineDescription:
    """What ``joey pipeline describe`` prints: versions and steps, deployment, topics, assays."""

    workspace: str
    name: str
    versions: tuple[PipelineVersion, ...]
    status: DeploymentStatus
    topics: PipelineTopics
    assays: tuple[str, ...]

    def __str__(self) -> str:
        lines = [
            f"pipeline {self.name} (workspace {self.workspace}), {plural(len(self.versions), 'version')}"
        ]
        for v in self.versions:
            created = f"{v.created_at:%Y-%m-%d %H:%M:%S} UTC" if v.created_at else "-"
            steps = " -> ".join(str(s) for s in v.steps)
            lines.append(f"  version {v.version} (created {created}): {steps}")
        st = self.status
        if st.status == "Undeployed":
            lines.append(f"deployment: none ({st.message})")
        else:
            lines.append(
                f"deployment: {st.status}, version {st.pipeline_version}, "
                f"{plural(st.replicas_wanted, 'replica')}"
                + (
                    f" (autoscaling {st.autoscale.min_replicas}-{st.autoscale.max_replicas})"
                    if st.autoscale
                    else ""
                )
                + f": {st.message}"
            )
        lines.append(f"topics: {topics_text(self.topics)}")
        lines.append(f"assays: {', '.join(self.assays) if self.assays else 'none'}")
        return "\n".join(lines)


def _version_of(reply: Reply) -> Any:
    """The pipeline version that answered ``reply``; None for a row that failed on the caller's side."""
    metadata = reply.body.get("metadata")
    return metadata.get("pipeline_version") if isinstance(metadata, dict) else None


def _check_positive(name: str, value: int | None, otherwise: str) -> None:
    """Refuse a count or version below 1 before anything is sent: none of them means a default."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be a whole number of at least 1, got {value!r}; {otherwise}")


def _check_timeout(timeout: float) -> None:
    if not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")


def log_entries_to_frame(entries: Sequence[pb.LogEntry]) -> pd.DataFrame:
    return pd.DataFrame([log_entry_row(e) for e in entries]).convert_dtypes()
