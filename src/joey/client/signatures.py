"""Declared signatures of python steps, as users give them, converted to the registry's TensorSpecs.

A schema is a ``pyarrow.Schema`` (what Wallaroo users pass: one field per input, describing one
record, so the batch dimension is added: a fixed-size list of 4 floats is shape ``[-1, 4]``, a list
of any length ``[-1, -1]``), a dict ``{name: (dtype, shape)}`` or a sequence of objects with ``name``,
``dtype`` and ``shape`` (such as :class:`joey.TensorSpec`); in the last two the shape includes
the batch dimension, -1.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, TypeAlias

import numpy as np
import pyarrow as pa

from joey_core.v1 import registry_pb2 as pb

Schema: TypeAlias = "pa.Schema | Mapping[str, tuple[Any, Sequence[int]]] | Sequence[Any]"


def dtype_name(dtype: Any) -> str:
    """A numpy dtype (or its name, or a Python type) as the registry names it: strings are "string"."""
    if dtype is str or (isinstance(dtype, str) and dtype in ("string", "str")):
        return "string"
    try:
        resolved = np.dtype(dtype)
    except TypeError:
        raise ValueError(f"{dtype!r} is not a numpy dtype") from None
    if resolved.kind not in "biufU":
        raise ValueError(f"{resolved} is not a tensor dtype: tensors hold numbers, booleans or strings")
    return "string" if resolved.kind == "U" else resolved.name


def _arrow_spec(field: pa.Field) -> pb.TensorSpec:
    shape = [-1]
    value_type = field.type
    while True:
        if isinstance(value_type, pa.FixedShapeTensorType):
            shape += list(value_type.shape)
            value_type = value_type.value_type
        elif isinstance(value_type, pa.FixedSizeListType):
            shape.append(value_type.list_size)
            value_type = value_type.value_type
        elif isinstance(value_type, pa.ListType | pa.LargeListType):
            shape.append(-1)
            value_type = value_type.value_type
        else:
            break
    if pa.types.is_string(value_type) or pa.types.is_large_string(value_type):
        dtype = "string"
    else:
        try:
            dtype = dtype_name(value_type.to_pandas_dtype())
        except (NotImplementedError, ValueError):
            raise ValueError(
                f"field {field.name!r} has arrow type {field.type}, which has no tensor dtype"
            ) from None
    return pb.TensorSpec(name=field.name, dtype=dtype, shape=shape)


def tensor_specs(schema: Schema) -> list[pb.TensorSpec]:
    if isinstance(schema, pa.Schema):
        return [_arrow_spec(field) for field in schema]
    if isinstance(schema, Mapping):
        return [
            pb.TensorSpec(name=name, dtype=dtype_name(dtype), shape=[int(d) for d in shape])
            for name, (dtype, shape) in schema.items()
        ]
    return [
        pb.TensorSpec(name=spec.name, dtype=dtype_name(spec.dtype), shape=[int(d) for d in spec.shape])
        for spec in schema
    ]


def sample_json(sample: Any) -> str:
    """A sample input (rows of the one input ``input``, ``{name: rows}``, or a DataFrame of one
    column per input) as the JSON the upload carries."""
    if hasattr(sample, "to_dict") and hasattr(sample, "columns"):  # a pandas DataFrame
        sample = {str(c): sample[c].tolist() for c in sample.columns}
    if not isinstance(sample, Mapping):
        sample = {"input": sample}
    return json.dumps({str(k): np.asarray(v).tolist() for k, v in sample.items()})


def parse_option(text: str) -> tuple[str, tuple[str, tuple[int, ...]]]:
    """A CLI ``--input``/``--output`` value ``NAME:DTYPE:SHAPE`` (shape like ``-1,4``) as a dict item."""
    parts = text.split(":")
    if len(parts) != 3 or not parts[0]:
        raise ValueError(f"{text!r} is not NAME:DTYPE:SHAPE (e.g. features:float32:-1,4)")
    name, dtype, shape = parts
    try:
        dims = tuple(int(d) for d in shape.split(","))
    except ValueError:
        raise ValueError(f"{text!r}: shape {shape!r} is not comma-separated integers (e.g. -1,4)") from None
    return name, (dtype_name(dtype), dims)
