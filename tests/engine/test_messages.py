"""The records a replica writes: strict JSON outputs and errors, Avro logs that round-trip."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime

from joey import records
from joey_engine.deployment import Deployment
from joey_engine.messages import Source, error_value, log_value, output_value
from joey_engine.pipeline import Failure, Success

NOW = datetime(2026, 11, 25, 12, 0, 0, 123456, tzinfo=UTC)


def source(value: bytes | None, offset: int = 7) -> Source:
    return Source("joey.w.p.inputs", 2, offset, b"key", value, f"req-{offset}")


def test_output_record_carries_input_output_and_metadata(make_deployment: Callable[..., Deployment]) -> None:
    deployment = make_deployment()
    raw = b'{"features": [1, 2.5, 3, 4], "note": "keep me"}'
    result = Success(json.loads(raw), {"label": 2, "probabilities": [0.0, 0.1, 0.9]}, (1500, 20))
    body = json.loads(output_value(deployment, source(raw), result, NOW))
    assert body == {
        "time": "2026-11-25T12:00:00.123456+00:00",
        "request_id": "req-7",
        "in": {"features": [1, 2.5, 3, 4], "note": "keep me"},
        "out": {"label": 2, "probabilities": [0.0, 0.1, 0.9]},
        "check_failures": [],
        "metadata": {
            "workspace": deployment.workspace,
            "pipeline": deployment.pipeline,
            "pipeline_version": deployment.pipeline_version,
            "deployment_id": deployment.deployment_id,
            "models": deployment.models,
            "partition": 2,
            "offset": 7,
            "elapsed_ns": [1500, 20],
        },
    }


def test_non_strict_json_input_is_made_strict_everywhere(make_deployment: Callable[..., Deployment]) -> None:
    deployment = make_deployment()
    raw = b'{"features": [1, 2, 3, 4], "extra": NaN}'
    result = Success(json.loads(raw), {"label": 1}, (10,))
    output = output_value(deployment, source(raw), result, NOW)
    assert json.loads(output, parse_constant=lambda c: 1 / 0)["in"] == {
        "features": [1, 2, 3, 4],
        "extra": None,
    }
    log = records.decode_log(log_value(deployment, source(raw), result, NOW))
    assert json.loads(log["inputs"]) == {"features": [1, 2, 3, 4], "extra": None}
    assert log["ok"] and json.loads(log["outputs"]) == {"label": 1}


def test_error_and_log_of_a_record_that_is_not_json(make_deployment: Callable[..., Deployment]) -> None:
    deployment = make_deployment()
    raw = b"\xffnot json"
    failure = Failure("record is not valid JSON: ...", None)
    error = json.loads(error_value(deployment, source(raw), failure, NOW))
    assert error["error"] == failure.reason and error["input"] is None
    assert error["raw_input"] == raw.decode("utf-8", errors="replace")
    log = records.decode_log(log_value(deployment, source(raw), failure, NOW))
    assert not log["ok"] and log["inputs"] is None and log["raw_input"] == raw
    assert (log["input_partition"], log["input_offset"], log["request_id"]) == (2, 7, "req-7")
