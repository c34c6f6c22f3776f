"""Fuzz target: the OIP tensor parser takes any request tensor (shape, datatype, data as REST JSON sends it,
or raw bytes) to an array or a GatewayError, and valid tensors to records."""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np
from hypothesis import example, given
from hypothesis import strategies as st

from joey_gateway.errors import GatewayError, Status
from joey_gateway.http_server import decode_request
from joey_gateway.tensors import Limits, Tensor, from_raw, from_values, to_rows

_DATATYPES = st.sampled_from(
    ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64"]
    + ["FP16", "FP32", "FP64", "BYTES", "fp32", "STRING", ""]
)
_DIM = st.integers(min_value=0, max_value=6) | st.sampled_from([-1, -2, 2**31, 2**62, 2**63, 2**64])
_SHAPES = st.lists(_DIM, max_size=4)
_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=4)
    | st.sampled_from(["NaN", "inf", "1e999", "0x10"])
)
_DATA = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=2), inner, max_size=2),
)


_LIMITS = Limits(max_rows=1000, max_elements=10_000)


def parsed_or_refused(parse: Any, name: str, datatype: str, shape: list[int], data: Any) -> None:
    try:
        array = parse(name, datatype, shape, data, _LIMITS)
    except GatewayError as exc:
        assert exc.status in (Status.INVALID_ARGUMENT, Status.TOO_LARGE) and exc.message
        return
    assert list(array.shape) == shape
    if array.ndim:
        rows = to_rows([Tensor(name, datatype, array)])
        assert len(rows) == shape[0]


@given(_DATATYPES, _SHAPES, st.lists(_DATA, max_size=6) | _DATA)
@example("INT8", [1], [300])  # out of the datatype's range
@example("UINT8", [1], [-1])
@example("FP32", [2, -1], [1.0, 2.0])  # a negative dimension that np.prod and reshape accept
@example("FP32", [2**62, 4, 0], [])  # a shape whose element count overflows int64 to 0
@example("BYTES", [2, 1], [[b"a"], ["b"]])
def test_json_data(datatype: str, shape: list[int], data: Any) -> None:
    parsed_or_refused(from_values, "x", datatype, shape, data)


@given(_DATATYPES, _SHAPES, st.binary(max_size=64))
@example("BYTES", [1], struct.pack("<I", 2**32 - 1) + b"x")  # an element length past the end
@example("FP32", [-1, -1], b"\x00" * 4)
def test_raw_data(datatype: str, shape: list[int], raw: bytes) -> None:
    parsed_or_refused(from_raw, "x", datatype, shape, raw)


@given(st.lists(st.binary(max_size=6), max_size=6), st.integers(min_value=0, max_value=3))
def test_bytes_elements_round_trip(items: list[bytes], junk: int) -> None:
    raw = b"".join(struct.pack("<I", len(item)) + item for item in items)
    if items:  # a dimension of 0 is refused: it would be rows without elements
        assert from_raw("x", "BYTES", [len(items)], raw, _LIMITS).tolist() == items
    parsed_or_refused(from_raw, "x", "BYTES", [len(items)], raw + b"\x01" * junk)


_ANY = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
)
_INPUT = st.fixed_dictionaries(
    {"name": st.text(max_size=3) | _ANY, "shape": _SHAPES | _ANY, "datatype": _DATATYPES | _ANY},
    optional={
        "data": st.lists(_DATA, max_size=6) | _ANY,
        "parameters": _ANY | st.fixed_dictionaries({"binary_data_size": _ANY | st.integers(-1, 40)}),
    },
)
_BODIES = st.fixed_dictionaries(
    {"inputs": st.lists(_INPUT, max_size=3) | _ANY},
    optional={
        "id": _ANY,
        "parameters": _ANY
        | st.fixed_dictionaries({"timeout": _ANY | st.integers(), "binary_data_output": _ANY}),
        "outputs": _ANY
        | st.lists(st.fixed_dictionaries({"name": _ANY}, optional={"parameters": _ANY}), max_size=2),
    },
)


@given(_BODIES, st.binary(max_size=40), st.booleans())
# Found by this property: a timeout past float's range raised OverflowError; an input's "parameters" or the
# request's "outputs" of the wrong type raised AttributeError / TypeError.
@example({"inputs": [], "parameters": {"timeout": 10**400}}, b"", False)
@example({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "parameters": [1]}]}, b"", False)
@example({"inputs": [], "outputs": 5}, b"", False)
def test_request_bodies(body: dict[str, Any], binary: bytes, binary_body: bool) -> None:
    """``binary_body``: the JSON header followed by binary data, its length in the header."""
    header = json.dumps(body).encode()
    data = header + binary if binary_body else header
    try:
        request = decode_request("m", "", data, len(header) if binary_body else None, _LIMITS)
    except GatewayError as exc:
        assert exc.status in (Status.INVALID_ARGUMENT, Status.TOO_LARGE) and exc.message
    else:
        assert all(isinstance(tensor.data, np.ndarray) for tensor in request.request.inputs)


@given(st.binary(max_size=200), st.none() | st.integers(min_value=0, max_value=300))
def test_request_bytes(body: bytes, header_length: int | None) -> None:
    try:
        decode_request("m", "", body, header_length, _LIMITS)
    except GatewayError as exc:
        assert exc.status is Status.INVALID_ARGUMENT and exc.message
