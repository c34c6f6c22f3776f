"""Open Inference Protocol tensors <-> Joey records, and the REST body with binary tensors.

(Only modules without the generated OIP stubs are imported here: tritonclient.grpc, used by the
end-to-end tests in this session, registers the same `inference.*` protobuf names.)
"""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from joey_gateway.errors import GatewayError, Status
from joey_gateway.http_server import decode_request, encode_response
from joey_gateway.tensors import (
    InferResponse,
    Limits,
    Tensor,
    check_inputs,
    from_raw,
    from_rows,
    from_values,
    oip_datatype,
    to_raw,
    to_rows,
)

LIMITS = Limits(max_rows=100, max_elements=1000)


def test_raw_tensors_round_trip() -> None:
    text = Tensor("s", "BYTES", np.array([[b"ab", b""], [b"\xc3\xa9", b"xyz"]], dtype=np.object_))
    raw = to_raw(text)
    assert raw[:6] == struct.pack("<I", 2) + b"ab"
    assert from_raw("s", "BYTES", [2, 2], raw, LIMITS).tolist() == text.data.tolist()
    numbers = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert (
        from_raw("x", "FP32", [2, 3], to_raw(Tensor("x", "FP32", numbers)), LIMITS).tolist()
        == numbers.tolist()
    )


@pytest.mark.parametrize(
    ("datatype", "shape", "raw", "message"),
    [
        ("FP32", [2, 3], b"\0" * 20, "needs 6 elements, got 5"),
        ("FP32", [1], b"\0" * 3, "not a whole number of FP32"),
        ("BYTES", [1], b"\5\0\0\0ab", "truncated BYTES element"),
        ("BYTES", [3], b"\1\0\0\0ab", "needs 3 elements, more than its 6 bytes can hold"),
        ("BYTES", [1], b"\1\0\0\0ab", "1 bytes left after the 1 elements"),
        ("COMPLEX", [1], b"", "unknown datatype 'COMPLEX'"),
    ],
)
def test_malformed_raw_tensors_are_refused(datatype: str, shape: list[int], raw: bytes, message: str) -> None:
    with pytest.raises(GatewayError) as refused:
        from_raw("x", datatype, shape, raw, LIMITS)
    assert refused.value.status == Status.INVALID_ARGUMENT
    assert message in refused.value.message


def test_rows_follow_the_batch_dimension() -> None:
    inputs = [
        Tensor("features", "FP32", np.array([[1, 2], [3, 4]], dtype=np.float32)),
        Tensor("name", "BYTES", np.array([b"a", b"b"], dtype=np.object_)),
    ]
    assert to_rows(inputs) == [{"features": [1.0, 2.0], "name": "a"}, {"features": [3.0, 4.0], "name": "b"}]
    with pytest.raises(GatewayError, match="disagree on the batch"):
        to_rows([inputs[0], Tensor("y", "INT64", np.array([1, 2, 3]))])
    with pytest.raises(GatewayError, match="shape \\[\\]"):
        to_rows([Tensor("y", "INT64", np.array(1))])


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        (
            [4],
            "pipeline 'iris' input 'features' has shape [4], expected [-1, 4]: the first dimension is the "
            "batch, one row per record; add the batch dimension: shape [1, 4] for one record",
        ),
        ([2, 3], "input 'features' has shape [2, 3], expected [-1, 4]: the first dimension is the batch"),
        ([1, 2, 2], "has shape [1, 2, 2], expected [-1, 4]"),
    ],
)
def test_a_shape_that_does_not_fit_the_pipeline_is_refused_once(shape: list[int], message: str) -> None:
    tensor = Tensor("features", "FP32", np.zeros(shape, dtype=np.float32))
    with pytest.raises(GatewayError) as refused:
        check_inputs("iris", [tensor], {"features": (-1, 4)})
    assert refused.value.status == Status.INVALID_ARGUMENT
    assert message in refused.value.message


def test_inputs_that_fit_pass_and_a_missing_one_is_named() -> None:
    fits = [Tensor("x", "FP32", np.zeros((3, 4, 7))), Tensor("extra", "INT64", np.zeros(3))]
    check_inputs("p", fits, {"x": (-1, 4, -1)})  # extra fields are the record's (split keys, checks)
    with pytest.raises(GatewayError) as refused:
        check_inputs("p", [Tensor("X", "FP32", np.zeros((1, 4)))], {"features": (-1, 4)})
    assert refused.value.message == (
        "pipeline 'p' needs input 'features'; its inputs are 'features' [-1, 4], the request has 'X'"
    )


