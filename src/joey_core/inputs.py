"""Data the way users hold it, as input records: a DataFrame with one column per feature or a numpy array
is shaped for the pipeline's input when its signature leaves one way to do it, and refused before
anything is sent otherwise, saying how to shape it.

The signature is that of the records the deployed pipeline version reads: the inputs of its first model
step (a split's first arm), each fed from a record field. Packing rule: a frame with no column named
after the single input, a vector of N numbers (or one number), and exactly N numeric columns becomes one
record per row, ``{input: [the row's values in the frame's column order]}``. Values are converted the
way the engine takes them for the input's dtype: booleans as 0 and 1, integral floats as integers for an
integer input; NaN, inf, fractions for an integer input and values out of the dtype's range are refused
naming the row and column, as are duplicate column names.

Shared by the SDK's ``pipeline.infer`` and the gateway's records endpoint, so that a frame posted to one is
shaped as the other shapes it.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from joey_core.lazy import LazyModule
from joey_core.models import TensorSpec
from joey_core.v1 import registry_pb2 as pb

if TYPE_CHECKING:
    import pandas as pd
else:
    pd = LazyModule("pandas")

_SHOWN_COLUMNS = 10
_NUMERIC = "biuf"
# The numpy kinds of values each input dtype kind takes; booleans are sent as 0 and 1 to numbers.
_TAKES = {"f": _NUMERIC, "i": _NUMERIC, "u": _NUMERIC, "b": "b", "U": "UO"}


class InputError(ValueError):
    """Data refused before anything is sent: it does not fit the pipeline's inputs."""


@dataclass(frozen=True)
class RecordInput:
    """An input of the pipeline's first model step and the record field that feeds it."""

    field: str
    tensor: TensorSpec

    @property
    def per_record(self) -> tuple[int, ...]:
        """The shape of one record's value (the tensor's without its batch dimension); -1 is any size."""
        return self.tensor.shape[1:]

    @property
    def kind(self) -> str:
        """The numpy kind of the input's dtype ("U" for string)."""
        return "U" if self.tensor.dtype == "string" else np.dtype(self.tensor.dtype).kind

    @property
    def width(self) -> int | None:
        """How many numeric columns a frame packs into this input: N for a vector of N numbers, 1 for a
        number; None when it takes no numbers or no fixed count of them."""
        shape = self.per_record
        if self.kind not in "fiu":
            return None
        if not shape:
            return 1
        return shape[0] if len(shape) == 1 and shape[0] > 0 else None

    def __str__(self) -> str:
        return f"{self.field!r} ({self.tensor.dtype} {_shape(self.per_record)})"


Signature = Callable[[], Sequence[RecordInput]]
"""The pipeline's record inputs, fetched only when the data needs them."""


def record_inputs(version: pb.PipelineVersion) -> tuple[RecordInput, ...]:
    for step in version.steps:
        # A split has no model of its own; its arms read the same fields.
        feeder = step.arms[0] if step.arms else step
        if feeder.model:
            return tuple(
                RecordInput(feeder.input_mapping.get(s.name, s.name), TensorSpec.from_proto(s))
                for s in feeder.inputs
            )
    return ()


def to_records(
    data: pa.Table | pd.DataFrame | np.ndarray | Sequence[dict[str, Any]] | dict[str, Any],
    signature: Signature,
    pipeline: str,
) -> list[Any]:
    """One input record per row of ``data``; raise InputError when it cannot fit the pipeline's inputs."""
    inputs = functools.cache(signature)
    if isinstance(data, np.ndarray):
        return _array_records(data, inputs(), pipeline)
    if isinstance(data, pa.Table):
        _refuse_duplicates(pd.Index(data.column_names))
        if _names_an_input(data.column_names, inputs()):
            return data.to_pylist()
        return _frame_records(data.to_pandas(), inputs(), pipeline)
    if isinstance(data, pd.DataFrame):
        _refuse_duplicates(data.columns)
        if _names_an_input(list(data.columns), inputs()):
            return _json_rows(data)
        return _frame_records(data, inputs(), pipeline)
    if isinstance(data, dict):
        return [data]
    return list(data)


def _refuse_duplicates(columns: pd.Index) -> None:
    if columns.has_duplicates:
        twice = ", ".join(repr(c) for c in columns[columns.duplicated()].unique()[:_SHOWN_COLUMNS])
        raise InputError(
            f"the frame has more than one column named {twice}: each column is one record field (or one "
            "packed feature), so names must be unique; rename or drop the duplicates"
        )


