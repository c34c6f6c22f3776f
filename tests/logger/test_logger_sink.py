"""PostgresLogSink against the session's real database."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from joey_core import db
from joey_core.settings import CommonSettings
from joey_logger.settings import LoggerSettings
from joey_logger.sink import (
    SINKS,
    BatchRejected,
    PostgresLogSink,
    SinkUnavailable,
    WriteResult,
    create_sink,
)
from tests.conftest import scratch_database
from tests.logger.helpers import count_rows, log_record


@pytest.fixture
def sink(database_url: str) -> Iterator[PostgresLogSink]:
    sink = PostgresLogSink(database_url)
    sink.open()
    yield sink
    sink.close()


def test_a_batch_is_written_once(sink: PostgresLogSink, database_url: str, pipeline: str) -> None:
    batch = [log_record(pipeline, i) for i in range(50)]
    assert sink.write(batch) == WriteResult(written=50, duplicates=0)
    assert sink.write(batch) == WriteResult(written=0, duplicates=50)
    assert count_rows(database_url, pipeline) == (50, 50)


def test_a_partly_known_batch_adds_only_the_new_records(
    sink: PostgresLogSink, database_url: str, pipeline: str
) -> None:
    sink.write([log_record(pipeline, i) for i in range(10)])
    assert sink.write([log_record(pipeline, i) for i in range(5, 15)]) == WriteResult(written=5, duplicates=5)
    assert count_rows(database_url, pipeline) == (15, 15)


def test_duplicates_within_a_batch_collapse(sink: PostgresLogSink, database_url: str, pipeline: str) -> None:
    batch = [log_record(pipeline, i) for i in (1, 2, 1, 3, 2, 1)]
    assert sink.write(batch) == WriteResult(written=3, duplicates=3)
    assert count_rows(database_url, pipeline) == (3, 3)


def test_the_identity_is_the_whole_key(sink: PostgresLogSink, database_url: str, pipeline: str) -> None:
    base = log_record(pipeline, 1)
    variants = [
        base,
        base | {"workspace": "other"},
        base | {"request_id": "req-other"},
        base | {"input_partition": 9},
        base | {"input_offset": 999},
        base | {"pipeline_version": 2, "ok": False, "time": base["time"].replace(year=2020)},
    ]
    assert sink.write(variants) == WriteResult(written=5, duplicates=1)
    assert count_rows(database_url, pipeline) == (5, 5)


def test_values_round_trip(sink: PostgresLogSink, database_url: str, pipeline: str) -> None:
    failed = log_record(
        pipeline,
        1,
        ok=False,
        error="input 'features' has shape [3], expected [4]",
        record_key=None,
        inputs=None,
        raw_input=b"\x00\xffnot json",
        outputs=None,
        shadow_outputs=None,
        check_failures=[],
        models=[],
        elapsed_ns=[],
    )
    succeeded = log_record(
        pipeline,
        2,
        record_key=b"\x00k\xff",
        inputs='{"features": [[5.1, 3.5, 1.4, 0.2]], "note": "ünïcode"}',
        outputs='{"label": [0], "probabilities": [[0.9, 0.05, null]]}',
        shadow_outputs='{"challenger": {"label": [1]}}',
        check_failures=["probabilities[0] > 0.8"],
        models=[
            {"name": "a", "version": 2, "sha256": "00" * 32},
            {"name": "b", "version": 7, "sha256": "ff" * 32},
        ],
        elapsed_ns=[1500, 9_000_000_000],
    )
    sink.write([failed, succeeded])
    with psycopg.connect(database_url) as conn:
        found = conn.execute(
            "SELECT request_id, ok, error, record_key, inputs, raw_input, outputs, shadow_outputs,"
            " check_failures, models, elapsed_ns, time, input_topic, input_partition, input_offset,"
            " pipeline_version, deployment_id FROM inference_logs WHERE pipeline = %s ORDER BY request_id",
            (pipeline,),
        ).fetchall()
    by_id = {row[0]: row for row in found}
    row = by_id["req-1"]
    assert row[1:11] == (False, failed["error"], None, None, b"\x00\xffnot json", None, None, [], [], [])
    row = by_id["req-2"]
    assert row[1:11] == (
        True,
        None,
        b"\x00k\xff",
        {"features": [[5.1, 3.5, 1.4, 0.2]], "note": "ünïcode"},
        None,
        {"label": [0], "probabilities": [[0.9, 0.05, None]]},
        {"challenger": {"label": [1]}},
        ["probabilities[0] > 0.8"],
        succeeded["models"],
        [1500, 9_000_000_000],
    )
    assert row[11] == succeeded["time"]
    assert row[12:] == (succeeded["input_topic"], 2, 2, 1, "dep-1")


@pytest.mark.parametrize(
    "bad",
    [
        {"error": "a NUL \x00 in text"},
        {"inputs": "{not json"},
        {"outputs": '{"a": "\\u0000"}'},
    ],
)
def test_a_batch_with_a_record_the_database_refuses_writes_nothing(
    sink: PostgresLogSink, database_url: str, pipeline: str, bad: dict[str, Any]
) -> None:
    with pytest.raises(BatchRejected):
        sink.write([log_record(pipeline, 1), log_record(pipeline, 2, **bad)])
    assert count_rows(database_url, pipeline) == (0, 0)
    # The connection stays usable for the next batch.
    assert sink.write([log_record(pipeline, 1)]).written == 1


def test_an_unreachable_database_is_reported_as_unavailable(pipeline: str) -> None:
    sink = PostgresLogSink("postgresql://postgres@127.0.0.1:1/nowhere", connect_timeout_s=2)
    with pytest.raises(SinkUnavailable):
        sink.open()
    with pytest.raises(SinkUnavailable):
        sink.write([log_record(pipeline, 1)])


def test_sinks_are_created_by_name(settings: CommonSettings) -> None:
    assert SINKS["postgres"] is PostgresLogSink
    assert isinstance(create_sink(LoggerSettings(**settings.model_dump())), PostgresLogSink)
    with pytest.raises(ValueError, match="unknown log sink 'kafka'; registered sinks: postgres"):
        create_sink(LoggerSettings(**(settings.model_dump() | {"sink": "kafka"})))


def test_records_of_a_deleted_pipelines_deployments_are_dropped(
    sink: PostgresLogSink, database_url: str, pipeline: str
) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("INSERT INTO deleted_deployments (deployment_id) VALUES (%s)", (f"gone-{pipeline}",))
    late = [log_record(pipeline, i, deployment_id=f"gone-{pipeline}") for i in range(3)]
    assert sink.write([*late, log_record(pipeline, 3)]).written == 1
    assert count_rows(database_url, pipeline) == (1, 1)


def test_long_request_ids_are_stored_whole_and_once(
    sink: PostgresLogSink, database_url: str, pipeline: str
) -> None:
    # Over the ~2.7 KB a btree entry holds, and random: Postgres compresses index entries, so
    # repeated characters would fit the old key and not test it. Only their hash is in the key.
    ids = [secrets.token_hex(1536), secrets.token_hex(50 * 1024), "é" + secrets.token_hex(1536)]
    batch = [log_record(pipeline, i, request_id=request_id) for i, request_id in enumerate(ids)]
    assert sink.write(batch) == WriteResult(written=3, duplicates=0)
    assert sink.write(batch) == WriteResult(written=0, duplicates=3)
    with psycopg.connect(database_url) as conn:
        stored = conn.execute(
            "SELECT request_id, joey_request_key(request_id) FROM inference_logs WHERE pipeline = %s "
            "ORDER BY input_offset",
            (pipeline,),
        ).fetchall()
    assert [row[0] for row in stored] == ids
    assert all(row[1].startswith("sha256:") and len(row[1]) == 71 for row in stored)
    assert len({row[1] for row in stored}) == 3
    # A short id spelling out a long one's key is a different request, with a key of its own.
    spoof = log_record(pipeline, 0, request_id=stored[0][1])
    assert sink.write([spoof, batch[0]]) == WriteResult(written=1, duplicates=1)


def test_a_row_too_large_for_the_index_is_refused_not_an_outage(
    sink: PostgresLogSink, database_url: str, pipeline: str
) -> None:
    # A long workspace name (random: Postgres compresses index entries) still makes the unique key's
    # entry too large (ProgramLimitExceeded, an OperationalError in psycopg's classes): the data's
    # fault, not the database's.
    with pytest.raises(BatchRejected, match="ProgramLimitExceeded 54000: index row size"):
        sink.write([log_record(pipeline, 1), log_record(pipeline, 2, workspace=secrets.token_urlsafe(6000))])
    assert count_rows(database_url, pipeline) == (0, 0)
    assert sink.write([log_record(pipeline, 1)]).written == 1


def test_a_lost_connection_is_an_outage_and_the_next_write_reconnects(
    sink: PostgresLogSink, database_url: str, pipeline: str
) -> None:
    assert sink.write([log_record(pipeline, 1)]).written == 1
    assert sink._conn is not None  # its backend, and no other: the session database is shared
    pid = sink._conn.info.backend_pid
    with psycopg.connect(database_url, autocommit=True) as conn:
        ended = conn.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchall()
    with pytest.raises(SinkUnavailable):
        sink.write([log_record(pipeline, 2)])
    assert sink.write([log_record(pipeline, 2)]).written == 1
    assert ended == [(True,)]


def test_a_read_only_database_is_an_outage_not_a_refusal(
    sink: PostgresLogSink, database_url: str, pipeline: str
) -> None:
    # As on a standby after a failover, or under default_transaction_read_only: every write fails
    # (ReadOnlySqlTransaction 25006), and the records must wait for a writable server, not be
    # dead-lettered as if their data were refused. Its session only: the database is shared.
    assert sink.write([log_record(pipeline, 1)]).written == 1
    assert sink._conn is not None
    sink._conn.execute("SET default_transaction_read_only = on")
    sink._conn.commit()
    with pytest.raises(SinkUnavailable, match="ReadOnlySqlTransaction 25006"):
        sink.write([log_record(pipeline, 2)])
    assert count_rows(database_url, pipeline) == (1, 1)
    assert sink.write([log_record(pipeline, 2)]).written == 1  # a new connection, writable


def test_a_database_at_migration_0011_upgrades_and_keeps_one_row_per_input(pipeline: str) -> None:
    with scratch_database("joey_logupgrade", up_to=11) as url:
        # Rows stored under the old key, one with a request id long enough (600 bytes) to be hashed now.
        old = [log_record(pipeline, 0), log_record(pipeline, 1, request_id=secrets.token_hex(300))]
        with psycopg.connect(url) as conn, conn.cursor() as cursor:
            cursor.executemany(
                "INSERT INTO inference_logs (workspace, pipeline, pipeline_version, deployment_id, "
                "request_id, time, input_topic, input_partition, input_offset, ok) "
                "VALUES (%(workspace)s, %(pipeline)s, 1, 'd', %(request_id)s, now(), 't', "
                "%(input_partition)s, %(input_offset)s, true)",
                old,
            )
        assert db.migrate(url, up_to=13) == ["0012_log_request_key.sql", "0013_assay_failure.sql"]
        sink = PostgresLogSink(url)
        sink.open()
        try:
            # The same inputs again (a replay across the upgrade) add nothing; a long id is stored.
            longest = log_record(pipeline, 2, request_id=secrets.token_hex(50 * 1024))
            assert sink.write([*old, longest]) == WriteResult(written=1, duplicates=2)
            assert sink.write([longest]) == WriteResult(written=0, duplicates=1)
        finally:
            sink.close()
        assert count_rows(url, pipeline) == (3, 3)