def test_outputs_are_stacked_with_the_declared_datatype() -> None:
    label = from_rows("label", "INT64", [0, 2, 1])
    assert label.shape == [3] and label.data.dtype == np.int64
    guessed = from_rows("p", None, [[0.5, 0.5], [1.0, 0.0]])
    assert guessed.datatype == "FP64" and guessed.shape == [2, 2]
    with pytest.raises(GatewayError) as ragged:
        from_rows("p", "FP32", [[0.5, 0.5], [1.0]])
    assert ragged.value.status == Status.INTERNAL
    assert oip_datatype("float32") == "FP32" and oip_datatype("string") == "BYTES"


def test_rest_body_with_binary_tensors() -> None:
    x = np.array([[1, 2, 3, 4]], dtype=np.float32)
    header = json.dumps(
        {
            "id": "r1",
            "parameters": {"binary_data_output": True, "timeout": 250_000},
            "inputs": [
                {
                    "name": "features",
                    "shape": [1, 4],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": 16},
                }
            ],
            "outputs": [{"name": "label", "parameters": {"binary_data": False}}, {"name": "probabilities"}],
        }
    ).encode()
    rest = decode_request("iris", "", header + x.tobytes(), len(header), LIMITS)
    assert rest.request.inputs[0].data.tolist() == x.tolist()
    assert rest.request.outputs == ["label", "probabilities"]
    assert rest.request.timeout_s == 0.25
    assert not rest.wants_binary("label") and rest.wants_binary("probabilities")

    probabilities = np.array([[0.1, 0.2, 0.7]], dtype=np.float32)
    response = InferResponse(
        "iris",
        "1",
        "r1",
        [Tensor("label", "INT64", np.array([2])), Tensor("probabilities", "FP32", probabilities)],
    )
    body, length = encode_response(rest, response)
    assert length is not None
    document = json.loads(body[:length])
    assert document["outputs"][0]["data"] == [2]
    assert document["outputs"][1]["parameters"] == {"binary_data_size": 12}
    assert np.frombuffer(body[length:], dtype=np.float32).tolist() == probabilities.reshape(-1).tolist()

    with pytest.raises(GatewayError, match="does not fit the binary body"):
        decode_request("iris", "", header + x.tobytes()[:8], len(header), LIMITS)


@pytest.mark.parametrize(
    ("shape", "status", "message"),
    [
        ([1_000_000, 0], Status.INVALID_ARGUMENT, "a dimension of 0 leaves its rows without elements"),
        ([0, 4], Status.INVALID_ARGUMENT, "a dimension of 0"),
        ([101, 1], Status.TOO_LARGE, "101 rows; a request may hold at most 100"),
        ([10, 10**30, 10**30], Status.TOO_LARGE, "over 1000 elements"),
        ([1, -4], Status.INVALID_ARGUMENT, "non-negative integers"),
        ([1, True], Status.INVALID_ARGUMENT, "non-negative integers"),
    ],
)
def test_shapes_are_checked_before_any_element(shape: list[int], status: Status, message: str) -> None:
    """Refused whatever the data: nothing is decoded or allocated for a shape the limits refuse."""
    for decode in (
        lambda: from_raw("x", "FP32", shape, b"", LIMITS),
        lambda: from_values("x", "FP32", shape, [], LIMITS),
    ):
        with pytest.raises(GatewayError) as refused:
            decode()
        assert refused.value.status == status
        assert message in refused.value.message


def test_a_rest_body_nested_too_deeply_is_refused() -> None:
    body = b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with pytest.raises(GatewayError) as refused:
        decode_request("iris", "", body, None, LIMITS)
    assert refused.value.status == Status.INVALID_ARGUMENT
    assert "not valid JSON" in refused.value.message


@pytest.mark.parametrize(
    "document",
    [
        {"inputs": [{"name": "f", "shape": [1], "datatype": "INT8", "data": [1000]}]},
        {"inputs": [{"name": "f", "shape": [1], "datatype": "INT64", "data": [10**30]}]},
        {"inputs": [{"name": "f", "shape": [1], "datatype": "UINT8", "data": [-1]}]},
        {"inputs": [{"name": "f", "shape": [1], "datatype": "FP32", "data": [1], "parameters": [1]}]},
    ],
)
def test_numbers_out_of_range_and_odd_parameters_are_a_bad_request_not_a_failure(
    document: dict[str, object],
) -> None:
    """Found by schemathesis as 500s: JSON numbers have no bound, numpy's types do."""
    with pytest.raises(GatewayError) as refused:
        decode_request("iris", "", json.dumps(document).encode(), None, LIMITS)
    assert refused.value.status == Status.INVALID_ARGUMENT, refused.value.message


def test_a_timeout_past_a_float_is_taken_as_no_shorter_than_any_deadline() -> None:
    """Found by schemathesis as a 500 (OverflowError)."""
    document = {"inputs": [], "parameters": {"timeout": 10**400}}
    decoded = decode_request("iris", "", json.dumps(document).encode(), None, LIMITS)
    assert decoded.request.timeout_s is not None and decoded.request.timeout_s > 10**200
