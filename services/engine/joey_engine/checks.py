"""A validations step's named checks, compiled once and evaluated on whole batches.

A check is evaluated on the batch's columns in one go. When that is not possible (a field
missing from some records, vectors of different lengths, a value the expression cannot take)
it is evaluated record by record instead, and a record on which it still cannot be evaluated
counts it as failed: a check flags records, it never turns an inference into an error.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from joey_core.expressions import Expression, ExpressionError, compile_expression
from joey_core.models import TensorSpec
from joey_engine.deployment import Validations

Columns = dict[tuple[str, str], np.ndarray]


class _Unavailable(Exception):
    """A field a check refers to has no usable value in a record."""


@dataclass(frozen=True)
class _Check:
    name: str
    expression: Expression


@dataclass(frozen=True)
class Verdicts:
    failed: np.ndarray
    """Bool array (records, checks): True where a check flagged the record or could not be evaluated."""
    problems: dict[int, list[str]]
    """For records on which some check could not be evaluated: why, by record index."""


class Checks:
    def __init__(self, step: Validations, position: int, outputs: Sequence[TensorSpec] | None) -> None:
        """Compile the checks of the step at ``position`` (1-based) of a pipeline.

        ``outputs`` are those of the model step before it, None when no model step comes before.
        """
        self.names = tuple(name for name, _ in step.checks)
        checks = []
        for name, text in step.checks:
            try:
                checks.append(_Check(name, compile_expression(text)))
            except ExpressionError as exc:
                raise ValueError(f"step {position} (validations): check {name!r} is invalid: {exc}") from None
        self._checks = tuple(checks)
        self._fields = frozenset(field for check in checks for field in check.expression.fields)
        wanted = sorted(name for scope, name in self._fields if scope == "out")
        if wanted and outputs is None:
            raise ValueError(
                f"step {position} (validations): checks refer to model outputs {wanted} "
                "but no model step comes before them"
            )
        available = sorted(t.name for t in outputs or ())
        missing = [name for name in wanted if name not in available]
        if missing:
            raise ValueError(
                f"step {position} (validations): checks refer to outputs {missing} that the model step "
                f"before them does not produce; it produces {available}"
            )

    def evaluate(self, rows: Sequence[dict[str, Any]], outputs: Mapping[str, np.ndarray]) -> Verdicts:
        """The checks' verdicts on a batch of input records and the outputs of the previous model step."""
        n = len(rows)
        columns: Columns = {}
        for scope, name in self._fields:
            column = outputs[name] if scope == "out" else _input_column(rows, name)
            if column is not None:
                columns[scope, name] = column
        failed = np.zeros((n, len(self._checks)), dtype=bool)
        problems: dict[int, list[str]] = {}
        for j, check in enumerate(self._checks):
            verdict = _on_batch(check.expression, columns, n)
            if verdict is not None:
                failed[:, j] = verdict
                continue
            for i in range(n):
                try:
                    failed[i, j] = _evaluate(check.expression, _row_columns(check, rows[i], outputs, i), 1)[0]
                except Exception as exc:
                    # Anything, even an evaluator bug, only flags the record: it is still answered.
                    failed[i, j] = True
                    reason = str(exc) if isinstance(exc, ExpressionError | _Unavailable) else repr(exc)
                    problems.setdefault(i, []).append(f"check {check.name!r} cannot be evaluated: {reason}")
        return Verdicts(failed, problems)


def _input_column(rows: Sequence[dict[str, Any]], name: str) -> np.ndarray | None:
    """An input field's values for the whole batch, None unless every record has it with the same shape."""
    try:
        column = np.asarray([row[name] for row in rows])
    except (KeyError, ValueError):
        return None
    # Mixed values (numbers and nulls, objects) are left to the records one by one.
    return None if column.dtype == object else column


def _row_columns(check: _Check, row: dict[str, Any], outputs: Mapping[str, np.ndarray], i: int) -> Columns:
    columns: Columns = {}
    for scope, name in check.expression.fields:
        if scope == "out":
            columns[scope, name] = outputs[name][i : i + 1]
            continue
        if name not in row:
            raise _Unavailable(f"the record has no field {name!r}")
        try:
            columns[scope, name] = np.asarray([row[name]])
        except ValueError:
            raise _Unavailable(f"in.{name} is not a rectangular array") from None
    return columns


def _on_batch(expression: Expression, columns: Columns, n: int) -> np.ndarray | None:
    """The verdicts on the whole batch, None when the records have to be tried one by one."""
    if not expression.fields <= columns.keys():
        return None
    try:
        return _evaluate(expression, columns, n)
    except Exception:
        return None


def _evaluate(expression: Expression, columns: Columns, n: int) -> np.ndarray:
    result = expression.evaluate(columns, n)
    if result.shape != (n,) or result.dtype != bool:
        raise ValueError(f"gave {result.dtype} values of shape {list(result.shape)}, expected {n} booleans")
    return result
