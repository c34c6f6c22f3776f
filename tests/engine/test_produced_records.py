"""The records a replica writes: strict JSON outputs and errors, Avro logs that round-trip."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from joey_core import records, topics
from joey_core.kafka import ConsumedRecord
from joey_core.records import DEADLINE_HEADER, REQUEST_ID_HEADER
from joey_engine.deployment import Deployment
from joey_engine.pipeline import Failure, Result, Success
from joey_engine.produced_records import (
    Produced,
    answered,
    error_value,
    expired,
    log_entry,
    log_record,
    output_value,
    refused,
)

NOW = datetime(2026, 11, 25, 12, 0, 0, 123456, tzinfo=UTC)


def source(value: bytes | None, offset: int = 7, deadline_ms: float | None = None) -> ConsumedRecord:
    headers = [(REQUEST_ID_HEADER, f"req-{offset}".encode())]
    if deadline_ms is not None:
        headers.append((DEADLINE_HEADER, str(deadline_ms).encode()))
    return ConsumedRecord("joey.w.p.inputs", 2, offset, b"key", value, headers)


def logged(record: Produced) -> dict[str, Any]:
    """The one entry of a log record."""
    [entry] = records.decode_log_entries(record.headers, record.value)
    return entry


def log_of(deployment: Deployment, source: ConsumedRecord, result: Result, now: datetime) -> dict[str, Any]:
    """The log entry of one input, as its log record carries it."""
    return logged(log_record([log_entry(deployment, source, result, now)]))


def produced(
    deployment: Deployment, source: ConsumedRecord, result: Result, now: datetime, limit: int
) -> tuple[Result, list[Produced]]:
    """What a replica produces for a batch of one input: its result, reply and log record."""
    batch = answered(deployment, [source], [result], now, limit)
    [log] = batch.logs
    return batch.results[0], [*batch.replies, log.record]


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
    log = log_of(deployment, source(raw), result, NOW)
    assert json.loads(log["inputs"]) == {"features": [1, 2, 3, 4], "extra": None}
    assert log["ok"] and json.loads(log["outputs"]) == {"label": 1}


def test_error_and_log_of_a_record_that_is_not_json(make_deployment: Callable[..., Deployment]) -> None:
    deployment = make_deployment()
    raw = b"\xffnot json"
    failure = Failure("record is not valid JSON: ...", None)
    error = json.loads(error_value(deployment, source(raw), failure, NOW))
    assert error["error"] == failure.reason and error["input"] is None
    assert error["raw_input"] == raw.decode("utf-8", errors="replace")
    log = log_of(deployment, source(raw), failure, NOW)
    assert not log["ok"] and log["inputs"] is None and log["raw_input"] == raw
    assert (log["input_partition"], log["input_offset"], log["request_id"]) == (2, 7, "req-7")


def test_records_of_a_pipeline_with_checks_carry_the_anomalies(
    make_deployment: Callable[..., Deployment],
    make_step: Callable[..., Any],
    make_validations: Callable[..., Any],
) -> None:
    checks = make_validations(too_sure="out.probabilities[0] > 0.99", wide="in.features[0] > 7.0")
    deployment = make_deployment(steps=[make_step("0" * 64), checks])
    raw = b'{"features": [7.5, 2.5, 3, 4]}'
    outputs = {"label": 0, "probabilities": [1.0, 0.0, 0.0]}
    flagged = Success(json.loads(raw), outputs, (1500, 20), ("too_sure", "wide"))
    body = json.loads(output_value(deployment, source(raw), flagged, NOW))
    assert body["check_failures"] == ["too_sure", "wide"]
    assert body["anomaly"] == {"count": 2, "too_sure": True, "wide": True}
    assert list(body) == ["time", "request_id", "in", "out", "check_failures", "anomaly", "metadata"]
    assert body["metadata"]["elapsed_ns"] == [1500, 20]
    log = log_of(deployment, source(raw), flagged, NOW)
    assert log["check_failures"] == ["too_sure", "wide"] and log["ok"]

    one = Success(json.loads(raw), outputs, (1500, 20), ("wide",))
    body = json.loads(output_value(deployment, source(raw, 8), one, NOW))
    assert body["check_failures"] == ["wide"]
    assert body["anomaly"] == {"count": 1, "too_sure": False, "wide": True}

    clean = Success(json.loads(raw), outputs, (1500, 20))
    body = json.loads(output_value(deployment, source(raw, 9), clean, NOW))
    assert body["check_failures"] == [] and body["anomaly"] == {"count": 0, "too_sure": False, "wide": False}
    assert log_of(deployment, source(raw, 9), clean, NOW)["check_failures"] == []


def test_records_of_a_pipeline_without_checks_have_no_anomaly_object(
    make_deployment: Callable[..., Deployment],
) -> None:
    deployment = make_deployment()
    raw = b'{"features": [1, 2, 3, 4]}'
    value = output_value(deployment, source(raw), Success(json.loads(raw), {"label": 1}, (10,)), NOW)
    assert b'"out":{"label":1},"check_failures":[],"metadata":{' in value
    assert b"anomaly" not in value


def test_records_of_a_pipeline_with_a_shadow_step_carry_the_challengers(
    make_deployment: Callable[..., Deployment],
    make_step: Callable[..., Any],
    make_challenger: Callable[..., Any],
) -> None:
    challengers = [make_challenger("sum"), make_challenger("pooled", sha256="4" * 64)]
    deployment = make_deployment(steps=[make_step("0" * 64, challengers=challengers)])
    raw = b'{"features": [1, 2, 3, 4]}'
    outputs = {"label": 1, "probabilities": [0.0, 1.0, 0.0]}
    shadow = {"sum": {"total": 10.0}, "pooled": {"pooled": [1.0, 2.0, 3.0, 4.0]}}
    ok = Success(json.loads(raw), outputs, (1500,), shadow=shadow, shadow_errors={})
    value = output_value(deployment, source(raw), ok, NOW)
    body = json.loads(value)
    assert body["out"] == outputs and body["shadow"] == shadow
    assert list(body) == ["time", "request_id", "in", "out", "shadow", "check_failures", "metadata"]
    # Only the champion produced the result.
    assert body["metadata"]["models"] == [{"name": "iris", "version": 1, "sha256": "0" * 64}]
    log = log_of(deployment, source(raw), ok, NOW)
    assert json.loads(log["shadow_outputs"]) == shadow and json.loads(log["outputs"]) == outputs
    assert log["models"] == body["metadata"]["models"]

    reason = "challenger 'pooled' v1 of step 1 output 'pooled' has shape [1, 4], expected ..."
    partly = Success(
        json.loads(raw), outputs, (1500,), shadow={"sum": {"total": 10.0}}, shadow_errors={"pooled": reason}
    )
    body = json.loads(output_value(deployment, source(raw, 8), partly, NOW))
    assert body["shadow"] == {"sum": {"total": 10.0}} and body["shadow_errors"] == {"pooled": reason}
    assert list(body)[3:6] == ["out", "shadow", "shadow_errors"]
    log = log_of(deployment, source(raw, 8), partly, NOW)
    assert json.loads(log["shadow_outputs"]) == {"sum": {"total": 10.0}}

    failed = Failure("missing input 'features'; ...", {"x": 1})
    assert log_of(deployment, source(b'{"x": 1}', 9), failed, NOW)["shadow_outputs"] is None


def test_records_without_a_shadow_step_have_no_shadow(make_deployment: Callable[..., Deployment]) -> None:
    deployment = make_deployment()
    raw = b'{"features": [1, 2, 3, 4]}'
    result = Success(json.loads(raw), {"label": 1}, (10,))
    assert b"shadow" not in output_value(deployment, source(raw), result, NOW)
    assert log_of(deployment, source(raw), result, NOW)["shadow_outputs"] is None


def test_a_record_past_its_deadline_fails_with_the_reason_in_error_and_log(
    make_deployment: Callable[..., Deployment],
) -> None:
    deployment = make_deployment()
    raw = b'{"features": [1, 2, 3, 4]}'
    late = source(raw, deadline_ms=1_000_000.0)
    assert expired(late, now_ms=1_000_000.0) is None, "a deadline is met up to and including its instant"
    assert expired(source(raw), now_ms=2e12) is None, "a record without a deadline never expires"
    failure = expired(late, now_ms=1_000_250.0)
    assert isinstance(failure, Failure)
    assert failure.reason.startswith("deadline exceeded 250 ms")
    error = json.loads(error_value(deployment, late, failure, NOW))
    assert error["request_id"] == "req-7" and error["error"] == failure.reason
    assert error["raw_input"] == raw.decode()
    log = log_of(deployment, late, failure, NOW)
    assert not log["ok"] and log["error"] == failure.reason


def test_records_that_fit_are_produced_as_they_are(make_deployment: Callable[..., Deployment]) -> None:
    deployment = make_deployment()
    raw = b'{"features": [1, 2, 3, 4]}'
    result = Success(json.loads(raw), {"label": 1}, (10,))
    answer, produced_ = produced(deployment, source(raw), result, NOW, 10_000)
    assert answer is result
    reply, log = produced_
    assert (reply.topic, reply.key, reply.value) == (
        deployment.topics.outputs,
        b"key",
        output_value(deployment, source(raw), result, NOW),
    )
    assert (log.topic, log.key, log.value) == (
        topics.LOGS,
        b"req-7",
        log_record([log_entry(deployment, source(raw), result, NOW)]).value,
    )


def test_an_output_over_the_limit_becomes_a_bounded_error(make_deployment: Callable[..., Deployment]) -> None:
    deployment = make_deployment()
    raw = json.dumps({"features": [1, 2, 3, 4], "pad": "é" * 20_000}).encode()
    result = Success(json.loads(raw), {"label": 1}, (10,))
    limit = 8_000
    answer, produced_ = produced(deployment, source(raw), result, NOW, limit)
    assert isinstance(answer, Failure) and answer.inputs is None
    assert answer.reason.startswith("its output record would be ")
    assert answer.reason.endswith(
        f"over the {limit}-byte limit of a record (the producer's message.max.bytes less "
        f"Kafka's overhead); raw_input holds its first 1024 of {len(raw)} bytes"
    )
    error, log = produced_
    assert error.topic == deployment.topics.errors and error.size <= limit and log.size <= limit
    body = json.loads(error.value)
    assert body["error"] == answer.reason and body["input"] is None
    assert body["raw_input"] == raw[:1024].decode("utf-8", errors="replace")
    entry = logged(log)
    assert (entry["ok"], entry["error"], entry["inputs"], entry["raw_input"]) == (
        False,
        answer.reason,
        None,
        raw[:1024],
    )


def test_a_failure_whose_error_is_too_large_keeps_its_reason_and_a_huge_key_is_digested(
    make_deployment: Callable[..., Deployment],
) -> None:
    deployment = make_deployment()
    raw = json.dumps({"features": "x" * 50_000}).encode()
    big_key = ConsumedRecord("joey.w.p.inputs", 2, 7, b"k" * 50_000, raw, [(REQUEST_ID_HEADER, b"r")])
    answer, (error, log) = produced(
        deployment, big_key, Failure("wrong type " * 1000, json.loads(raw)), NOW, 20_000
    )
    assert isinstance(answer, Failure) and answer.reason.startswith("wrong type wrong type")
    assert "its error record would be" in answer.reason and len(answer.reason) < 5_000
    assert error.key == b"sha256:" + hashlib.sha256(b"k" * 50_000).hexdigest().encode()
    assert logged(log)["record_key"] == error.key


def test_a_record_that_cannot_be_encoded_fails_alone(make_deployment: Callable[..., Deployment]) -> None:
    deployment = make_deployment()
    # A lone surrogate (a python step's error message can hold one) has no UTF-8 form for Avro.
    answer, (error, log) = produced(deployment, source(b"{}"), Failure("bad \udc80 value", {}), NOW, 100_000)
    assert isinstance(answer, Failure)
    assert answer.reason.startswith("bad ? value; its records could not be encoded (UnicodeEncodeError: ")
    assert json.loads(error.value)["error"] == answer.reason
    assert logged(log)["error"] == answer.reason


def test_a_record_with_an_unusable_request_id_is_refused() -> None:
    bad = ConsumedRecord("joey.w.p.inputs", 2, 7, None, b"{}", [(REQUEST_ID_HEADER, b"\xff")])
    failure = refused(bad, now_ms=0)
    assert failure == Failure("request-id header is not UTF-8 (byte 0)", None)
    assert refused(source(b"{}"), now_ms=0) is None


def batch_of(count: int, pad: int = 0) -> tuple[list[ConsumedRecord], list[Result]]:
    raws = [json.dumps({"features": [1, 2, 3, 4], "pad": "x" * pad}).encode() for _ in range(count)]
    return [source(raw, offset) for offset, raw in enumerate(raws)], [
        Success(json.loads(raw), {"label": 1}, (10,)) for raw in raws
    ]


def test_a_batch_is_logged_in_one_record_keyed_by_its_first_request_id(
    make_deployment: Callable[..., Deployment],
) -> None:
    deployment = make_deployment()
    sources, results = batch_of(5)
    batch = answered(deployment, sources, results, NOW, 100_000)
    assert batch.results == results and batch.bounded == 0
    assert [json.loads(r.value)["request_id"] for r in batch.replies] == [s.request_id for s in sources]
    [log] = batch.logs
    assert (log.record.topic, log.record.key, log.inputs) == (topics.LOGS, b"req-0", (0, 1, 2, 3, 4))
    entries = records.decode_log_entries(log.record.headers, log.record.value)
    assert [e["request_id"] for e in entries] == [s.request_id for s in sources]


def test_a_batch_over_the_limit_is_logged_in_several_records_each_input_once(
    make_deployment: Callable[..., Deployment],
) -> None:
    deployment = make_deployment()
    sources, results = batch_of(40, pad=500)
    limit = 5_000
    batch = answered(deployment, sources, results, NOW, limit)
    assert batch.bounded == 0 and len(batch.logs) > 1
    assert all(log.record.size <= limit for log in batch.logs)
    logged_ids = [
        e["request_id"]
        for log in batch.logs
        for e in records.decode_log_entries(log.record.headers, log.record.value)
    ]
    assert logged_ids == [s.request_id for s in sources]
    assert [log.record.key for log in batch.logs] == [
        sources[log.inputs[0]].request_id.encode() for log in batch.logs
    ]


def test_an_entry_that_fits_no_log_record_fails_its_input_alone(
    make_deployment: Callable[..., Deployment],
) -> None:
    deployment = make_deployment()
    sources, results = batch_of(6)
    # One input too large to log even alone, one whose log entry cannot be encoded (a lone surrogate).
    big = json.dumps({"features": [1, 2, 3, 4], "pad": "y" * 30_000}).encode()
    sources[2], results[2] = source(big, 2), Success(json.loads(big), {"label": 1}, (10,))
    results[4] = Failure("bad \udc80 value", {})
    limit = 20_000
    batch = answered(deployment, sources, results, NOW, limit)
    assert batch.bounded == 2
    assert [type(r) for r in batch.results] == [Success, Success, Failure, Success, Failure, Success]
    assert isinstance(batch.results[2], Failure) and "record would be" in batch.results[2].reason
    assert isinstance(batch.results[4], Failure)
    assert "its records could not be encoded (UnicodeEncodeError: " in batch.results[4].reason
    replies = [json.loads(r.value) for r in batch.replies]
    assert [("error" in r) for r in replies] == [False, False, True, False, True, False]
    entries = {
        e["request_id"]: e
        for log in batch.logs
        for e in records.decode_log_entries(log.record.headers, log.record.value)
    }
    assert sorted(entries) == sorted(s.request_id for s in sources)
    assert [entries[s.request_id]["ok"] for s in sources] == [True, True, False, True, False, True]
    assert all(log.record.size <= limit for log in batch.logs)
