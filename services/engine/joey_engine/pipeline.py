"""Runs a batch of raw input records through a deployment's steps (no Kafka here).

Each record is validated on its own, so a bad record fails alone with a reason naming the
problem; the valid ones are stacked into one batch per input and run through the model steps,
and each validations step checks the batch after the model step before it. A shadow step runs its
champion like a model step, then each challenger on the same feeds; a challenger that fails is
reported with the records it ran on and never changes their result.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from joey.records import RecordError, decode_input, dumps_text
from joey_engine import metrics
from joey_engine.checks import Checks
from joey_engine.deployment import Deployment, Step, Tensor, Validations
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

    @cached_property
    def outputs_json(self) -> str:
        """``outputs`` as JSON text, encoded once for both the output record and the log."""
        return dumps_text(self.outputs)

    @cached_property
    def shadow_json(self) -> str:
        """``shadow`` as JSON text, for both the output record and the log."""
        return dumps_text(self.shadow)


@dataclass(frozen=True)
class Failure:
    reason: str
    inputs: dict[str, Any] | None
    """The input record when it was a JSON object, else None."""


Result = Success | Failure


class StepError(Exception):
    """A model step failed on a batch; the message names the step."""


class StepAborted(StepError):
    """A model step's runtime gave up on the whole batch (a python step crashed or hung): its records
    all fail, without the one-by-one retry that could cost a timeout per record."""


@dataclass(frozen=True)
class _RecordInput:
    """An input of the first model step and the record field that feeds it."""

    tensor: Tensor
    field: str

    @cached_property
    def label(self) -> str:
        """How error messages name it: by the field too when the user's record names it differently."""
        name = repr(self.tensor.name)
        return name if self.field == self.tensor.name else f"{name} (record field {self.field!r})"


@dataclass(frozen=True)
class _Challenger:
    what: str
    """How errors name it."""
    step: Step
    runtime: ModelRuntime
    sources: tuple[tuple[Tensor, str], ...]
    """The inputs taken from the champion's feeds, as in ``_ModelStage.sources``."""
    record_inputs: tuple[_RecordInput, ...]
    """First step only: the inputs the champion's feeds cannot give (another record field, dtype or
    shape), converted from each record, so that a record unfit for the challenger fails only there."""


@dataclass(frozen=True)
class _ModelStage:
    position: int
    step: Step
    runtime: ModelRuntime
    sources: tuple[tuple[Tensor, str], ...]
    """Each input with the name it takes from the feeds it runs on: an output of the model step before, or
    for the first model step the input's own name (its feeds are built from the record under input names)."""
    challengers: tuple[_Challenger, ...] = ()

    @cached_property
    def what(self) -> str:
        return f"step {self.position} (model {self.step.model!r} v{self.step.version})"


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


_KIND_NAMES = {"f": "numbers", "i": "integers", "u": "integers", "b": "booleans", "U": "strings"}
# JSON value kinds each model dtype kind accepts: integers are valid floats, nothing else converts implicitly.
_ACCEPTED_KINDS = {"f": "fiu", "i": "iu", "u": "iu", "b": "b", "U": "U"}


def _shape_text(shape: Sequence[int]) -> str:
    return "[" + ", ".join("?" if dim < 0 else str(dim) for dim in shape) + "]"


def _convert(tensor: Tensor, value: Any, label: str) -> np.ndarray:
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
    if raw.dtype.kind not in _ACCEPTED_KINDS.get(target.kind, target.kind):
        got = _KIND_NAMES.get(raw.dtype.kind, "null or mixed values")
        raise RecordError(f"input {label} must hold {tensor.dtype} values, got {got}")
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
        raise RecordError(f"input {label} contains NaN/inf")
    return array


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
        expected = ", ".join(i.label for i in record_inputs)
        raise RecordError(f"missing input {first.tensor.name!r}{where}; {expects} expects inputs {expected}")
    return {i.tensor.name: _convert(i.tensor, row[i.field], i.label) for i in record_inputs}


