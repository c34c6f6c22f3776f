"""Open Inference Protocol tensors as numpy arrays, and their conversion to and from Joey records.

A request's tensors share a first (batch) dimension; row ``i`` of every input becomes one input
record ``{name: value}``, and the replies' outputs are stacked back along that dimension.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from joey_gateway.errors import GatewayError, Status

_NUMPY = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(np.object_),
}
DATATYPES = tuple(_NUMPY)
"""The OIP datatypes the gateway decodes."""
_OIP = {dtype.name: name for name, dtype in _NUMPY.items() if name != "BYTES"}


def oip_datatype(numpy_name: str) -> str:
    """The OIP datatype of a numpy dtype name: float32 -> FP32; anything not numeric (string) -> BYTES."""
    return _OIP.get(numpy_name, "BYTES")


def numpy_dtype(datatype: str) -> np.dtype[Any]:
    try:
        return _NUMPY[datatype]
    except KeyError:
        raise GatewayError(
            Status.INVALID_ARGUMENT, f"unknown datatype {datatype!r}; use one of {', '.join(_NUMPY)}"
        ) from None


@dataclass
class Tensor:
    name: str
    datatype: str
    data: np.ndarray[Any, Any]

    @property
    def shape(self) -> list[int]:
        return list(self.data.shape)


@dataclass
class InferRequest:
    model: str
    id: str
    inputs: list[Tensor]
    outputs: list[str]
    """Requested outputs by name; empty means all."""
    timeout_s: float | None = None
    """The caller's own timeout, when it sent one."""


@dataclass
class InferResponse:
    model: str
    version: str
    id: str
    outputs: list[Tensor]


@dataclass(frozen=True)
class Limits:
    """What one request may hold; checked on its declared shapes before any element is decoded."""

    max_rows: int
    max_elements: int


def check_shape(name: str, shape: Sequence[int], limits: Limits) -> None:
    """Refuse a shape that is no list of non-negative integers, holds no element (``[1000000, 0]`` would be
    a million empty records), has more rows or elements than ``limits``. Computed on Python integers: no
    overflow, nothing allocated."""
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise GatewayError(
            Status.INVALID_ARGUMENT, f"input {name!r}: shape must be non-negative integers, got {list(shape)}"
        )
    if shape and 0 in shape:
        raise GatewayError(
            Status.INVALID_ARGUMENT,
            f"input {name!r} has shape {list(shape)}: a dimension of 0 leaves its rows without elements",
        )
    if shape and shape[0] > limits.max_rows:
        raise GatewayError(
            Status.TOO_LARGE,
            f"input {name!r} has {shape[0]} rows; a request may hold at most {limits.max_rows}",
        )
    elements = 1
    for dimension in shape:
        elements *= dimension
        if elements > limits.max_elements:
            raise GatewayError(
                Status.TOO_LARGE,
                f"input {name!r}: shape {list(shape)} is over {limits.max_elements} elements, "
                "the most one input may hold",
            )


def _check_count(name: str, shape: Sequence[int], count: int) -> None:
    expected = math.prod(shape)
    if count != expected:
        raise GatewayError(
            Status.INVALID_ARGUMENT,
            f"input {name!r}: shape {list(shape)} needs {expected} elements, got {count}",
        )


