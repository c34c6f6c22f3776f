"""Data the way users hold it, as input records: a DataFrame with one column per feature or a numpy array
is shaped for the pipeline's input when its signature leaves one way to do it, and refused before
anything is sent otherwise, saying how to shape it.

The signature is that of the records the deployed pipeline version reads: the inputs of its first model
step (a split's first arm), each fed from a record field. Packing rule: a frame with no column named
after the single input, a vector of N values, and exactly N numeric columns becomes one record per row,
``{input: [the row's values in the frame's column order]}``. NaN and missing values are sent as null
(JSON has no NaN), which the engine refuses in a float input, naming the element.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from joey.client.calls import JoeyError, RegistryCaller
from joey_core.models import TensorSpec
from joey_core.v1 import registry_pb2 as pb

_SHOWN_COLUMNS = 10


class InputError(JoeyError, ValueError):
    """Data ``Pipeline.infer`` refuses before sending anything: it does not fit the pipeline's inputs."""

    def __init__(self, message: str) -> None:
        super().__init__("INVALID_ARGUMENT", message)


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
    def vector_width(self) -> int | None:
        """N when one record's value is a vector of N numbers, the shape columns can be packed into."""
        numeric = self.tensor.dtype != "string" and np.dtype(self.tensor.dtype).kind in "fiu"
        shape = self.per_record
        return shape[0] if numeric and len(shape) == 1 and shape[0] > 0 else None

    def __str__(self) -> str:
        return f"{self.field!r} ({self.tensor.dtype} {_shape(self.per_record)})"


Signature = Callable[[], Sequence[RecordInput]]
"""The pipeline's record inputs, fetched only when the data needs them."""


def deployed_inputs(client: RegistryCaller, pipeline: str, version: int) -> tuple[RecordInput, ...]:
    """The record inputs of ``version`` of ``pipeline``; none when it has no model step."""
    found = client.call("GetPipeline", pb.GetPipelineRequest(workspace=client.workspace, name=pipeline))
    for pv in found.versions:
        if pv.version == version:
            return record_inputs(pv)
    return ()


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
    signature = functools.cache(signature)
    if isinstance(data, np.ndarray):
        return _array_records(data, signature(), pipeline)
    if isinstance(data, pa.Table):
        if _names_an_input(data.column_names, signature):
            return data.to_pylist()
        return _frame_records(data.to_pandas(), signature(), pipeline)
    if isinstance(data, pd.DataFrame):
        if _names_an_input(list(data.columns), signature):
            return _json_rows(data)
        return _frame_records(data, signature(), pipeline)
    if isinstance(data, dict):
        return [data]
    return list(data)


def _names_an_input(columns: Sequence[Any], signature: Signature) -> bool:
    """Whether the columns are records as they are: they name an input, or there is nothing to pack into."""
    inputs = signature()
    return not inputs or any(i.field in columns for i in inputs)


def _json_rows(frame: pd.DataFrame) -> list[Any]:
    # NaN becomes null: JSON has no NaN.
    rows: list[Any] = json.loads(frame.to_json(orient="records", double_precision=15))
    return rows


def _frame_records(frame: pd.DataFrame, inputs: Sequence[RecordInput], pipeline: str) -> list[Any]:
    columns = [str(c) for c in frame.columns]
    numeric = [
        str(c)
        for c, dtype in frame.dtypes.items()
        if pd.api.types.is_numeric_dtype(dtype) and not pd.api.types.is_bool_dtype(dtype)
    ]
    if len(inputs) == 1 and inputs[0].vector_width == len(columns) == len(numeric):
        return _packed(frame, inputs[0].field)
    raise InputError(_frame_advice(pipeline, inputs, columns, numeric))


def _packed(frame: pd.DataFrame, field: str) -> list[Any]:
    """Each row's values, in the frame's column order, as the one input's vector."""
    if all(pd.api.types.is_integer_dtype(d) and not frame[c].isna().any() for c, d in frame.dtypes.items()):
        values = frame.to_numpy(dtype=np.int64)
    else:
        values = frame.to_numpy(dtype=np.float64, na_value=np.nan)
    return [{field: row} for row in _json_values(values)]


def _json_values(values: np.ndarray) -> list[Any]:
    """The rows of ``values`` as Python values, NaN and inf as None (JSON has no NaN)."""
    if values.dtype.kind != "f":
        return list(values.tolist())
    cells = values.astype(object)
    cells[~np.isfinite(values)] = None
    return list(cells.tolist())


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
    width = only.vector_width
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
    return [{only.field: row} for row in _json_values(array)]


def _fits(shape: Sequence[int], expected: Sequence[int]) -> bool:
    return len(shape) == len(expected) and all(
        want < 0 or want == got for want, got in zip(expected, shape, strict=True)
    )


def _shape(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"
