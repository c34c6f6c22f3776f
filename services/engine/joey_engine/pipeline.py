"""Runs a batch of raw input records through a deployment's steps (no Kafka here).

Each record is validated on its own, so a bad record fails alone with a reason naming the
problem; the valid ones are stacked into one batch per input and run through the model steps,
and each validations step checks the batch after the model step before it. A shadow step runs its
champion like a model step, then each challenger on the same feeds; a challenger that fails is
reported with the records it ran on and never changes their result. A split step's arm is chosen for
every record before the batch runs (so a batch that is retried record by record keeps each record's
arm); the step runs each arm's records as one sub-batch and scatters the outputs back in order.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import orjson

from joey_core.models import TensorSpec
from joey_core.records import RecordError, decode_input, dumps_text
from joey_engine import metrics
from joey_engine.checks import Checks
from joey_engine.deployment import Deployment, Split, Step, Validations
from joey_engine.runtime import ModelRuntime, RuntimeAborted

log = logging.getLogger(__name__)


# Not frozen: a frozen dataclass pays an object.__setattr__ call per field at creation, and a
# Success is made for every record (treat it as immutable all the same).
@dataclass
class Success:
    inputs: dict[str, Any]
    """The input record as received, including fields that are not model inputs."""
    outputs: dict[str, Any]
    """The last step's outputs for this record, as plain Python values."""
    elapsed_ns: tuple[int, ...]
    """Time of each step for the batch this record ran in."""
    check_failures: tuple[str, ...] = ()
    """The checks that flagged this record, in the deployment's order of check names."""
    check_errors: tuple[str, ...] = ()
    """Why checks that count as failed could not be evaluated on this record."""
    shadow: dict[str, dict[str, Any]] | None = None
    """Each challenger's outputs for this record, by model name; None when the pipeline has no shadow step."""
    shadow_errors: dict[str, str] | None = None
    """Why challengers failed on this record, by model name (the ones missing from ``shadow``)."""
    split: tuple[str, ...] | None = None
    """The model each split step chose for this record, in step order; None without split steps."""

    @cached_property
    def outputs_json(self) -> str:
        """``outputs`` as JSON text, encoded once for both the output record and the log."""
        return _json_text(self.outputs)

    @cached_property
    def shadow_json(self) -> str:
        """``shadow`` as JSON text, for both the output record and the log."""
        return _json_text(self.shadow)


def _json_text(value: Any) -> str:
    """``dumps_text(value)`` by orjson, ten times faster, where it encodes the same JSON value: plain
    Python values (what models' ``tolist()`` gives), non-finite floats as null as dumps_text does. What
    orjson refuses (numpy values from a python step, integers beyond 64 bits, non-string keys, lone
    surrogates) goes to dumps_text. The text may differ (1e-05 is 1e-5, non-ASCII is not escaped), the
    value does not."""
    try:
        return orjson.dumps(value).decode()
    except TypeError:
        return dumps_text(value)


@dataclass(frozen=True)
class Failure:
    reason: str
    inputs: dict[str, Any] | None
    """The input record when it was a JSON object, else None."""
    split: tuple[str, ...] | None = None
    """As in Success, when the record failed after its split arms were chosen."""


Result = Success | Failure


class StepError(Exception):
    """A model step failed on a batch; the message names the step."""


class StepAborted(StepError):
    """A model step's runtime gave up on the whole batch (a python step crashed or hung). A hung batch
    fails whole, without the one-by-one retry that could cost a timeout per record; a crashed one
    (``crashed``) is split in halves until the records that crash it fail alone."""

    def __init__(self, message: str, crashed: bool) -> None:
        super().__init__(message)
        self.crashed = crashed


@dataclass(frozen=True)
class _RecordInput:
    """An input of the first model step and the record field that feeds it."""

    tensor: TensorSpec
    field: str

    @cached_property
    def label(self) -> str:
        """How error messages name it: by the field too when the user's record names it differently."""
        name = repr(self.tensor.name)
        return name if self.field == self.tensor.name else f"{name} (record field {self.field!r})"

    @cached_property
    def signature(self) -> str:
        """How a missing input's error lists it: with the field that feeds it, its dtype and shape."""
        spec = f"{self.tensor.dtype} {_shape_text(self.tensor.shape[1:])}"
        fed = "" if self.field == self.tensor.name else f"record field {self.field!r}, "
        return f"{self.tensor.name!r} ({fed}{spec})"


@dataclass(frozen=True)
class _Challenger:
    what: str
    """How errors name it."""
    step: Step
    runtime: ModelRuntime
    sources: tuple[tuple[TensorSpec, str], ...]
    """The inputs taken from the champion's feeds, as in ``_ModelStage.sources``."""
    record_inputs: tuple[_RecordInput, ...]
    """First step only: the inputs the champion's feeds cannot give (another record field, dtype or
    shape), converted from each record, so that a record unfit for the challenger fails only there."""