def _fits(fed: Tensor, wanted: Tensor) -> bool:
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
    what: str, step: Step, runtime: ModelRuntime, before: _ModelStage
) -> tuple[tuple[Tensor, str], ...]:
    """The inputs of a model fed by the model step before, with the output that feeds each."""
    sources = tuple((t, step.source(t.name)) for t in runtime.inputs)
    available = {t.name for t in before.step.outputs}
    missing = [_fed(t.name, source) for t, source in sources if source not in available]
    if missing:
        raise ValueError(
            f"{what} needs inputs {missing} that step {before.position} "
            f"(model {before.step.model!r}) does not produce; it produces {sorted(available)}"
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
        self._stages: list[_ModelStage | _ChecksStage] = []
        loaded = iter(runtimes)
        before: _ModelStage | None = None
        for k, step in enumerate(deployment.steps, start=1):
            if isinstance(step, Validations):
                checks = Checks(step, k, None if before is None else before.runtime.outputs)
                columns = np.asarray([self._check_names.index(name) for name in checks.names])
                self._stages.append(_ChecksStage(k, checks, columns))
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

    def _challenger(
        self, k: int, step: Step, runtime: ModelRuntime, before: _ModelStage | None
    ) -> _Challenger:
        what = f"challenger {step.model!r} v{step.version} of step {k}"
        _check_mapping(what, step, runtime)
        if before is not None:
            return _Challenger(what, step, runtime, _chained(what, step, runtime, before), ())
        # Inputs that read the same field as the champion's at a compatible type reuse its converted column.
        fed = {i.field: i.tensor for i in self._record_inputs}
        sources: list[tuple[Tensor, str]] = []
        record_inputs: list[_RecordInput] = []
        for tensor in runtime.inputs:
            field = step.source(tensor.name)
            champion = fed.get(field)
            if champion is not None and _fits(champion, tensor):
                sources.append((tensor, champion.name))
            else:
                record_inputs.append(_RecordInput(tensor, field))
        return _Challenger(what, step, runtime, tuple(sources), tuple(record_inputs))

    def run(self, values: Sequence[bytes | None]) -> list[Result]:
        """One result per value, in order."""
        invalid: dict[int, Failure] = {}
        rows: list[dict[str, Any]] = []
        for i, value in enumerate(values):
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
    ) -> list[Result]:
        try:
            if feeds is None:
                assert arrays is not None
                names = [i.tensor.name for i in self._record_inputs]
                feeds = {name: np.stack([a[name] for a in arrays]) for name in names}
            ran = self._infer(feeds, rows)
        except StepAborted as exc:
            return [Failure(str(exc), row) for row in rows]
        except (StepError, ValueError) as exc:
            # Dynamic dimensions of different sizes cannot be stacked, and one odd record can make a model
            # fail the whole batch: run the records one by one so only the culprit fails.
            if len(rows) > 1:
                log.warning("batch of %d records failed (%s); running them one at a time", len(rows), exc)
            if arrays is None:
                arrays = [self._validate(row) for row in rows]
            return [self._run_one(row, array) for row, array in zip(rows, arrays, strict=True)]
        return self._successes(rows, ran)

    def _run_one(self, row: dict[str, Any], array: dict[str, np.ndarray]) -> Result:
        try:
            ran = self._infer({name: value[np.newaxis] for name, value in array.items()}, [row])
        except StepError as exc:
            return Failure(str(exc), row)
        return self._successes([row], ran)[0]

    def _successes(self, rows: list[dict[str, Any]], ran: _Ran) -> list[Result]:
        columns = {name: output.tolist() for name, output in ran.outputs.items()}
        elapsed = ran.elapsed_ns
        if ran.flagged is None and ran.shadow is None:
            return [
                Success(row, {name: column[i] for name, column in columns.items()}, elapsed)
                for i, row in enumerate(rows)
            ]
        n = len(rows)
        failures = [()] * n if ran.flagged is None else self._failures(ran.flagged)
        shadows = [(None, None)] * n if ran.shadow is None else _by_record(ran.shadow, n)
        return [
            Success(
                row,
                {name: column[i] for name, column in columns.items()},
                elapsed,
                failures[i],
                tuple(ran.problems.get(i, ())),
                *shadows[i],
            )
            for i, row in enumerate(rows)
        ]

    def _failures(self, flagged: np.ndarray) -> list[tuple[str, ...]]:
        """Each record's flagged check names; records flagged by none (the usual case) share one tuple."""
        failures: list[tuple[str, ...]] = [()] * len(flagged)
        for i in np.flatnonzero(flagged.any(axis=1)):
            failures[i] = tuple(self._check_names[j] for j in np.flatnonzero(flagged[i]))
        return failures

    def _infer(self, feeds: dict[str, np.ndarray], rows: list[dict[str, Any]]) -> _Ran:
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
            else:
                step_feeds = {t.name: _cast(current[source], t.dtype) for t, source in stage.sources}
                produced = self._run_model(stage.what, stage.runtime, step_feeds, n)
                if stage.challengers:
                    assert shadowed is not None
                    shadowed.extend(self._shadow(c, current, rows) for c in stage.challengers)
                outputs = current = produced
            elapsed.append(time.perf_counter_ns() - start)
            self._step_seconds[stage.position - 1].observe(elapsed[-1] / 1e9)
        return _Ran(current, tuple(elapsed), flagged, problems, shadowed)

    def _run_model(
        self, what: str, runtime: ModelRuntime, feeds: dict[str, np.ndarray], n: int
    ) -> dict[str, np.ndarray]:
        try:
            produced = self._predict(runtime, feeds, n)
        except RuntimeAborted as exc:
            raise StepAborted(f"{what} failed: {exc}") from exc
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
            produced = self._run_model(challenger.what, challenger.runtime, feeds, len(kept))
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
    def _predict(runtime: ModelRuntime, feeds: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
        if n == 1 or all(t.shape[:1] == (-1,) for t in runtime.inputs):
            return runtime.predict(feeds)
        # A fixed first dimension (usually 1) means the model takes one record per call.
        parts = [runtime.predict({name: value[i : i + 1] for name, value in feeds.items()}) for i in range(n)]
        return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}
