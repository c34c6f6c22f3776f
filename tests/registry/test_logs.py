from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import grpc
import psycopg
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from psycopg.types.json import Jsonb

from joey.v1 import registry_pb2 as pb
from tests.registry.helpers import Stub, rpc_error, step, upload

T0 = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)


def ts(value: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


@pytest.fixture
def logged(stub: Stub, workspace: str, iris_bytes: bytes, db: psycopg.Connection) -> str:
    """Pipeline "p" with six log rows a minute apart: r0..r5, every third one failed."""
    sha = upload(stub, workspace, "iris", iris_bytes).sha256
    stub.CreatePipeline(pb.CreatePipelineRequest(workspace=workspace, name="p", steps=[step("iris")]))
    for i in range(6):
        ok = i % 3 != 2
        db.execute(
            """
            INSERT INTO inference_logs (workspace, pipeline, pipeline_version, deployment_id, request_id,
                time, input_topic, input_partition, input_offset, ok, error, inputs, raw_input, outputs,
                check_failures, models, elapsed_ns)
            VALUES (%s, 'p', 1, 'd1', %s, %s, 'in', %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
            """,
            (
                workspace,
                f"r{i}",
                T0 + timedelta(minutes=i),
                i % 2,
                100 + i,
                ok,
                None if ok else f"error {i}",
                Jsonb({"features": [i, 1, 2, 3]}) if i != 5 else None,
                b"not json" if i == 5 else None,
                Jsonb({"label": [i]}) if ok else None,
                Jsonb(["too small"] if i == 1 else []),
                Jsonb([{"name": "iris", "version": 1, "sha256": sha}]),
                Jsonb([1000 + i]),
            ),
        )
    # Another pipeline's row must never show up.
    db.execute(
        "INSERT INTO inference_logs (workspace, pipeline, pipeline_version, deployment_id, request_id, time, "
        "input_topic, input_partition, input_offset, ok) "
        "VALUES (%s, 'other', 1, 'd', 'x', %s, 'in', 0, 0, true)",
        (workspace, T0),
    )
    return workspace


def query(stub: Stub, workspace: str, **fields: object) -> pb.QueryLogsResponse:
    return stub.QueryLogs(pb.QueryLogsRequest(workspace=workspace, pipeline="p", **fields))  # type: ignore[arg-type]


def ids(response: pb.QueryLogsResponse) -> list[str]:
    return [e.request_id for e in response.entries]


def test_newest_first_without_range(stub: Stub, logged: str) -> None:
    response = query(stub, logged)
    assert ids(response) == ["r5", "r4", "r3", "r2", "r1", "r0"]
    assert response.total == 6
    limited = query(stub, logged, limit=2)
    assert (ids(limited), limited.total) == (["r5", "r4"], 6)


def test_chronological_with_range(stub: Stub, logged: str) -> None:
    response = query(stub, logged, start=ts(T0 + timedelta(minutes=1)), end=ts(T0 + timedelta(minutes=4)))
    assert (ids(response), response.total) == (["r1", "r2", "r3"], 3)
    assert ids(query(stub, logged, start=ts(T0 + timedelta(minutes=4)))) == ["r4", "r5"]
    assert ids(query(stub, logged, end=ts(T0 + timedelta(minutes=2)), limit=1)) == ["r0"]


def test_validity_filter(stub: Stub, logged: str) -> None:
    failed = query(stub, logged, validity=pb.LOG_VALIDITY_FAILED)
    assert (ids(failed), failed.total) == (["r5", "r2"], 2)
    assert query(stub, logged, validity=pb.LOG_VALIDITY_OK).total == 4


def test_entry_fields(stub: Stub, logged: str) -> None:
    entries = {e.request_id: e for e in query(stub, logged).entries}
    ok = entries["r1"]
    assert ok.ok and ok.error == "" and ok.pipeline_version == 1
    assert json.loads(ok.inputs_json) == {"features": [1, 1, 2, 3]}
    assert json.loads(ok.outputs_json) == {"label": [1]}
    assert list(ok.check_failures) == ["too small"]
    assert [(m.name, m.version) for m in ok.models] == [("iris", 1)]
    assert list(ok.elapsed_ns) == [1001]
    assert (ok.input_partition, ok.input_offset) == (1, 101)
    assert ok.time.ToDatetime(tzinfo=UTC) == T0 + timedelta(minutes=1)
    bad = entries["r5"]
    assert (bad.ok, bad.error, bad.inputs_json, bad.outputs_json, bad.raw_input) == (
        False,
        "error 5",
        "",
        "",
        b"not json",
    )


def test_bad_log_queries(stub: Stub, logged: str) -> None:
    error = rpc_error(lambda: query(stub, logged, limit=10_001))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "limit must be between 1 and 10000" in error.details()
    error = rpc_error(lambda: query(stub, logged, start=ts(T0), end=ts(T0 - timedelta(seconds=1))))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    error = rpc_error(lambda: stub.QueryLogs(pb.QueryLogsRequest(workspace=logged, pipeline="ghost")))
    assert error.code() == grpc.StatusCode.NOT_FOUND