@dataclass(frozen=True)
class _ModelStage:
    position: int
    step: Step
    runtime: ModelRuntime
    sources: tuple[tuple[TensorSpec, str], ...]
    """Each input with the name it takes from the feeds it runs on: an output of the model step before, or
    for the first model step the input's own name (its feeds are built from the record under input names)."""
    challengers: tuple[_Challenger, ...] = ()

    @cached_property
    def what(self) -> str:
        return f"step {self.position} (model {self.step.model!r} v{self.step.version})"

    @cached_property
    def label(self) -> str:
        """How a step fed by this one names it."""
        return f"step {self.position} (model {self.step.model!r})"

    @property
    def declared_outputs(self) -> tuple[TensorSpec, ...]:
        return self.step.outputs

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return self.runtime.outputs


@dataclass(frozen=True)
class _Arm:
    what: str
    step: Step
    runtime: ModelRuntime
    sources: tuple[tuple[TensorSpec, str], ...]
    """As in ``_ModelStage.sources``: for the first step, the record inputs' names that feed it."""


MODEL_SPLIT = "_model_split"
"""The output field naming the model(s) a split chose for a record, as Wallaroo's ``out._model_split``."""


@dataclass(frozen=True)
class _SplitStage:
    position: int
    split: Split
    arms: tuple[_Arm, ...]
    index: int
    """Which of the deployment's split steps this is: its column of the batch's choices."""

    @cached_property
    def label(self) -> str:
        return f"step {self.position} (split of {', '.join(repr(a.step.model) for a in self.arms)})"

    @cached_property
    def names(self) -> np.ndarray:
        """The arms' model names, indexable by an array of arm indexes."""
        return np.asarray([a.step.model for a in self.arms], dtype=object)

    @property
    def declared_outputs(self) -> tuple[TensorSpec, ...]:
        return self.arms[0].step.outputs

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return self.arms[0].runtime.outputs

    @cached_property
    def _cumulative(self) -> np.ndarray:
        weights = np.asarray(self.split.weights, dtype=np.float64)
        return np.cumsum(weights) / weights.sum()

    @cached_property
    def _routes(self) -> dict[str, int]:
        index = {arm.step.model: a for a, arm in enumerate(self.arms)}
        return {value: index[model] for value, model in self.split.routes}

    def choose(self, rows: Sequence[dict[str, Any]], rng: np.random.Generator) -> np.ndarray:
        """The arm index of each record."""
        split = self.split
        if split.meta_key:
            return np.fromiter(
                (
                    self._routes.get(_key_text(row[split.meta_key]), 0) if split.meta_key in row else 0
                    for row in rows
                ),
                dtype=np.intp,
                count=len(rows),
            )
        units = rng.random(len(rows))
        if split.hash_key:
            for i, row in enumerate(rows):
                if split.hash_key in row:
                    units[i] = _hash_unit(row[split.hash_key])
        # Rounding can leave the last cumulative weight a hair under 1.
        return np.minimum(np.searchsorted(self._cumulative, units, side="right"), len(self.arms) - 1)


def _canonical_json(value: Any) -> str:
    """One text per JSON value: sorted keys, no spaces, ASCII only (so even a lone surrogate encodes)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _key_text(value: Any) -> str:
    """A key split compares values as text: a string as is, anything else as its JSON text."""
    return value if isinstance(value, str) else _canonical_json(value)


def _hash_unit(value: Any) -> float:
    """``value`` mapped to [0, 1) by a hash of its canonical JSON that is the same in every process."""
    digest = hashlib.blake2b(_canonical_json(value).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


@dataclass(frozen=True)
class _Shadowed:
    """A challenger's run over a batch."""

    model: str
    columns: dict[str, list[Any]]
    """Output name -> one value per record of the batch (None where it failed)."""
    errors: dict[int, str]
    """Why it failed, by record index in the batch."""


@dataclass(frozen=True)
class _ChecksStage:
    position: int
    checks: Checks
    columns: np.ndarray
    """Where each of the step's checks goes among the deployment's check names."""


_Feeder = _ModelStage | _SplitStage
"""A stage whose outputs feed what follows."""


@dataclass(frozen=True)
class _Ran:
    """A batch after all steps."""

    outputs: dict[str, np.ndarray]
    elapsed_ns: tuple[int, ...]
    flagged: np.ndarray | None
    """Bool array (records, check names), None when the pipeline has no checks."""
    problems: dict[int, list[str]]
    shadow: list[_Shadowed] | None
    """None when the pipeline has no shadow step."""


_KIND_NAMES = {"f": "a number", "i": "an integer", "u": "an integer", "b": "a boolean", "U": "a string"}
# JSON value kinds each model dtype kind accepts: integers are valid floats, nothing else converts implicitly.
_ACCEPTED_KINDS = {"f": "fiu", "i": "iu", "u": "iu", "b": "b", "U": "U"}
_NULL_FLOAT = (
    ": JSON has no NaN, so a NaN or missing value arrives as null, and inputs must be finite numbers; "
    "fill or drop missing values before sending"
)
_SHOWN_FIELDS = 10
# The Python type of a parsed JSON value of each kind.
_JSON_TYPES: dict[str, type] = {"f": float, "i": int, "u": int, "b": bool, "U": str}


