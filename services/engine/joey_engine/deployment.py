"""The engine's view of a DeploymentSpec: frozen dataclasses converted from the proto at the edge."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property

from google.protobuf import json_format

from joey_core import topics
from joey_core.models import ModelConfig, TensorSpec, specs_from_proto
from joey_core.records import dumps_text
from joey_core.v1 import registry_pb2

# Bounds on what a joey.deployments record may ask of an engine: anyone who can write that topic could
# otherwise make every engine load thousands of models or allocate without limit.
MAX_RECORD_BYTES = 16 << 20
MAX_STEPS = 1024
MAX_BRANCHES = 256
"""Most challengers of a shadow step, or arms of a split."""
MAX_TENSORS = 65536
"""Most inputs or outputs of one model, checks of a validations step, or routes of a key split."""
MAX_TEXT = 4096
"""Longest check expression, tensor or field name, route value."""
SHA256 = re.compile(r"^[0-9a-f]{64}$")
DEPLOYMENT_ID = re.compile(r"^[A-Za-z0-9-]{1,64}$")
FRAMEWORK = re.compile(r"^[a-z0-9_-]{1,32}$")


@dataclass(frozen=True)
class Step:
    model: str
    version: int
    sha256: str
    framework: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    input_mapping: tuple[tuple[str, str], ...] = ()
    """(input, source) pairs by input name, for the inputs not fed by their own name: the source is a
    record field for the first model step, else an output of the model step before."""
    challengers: tuple[Step, ...] = ()
    """Set on a shadow step (this step's model is the champion): models fed from the same sources, each
    per its own mapping, whose outputs are only recorded; they never change the step's result."""
    config: ModelConfig = ModelConfig()

    def source(self, name: str) -> str:
        """Where input ``name`` is fed from."""
        return dict(self.input_mapping).get(name, name)

    def ref(self) -> dict[str, str | int]:
        """The step as it appears in the ``models`` list of outputs, errors and logs."""
        return {"name": self.model, "version": self.version, "sha256": self.sha256}


@dataclass(frozen=True)
class Validations:
    """Named checks over the input record (``in.*``) and the previous model step's outputs (``out.*``).

    Only their text travels (replicas get the deployment pickled); the runner compiles them at load.
    """

    checks: tuple[tuple[str, str], ...]
    """(name, expression) pairs, by name: a proto map has no order of its own."""


@dataclass(frozen=True)
class Split:
    """A step one of whose arms serves each record: at random with ``weights`` (sticky per value of
    record field ``hash_key`` when set), or by the value of record field ``meta_key`` looked up in
    ``routes`` (``arms[0]`` being the default). Arms are distinct models, fed from the same sources
    (each per its own mapping) and producing the same outputs."""

    arms: tuple[Step, ...]
    weights: tuple[float, ...] = ()
    hash_key: str = ""
    meta_key: str = ""
    routes: tuple[tuple[str, str], ...] = ()
    """(value, model name) pairs of a key split."""

    def arm(self, model: str) -> Step:
        return next(arm for arm in self.arms if arm.model == model)


@dataclass(frozen=True)
class Deployment:
    workspace: str
    pipeline: str
    pipeline_version: int
    replicas: int
    deployment_id: str
    steps: tuple[Step | Validations | Split, ...]
    topics: topics.PipelineTopics

    @property
    def key(self) -> str:
        return topics.deployment_key(self.workspace, self.pipeline)

    @property
    def consumer_group(self) -> str:
        return topics.engine_group(self.workspace, self.pipeline)

    @property
    def model_steps(self) -> tuple[Step, ...]:
        """The steps that run a model, each with an artifact; validations steps have none."""
        return tuple(step for step in self.steps if isinstance(step, Step))

    @property
    def artifact_steps(self) -> tuple[Step, ...]:
        """Every model to load, in order: each model step followed by its challengers, each split's arms."""
        loaded: list[Step] = []
        for step in self.steps:
            if isinstance(step, Step):
                loaded += (step, *step.challengers)
            elif isinstance(step, Split):
                loaded += step.arms
        return tuple(loaded)

    def batch_limits(self, max_size: int, max_delay_ms: int) -> tuple[int, int]:
        """The most records in one batch and the longest wait for more: the engine's settings, lowered
        by any model's config (one batch runs through every step)."""
        configs = [step.config for step in self.artifact_steps]
        sizes = [c.batch_size_target for c in configs if c.batch_size_target is not None]
        delays = [c.max_batch_delay_ms for c in configs if c.max_batch_delay_ms is not None]
        return min([max_size, *sizes]), min([max_delay_ms, *delays])

    @cached_property
    def has_shadow(self) -> bool:
        return any(step.challengers for step in self.model_steps)

    @cached_property
    def splits(self) -> tuple[Split, ...]:
        return tuple(step for step in self.steps if isinstance(step, Split))

    @cached_property
    def models(self) -> list[dict[str, str | int]]:
        """The models that produce the result, but for split arms (see ``models_of``); no challengers."""
        return [step.ref() for step in self.model_steps]

    def models_of(self, chosen: tuple[str, ...] | None) -> list[dict[str, str | int]]:
        """The models that served one record: every model step and, per split step, the arm named in
        ``chosen`` (in step order). None means the record failed before any arm was chosen for it.

        Built once per distinct choice (a handful), since every record of a split pipeline asks."""
        if not self.splits:
            return self.models
        found = self._served.get(chosen)
        if found is None:
            picks = iter(chosen or ())
            found = []
            for step in self.steps:
                if isinstance(step, Step):
                    found.append(step.ref())
                elif isinstance(step, Split) and chosen is not None:
                    found.append(step.arm(next(picks)).ref())
            self._served[chosen] = found
        return found

    def models_json(self, chosen: tuple[str, ...] | None) -> str:
        """``models_of(chosen)`` as JSON text, encoded once per distinct choice."""
        text = self._served_json.get(chosen)
        if text is None:
            text = self._served_json[chosen] = dumps_text(self.models_of(chosen))
        return text

    @cached_property
    def _served(self) -> dict[tuple[str, ...] | None, list[dict[str, str | int]]]:
        return {}

    @cached_property
    def _served_json(self) -> dict[tuple[str, ...] | None, str]:
        return {}

    @cached_property
    def check_names(self) -> tuple[str, ...]:
        """Every check's name, in step order; a name repeated in a later step is one check."""
        names = (name for step in self.steps if isinstance(step, Validations) for name, _ in step.checks)
        return tuple(dict.fromkeys(names))

    @cached_property
    def shared_metadata_json(self) -> str:
        """The metadata members every record of this deployment carries, as JSON object members."""
        shared: dict[str, object] = {
            "workspace": self.workspace,
            "pipeline": self.pipeline,
            "pipeline_version": self.pipeline_version,
            "deployment_id": self.deployment_id,
        }
        if not self.splits:
            # With a split step the models differ per record: each record carries its own.
            shared["models"] = self.models
        return dumps_text(shared)[1:-1]

    def __str__(self) -> str:
        return f"{self.key} v{self.pipeline_version} ({self.deployment_id})"


def _bounded(what: str, count: int, most: int) -> None:
    if count > most:
        raise ValueError(f"{what}: {count}, more than {most}")


def _text(what: str, value: str) -> str:
    if not value or len(value) > MAX_TEXT:
        raise ValueError(f"{what} must be 1 to {MAX_TEXT} characters")
    return value


def _check_model(spec: registry_pb2.ResolvedStep) -> None:
    topics.validate_name("model", spec.model)
    if not SHA256.match(spec.sha256):
        raise ValueError(f"model {spec.model!r} has an invalid artifact sha256 {spec.sha256[:80]!r}")
    if not 1 <= spec.version < 2**31:
        raise ValueError(f"model {spec.model!r} has an invalid version {spec.version}")
    if spec.framework and not FRAMEWORK.match(spec.framework):
        raise ValueError(f"model {spec.model!r} has an invalid framework {spec.framework[:80]!r}")
    for kind, tensors in (("inputs", spec.inputs), ("outputs", spec.outputs)):
        _bounded(f"{kind} of model {spec.model!r}", len(tensors), MAX_TENSORS)
        for tensor in tensors:
            _text(f"a tensor name of model {spec.model!r}", tensor.name)
            _bounded(f"dimensions of tensor {tensor.name!r}", len(tensor.shape), 64)
    _bounded(f"input mapping of model {spec.model!r}", len(spec.input_mapping), MAX_TENSORS)
    for name, source in spec.input_mapping.items():
        _text(f"an input mapping of model {spec.model!r}", name)
        _text(f"an input mapping of model {spec.model!r}", source)


def _model_step(spec: registry_pb2.ResolvedStep, challengers: tuple[Step, ...] = ()) -> Step:
    _check_model(spec)
    return Step(
        spec.model,
        spec.version,
        spec.sha256,
        spec.framework or "onnx",
        specs_from_proto(spec.inputs),
        specs_from_proto(spec.outputs),
        tuple(sorted((name, source) for name, source in spec.input_mapping.items() if source != name)),
        challengers,
        ModelConfig.from_proto(spec.config),
    )


def _challenger(champion: str, spec: registry_pb2.ResolvedStep) -> Step:
    if not spec.model or spec.checks or spec.challengers:
        raise ValueError(f"a challenger of model {champion!r} must be a plain model step")
    return _model_step(spec)


def _split(spec: registry_pb2.ResolvedStep) -> Split:
    if spec.model or spec.checks or spec.challengers:
        raise ValueError("a split step has arms and nothing else (no model, checks or challengers)")
    _bounded("arms of a split", len(spec.arms), MAX_BRANCHES)
    if any(not arm.model or arm.checks or arm.challengers or arm.arms for arm in spec.arms):
        raise ValueError("every arm of a split must be a plain model step")
    names = [arm.model for arm in spec.arms]
    if len(set(names)) != len(names):
        raise ValueError(f"split arms {names} are not distinct models")
    _bounded("routes of a split", len(spec.routes), MAX_TENSORS)
    for value in spec.routes:
        # An empty key value is a route the registry accepts (records whose key is "").
        if len(value) > MAX_TEXT:
            raise ValueError(f"a route value of a split is over {MAX_TEXT} characters")
    if spec.hash_key:
        _text("the hash key of a split", spec.hash_key)
    if spec.meta_key:
        _text("the meta key of a split", spec.meta_key)
        routes = tuple(sorted(spec.routes.items()))
        unknown = sorted({model for _, model in routes} - set(names))
        if unknown or spec.weights:
            raise ValueError(f"key split with weights, or routing to {unknown}, not among its arms {names}")
        return Split(_arms(spec), meta_key=spec.meta_key, routes=routes)
    weights = tuple(spec.weights)
    if len(weights) != len(names) or len(names) < 2 or not all(w > 0 for w in weights):
        raise ValueError(f"random split needs 2 or more arms with one positive weight each, got {weights}")
    return Split(_arms(spec), weights, hash_key=spec.hash_key)


def _arms(spec: registry_pb2.ResolvedStep) -> tuple[Step, ...]:
    return tuple(_model_step(arm) for arm in spec.arms)


def _step(spec: registry_pb2.ResolvedStep) -> Step | Validations | Split:
    if spec.arms:
        return _split(spec)
    if spec.checks:
        if spec.model or spec.challengers:
            what = f"of model {spec.model!r}" if spec.model else "with challengers"
            raise ValueError(f"step {what} also has checks; a step is one or the other")
        _bounded("checks of a validations step", len(spec.checks), MAX_TENSORS)
        for name, expression in spec.checks.items():
            _text("a check name", name)
            _text(f"check {name!r}", expression)
        return Validations(tuple(sorted(spec.checks.items())))
    if not spec.challengers:
        return _model_step(spec)
    if not spec.model:
        raise ValueError("shadow step without a champion model")
    _bounded(f"challengers of model {spec.model!r}", len(spec.challengers), MAX_BRANCHES)
    challengers = tuple(_challenger(spec.model, c) for c in spec.challengers)
    names = [spec.model, *(c.model for c in challengers)]
    if len(set(names)) != len(names):
        # Challengers' outputs are keyed by model name.
        raise ValueError(f"shadow step models {names} are not distinct")
    return _model_step(spec, challengers)


def from_proto(spec: registry_pb2.DeploymentSpec, max_replicas: int = 2**31 - 1) -> Deployment:
    """The deployment ``spec`` asks for, if every field it uses is within bounds, else ValueError.

    Topic names are the engine's own, derived from workspace and pipeline: a record naming other topics
    could make the engine read or write another pipeline's records. Replicas beyond ``max_replicas``
    (the partitions of a pipeline's topics) would get no partition: they are capped."""
    topics.validate_name("workspace", spec.workspace)
    topics.validate_name("pipeline", spec.pipeline)
    what = f"deployment of {spec.workspace}/{spec.pipeline}"
    if not DEPLOYMENT_ID.match(spec.deployment_id):
        raise ValueError(f"{what} has no valid deployment_id (1 to 64 letters, digits or '-')")
    if not 1 <= spec.pipeline_version < 2**31:
        raise ValueError(f"{what} has an invalid pipeline_version {spec.pipeline_version}")
    names = topics.pipeline_topics(spec.workspace, spec.pipeline)
    given = (spec.topics.inputs, spec.topics.outputs, spec.topics.errors)
    if any(name and name != derived for name, derived in zip(given, names.all(), strict=True)):
        raise ValueError(f"{what} names topics {list(given)} other than its own {list(names.all())}")
    _bounded(f"steps of the {what}", len(spec.steps), MAX_STEPS)
    steps = tuple(_step(s) for s in spec.steps)
    if not any(isinstance(step, Step | Split) for step in steps):
        raise ValueError(f"{what} has no model steps")
    return Deployment(
        workspace=spec.workspace,
        pipeline=spec.pipeline,
        pipeline_version=spec.pipeline_version,
        replicas=min(max(spec.replicas, 1), max_replicas),
        deployment_id=spec.deployment_id,
        steps=steps,
        topics=names,
    )


def parse(value: bytes, max_replicas: int = 2**31 - 1) -> Deployment:
    """Decode one ``joey.deployments`` value; raise ValueError when it is not a usable spec."""
    if len(value) > MAX_RECORD_BYTES:
        raise ValueError(f"record of {len(value)} bytes, more than {MAX_RECORD_BYTES}")
    try:
        spec = json_format.Parse(value, registry_pb2.DeploymentSpec(), ignore_unknown_fields=True)
    except (json_format.ParseError, UnicodeDecodeError) as exc:
        raise ValueError(f"not a DeploymentSpec: {str(exc)[:200]}") from None
    except RecursionError:
        raise ValueError("not a DeploymentSpec: nested too deeply") from None
    return from_proto(spec, max_replicas)
