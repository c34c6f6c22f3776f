"""Fuzz target: the OIP tensor parser takes any request tensor (shape, datatype, data as REST JSON sends it,
or raw bytes) to an array or a GatewayError, and valid tensors to records."""

from __future__ import annotations

import struct
from typing import Any

from hypothesis import example, given
from hypothesis import strategies as st

from joey_gateway.errors import GatewayError, Status
from joey_gateway.tensors import Tensor, from_raw, from_values, to_rows

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


def parsed_or_refused(parse: Any, name: str, datatype: str, shape: list[int], data: Any) -> None:
    try:
        array = parse(name, datatype, shape, data)
    except GatewayError as exc:
        assert exc.status is Status.INVALID_ARGUMENT and exc.message
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
    assert from_raw("x", "BYTES", [len(items)], raw).tolist() == items
    parsed_or_refused(from_raw, "x", "BYTES", [len(items)], raw + b"\x01" * junk)