def _shape_text(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(dim) for dim in shape) + "]"


def _convert(tensor: TensorSpec, value: Any, label: str) -> np.ndarray:
    """One record's value for ``tensor`` as an array of the model's dtype, without the batch dimension.

    ``label`` names the input in error messages.
    """
    target = np.dtype(tensor.dtype)
    expected_shape = tensor.shape[1:]
    try:
        raw = np.asarray(value)
    except ValueError:
        raise RecordError(
            f"input {label} is not a rectangular array: expected shape {_shape_text(expected_shape)}"
        ) from None
    accepted = _ACCEPTED_KINDS.get(target.kind, target.kind)
    if raw.dtype.kind not in accepted:
        raise _wrong_values(tensor, value, accepted, label)
    want_text = _shape_text(expected_shape)
    if raw.ndim != len(expected_shape) or any(
        want >= 0 and want != got for want, got in zip(expected_shape, raw.shape, strict=True)
    ):
        raise RecordError(f"input {label} has shape {_shape_text(raw.shape)}, expected {want_text}")
    if target.kind == "U":
        return raw
    try:
        # Float overflow shows up as inf and is rejected below with the NaN check.
        with np.errstate(over="ignore"):
            array = np.asarray(value, dtype=target)
    except OverflowError:
        raise RecordError(f"input {label} has values out of range for {tensor.dtype}") from None
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        first = tuple(np.argwhere(~np.isfinite(array))[0])
        sent = raw[first]
        if np.isfinite(sent):
            raise RecordError(
                f"input {label} has a value out of range for {tensor.dtype}{_at(first)} ({sent})"
            )
        raise RecordError(
            f"input {label} contains NaN/inf{_at(first)} ({sent}): inputs must be finite numbers"
        )
    return array


def _at(index: tuple[int, ...]) -> str:
    """Where an element is within a record's value: nothing for a scalar input."""
    return f" at element {list(map(int, index))}" if index else ""


def _wrong_values(tensor: TensorSpec, value: Any, accepted: str, label: str) -> RecordError:
    """The error naming the first element of ``value`` of a kind ``tensor`` does not accept, and where."""
    elements = np.asarray(value, dtype=object)
    flat = elements.ravel()
    # Each element's type is taken in numpy's loop: a Python loop over a 224x224x3 image costs ten times more.
    types = np.frompyfunc(type, 1, 1)(flat)
    wrong = np.flatnonzero(~np.logical_or.reduce([types == _JSON_TYPES[k] for k in accepted]))
    first = int(wrong[0]) if wrong.size else None
    if "i" in accepted:  # an integer beyond 64 bits is an int to Python but not to numpy
        ints = np.flatnonzero(types == _JSON_TYPES["i"])
        big = (int(i) for i in ints[: None if first is None else np.searchsorted(ints, first)])
        low, high = _int_range(tensor.dtype)
        first = next((i for i in big if not low <= flat[i] <= high), first)
    if first is None:  # numpy found a kind no single element has: report the whole value
        return RecordError(f"input {label} must hold {tensor.dtype} values, got {dumps_text(value)[:60]}")
    element = flat[first]
    kind = _json_kind(element)
    at = _at(tuple(int(i) for i in np.unravel_index(first, elements.shape)))
    wants = f"input {label} must hold {tensor.dtype} values"
    if element is None:
        why = _NULL_FLOAT if np.dtype(tensor.dtype).kind == "f" else ""
        return RecordError(f"{wants}, got null{at}{why}")
    sent = dumps_text(element)[:60]
    if kind in ("i", "big") and np.dtype(tensor.dtype).kind in "iu":
        return RecordError(f"{wants}, got an integer out of range for {tensor.dtype}{at} ({sent})")
    if kind in ("i", "big"):
        return RecordError(
            f"{wants}, got an integer out of range{at} ({sent}): JSON integers must fit in 64 bits"
        )
    if kind == "f" and np.dtype(tensor.dtype).kind in "iu":
        got = "a non-integer number" if not float(element).is_integer() else "a number written as a float"
        return RecordError(f"{wants}, got {got}{at} ({sent})")
    got = _KIND_NAMES.get(kind, "an object" if isinstance(element, dict) else type(element).__name__)
    return RecordError(f"{wants}, got {got}{at} ({sent})")


def _int_range(dtype: str) -> tuple[int, int]:
    """The integers an input takes: its dtype's range, or 64-bit ones for a float input."""
    if np.dtype(dtype).kind in "iu":
        info = np.iinfo(dtype)
        return int(info.min), int(info.max)
    return -(2**63), 2**64 - 1


