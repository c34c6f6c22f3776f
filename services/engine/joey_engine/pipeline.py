"""Runs a batch of raw input records through a deployment's steps (no Kafka here).

Each record is validated on its own, so a bad record fails alone with a reason naming the
problem; the valid ones are stacked into one batch per input and run through the model steps,
and each validations step checks the batch after the model step before it.
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
from joey_engine.runtime import ModelRuntime

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

    @cached_property
    def outputs_json(self) -> str:
        """``outputs`` as JSON text, encoded once for both the output record and the log."""
        return dumps_text(self.outputs)


@dataclass(frozen=True)
class Failure:
    reason: str
    inputs: dict[str, Any] | None
    """The input record when it was a JSON object, else None."""


Result = Success | Failure


class StepError(Exception):
    """A model step failed on a batch; the message names the step."""


@dataclass(frozen=True)
class _ModelStage:
    position: int
    step: Step
    runtime: ModelRuntime
    sources: tuple[tuple[Tensor, str], ...]
    """Each input with the name it takes from the feeds it runs on: an output of the model step before, or
    for the first model step the input's own name (its feeds are built from the record under input names)."""


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


def _cast(array: np.ndarray, dtype: str) -> np.ndarray:
    target = np.dtype(dtype)
    if target.kind == "U":
        return array  # onnxruntime takes str and object arrays alike
    return array if array.dtype == target else array.astype(target)


class PipelineRunner:
    """Thread-safe: holds only loaded runtimes, which support concurrent ``predict`` calls."""

    def __init__(self, deployment: Deployment, runtimes: Sequence[ModelRuntime]) -> None:
        """``runtimes`` are those of the model steps, in order; validations steps need none."""
        model_steps = deployment.model_steps
        if len(runtimes) != len(model_steps):
            raise ValueError(f"{len(model_steps)} model steps but {len(runtimes)} runtimes")
        self._check_names = deployment.check_names
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
            names = [t.name for t in runtime.inputs]
            unknown = sorted({name for name, _ in step.input_mapping} - set(names))
            if unknown:
                raise ValueError(
                    f"step {k} (model {step.model!r}) maps inputs {unknown} that it does not have; "
                    f"its inputs are {names}"
                )
            if before is None:
                self._record_inputs = tuple(_RecordInput(t, step.source(t.name)) for t in runtime.inputs)
                sources = tuple((t, t.name) for t in runtime.inputs)
            else:
                sources = tuple((t, step.source(t.name)) for t in runtime.inputs)
                available = {t.name for t in before.step.outputs}
                missing = [_fed(t.name, source) for t, source in sources if source not in available]
                if missing:
                    raise ValueError(
                        f"step {k} (model {step.model!r}) needs inputs {missing} that step {before.position} "
                        f"(model {before.step.model!r}) does not produce; it produces {sorted(available)}"
                    )
            before = _ModelStage(k, step, runtime, sources)
            self._stages.append(before)
        self._step_seconds = [
            metrics.STEP_SECONDS.labels(deployment.workspace, deployment.pipeline, str(k))
            for k in range(1, len(deployment.steps) + 1)
        ]

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
        missing = [i for i in self._record_inputs if i.field not in row]
        if missing:
            first = missing[0]
            where = (
                ""
                if first.field == first.tensor.name
                else f" (the pipeline reads it from record field {first.field!r})"
            )
            expected = ", ".join(i.label for i in self._record_inputs)
            raise RecordError(
                f"missing input {first.tensor.name!r}{where}; the pipeline expects inputs {expected}"
            )
        return {i.tensor.name: _convert(i.tensor, row[i.field], i.label) for i in self._record_inputs}

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
        except (StepError, ValueError) as exc:
            # Dynamic dimensions of different sizes cannot be stacked, and one odd record can make a model
            # fail the whole batch: run the records one by one so only the culprit fails.
            if len(rows) > 1:
                log.warning("batch of %d records failed (%s); running them one at a time", len(rows), exc)
            if arrays is None:
                arrays = [self._validate(row) for row in rows]
            return [self._run_one(row, array) for row, array in zip(rows, arrays, strict=True)]
        columns = {name: output.tolist() for name, output in ran.outputs.items()}
        elapsed = ran.elapsed_ns
        if ran.flagged is None:
            return [
                Success(row, {name: column[i] for name, column in columns.items()}, elapsed)
                for i, row in enumerate(rows)
            ]
        failures = self._failures(ran.flagged)
        return [
            Success(
                row,
                {name: column[i] for name, column in columns.items()},
                elapsed,
                failures[i],
                tuple(ran.problems.get(i, ())),
            )
            for i, row in enumerate(rows)
        ]

    def _run_one(self, row: dict[str, Any], array: dict[str, np.ndarray]) -> Result:
        try:
            ran = self._infer({name: value[np.newaxis] for name, value in array.items()}, [row])
        except StepError as exc:
            return Failure(str(exc), row)
        outputs = {name: output[0].tolist() for name, output in ran.outputs.items()}
        if ran.flagged is None:
            return Success(row, outputs, ran.elapsed_ns)
        return Success(
            row, outputs, ran.elapsed_ns, self._failures(ran.flagged)[0], tuple(ran.problems.get(0, ()))
        )

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
                outputs = current = self._run_step(stage, current, n)
            elapsed.append(time.perf_counter_ns() - start)
            self._step_seconds[stage.position - 1].observe(elapsed[-1] / 1e9)
        return _Ran(current, tuple(elapsed), flagged, problems)

    def _run_step(self, stage: _ModelStage, current: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
        step, runtime, k = stage.step, stage.runtime, stage.position
        step_feeds = {t.name: _cast(current[source], t.dtype) for t, source in stage.sources}
        try:
            produced = self._predict(runtime, step_feeds, n)
        except Exception as exc:
            raise StepError(f"step {k} (model {step.model!r} v{step.version}) failed: {exc}") from exc
        for name, output in produced.items():
            if output.ndim == 0 or output.shape[0] != n:
                raise StepError(
                    f"step {k} (model {step.model!r} v{step.version}) output {name!r} has shape "
                    f"{list(output.shape)}, expected a first dimension of {n} (one row per record)"
                )
        return produced

    @staticmethod
    def _predict(runtime: ModelRuntime, feeds: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
        if n == 1 or all(t.shape[:1] == (-1,) for t in runtime.inputs):
            return runtime.predict(feeds)
        # A fixed first dimension (usually 1) means the model takes one record per call.
        parts = [runtime.predict({name: value[i : i + 1] for name, value in feeds.items()}) for i in range(n)]
        return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}