def _names_an_input(columns: Sequence[Any], inputs: Sequence[RecordInput]) -> bool:
    """Whether the columns are records as they are: they name an input, or there is nothing to pack into."""
    return not inputs or any(i.field in columns for i in inputs)


def _json_rows(frame: pd.DataFrame) -> list[Any]:
    """The frame's rows as records, one field per column; missing numbers as null (JSON has no NaN)."""
    names = [str(c) for c in frame.columns]
    columns = [_json_column(frame.iloc[:, i]) for i in range(frame.shape[1])]
    return [dict(zip(names, row, strict=True)) for row in zip(*columns, strict=True)]


def _json_column(series: pd.Series) -> list[Any]:
    kind = _kind(series.dtype)
    if kind in _NUMERIC:
        return _json_values(_column(series))
    if kind == "O":  # lists, arrays, strings: the record encoder takes them as they are, at full precision
        return list(series.tolist())
    # Dates, categories, strings of pandas' own dtype: as pandas writes them to JSON.
    values: list[Any] = json.loads(series.to_json(orient="values", double_precision=15))
    return values


def _kind(dtype: Any) -> str:
    """A column's numpy kind, nullable and Arrow-backed dtypes included; "O" for other dtypes."""
    try:
        return np.dtype(getattr(dtype, "numpy_dtype", dtype)).kind
    except TypeError:
        return "O"


def _column(series: pd.Series) -> np.ndarray:
    """A column's values as a numpy array, a missing value (of a nullable dtype too) as NaN."""
    if series.hasnans:
        return series.to_numpy(dtype=np.float64, na_value=np.nan)
    return series.to_numpy(dtype=getattr(series.dtype, "numpy_dtype", None))


def _frame_records(frame: pd.DataFrame, inputs: Sequence[RecordInput], pipeline: str) -> list[Any]:
    columns = [str(c) for c in frame.columns]
    numeric = [
        str(c) for c, dtype in zip(frame.columns, frame.dtypes, strict=True) if _kind(dtype) in _NUMERIC
    ]
    if len(inputs) != 1 or inputs[0].width != len(columns) or len(numeric) != len(columns):
        raise InputError(_frame_advice(pipeline, inputs, columns, numeric))
    only = inputs[0]
    labels = frame.index.tolist()

    def packed(index: int) -> np.ndarray:
        def where(at: tuple[int, ...]) -> str:
            return f"row {labels[at[0]]!r}, column {columns[index]!r}"

        return _cast(_column(frame.iloc[:, index]), only, pipeline, where)

    cells = [packed(index) for index in range(len(columns))]
    values = np.column_stack(cells) if only.per_record else cells[0]
    return [{only.field: row} for row in values.tolist()]


def _json_values(values: np.ndarray) -> list[Any]:
    """The rows of ``values`` as Python values, NaN and inf as None (JSON has no NaN)."""
    if values.dtype.kind != "f":
        return list(values.tolist())
    cells = values.astype(object)
    cells[~np.isfinite(values)] = None
    return list(cells.tolist())


def _cast(
    values: np.ndarray, only: RecordInput, pipeline: str, where: Callable[[tuple[int, ...]], str]
) -> np.ndarray:
    """``values`` as the engine takes them for ``only``; raise InputError naming the first value (``where``
    says where it is) that it would refuse, so no record fails alone for it."""
    target = only.kind
    kind = values.dtype.kind
    reads = f"pipeline {pipeline!r} reads {only}"
    if kind not in _TAKES[target]:
        raise InputError(f"{reads}, which takes {only.tensor.dtype} values, not {values.dtype} values")
    if kind == "b" and target != "b":
        return _cast(values.astype(np.int64), only, pipeline, where)  # JSON's true is not a number
    if kind == "f":
        if not (finite := np.isfinite(values)).all():
            at = _first(~finite, values)
            what = "NaN (or missing)" if np.isnan(values[at]) else str(values[at])
            raise InputError(
                f"{reads}: {where(at)} is {what}, but inputs must be finite numbers (JSON has no NaN); "
                "fill or drop missing values before calling infer (e.g. frame.dropna())"
            )
        if target in "iu" and not (whole := values == np.round(values)).all():
            at = _first(~whole, values)
            raise InputError(
                f"{reads}: {where(at)} is {values[at]}, a non-integer number; round or convert the values "
                f"(e.g. frame.round().astype('{only.tensor.dtype}')) if that is what is meant"
            )
    if target == "f":
        values = values.astype(np.float64)
        limit = float(np.finfo(only.tensor.dtype).max)
        if not (fits := np.abs(values) <= limit).all():
            at = _first(~fits, values)
            raise InputError(f"{reads}: {where(at)} is {values[at]}, out of range for {only.tensor.dtype}")
        return values
    if target in "iu":
        info = np.iinfo(only.tensor.dtype)
        # Compared with Python ints, which numpy does exactly for every integer and float dtype.
        if not (fits := (values >= info.min) & (values < info.max + 1)).all():
            at = _first(~fits, values)
            raise InputError(f"{reads}: {where(at)} is {values[at]}, out of range for {only.tensor.dtype}")
        return values.astype(only.tensor.dtype)
    return values