def _json_kind(element: Any) -> str:
    """The numpy kind of a parsed JSON value ("big" for an integer numpy cannot hold, "null" for None)."""
    if element is None:
        return "null"
    if isinstance(element, bool):
        return "b"
    if isinstance(element, int):
        return "i" if -(2**63) <= element < 2**64 else "big"
    if isinstance(element, float):
        return "f"
    if isinstance(element, str):
        return "U"
    return "O"


def _fields(row: dict[str, Any]) -> str:
    """The fields a record has, as a missing input's error names them."""
    if not row:
        return "the record has no fields"
    names = ", ".join(repr(name) for name in list(row)[:_SHOWN_FIELDS])
    more = f", ... ({len(row)} fields)" if len(row) > _SHOWN_FIELDS else ""
    return f"the record has fields {names}{more}"


def _fed(name: str, source: str) -> str:
    """An input as the SDK shows a mapping: ``x<-probabilities``, or the bare name when fed by it."""
    return name if source == name else f"{name}<-{source}"


def _record_arrays(
    record_inputs: Sequence[_RecordInput], row: dict[str, Any], expects: str
) -> dict[str, np.ndarray]:
    """A record's value for each input; ``expects`` names who expects them in the error of a missing one."""
    missing = [i for i in record_inputs if i.field not in row]
    if missing:
        first = missing[0]
        where = (
            ""
            if first.field == first.tensor.name
            else f" (the pipeline reads it from record field {first.field!r})"
        )
        expected = ", ".join(i.signature for i in record_inputs)
        raise RecordError(
            f"missing input {first.tensor.name!r}{where}; {expects} expects inputs {expected}; {_fields(row)}"
        )
    return {i.tensor.name: _convert(i.tensor, row[i.field], i.label) for i in record_inputs}


def _fits(fed: TensorSpec, wanted: TensorSpec) -> bool:
    """Whether an array valid for ``fed`` is valid as is for ``wanted``."""
    return (
        fed.dtype == wanted.dtype
        and len(fed.shape) == len(wanted.shape)
        and all(want < 0 or want == got for want, got in zip(wanted.shape[1:], fed.shape[1:], strict=True))
    )


def _check_mapping(what: str, step: Step, runtime: ModelRuntime) -> None:
    names = [t.name for t in runtime.inputs]
    unknown = sorted({name for name, _ in step.input_mapping} - set(names))
    if unknown:
        raise ValueError(f"{what} maps inputs {unknown} that it does not have; its inputs are {names}")


def _chained(
    what: str, step: Step, runtime: ModelRuntime, before: _Feeder
) -> tuple[tuple[TensorSpec, str], ...]:
    """The inputs of a model fed by the model step before, with the output that feeds each."""
    sources = tuple((t, step.source(t.name)) for t in runtime.inputs)
    available = {t.name for t in before.declared_outputs}
    missing = [_fed(t.name, source) for t, source in sources if source not in available]
    if missing:
        raise ValueError(
            f"{what} needs inputs {missing} that {before.label} does not produce; "
            f"it produces {sorted(available)}"
        )
    return sources


def _by_record(shadowed: list[_Shadowed], n: int) -> list[tuple[dict[str, dict[str, Any]], dict[str, str]]]:
    """Each record's ``shadow`` and ``shadow_errors``."""
    per_record = []
    for i in range(n):
        shadow: dict[str, dict[str, Any]] = {}
        errors: dict[str, str] = {}
        for run in shadowed:
            reason = run.errors.get(i)
            if reason is None:
                shadow[run.model] = {name: column[i] for name, column in run.columns.items()}
            else:
                errors[run.model] = reason
        per_record.append((shadow, errors))
    return per_record


def _bisect(n: int, run: Callable[[int, int], list[Result]]) -> list[Result]:
    """The results of records ``0:n`` run as two halves, ``run(start, stop)`` each."""
    half = n // 2
    return [*run(0, half), *run(half, n)]


def _part(batch: Any, start: int, stop: int | None) -> Any:
    """Records ``start:stop`` of a batch: per-record arrays, a dict of columns, split choices (or None)."""
    if isinstance(batch, dict):
        return {name: column[start:stop] for name, column in batch.items()}
    return None if batch is None else batch[start:stop]


def _cast(array: np.ndarray, dtype: str) -> np.ndarray:
    target = np.dtype(dtype)
    if target.kind == "U":
        return array  # onnxruntime takes str and object arrays alike
    return array if array.dtype == target else array.astype(target)


