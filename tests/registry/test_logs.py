from __future__ import annotations

import base64
import json
import random
from datetime import UTC, datetime, timedelta

import grpc
import psycopg
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from psycopg.types.json import Jsonb

from joey_core.v1 import registry_pb2 as pb
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


def test_anomalies_filter(stub: Stub, logged: str) -> None:
    anomalies = query(stub, logged, anomalies_only=True)
    assert (ids(anomalies), anomalies.total) == (["r1"], 1)
    assert list(anomalies.entries[0].check_failures) == ["too small"]
    assert query(stub, logged, anomalies_only=True, validity=pb.LOG_VALIDITY_FAILED).total == 0
    assert ids(query(stub, logged, anomalies_only=True, start=ts(T0 + timedelta(minutes=2)))) == []


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


ROWS = 250


@pytest.fixture
def many(stub: Stub, workspace: str, iris_bytes: bytes, db: psycopg.Connection) -> str:
    """Pipeline "p" with 250 rows, three per second (ties broken by id), inserted out of time order
    so ids and times disagree; every fifth row failed (50 failed, 200 ok); every fourth row from r1
    that did not fail is an anomaly (a failed check)."""
    upload(stub, workspace, "iris", iris_bytes)
    stub.CreatePipeline(pb.CreatePipelineRequest(workspace=workspace, name="p", steps=[step("iris")]))
    order = random.Random(7).sample(range(ROWS), ROWS)
    with db.cursor() as cur:
        cur.executemany(
            "INSERT INTO inference_logs (workspace, pipeline, pipeline_version, deployment_id, request_id, "
            "time, input_topic, input_partition, input_offset, ok, check_failures) "
            "VALUES (%s, 'p', 1, 'd1', %s, %s, 'in', 0, %s, %s, %s)",
            [
                (
                    workspace,
                    f"r{i}",
                    T0 + timedelta(seconds=i // 3),
                    i,
                    i % 5 != 0,
                    Jsonb(["too_sure"] if i % 4 == 1 and i % 5 != 0 else []),
                )
                for i in order
            ],
        )
    return workspace


def expected(db: psycopg.Connection, workspace: str, chronological: bool, where: str = "true") -> list[str]:
    direction = "ASC" if chronological else "DESC"
    rows = db.execute(
        f"SELECT request_id FROM inference_logs WHERE workspace = %s AND pipeline = 'p' AND {where} "
        f"ORDER BY time {direction}, id {direction}",
        (workspace,),
    ).fetchall()
    return [r[0] for r in rows]


def all_pages(stub: Stub, workspace: str, token: str = "", **fields: object) -> list[pb.QueryLogsResponse]:
    pages = [query(stub, workspace, page_token=token, **fields)]
    while pages[-1].next_page_token:
        assert len(pages) <= ROWS, "paging does not end"
        pages.append(query(stub, workspace, page_token=pages[-1].next_page_token, **fields))
    return pages


ANOMALY = "jsonb_array_length(check_failures) > 0"


@pytest.mark.parametrize(
    ("fields", "chronological", "where"),
    [
        ({}, False, "true"),
        ({"validity": pb.LOG_VALIDITY_OK}, False, "ok"),
        ({"validity": pb.LOG_VALIDITY_FAILED}, False, "NOT ok"),
        ({"start": ts(T0)}, True, "true"),
        (
            {"start": ts(T0 + timedelta(seconds=10)), "end": ts(T0 + timedelta(seconds=70))},
            True,
            f"time >= '{T0 + timedelta(seconds=10)}' AND time < '{T0 + timedelta(seconds=70)}'",
        ),
        ({"end": ts(T0 + timedelta(seconds=200)), "validity": pb.LOG_VALIDITY_OK}, True, "ok"),
        ({"anomalies_only": True}, False, ANOMALY),
        ({"anomalies_only": True, "validity": pb.LOG_VALIDITY_OK}, False, f"ok AND {ANOMALY}"),
        ({"anomalies_only": True, "validity": pb.LOG_VALIDITY_FAILED}, False, "false"),
        (
            {"anomalies_only": True, "start": ts(T0 + timedelta(seconds=20))},
            True,
            f"time >= '{T0 + timedelta(seconds=20)}' AND {ANOMALY}",
        ),
    ],
)
def test_pages_cover_the_result_exactly(
    stub: Stub, many: str, db: psycopg.Connection, fields: dict[str, object], chronological: bool, where: str
) -> None:
    want = expected(db, many, chronological, where)
    pages = all_pages(stub, many, limit=40, **fields)
    got = [rid for page in pages for rid in ids(page)]
    assert got == want
    assert len(pages) == max(1, -(-len(want) // 40))  # no empty trailing page, even at a multiple of 40
    assert all(len(page.entries) == 40 and page.next_page_token for page in pages[:-1])
    assert pages[-1].next_page_token == ""
    assert {page.total for page in pages} == {len(want)}


def test_page_size_may_change_between_pages(stub: Stub, many: str, db: psycopg.Connection) -> None:
    first = query(stub, many, limit=7)
    rest = all_pages(stub, many, first.next_page_token, limit=100)
    assert ids(first) + [rid for page in rest for rid in ids(page)] == expected(db, many, False)


def test_token_of_another_query_is_refused(stub: Stub, many: str) -> None:
    token = query(stub, many, limit=40).next_page_token
    for other in (
        {"validity": pb.LOG_VALIDITY_FAILED},
        {"start": ts(T0)},
        {"end": ts(T0 + timedelta(days=1))},
        {"anomalies_only": True},
    ):
        error = rpc_error(lambda other=other: query(stub, many, limit=40, page_token=token, **other))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "page token does not belong to this query" in error.details()


def _token(body: dict[str, object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(body).encode()).decode().rstrip("=")


def test_damaged_tokens_are_invalid_arguments(stub: Stub, many: str) -> None:
    token = query(stub, many, limit=40).next_page_token
    body = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    assert set(body) == {"v", "f", "t", "i", "n"}
    damaged = [
        "garbage",
        "!!!!",
        "x" * 600,
        token[:-3],
        _token([1, 2]),  # type: ignore[arg-type]
        base64.urlsafe_b64encode(b"\xff\xfe").decode(),
        _token(body | {"i": "12"}),
        _token(body | {"i": -1}),
        _token(body | {"i": True}),
        _token(body | {"t": 10**20}),
        _token(body | {"t": 1.5}),
        _token(body | {"n": -5}),
        _token(body | {"v": 2}),
        _token(body | {"extra": 1}),
        _token({k: v for k, v in body.items() if k != "f"}),
    ]
    for bad in damaged:
        error = rpc_error(lambda bad=bad: query(stub, many, limit=40, page_token=bad))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, bad
        assert "page token" in error.details()
    forged = rpc_error(lambda: query(stub, many, limit=40, page_token=_token(body | {"f": "0" * 16})))
    assert "does not belong" in forged.details()
    # A well-formed cursor moved by hand stays inside the caller's own filter.
    moved = query(stub, many, limit=500, page_token=_token(body | {"t": 0, "i": 1}))
    assert (len(moved.entries), moved.next_page_token) == (0, "")


def test_shadow_outputs_are_returned_as_shadow_json(
    stub: Stub, workspace: str, iris_bytes: bytes, db: psycopg.Connection
) -> None:
    upload(stub, workspace, "iris", iris_bytes)
    stub.CreatePipeline(pb.CreatePipelineRequest(workspace=workspace, name="p", steps=[step("iris")]))
    shadow = {"iris-b": {"label": [1], "probabilities": [0.25, 0.5, 0.25]}, "iris-c": {"label": [2]}}
    for i, outputs in enumerate([shadow, None]):
        db.execute(
            "INSERT INTO inference_logs (workspace, pipeline, pipeline_version, deployment_id, request_id, "
            "time, input_topic, input_partition, input_offset, ok, outputs, shadow_outputs) "
            "VALUES (%s, 'p', 1, 'd', %s, %s, 'in', 0, %s, true, %s, %s)",
            (
                workspace,
                f"r{i}",
                T0 + timedelta(minutes=i),
                i,
                Jsonb({"label": [0]}),
                outputs and Jsonb(outputs),
            ),
        )
    entries = query(stub, workspace, start=ts(T0)).entries
    assert [e.request_id for e in entries] == ["r0", "r1"]
    assert json.loads(entries[0].shadow_json) == shadow
    assert entries[1].shadow_json == ""