def _first(bad: np.ndarray, values: np.ndarray) -> tuple[int, ...]:
    """The position of the first True in ``bad`` (of ``values``' shape)."""
    return tuple(int(i) for i in np.argwhere(bad)[0])


def _frame_advice(
    pipeline: str, inputs: Sequence[RecordInput], columns: list[str], numeric: list[str]
) -> str:
    shown = ", ".join(repr(c) for c in columns[:_SHOWN_COLUMNS]) + (
        ", ..." if len(columns) > _SHOWN_COLUMNS else ""
    )
    has = f"the frame has {len(columns)} columns ({shown})"
    others = [c for c in columns if c not in numeric]
    if others:
        has += f", {len(others)} of them not numeric ({', '.join(repr(c) for c in others[:_SHOWN_COLUMNS])})"
    fields = ", ".join(str(i) for i in inputs)
    if len(inputs) != 1:
        return (
            f"pipeline {pipeline!r} reads record fields {fields}, and {has}: give the frame one column per "
            "field, named after it, each cell holding that field's value for the row"
        )
    only = inputs[0]
    width = only.width
    if width is not None and not only.per_record:
        return (
            f"pipeline {pipeline!r} reads record field {fields}, and {has}: pass one numeric column, whose "
            f"values are sent as {only.field!r}, or name the column {only.field!r}"
        )
    if width is not None:
        return (
            f"pipeline {pipeline!r} reads record field {fields}, and {has}: pass exactly {width} numeric "
            f"columns, which are packed into {only.field!r} in the frame's column order "
            f"(e.g. frame[[<the {width} feature columns>]]), or one column {only.field!r} holding a list of "
            f"{width} numbers per row (e.g. pd.DataFrame({{{only.field!r}: X.tolist()}}))"
        )
    return (
        f"pipeline {pipeline!r} reads record field {fields}, and {has}: give the frame a column "
        f"{only.field!r} holding each row's value of shape {_shape(only.per_record)}"
    )


def _array_records(array: np.ndarray, inputs: Sequence[RecordInput], pipeline: str) -> list[Any]:
    if len(inputs) != 1:
        fields = ", ".join(str(i) for i in inputs) or "none (it has no model step)"
        raise InputError(
            f"pipeline {pipeline!r} reads record fields {fields}: a numpy array cannot say which field each "
            "value feeds; pass a DataFrame with one column per field, or records (dicts) naming them"
        )
    only = inputs[0]
    expected = only.per_record
    if array.ndim == 0 or not _fits(array.shape[1:], expected):
        batched = _shape((-1, *expected))
        hint = (
            f"; for one record, add the batch dimension: array.reshape(1, {', '.join(map(str, array.shape))})"
            if _fits(array.shape, expected)
            else ""
        )
        raise InputError(
            f"pipeline {pipeline!r} reads {only}: an array for it has shape {batched}, one row per record, "
            f"but this one has shape {_shape(array.shape)}{hint}"
        )

    def where(at: tuple[int, ...]) -> str:
        return f"row {at[0]}" + (f", element {list(at[1:])}" if len(at) > 1 else "")

    return [{only.field: row} for row in _cast(array, only, pipeline, where).tolist()]


def _fits(shape: Sequence[int], expected: Sequence[int]) -> bool:
    return len(shape) == len(expected) and all(
        want < 0 or want == got for want, got in zip(expected, shape, strict=True)
    )


def _shape(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"