class PipelineRunner:
    """Thread-safe: holds only loaded runtimes, which support concurrent ``predict`` calls."""

    def __init__(self, deployment: Deployment, runtimes: Sequence[ModelRuntime]) -> None:
        """``runtimes`` are those of ``deployment.artifact_steps``, in order; validations steps need none."""
        models = deployment.artifact_steps
        if len(runtimes) != len(models):
            raise ValueError(f"{len(models)} models to run but {len(runtimes)} runtimes")
        self._check_names = deployment.check_names
        self._has_shadow = deployment.has_shadow
        self._stages: list[_ModelStage | _ChecksStage | _SplitStage] = []
        self._splits: list[_SplitStage] = []
        self._rng = np.random.default_rng()
        loaded = iter(runtimes)
        before: _Feeder | None = None
        for k, step in enumerate(deployment.steps, start=1):
            if isinstance(step, Validations):
                checks = Checks(step, k, None if before is None else before.outputs)
                columns = np.asarray([self._check_names.index(name) for name in checks.names])
                self._stages.append(_ChecksStage(k, checks, columns))
                continue
            if isinstance(step, Split):
                before = self._split(k, step, [next(loaded) for _ in step.arms], before)
                self._splits.append(before)
                self._stages.append(before)
                continue
            runtime = next(loaded)
            what = f"step {k} (model {step.model!r})"
            _check_mapping(what, step, runtime)
            if before is None:
                self._record_inputs = tuple(_RecordInput(t, step.source(t.name)) for t in runtime.inputs)
                sources = tuple((t, t.name) for t in runtime.inputs)
            else:
                sources = _chained(what, step, runtime, before)
            challengers = tuple(
                self._challenger(k, challenger, next(loaded), before) for challenger in step.challengers
            )
            before = _ModelStage(k, step, runtime, sources, challengers)
            self._stages.append(before)
        self._step_seconds = [
            metrics.STEP_SECONDS.labels(deployment.workspace, deployment.pipeline, str(k))
            for k in range(1, len(deployment.steps) + 1)
        ]

    def _split(
        self, k: int, split: Split, runtimes: list[ModelRuntime], before: _Feeder | None
    ) -> _SplitStage:
        arms: list[_Arm] = []
        for step, runtime in zip(split.arms, runtimes, strict=True):
            what = f"step {k} (split arm {step.model!r} v{step.version})"
            _check_mapping(what, step, runtime)
            if before is not None:
                sources = _chained(what, step, runtime, before)
            elif not arms:
                # The first arm defines how records are validated and stacked; the others read its fields.
                self._record_inputs = tuple(_RecordInput(t, step.source(t.name)) for t in runtime.inputs)
                sources = tuple((t, t.name) for t in runtime.inputs)
            else:
                fed = {i.field: i.tensor.name for i in self._record_inputs}
                unfed = [t.name for t in runtime.inputs if step.source(t.name) not in fed]
                if unfed:
                    raise ValueError(f"{what} reads record fields for {unfed} that the first arm does not")
                sources = tuple((t, fed[step.source(t.name)]) for t in runtime.inputs)
            produces = sorted(t.name for t in runtime.outputs)
            if arms and produces != sorted(t.name for t in arms[0].runtime.outputs):
                raise ValueError(
                    f"{what} produces {produces}, unlike the arm {arms[0].step.model!r}: "
                    f"{sorted(t.name for t in arms[0].runtime.outputs)}"
                )
            arms.append(_Arm(what, step, runtime, sources))
        return _SplitStage(k, split, tuple(arms), len(self._splits))

    def _challenger(self, k: int, step: Step, runtime: ModelRuntime, before: _Feeder | None) -> _Challenger:
        what = f"challenger {step.model!r} v{step.version} of step {k}"
        _check_mapping(what, step, runtime)
        if before is not None:
            return _Challenger(what, step, runtime, _chained(what, step, runtime, before), ())
        # Inputs that read the same field as the champion's at a compatible type reuse its converted column.
        fed = {i.field: i.tensor for i in self._record_inputs}
        sources: list[tuple[TensorSpec, str]] = []
        record_inputs: list[_RecordInput] = []
        for tensor in runtime.inputs:
            field = step.source(tensor.name)
            champion = fed.get(field)
            if champion is not None and _fits(champion, tensor):
                sources.append((tensor, champion.name))
            else:
                record_inputs.append(_RecordInput(tensor, field))
        return _Challenger(what, step, runtime, tuple(sources), tuple(record_inputs))

    def run(
        self, values: Sequence[bytes | None], failed: Mapping[int, Failure] | None = None
    ) -> list[Result]:
        """One result per value, in order. ``failed``: records that fail without being run, by index (a
        replica drops those past their deadline); they take their place among the results as they are.

        Never raises for what the records hold: a batch that makes the runner raise (a bug one record
        trips over) is bisected like one that crashes a step, until the record that does fails alone; a
        batch of one record is answered by its failure. An error that is not any record's fault raises:
        OSError and MemoryError (the machine is short of processes, files or memory), or an exception
        every record of a larger batch raises alone (a broken runtime); the replica then restarts and the
        batch is retried instead of being answered with errors.
        """
        failed = failed or {}
        try:
            return self._run(values, failed)
        except (OSError, MemoryError):
            raise
        except Exception as exc:
            log.exception("batch of %d records failed in the engine; isolating the record", len(values))
            ran: list[bool] = []
            results = self._isolated(values, failed, ran, exc)
            if not ran and len(values) > 1:
                raise
            return results

    def _isolating(
        self, values: Sequence[bytes | None], failed: Mapping[int, Failure], ran: list[bool]
    ) -> list[Result]:
        """Run ``values``; when they raise, bisect down to the records that raise alone, each answered by
        a failure. ``ran`` gets an entry for every part that ran without raising."""
        try:
            results = self._run(values, failed)
        except (OSError, MemoryError):
            raise
        except Exception as exc:
            return self._isolated(values, failed, ran, exc)
        ran.append(True)
        return results

    def _isolated(
        self,
        values: Sequence[bytes | None],
        failed: Mapping[int, Failure],
        ran: list[bool],
        exc: Exception,
    ) -> list[Result]:
        """The results of ``values``, which raised ``exc`` when run together: one record's failure, or
        its halves run apart (not the whole again)."""
        if len(values) == 1:
            return [
                failed.get(0)
                or Failure(f"the engine failed on this record: {type(exc).__name__}: {exc}", None)
            ]
        return _bisect(
            len(values),
            lambda start, stop: self._isolating(
                values[start:stop], {i - start: f for i, f in failed.items() if start <= i < stop}, ran
            ),
        )

    def _run(self, values: Sequence[bytes | None], failed: Mapping[int, Failure]) -> list[Result]:
        invalid: dict[int, Failure] = dict(failed)
        rows: list[dict[str, Any]] = []
        for i, value in enumerate(values):
            if i in invalid:
                continue
            try:
                rows.append(decode_input(value))
            except RecordError as exc:
                invalid[i] = Failure(str(exc), None)
        feeds = self._stack_batch(rows, values) if rows else None
        if feeds is None:
            # Something in the batch needs a closer look: validate record by record, so each bad one
            # fails alone with its own reason.
            valid_rows: list[dict[str, Any]] = []
            arrays: list[dict[str, np.ndarray]] = []
            decoded = iter(rows)
            for i in range(len(values)):
                if i in invalid:
                    continue
                row = next(decoded)
                try:
                    arrays.append(self._validate(row))
                    valid_rows.append(row)
                except RecordError as exc:
                    invalid[i] = Failure(str(exc), row)
            rows = valid_rows
        ran = iter(self._run_valid(rows, arrays if feeds is None else None, feeds) if rows else [])
        return [invalid[i] if i in invalid else next(ran) for i in range(len(values))]

    def _stack_batch(
        self, rows: list[dict[str, Any]], values: Sequence[bytes | None]
    ) -> dict[str, np.ndarray] | None:
        """The model feeds of a batch in which every record is valid, converted column-wise in one go.

        None when any record might be invalid; the caller then validates record by record, which
        gives the same verdicts and names the culprit. JSON booleans are excluded up front: numpy
        would quietly turn them into numbers when they sit next to numbers in one column.
        """
        if any(b"true" in v or b"false" in v for v in values if v is not None):
            return None
        feeds = {}
        for record_input in self._record_inputs:
            tensor = record_input.tensor
            target = np.dtype(tensor.dtype)
            if target.kind not in "fiu":
                return None
            try:
                column = np.asarray([row[record_input.field] for row in rows])
            except (KeyError, ValueError):
                return None
            expected = tensor.shape[1:]
            if (
                column.dtype.kind not in _ACCEPTED_KINDS[target.kind]
                or column.ndim != 1 + len(expected)
                or any(
                    want >= 0 and want != got for want, got in zip(expected, column.shape[1:], strict=True)
                )
            ):
                return None
            if target.kind in "iu" and column.size:
                limits = np.iinfo(target)
                if column.min() < limits.min or column.max() > limits.max:
                    return None
            with np.errstate(over="ignore"):
                array = column.astype(target, copy=False)
            if target.kind == "f" and not np.isfinite(array).all():
                return None
            feeds[tensor.name] = array
        return feeds

    def _validate(self, row: dict[str, Any]) -> dict[str, np.ndarray]:
        return _record_arrays(self._record_inputs, row, "the pipeline")

    def _run_valid(
        self,
        rows: list[dict[str, Any]],
        arrays: list[dict[str, np.ndarray]] | None,
        feeds: dict[str, np.ndarray] | None,
        choices: np.ndarray | None = None,
    ) -> list[Result]:
        """``choices``: the split arms already drawn for these records (a retried record keeps its arm)."""
        if choices is None:
            choices = self._choose(rows)
        try:
            if feeds is None:
                assert arrays is not None
                names = [i.tensor.name for i in self._record_inputs]
                feeds = {name: np.stack([a[name] for a in arrays]) for name in names}
            ran = self._infer(feeds, rows, choices)
        except StepAborted as exc:
            if not exc.crashed or len(rows) == 1:
                chosen = [None] * len(rows) if choices is None else self._chosen(choices)
                return [Failure(str(exc), row, split) for row, split in zip(rows, chosen, strict=True)]
            # A restart costs a fraction of a second: bisecting finds the culprits in about log2(n) of them.
            log.warning("batch of %d records crashed a step (%s); retrying it in halves", len(rows), exc)
            return _bisect(
                len(rows),
                lambda start, stop: self._run_valid(
                    rows[start:stop],
                    _part(arrays, start, stop),
                    _part(feeds, start, stop),
                    _part(choices, start, stop),
                ),
            )
        except (StepError, ValueError) as exc:
            # Dynamic dimensions of different sizes cannot be stacked, and one odd record can make a model
            # fail the whole batch: run the records one by one so only the culprit fails.
            if len(rows) > 1:
                log.warning("batch of %d records failed (%s); running them one at a time", len(rows), exc)
            if arrays is None:
                arrays = [self._validate(row) for row in rows]
            return [
                self._run_one(row, array, None if choices is None else choices[i : i + 1])
                for i, (row, array) in enumerate(zip(rows, arrays, strict=True))
            ]
        return self._successes(rows, ran, choices)

    def _choose(self, rows: list[dict[str, Any]]) -> np.ndarray | None:
        """The arm of every split step for each record: (records, split steps); None without splits."""
        if not self._splits:
            return None
        return np.column_stack([stage.choose(rows, self._rng) for stage in self._splits])

    def _chosen(self, choices: np.ndarray) -> list[tuple[str, ...]]:
        """Each record's chosen model names, in split step order."""
        names = [stage.names[choices[:, stage.index]].tolist() for stage in self._splits]
        return list(zip(*names, strict=True))

    def _run_one(
        self, row: dict[str, Any], array: dict[str, np.ndarray], choices: np.ndarray | None
    ) -> Result:
        try:
            ran = self._infer({name: value[np.newaxis] for name, value in array.items()}, [row], choices)
        except StepError as exc:
            return Failure(str(exc), row, None if choices is None else self._chosen(choices)[0])
        return self._successes([row], ran, choices)[0]

    def _successes(self, rows: list[dict[str, Any]], ran: _Ran, choices: np.ndarray | None) -> list[Result]:
        columns = {name: output.tolist() for name, output in ran.outputs.items()}
        elapsed = ran.elapsed_ns
        if ran.flagged is None and ran.shadow is None and choices is None:
            return [
                Success(row, {name: column[i] for name, column in columns.items()}, elapsed)
                for i, row in enumerate(rows)
            ]
        n = len(rows)
        failures = [()] * n if ran.flagged is None else self._failures(ran.flagged)
        shadows = [(None, None)] * n if ran.shadow is None else _by_record(ran.shadow, n)
        chosen_all: list[tuple[str, ...]] | list[None] = (
            [None] * n if choices is None else self._chosen(choices)
        )
        results: list[Result] = []
        for i, row in enumerate(rows):
            outputs = {name: column[i] for name, column in columns.items()}
            chosen = chosen_all[i]
            if chosen is not None:
                outputs[MODEL_SPLIT] = chosen[0] if len(chosen) == 1 else list(chosen)
            results.append(
                Success(
                    row,
                    outputs,
                    elapsed,
                    failures[i],
                    tuple(ran.problems.get(i, ())),
                    shadow=shadows[i][0],
                    shadow_errors=shadows[i][1],
                    split=chosen,
                )
            )
        return results

    def _failures(self, flagged: np.ndarray) -> list[tuple[str, ...]]:
        """Each record's flagged check names; records flagged by none (the usual case) share one tuple."""
        failures: list[tuple[str, ...]] = [()] * len(flagged)
        for i in np.flatnonzero(flagged.any(axis=1)):
            failures[i] = tuple(self._check_names[j] for j in np.flatnonzero(flagged[i]))
        return failures

    def _infer(
        self, feeds: dict[str, np.ndarray], rows: list[dict[str, Any]], choices: np.ndarray | None
    ) -> _Ran:
        n = len(rows)
        elapsed: list[int] = []
        current = feeds
        outputs: dict[str, np.ndarray] = {}
        flagged = np.zeros((n, len(self._check_names)), dtype=bool) if self._check_names else None
        problems: dict[int, list[str]] = {}
        shadowed: list[_Shadowed] | None = [] if self._has_shadow else None
        for stage in self._stages:
            start = time.perf_counter_ns()
            if isinstance(stage, _ChecksStage):
                assert flagged is not None
                # ``outputs`` are the last model step's so far: the one before this validations step.
                verdicts = stage.checks.evaluate(rows, outputs)
                flagged[:, stage.columns] |= verdicts.failed
                for i, reasons in verdicts.problems.items():
                    problems.setdefault(i, []).extend(reasons)
            elif isinstance(stage, _SplitStage):
                assert choices is not None
                outputs = current = self._run_split(stage, current, choices[:, stage.index])
            else:
                step_feeds = {t.name: _cast(current[source], t.dtype) for t, source in stage.sources}
                produced = self._run_model(stage.what, stage.step, stage.runtime, step_feeds, n)
                if stage.challengers:
                    assert shadowed is not None
                    shadowed.extend(self._shadow(c, current, rows) for c in stage.challengers)
                outputs = current = produced
            elapsed.append(time.perf_counter_ns() - start)
            self._step_seconds[stage.position - 1].observe(elapsed[-1] / 1e9)
        return _Ran(current, tuple(elapsed), flagged, problems, shadowed)

    def _run_split(
        self, stage: _SplitStage, current: dict[str, np.ndarray], chosen: np.ndarray
    ) -> dict[str, np.ndarray]:
        """Each arm run on its records as one sub-batch, the outputs scattered back into record order."""
        n = len(chosen)
        parts: list[tuple[np.ndarray, dict[str, np.ndarray]]] = []
        for a, arm in enumerate(stage.arms):
            picked = np.flatnonzero(chosen == a)
            if not picked.size:
                continue
            whole = picked.size == n
            feeds = {
                t.name: _cast(current[source] if whole else current[source][picked], t.dtype)
                for t, source in arm.sources
            }
            parts.append((picked, self._run_model(arm.what, arm.step, arm.runtime, feeds, picked.size)))
        if len(parts) == 1:
            return parts[0][1]
        merged: dict[str, np.ndarray] = {}
        for name in parts[0][1]:
            pieces = [produced[name] for _, produced in parts]
            tails = {piece.shape[1:] for piece in pieces}
            if len(tails) > 1:
                # Dynamic dimensions differ between arms; one record at a time they never need merging.
                raise StepError(f"{stage.label}: arms produce {name!r} in shapes {sorted(tails)}")
            column = np.empty((n, *pieces[0].shape[1:]), dtype=np.result_type(*pieces))
            for (picked, _), piece in zip(parts, pieces, strict=True):
                column[picked] = piece
            merged[name] = column
        return merged

    def _run_model(
        self, what: str, step: Step, runtime: ModelRuntime, feeds: dict[str, np.ndarray], n: int
    ) -> dict[str, np.ndarray]:
        try:
            produced = self._predict(runtime, feeds, n, step.config.single)
        except RuntimeAborted as exc:
            raise StepAborted(f"{what} failed: {exc}", exc.crashed) from exc
        except Exception as exc:
            raise StepError(f"{what} failed: {exc}") from exc
        for name, output in produced.items():
            if output.ndim == 0 or output.shape[0] != n:
                raise StepError(
                    f"{what} output {name!r} has shape {list(output.shape)}, "
                    f"expected a first dimension of {n} (one row per record)"
                )
        return produced

    def _shadow(
        self, challenger: _Challenger, current: dict[str, np.ndarray], rows: list[dict[str, Any]]
    ) -> _Shadowed:
        """Run a challenger on the feeds its champion ran on; whatever goes wrong is only reported."""
        model, n = challenger.step.model, len(rows)
        errors: dict[int, str] = {}
        kept: Sequence[int] = range(n)  # the records it runs on
        feeds = {t.name: current[source] for t, source in challenger.sources}
        arrays: list[dict[str, np.ndarray]] = []
        if challenger.record_inputs:
            fit = []
            for i, row in enumerate(rows):
                try:
                    arrays.append(_record_arrays(challenger.record_inputs, row, "the model"))
                    fit.append(i)
                except RecordError as exc:
                    errors[i] = str(exc)
            if not fit:
                return _Shadowed(model, {}, errors)
            if len(fit) < n:
                kept = fit
                feeds = {name: value[fit] for name, value in feeds.items()}
        try:
            # Records whose dynamic dimensions differ cannot be stacked: that too is only the challenger's.
            names = [i.tensor.name for i in challenger.record_inputs]
            feeds |= {name: np.stack([a[name] for a in arrays]) for name in names}
            feeds = {t.name: _cast(feeds[t.name], t.dtype) for t in challenger.runtime.inputs}
            produced = self._run_model(challenger.what, challenger.step, challenger.runtime, feeds, len(kept))
        except Exception as exc:  # a challenger must never fail the record
            reason = str(exc)
            errors.update(dict.fromkeys(kept, reason))
            return _Shadowed(model, {}, errors)
        if not errors:
            return _Shadowed(model, {name: output.tolist() for name, output in produced.items()}, errors)
        columns: dict[str, list[Any]] = {}
        for name, output in produced.items():
            column: list[Any] = [None] * n
            for i, value in zip(kept, output.tolist(), strict=True):
                column[i] = value
            columns[name] = column
        return _Shadowed(model, columns, errors)

    @staticmethod
    def _predict(
        runtime: ModelRuntime, feeds: dict[str, np.ndarray], n: int, single: bool
    ) -> dict[str, np.ndarray]:
        if n == 1 or (not single and all(t.shape[:1] == (-1,) for t in runtime.inputs)):
            return runtime.predict(feeds)
        # A fixed first dimension (usually 1), or batch_config "single", means one record per call.
        parts = [runtime.predict({name: value[i : i + 1] for name, value in feeds.items()}) for i in range(n)]
        return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}
