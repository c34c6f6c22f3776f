"""The connector-bridge's parts, fast: published specs checked, results decoded into rows, and the
source lease held by one process at a time and handed over when its holder's connection ends."""

from __future__ import annotations

import json

import pytest

from joey_connector_bridge.runners import log_rows, result_row
from joey_connector_bridge.store import BridgeStore
from joey_core import bridges, records, topics
from joey_core.kafka import ConsumedRecord
from tests.joey_core.test_records import BATCH_HEADERS, log


@pytest.mark.parametrize(
    "value",
    [
        b"[]",
        b'{"id": 1}',
        json.dumps({"id": "x", "workspace": "w", "name": "n", "kind": "sink", "pipeline": "p"}).encode(),
        json.dumps(
            {
                "id": 1,
                "workspace": "w",
                "name": "n",
                "kind": "sink",
                "pipeline": "p",
                "connection": "c",
                "what": "inputs",
            }
        ).encode(),
        json.dumps(
            {
                "id": 1,
                "workspace": "W!",
                "name": "n",
                "kind": "source",
                "pipeline": "p",
                "connection": "c",
                "what": "inputs",
            }
        ).encode(),
    ],
)
def test_a_record_that_is_no_bridge_is_refused(value: bytes) -> None:
    with pytest.raises(ValueError):
        bridges.parse(value)


def test_results_and_errors_become_rows_of_their_request_id() -> None:
    output = {
        "time": "2026-01-01T00:00:00+00:00",
        "request_id": "feed/7",
        "in": {},
        "out": {"label": 1},
        "metadata": {"pipeline_version": 3},
    }
    row = result_row(ConsumedRecord("joey.w.p.outputs", 0, 5, b"7", json.dumps(output).encode()))
    assert row is not None
    assert (row.request_id, row.source_key, row.outputs, row.error, row.pipeline_version) == (
        "feed/7",
        "7",
        {"label": 1},
        None,
        3,
    )
    error = {
        "time": "2026-01-01T00:00:00+00:00",
        "request_id": "r1",
        "error": "missing input",
        "metadata": {},
    }
    row = result_row(ConsumedRecord("joey.w.p.errors", 0, 6, b"k", json.dumps(error).encode()))
    assert row is not None
    assert (row.request_id, row.source_key, row.outputs, row.error) == ("r1", None, None, "missing input")
    assert result_row(ConsumedRecord("joey.w.p.outputs", 0, 7, None, b"not json")) is None


def test_a_logs_sink_takes_its_pipelines_inferences_only() -> None:
    spec = bridges.BridgeSpec(1, "default", "logs", "sink", "p", "c", bridges.LOGS)
    entries = [
        log(request_id="feed/7", record_key=b"7", ok=True, error=None, outputs='{"label": 1}'),
        log(request_id="r-2"),  # failed: its error, no outputs
        log(request_id="r-3", pipeline="other"),
    ]
    mixed = ConsumedRecord(topics.LOGS, 4, 9, None, records.encode_log(entries[2]))
    assert log_rows(mixed, spec) == [], "another pipeline's log"
    value = records.encode_log_batch(entries[:2])
    found = log_rows(ConsumedRecord(topics.LOGS, 4, 10, None, value, BATCH_HEADERS), spec)
    assert found is not None
    assert [(r.request_id, r.source_key, r.outputs, r.error, r.pipeline_version) for r in found] == [
        ("feed/7", "7", {"label": 1}, None, 3),
        ("r-2", None, None, "missing input 'features'", 3),
    ]
    assert {(r.topic, r.partition, r.offset) for r in found} == {(topics.LOGS, 4, 10)}
    assert found[0].time == "2026-01-02T03:04:05.678901+00:00"
    assert log_rows(ConsumedRecord(topics.LOGS, 4, 11, None, b"\x00"), spec) is None


def test_one_process_at_a_time_holds_a_source_and_the_next_takes_over(database_url: str) -> None:
    store = BridgeStore(database_url)
    first = store.lease(987654321)
    assert first is not None
    assert store.lease(987654321) is None, "held by the first"
    other = store.lease(987654322)
    assert other is not None, "another source is leased on its own"
    first.close()  # as the server sees a killed process's connection end
    second = store.lease(987654321)
    assert second is not None
    second.close()
    other.close()
