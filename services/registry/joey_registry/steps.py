"""Whether resolved pipeline steps fit together: model steps chain (by name or by their input
mapping), validations steps compile and read only fields that exist, a shadow step's champion and
challengers are all fed from the same sources, a split step's arms are interchangeable (same
sources, same outputs). Every error names the step (and model, check or input) and what is wrong."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import replace

from joey_core.expressions import ExpressionError, compile_expression
from joey_core.models import TensorSpec
from joey_registry.domain import (
    InputMapping,
    KeySplitStep,
    RandomSplitStep,
    ResolvedStep,
    ShadowStep,
    SplitStep,
    Step,
    ValidationsStep,
)
from joey_registry.errors import InvalidArgument
from joey_registry.validation import dtypes_compatible

CHECK_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
MAX_CHECK_NAME = 63
# Outputs carry anomaly.count next to anomaly.<name>, so a check may not be named "count".
RESERVED_CHECK_NAMES = frozenset({"count"})
FIELD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")


def describe(specs: tuple[TensorSpec, ...]) -> str:
    return ", ".join(f"{s.name!r} ({s.dtype})" for s in specs) or "nothing"


def _label(number: int, step: ResolvedStep, role: str = "") -> str:
    """E.g. "step 2 (iris v1)"; ``role`` ("champion ", "challenger ") places a model in a shadow step."""
    return f"step {number} ({role}{step.model} v{step.version})"


def _shape_text(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join("?" if d < 0 else str(d) for d in shape) + "]"


def _shapes_compatible(produced: tuple[int, ...], expected: tuple[int, ...]) -> bool:
    """An empty shape is an unknown rank; beyond the batch dimension, a dimension of -1 fits any."""
    if not produced or not expected:
        return True
    if len(produced) != len(expected):
        return False
    return all(p < 0 or e < 0 or p == e for p, e in zip(produced[1:], expected[1:], strict=True))


def map_inputs(number: int, step: ResolvedStep, mapping: InputMapping, role: str = "") -> ResolvedStep:
    """``step`` fed per ``mapping`` (model input -> source name), keeping only the entries that
    rename: an identity mapping is the same pipeline as no mapping."""
    inputs = {i.name for i in step.inputs}
    for name, _ in mapping:
        if name not in inputs:
            raise InvalidArgument(
                f"{_label(number, step, role)}: model {step.model!r} has no input {name!r}; "
                f"its inputs are: {describe(step.inputs)}"
            )
    return replace(step, input_mapping=tuple((name, source) for name, source in mapping if name != source))


Source = tuple[str, ResolvedStep]
"""The model step whose outputs feed what follows, with its label for messages."""


def check_steps(steps: Sequence[Step]) -> None:
    """The first model step is fed fields of the input record; a later model step is fed the
    outputs of the last model step before it (validations steps in between pass records through);
    a validations step's ``out.*`` are that model step's outputs. A shadow step is fed like a model
    step, every challenger from the same sources as the champion, and only the champion's outputs
    feed what follows."""
    if not any(isinstance(s, ResolvedStep | ShadowStep | RandomSplitStep | KeySplitStep) for s in steps):
        raise InvalidArgument("a pipeline needs at least one model step")
    previous: Source | None = None
    named: dict[str, int] = {}
    for number, step in enumerate(steps, 1):
        if isinstance(step, ValidationsStep):
            _check_validations(number, step, previous, named)
            continue
        if isinstance(step, RandomSplitStep | KeySplitStep):
            previous = _check_split(number, step, previous)
            continue
        if isinstance(step, ShadowStep):
            _check_challengers(number, step)
            fed = [(_label(number, step.champion, "champion "), step.champion)]
            fed += [(_label(number, c, "challenger "), c) for c in step.challengers]
        else:
            fed = [(_label(number, step), step)]
        for label, model in fed:
            if previous is None:
                _check_record_fields(label, model)
            else:
                _check_feeds(previous, label, model)
        previous = fed[0]


def key_split(
    number: int, default: ResolvedStep, meta_key: str, routes: Sequence[tuple[str, ResolvedStep]]
) -> KeySplitStep:
    """The key split of ``default`` and ``routes`` (value -> model): values routed to the same model
    share its arm, which must then be the same model version with the same input mapping, because
    results are keyed by model name."""
    arms = {default.model: default}
    for value, model in routes:
        arm = arms.setdefault(model.model, model)
        if arm != model:
            raise InvalidArgument(
                f"step {number}: model {model.model!r} is routed to as v{model.version} for value "
                f"{value!r} but is also v{arm.version} (or fed differently) elsewhere in the split; "
                "results are keyed by model name, so each model may appear in one form only"
            )
    return KeySplitStep(tuple(arms.values()), meta_key, tuple((value, m.model) for value, m in routes))


def _check_split(number: int, step: SplitStep, previous: Source | None) -> Source:
    """A split's arms are fed like a model step and must be interchangeable: later steps and checks
    read whichever arm served a record."""
    names = ", ".join(repr(a.model) for a in step.arms)
    if isinstance(step, RandomSplitStep):
        _check_random_split(number, step)
        field = step.hash_key
        what = "hash key"
    else:
        if not step.routes:
            raise InvalidArgument(
                f"step {number}: a key split needs at least one route (value -> model) besides its default"
            )
        field = step.meta_key
        what = "meta key"
        if not field:
            raise InvalidArgument(f"step {number}: a key split needs a meta key (a record field)")
    if field and not FIELD_NAME.fullmatch(field):
        raise InvalidArgument(
            f"step {number}: {what} {field!r} is not a valid record field name ({FIELD_NAME.pattern})"
        )
    for arm in step.arms:
        label = _label(number, arm, "split arm ")
        if previous is None:
            _check_record_fields(label, arm)
        else:
            _check_feeds(previous, label, arm)
    first = step.arms[0]
    for arm in step.arms[1:]:
        if previous is None:
            _check_same_fields(number, first, arm)
        _check_same_outputs(number, first, arm)
    return f"step {number} (split of {names})", first


def _check_random_split(number: int, step: RandomSplitStep) -> None:
    if len(step.arms) < 2:
        raise InvalidArgument(f"step {number}: a random split needs at least 2 arms, got {len(step.arms)}")
    seen: set[str] = set()
    for arm, weight in zip(step.arms, step.weights, strict=True):
        if not (math.isfinite(weight) and weight > 0):
            raise InvalidArgument(
                f"step {number}: arm {arm.model!r} has weight {weight}; weights must be positive numbers"
            )
        if arm.model in seen:
            raise InvalidArgument(
                f"step {number}: model {arm.model!r} is in two arms; results are keyed by model name, "
                "so each arm must be a different model"
            )
        seen.add(arm.model)


def _record_fields(step: ResolvedStep) -> dict[str, TensorSpec]:
    return {step.source(i.name): i for i in step.inputs}


def _check_same_fields(number: int, first: ResolvedStep, arm: ResolvedStep) -> None:
    ours, theirs = _record_fields(first), _record_fields(arm)
    where = f"step {number}: split arms {first.model!r} and {arm.model!r}"
    if set(ours) != set(theirs):
        raise InvalidArgument(
            f"{where} read different record fields ({sorted(ours)} vs {sorted(theirs)}); the arms of a "
            "split are fed from the same fields (map an arm's inputs to them)"
        )
    for name, spec in ours.items():
        other = theirs[name]
        if spec.dtype != other.dtype or not _shapes_compatible(spec.shape, other.shape):
            raise InvalidArgument(
                f"{where} read record field {name!r} differently: as {spec.dtype} "
                f"{_shape_text(spec.shape)} vs {other.dtype} {_shape_text(other.shape)}"
            )


def _check_same_outputs(number: int, first: ResolvedStep, arm: ResolvedStep) -> None:
    ours = {o.name: o for o in first.outputs}
    theirs = {o.name: o for o in arm.outputs}
    where = f"step {number}: split arms {first.model!r} and {arm.model!r}"
    if set(ours) != set(theirs):
        raise InvalidArgument(
            f"{where} produce different outputs ({describe(first.outputs)} vs {describe(arm.outputs)}); "
            "every arm must produce the same outputs, which later steps read whichever arm served"
        )
    for name, spec in ours.items():
        other = theirs[name]
        same_kind = dtypes_compatible(spec.dtype, other.dtype) or dtypes_compatible(other.dtype, spec.dtype)
        if not same_kind or not _shapes_compatible(spec.shape, other.shape):
            raise InvalidArgument(
                f"{where} produce output {name!r} differently: as {spec.dtype} {_shape_text(spec.shape)} "
                f"vs {other.dtype} {_shape_text(other.shape)}"
            )


def _check_challengers(number: int, step: ShadowStep) -> None:
    if not step.challengers:
        raise InvalidArgument(f"step {number}: a shadow step needs at least one challenger")
    champion = step.champion.model
    seen: set[str] = set()
    for challenger in step.challengers:
        name = challenger.model
        # Challenger outputs are kept under the model name, so two entries would collide.
        if name == champion:
            raise InvalidArgument(
                f"step {number}: challenger {name!r} is the champion's model; challenger outputs are "
                "kept by model name, so upload the challenger under a name of its own"
            )
        if name in seen:
            raise InvalidArgument(
                f"step {number}: challenger {name!r} is given twice; challenger outputs are kept by "
                "model name, so each challenger must be a different model"
            )
        seen.add(name)


def _check_record_fields(label: str, step: ResolvedStep) -> None:
    # Only a field name can be checked: which fields records carry is known when they arrive.
    for name, field in step.input_mapping:
        if not FIELD_NAME.fullmatch(field):
            raise InvalidArgument(
                f"{label}: input {name!r} is mapped from record field {field!r}, "
                f"which is not a valid field name ({FIELD_NAME.pattern})"
            )


def _check_feeds(previous: Source, label: str, step: ResolvedStep) -> None:
    source_label, source = previous
    produced = {o.name: o for o in source.outputs}
    for needed in step.inputs:
        fed_from = step.source(needed.name)
        where = f"{label} needs input {needed.name!r} ({needed.dtype})"
        if fed_from != needed.name:
            where += f" from {fed_from!r}"
        out = produced.get(fed_from)
        if out is None:
            raise InvalidArgument(f"{where}, but {source_label} produces only {describe(source.outputs)}")
        if not dtypes_compatible(out.dtype, needed.dtype):
            raise InvalidArgument(f"{where}, but {source_label} produces {out.name!r} as {out.dtype}")
        if not _shapes_compatible(out.shape, needed.shape):
            raise InvalidArgument(
                f"{where}, but {source_label} produces {out.name!r} with shape "
                f"{_shape_text(out.shape)}, which does not fit the input's shape {_shape_text(needed.shape)}"
            )


def _check_validations(
    number: int, step: ValidationsStep, previous: Source | None, named: dict[str, int]
) -> None:
    if not step.checks:
        raise InvalidArgument(f"step {number}: a validations step needs at least one check")
    for name, text in step.checks:
        where = f"step {number}: check {name!r}"
        _check_name(number, name, named)
        try:
            expression = compile_expression(text)
        except ExpressionError as exc:
            raise InvalidArgument(f"{where}: {exc}") from None
        outs = sorted(field for scope, field in expression.fields if scope == "out")
        if not outs:
            continue
        reads = ", ".join(f"out.{o}" for o in outs)
        if previous is None:
            raise InvalidArgument(
                f"{where} reads {reads}, but no model step comes before it; "
                "put the validations step after the model step whose outputs it checks"
            )
        source_label, source = previous
        produced = {o.name for o in source.outputs}
        missing = [o for o in outs if o not in produced]
        if missing:
            raise InvalidArgument(
                f"{where} reads {', '.join(f'out.{o}' for o in missing)}, but "
                f"{source_label} produces only {describe(source.outputs)}"
            )


def _check_name(number: int, name: str, named: dict[str, int]) -> None:
    if not CHECK_NAME.fullmatch(name) or len(name) > MAX_CHECK_NAME:
        raise InvalidArgument(
            f"step {number}: invalid check name {name!r}: use letters, digits and underscores, "
            f"not starting with a digit, at most {MAX_CHECK_NAME} characters"
        )
    if name in RESERVED_CHECK_NAMES:
        raise InvalidArgument(
            f"step {number}: check name {name!r} is reserved (outputs carry anomaly.{name}); choose another"
        )
    if name in named:
        raise InvalidArgument(
            f"step {number}: check {name!r} is already defined in step {named[name]}; "
            "check names must be unique in a pipeline"
        )
    named[name] = number