def from_raw(
    name: str, datatype: str, shape: Sequence[int], raw: bytes, limits: Limits
) -> np.ndarray[Any, Any]:
    """Decode little-endian tensor bytes; BYTES elements are each prefixed by a 4-byte length."""
    check_shape(name, shape, limits)
    dtype = numpy_dtype(datatype)
    if datatype == "BYTES":
        items: list[bytes] = []
        offset = 0
        expected = math.prod(shape)
        # Each element takes at least its 4-byte length: a shape that cannot fit is refused unread.
        if expected * 4 > len(raw):
            raise GatewayError(
                Status.INVALID_ARGUMENT,
                f"input {name!r}: shape {list(shape)} needs {expected} elements, more than its "
                f"{len(raw)} bytes can hold",
            )
        while offset < len(raw) and len(items) < expected:
            if offset + 4 > len(raw):
                raise GatewayError(Status.INVALID_ARGUMENT, f"input {name!r}: truncated BYTES element length")
            (length,) = struct.unpack_from("<I", raw, offset)
            offset += 4
            if offset + length > len(raw):
                raise GatewayError(Status.INVALID_ARGUMENT, f"input {name!r}: truncated BYTES element")
            items.append(raw[offset : offset + length])
            offset += length
        if offset < len(raw):
            raise GatewayError(
                Status.INVALID_ARGUMENT,
                f"input {name!r}: {len(raw) - offset} bytes left after the {expected} elements of shape "
                f"{list(shape)}",
            )
        _check_count(name, shape, len(items))
        return np.array(items, dtype=np.object_).reshape(shape)
    if len(raw) % dtype.itemsize:
        raise GatewayError(
            Status.INVALID_ARGUMENT,
            f"input {name!r}: {len(raw)} bytes is not a whole number of {datatype} elements",
        )
    _check_count(name, shape, len(raw) // dtype.itemsize)
    return np.frombuffer(raw, dtype=dtype.newbyteorder("<")).astype(dtype).reshape(shape)


def to_raw(tensor: Tensor) -> bytes:
    if tensor.datatype == "BYTES":
        parts = []
        for item in tensor.data.reshape(-1):
            data = item if isinstance(item, bytes) else str(item).encode()
            parts.append(struct.pack("<I", len(data)) + data)
        return b"".join(parts)
    return tensor.data.astype(tensor.data.dtype.newbyteorder("<")).tobytes()


def from_values(
    name: str, datatype: str, shape: Sequence[int], values: Sequence[Any], limits: Limits
) -> np.ndarray[Any, Any]:
    """A tensor from its elements (flat, or nested as REST clients may send them)."""
    check_shape(name, shape, limits)
    dtype = numpy_dtype(datatype)
    try:
        array = np.array(values, dtype=dtype)
    # OverflowError: an integer outside the datatype's range, e.g. 300 as INT8 (found by tests/fuzz).
    except (TypeError, ValueError, OverflowError) as exc:
        raise GatewayError(
            Status.INVALID_ARGUMENT, f"input {name!r}: data is not {datatype}: {exc}"
        ) from None
    _check_count(name, shape, array.size)
    return array.reshape(shape)


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def to_rows(inputs: Sequence[Tensor]) -> list[dict[str, Any]]:
    """One input record per entry of the batch (first) dimension shared by every input."""
    if not inputs:
        raise GatewayError(Status.INVALID_ARGUMENT, "request has no inputs")
    sizes = {}
    for tensor in inputs:
        if tensor.data.ndim == 0:
            raise GatewayError(
                Status.INVALID_ARGUMENT,
                f"input {tensor.name!r} has shape []: the first dimension is the batch of records",
            )
        sizes[tensor.name] = tensor.data.shape[0]
    if len(set(sizes.values())) > 1:
        raise GatewayError(
            Status.INVALID_ARGUMENT,
            f"inputs disagree on the batch (first) dimension: {sizes}; each row of it is one record",
        )
    count = next(iter(sizes.values()))
    columns = {tensor.name: tensor.data.tolist() for tensor in inputs}
    text = {tensor.name for tensor in inputs if tensor.datatype == "BYTES"}
    return [
        {name: _jsonable(values[i]) if name in text else values[i] for name, values in columns.items()}
        for i in range(count)
    ]


def _fits(shape: Sequence[int], expected: Sequence[int]) -> bool:
    return len(shape) == len(expected) and all(
        want < 0 or want == got for want, got in zip(expected, shape, strict=True)
    )


def check_inputs(pipeline: str, inputs: Sequence[Tensor], expected: Mapping[str, Sequence[int]]) -> None:
    """Refuse, before any record is produced, a request that lacks one of the pipeline's inputs or whose
    shape does not fit one (``expected``: input name -> batched shape, -1 for any size). Otherwise each row
    would become a record that fails alone, one failure per row for one mistake."""
    sent = {tensor.name: tensor for tensor in inputs}
    missing = [name for name in expected if name not in sent]
    if missing:
        wanted = ", ".join(f"{name!r} {list(shape)}" for name, shape in expected.items())
        raise GatewayError(
            Status.INVALID_ARGUMENT,
            f"pipeline {pipeline!r} needs input {missing[0]!r}; its inputs are {wanted}, "
            f"the request has {', '.join(repr(name) for name in sent)}",
        )
    for name, shape in expected.items():
        got = sent[name].shape
        if _fits(got, shape):
            continue
        if _fits(got, shape[1:]):
            hint = f"; add the batch dimension: shape {[1, *got]} for one record"
        else:
            hint = f"; each record's {name!r} has shape {list(shape[1:])} (-1: any size)"
        raise GatewayError(
            Status.INVALID_ARGUMENT,
            f"pipeline {pipeline!r} input {name!r} has shape {got}, expected {list(shape)}: the first "
            f"dimension is the batch, one row per record{hint}",
        )


def _guess_datatype(array: np.ndarray[Any, Any]) -> str:
    if array.dtype.kind == "f":
        return "FP64"
    if array.dtype.kind in "iu":
        return "INT64"
    if array.dtype.kind == "b":
        return "BOOL"
    return "BYTES"


def from_rows(name: str, datatype: str | None, values: list[Any]) -> Tensor:
    """Stack one output's per-record values into a tensor whose first dimension is the batch."""
    try:
        array = np.array(values)
    except ValueError:
        raise GatewayError(
            Status.INTERNAL, f"output {name!r} has values of different shapes across the batch"
        ) from None
    datatype = datatype or _guess_datatype(array)
    if datatype == "BYTES":
        array = np.array([str(v) for v in array.reshape(-1)], dtype=np.object_).reshape(array.shape)
    else:
        try:
            array = array.astype(numpy_dtype(datatype))
        except (TypeError, ValueError):
            raise GatewayError(Status.INTERNAL, f"output {name!r} is not {datatype}") from None
    return Tensor(name, datatype, array)
