"""Assay definitions and interactive runs through the gRPC API, over log rows written to the database."""

from __future__ import annotations

import math
import secrets
import threading
from datetime import UTC, datetime, timedelta
from typing import cast

import grpc
import numpy as np
import psycopg
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from psycopg.types.json import Jsonb
from psycopg_pool import PoolTimeout

from joey_core import assays
from joey_core.assays.runs import AssayDefinition
from joey_core.v1 import registry_pb2 as pb
from joey_logger.sink import PostgresLogSink
from joey_registry import assays as registry_assays
from joey_registry.access import Access
from joey_registry.assays import Assays
from joey_registry.store import Store
from tests.conftest import wait_until
from tests.logger.helpers import log_record
from tests.registry.helpers import Stub, rpc_error, step, upload

T0 = datetime(2025, 3, 1, tzinfo=UTC)
HOUR = timedelta(hours=1)
MINUTE = timedelta(minutes=1)


def ts(value: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


def insert_logs(
    db: psycopg.Connection, workspace: str, start: datetime, values: np.ndarray, tag: str
) -> None:
    """One log row per value, spread evenly over the hour from ``start``; the value is features[2]."""
    step_s = 3600 / len(values)
    with db.cursor() as cursor:
        cursor.executemany(
            """
            INSERT INTO inference_logs (workspace, pipeline, pipeline_version, deployment_id, request_id,
                time, input_topic, input_partition, input_offset, ok, inputs, outputs)
            VALUES (%s, 'p', 1, 'd1', %s, %s, 'in', 0, %s, true, %s, %s)
            """,
            [
                (
                    workspace,
                    f"{tag}-{i}",
                    start + timedelta(seconds=i * step_s),
                    i,
                    Jsonb({"features": [1.0, 2.0, float(v), 3.0]}),
                    Jsonb({"label": int(v > 0), "probabilities": [0.5, 0.25, 0.25]}),
                )
                for i, v in enumerate(values)
            ],
        )


def log_hours(stub: Stub, workspace: str, iris_bytes: bytes, db: psycopg.Connection) -> dict[str, np.ndarray]:
    """Pipeline "p" (iris) with a baseline hour and three window hours of logged features[2]."""
    upload(stub, workspace, "iris", iris_bytes)
    stub.CreatePipeline(pb.CreatePipelineRequest(workspace=workspace, name="p", steps=[step("iris")]))
    rng = np.random.default_rng(7)
    hours = {
        "baseline": rng.normal(0, 1, 400),
        "w0": rng.normal(0, 1, 300),
        "w1": rng.normal(0.5, 1, 350),
        "w2": rng.normal(2, 1.5, 250),
    }
    for n, (tag, values) in enumerate(hours.items()):
        insert_logs(db, workspace, T0 + n * HOUR, values, tag)
    # A failed inference (no outputs) and another pipeline's row are never counted.
    db.execute(
        "INSERT INTO inference_logs (workspace, pipeline, pipeline_version, deployment_id, request_id, time, "
        "input_topic, input_partition, input_offset, ok, inputs) VALUES "
        "(%s, 'other', 1, 'd', 'x', %s, 'in', 0, 0, true, %s)",
        (workspace, T0 + HOUR, Jsonb({"features": [0, 0, 99.0, 0]})),
    )
    return hours


@pytest.fixture
def logged(stub: Stub, workspace: str, iris_bytes: bytes, db: psycopg.Connection) -> dict[str, np.ndarray]:
    return log_hours(stub, workspace, iris_bytes, db)


@pytest.fixture(scope="module")
def refused_workspace(stub: Stub, iris_bytes: bytes, database_url: str) -> str:
    """A workspace with the logs of `logged`, shared by the refused definitions: each is refused and stores
    nothing, so each finds no assay in it, as in a fresh one."""
    name = f"ws-{secrets.token_hex(4)}"
    stub.CreateWorkspace(pb.CreateWorkspaceRequest(name=name))
    with psycopg.connect(database_url, autocommit=True) as db:
        log_hours(stub, name, iris_bytes, db)
    return name


def definition(workspace: str, **fields: object) -> pb.AssayDefinition:
    values: dict[str, object] = {
        "workspace": workspace,
        "name": "drift",
        "pipeline": "p",
        "iopath": "input features 2",
        "baseline_start": ts(T0),
        "baseline_end": ts(T0 + HOUR),
        "width_seconds": 3600,
    }
    return pb.AssayDefinition(**(values | fields))  # type: ignore[arg-type]


def test_interactive_run_equals_offline_score(
    stub: Stub, workspace: str, logged: dict[str, np.ndarray]
) -> None:
    summarizer = pb.AssaySummarizer(metric="maxdiff", num_bins=6, bin_mode="equal")
    request = pb.RunAssayInteractiveRequest(
        definition=definition(workspace, summarizer=summarizer, warning_threshold=0.1),
        end=ts(T0 + 4 * HOUR),
    )
    results = stub.RunAssayInteractive(request).results
    assert [r.window_start.ToDatetime(tzinfo=UTC) for r in results] == [T0 + k * HOUR for k in (1, 2, 3)]
    for result, tag in zip(results, ("w0", "w1", "w2"), strict=True):
        expected = assays.score(
            logged["baseline"],
            logged[tag],
            num_bins=6,
            bin_mode="equal",
            metric="maxdiff",
            warning_threshold=0.1,
        )
        assert result.score == expected.score
        assert list(result.scores) == list(expected.scores)
        assert result.bin_index == expected.bin_index
        assert result.status == str(expected.status)
        assert list(result.window_summary.bin_counts) == list(expected.window_summary.bin_counts)
        assert list(result.baseline_summary.edges) == list(expected.baseline_summary.edges)
        # A window's summary is the live assayer's (joey_core.assays.streaming): its mean is the
        # correctly rounded one, numpy's may differ in the last bit; small windows keep numpy's median.
        window = result.window_summary
        assert (window.count, window.min, window.max) == (
            len(logged[tag]),
            logged[tag].min(),
            logged[tag].max(),
        )
        assert window.mean == pytest.approx(expected.window_summary.mean, rel=1e-14)
        assert window.std == pytest.approx(expected.window_summary.std, rel=1e-14)
        assert window.median == expected.window_summary.median
    assert [r.status for r in results][-1] == "Alert"


def test_sliding_windows_and_baseline_data(stub: Stub, workspace: str, logged: dict[str, np.ndarray]) -> None:
    baseline = [float(v) for v in np.linspace(-2, 2, 50)]
    request = pb.RunAssayInteractiveRequest(
        definition=definition(
            workspace,
            baseline_start=None,
            baseline_end=None,
            baseline_data=baseline,
            start=ts(T0 + HOUR),
            width_seconds=7200,
            interval_seconds=3600,
        ),
        end=ts(T0 + 4 * HOUR),
    )
    results = stub.RunAssayInteractive(request).results
    assert len(results) == 2
    expected = assays.score(baseline, np.concatenate([logged["w1"], logged["w2"]]))
    assert results[1].score == expected.score
    assert results[1].window_end.ToDatetime(tzinfo=UTC) == T0 + 4 * HOUR


def test_preview_baseline(stub: Stub, workspace: str, logged: dict[str, np.ndarray]) -> None:
    preview = stub.PreviewBaseline(pb.PreviewBaselineRequest(definition=definition(workspace)))
    expected = assays.baseline_summary(logged["baseline"])
    assert preview.count == 400 and preview.mean == expected.mean and preview.std == expected.std
    assert list(preview.edge_names) == list(expected.edge_names)
    assert list(preview.bin_counts) == list(expected.bin_counts)


def test_create_list_pause_delete(stub: Stub, workspace: str, logged: dict[str, np.ndarray]) -> None:
    created = stub.CreateAssay(pb.CreateAssayRequest(definition=definition(workspace)))
    assert created.active and created.baseline.count == 400
    assert created.definition.start.ToDatetime(tzinfo=UTC) == T0 + HOUR  # defaults to the baseline end
    assert created.definition.interval_seconds == 3600
    again = rpc_error(lambda: stub.CreateAssay(pb.CreateAssayRequest(definition=definition(workspace))))
    assert again.code() == grpc.StatusCode.ALREADY_EXISTS
    listed = stub.ListAssays(pb.ListAssaysRequest(workspace=workspace)).assays
    assert [a.definition.name for a in listed] == ["drift"]
    assert not stub.ListAssays(pb.ListAssaysRequest(workspace=workspace, pipeline="other")).assays
    paused = stub.SetAssayActive(pb.SetAssayActiveRequest(workspace=workspace, name="drift", active=False))
    assert not paused.active
    got = stub.GetAssay(pb.GetAssayRequest(workspace=workspace, name="drift"))
    assert not got.active and list(got.baseline.bin_counts) == list(created.baseline.bin_counts)
    stub.DeleteAssay(pb.DeleteAssayRequest(workspace=workspace, name="drift"))
    gone = rpc_error(lambda: stub.GetAssay(pb.GetAssayRequest(workspace=workspace, name="drift")))
    assert gone.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"pipeline": "nope"}, "pipeline 'nope' not found"),
        ({"iopath": "input petals 0"}, "no input field 'petals'"),
        ({"iopath": "input features 4"}, "index 4 is out of range"),
        ({"iopath": "input features"}, "give an index"),
        ({"iopath": "output label 1"}, "scalar"),
        ({"iopath": "sideways features 1"}, "invalid iopath"),
        ({"baseline_start": ts(T0 - 10 * HOUR), "baseline_end": ts(T0 - 9 * HOUR)}, "baseline is empty"),
        ({"width_seconds": -5}, "must be positive"),
        ({"width_seconds": 86400, "interval_seconds": 7}, "86400 panes of 1 s"),
        ({"width_seconds": 3651 * 86400}, "at most 3650 days"),
        # Bounds checked before anything else, each naming its field (a timedelta of 10**15 s overflows).
        ({"width_seconds": 10**15}, "width_seconds must be at most 3650 days"),
        ({"interval_seconds": -5}, "interval_seconds must be positive"),
        ({"iopath": f"input features {2**31}"}, f"iopath index {2**31} is too large: at most {2**31 - 1}"),
        ({"iopath": f"input {'f' * 300} 0"}, "iopath field name has 300 characters: at most 256"),
        ({"model": "m" * 64}, "model name has 64 characters: at most 63"),
        ({"summarizer": pb.AssaySummarizer(num_bins=10**6)}, "num_bins must be at most 1000, got 1000000"),
        (
            {"baseline_start": None, "baseline_end": None, "baseline_rows": pb.AssayBaselineRows(stop=10**7)},
            "baseline_rows selects 10000000 values: at most 1000000",
        ),
        ({"summarizer": pb.AssaySummarizer(bin_weights=[1, 1, 1])}, "expected 7, got 3"),
        ({"summarizer": pb.AssaySummarizer(metric="kl")}, "unknown metric 'kl'"),
        ({"name": "Bad Name"}, "invalid assay name"),
        ({"model": "nope"}, "model 'nope' is not a step"),
        ({"min_count": -1}, "min_count must be 0 or more"),
        (
            {"baseline_rows": pb.AssayBaselineRows(stop=10)},
            "got a time range (baseline_start, baseline_end) and rows",
        ),
        ({"baseline_start": None, "baseline_end": None}, "give the baseline one way"),
        (
            {"baseline_start": None, "baseline_end": None, "baseline_rows": pb.AssayBaselineRows(start=9)},
            "baseline_rows needs 0 <= start < stop, got start 9, stop 0",
        ),
        # The SDK's baseline_first(0) and baseline_last(-3), named as the user called them.
        (
            {"baseline_start": None, "baseline_end": None, "baseline_rows": pb.AssayBaselineRows(stop=0)},
            "baseline_first needs N >= 1, got 0",
        ),
        (
            {
                "baseline_start": None,
                "baseline_end": None,
                "baseline_rows": pb.AssayBaselineRows(stop=-3, from_end=True),
            },
            "baseline_last needs N >= 1, got -3",
        ),
        (
            {"baseline_start": None, "baseline_end": None, "baseline_rows": pb.AssayBaselineRows(stop=5000)},
            "the baseline is the first 5000 values, but the logs of pipeline 'p' hold only 1300 values",
        ),
    ],
)
def test_bad_definitions_store_nothing(
    stub: Stub, refused_workspace: str, fields: dict[str, object], message: str
) -> None:
    workspace = refused_workspace
    error = rpc_error(
        lambda: stub.CreateAssay(pb.CreateAssayRequest(definition=definition(workspace, **fields)))
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in (error.details() or "")
    assert not stub.ListAssays(pb.ListAssaysRequest(workspace=workspace)).assays


def test_output_field_and_unknown_workspace(
    stub: Stub, workspace: str, logged: dict[str, np.ndarray]
) -> None:
    request = pb.RunAssayInteractiveRequest(
        definition=definition(workspace, iopath="output label"), end=ts(T0 + 2 * HOUR)
    )
    (result,) = stub.RunAssayInteractive(request).results
    labels = lambda tag: (logged[tag] > 0).astype(float)  # noqa: E731
    assert result.score == assays.score(labels("baseline"), labels("w0")).score
    assert not math.isnan(result.score)
    missing = rpc_error(lambda: stub.ListAssays(pb.ListAssaysRequest(workspace="no-such-ws")))
    assert missing.code() == grpc.StatusCode.NOT_FOUND


def test_model_filter(
    stub: Stub, workspace: str, logged: dict[str, np.ndarray], db: psycopg.Connection
) -> None:
    """Only rows of inferences the model took part in count; the rows of "p" start without models."""
    db.execute(
        "UPDATE inference_logs SET models = %s WHERE workspace = %s AND request_id LIKE 'baseline-%%' "
        "AND input_offset %% 2 = 0",
        (Jsonb([{"name": "iris", "version": 1, "sha256": "ab" * 32}]), workspace),
    )
    preview = stub.PreviewBaseline(pb.PreviewBaselineRequest(definition=definition(workspace, model="iris")))
    assert preview.count == 200
    assert preview.mean == assays.baseline_summary(logged["baseline"][::2]).mean


def test_deleting_an_assay_during_its_backfill_does_not_hold_up_logging(
    stub: Stub, workspace: str, logged: dict[str, np.ndarray], database_url: str
) -> None:
    stub.CreateAssay(pb.CreateAssayRequest(definition=definition(workspace)))
    deleted, written = threading.Event(), threading.Event()

    def delete() -> None:
        stub.DeleteAssay(pb.DeleteAssayRequest(workspace=workspace, name="drift"))
        deleted.set()

    def log_elsewhere() -> None:
        sink = PostgresLogSink(database_url)
        sink.open()
        try:
            sink.write([log_record("elsewhere", i, workspace=workspace) for i in range(3)])
        finally:
            sink.close()
        written.set()

    with psycopg.connect(database_url) as assayer:
        # What the assayer's backfill holds on the assay row for as long as it counts.
        assayer.execute(
            "SELECT a.id FROM assays a JOIN workspaces w ON w.id = a.workspace_id "
            "WHERE w.name = %s AND a.name = 'drift' FOR NO KEY UPDATE",
            (workspace,),
        )
        deleting = threading.Thread(target=delete)
        deleting.start()
        wait_until(
            lambda: assayer.execute("SELECT count(*) FROM pg_locks WHERE NOT granted").fetchone() != (0,),
            10,
            "the delete to wait for the backfill",
        )
        logging_thread = threading.Thread(target=log_elsewhere)
        logging_thread.start()
        assert written.wait(10), "logging waited for a backfill of an unrelated assay"
        assert not deleted.is_set()
        assayer.rollback()
    deleting.join(10)
    logging_thread.join(10)
    assert deleted.is_set()


def test_an_interactive_run_too_large_is_refused(
    stub: Stub, workspace: str, logged: dict[str, np.ndarray]
) -> None:
    request = pb.RunAssayInteractiveRequest(
        definition=definition(workspace, width_seconds=60), end=ts(T0 + timedelta(days=80))
    )
    error = rpc_error(lambda: stub.RunAssayInteractive(request))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "at most 100000 panes per run" in (error.details() or "")


def test_a_window_of_a_few_values_is_no_data_not_alert(
    stub: Stub, workspace: str, logged: dict[str, np.ndarray], db: psycopg.Connection
) -> None:
    few = np.array([9.0, 9.5, 10.0])
    insert_logs(db, workspace, T0 + 4 * HOUR, few, "few")
    request = pb.RunAssayInteractiveRequest(definition=definition(workspace), end=ts(T0 + 5 * HOUR))
    response = stub.RunAssayInteractive(request)
    # Results name their assay (interactive runs too) and say what they are of, for charts.
    assert (response.assay, response.iopath, response.min_count) == ("drift", "input features 2", 30)
    assert {r.assay for r in response.results} == {"drift"}
    *scored, small = response.results
    assert [r.window_summary.count for r in scored] == [300, 350, 250]
    assert [r.status for r in scored][-1] == "Alert"
    offline = assays.score(logged["baseline"], few)
    assert small.window_summary.count == 3 and small.score == offline.score and offline.status == "Alert"
    assert small.status == "NoData"
    # min_count 0 judges every window, as Wallaroo does.
    request.definition.min_count = 0
    assert stub.RunAssayInteractive(request).results[-1].status == "Alert"


def test_baselines_by_rows_of_the_log(stub: Stub, workspace: str, logged: dict[str, np.ndarray]) -> None:
    """Rows in log order: the baseline hour's 400, then w0's 300, w1's 350 and w2's 250."""

    def preview(rows: pb.AssayBaselineRows) -> pb.AssaySummary:
        d = definition(workspace, baseline_start=None, baseline_end=None, baseline_rows=rows)
        return stub.PreviewBaseline(pb.PreviewBaselineRequest(definition=d))

    cases = [
        (pb.AssayBaselineRows(stop=400), logged["baseline"]),
        (pb.AssayBaselineRows(stop=250, from_end=True), logged["w2"]),
        (pb.AssayBaselineRows(start=400, stop=700), logged["w0"]),
    ]
    for rows, values in cases:
        summary, expected = preview(rows), assays.baseline_summary(values)
        assert (summary.count, summary.mean, summary.std) == (len(values), expected.mean, expected.std)
        assert list(summary.bin_counts) == list(expected.bin_counts)

    d = definition(
        workspace, baseline_start=None, baseline_end=None, baseline_rows=pb.AssayBaselineRows(stop=400)
    )
    d.min_count = 100
    created = stub.CreateAssay(pb.CreateAssayRequest(definition=d))
    got = stub.GetAssay(pb.GetAssayRequest(workspace=workspace, name="drift"))
    for assay in (created, got):
        assert assay.definition.baseline_rows == pb.AssayBaselineRows(stop=400)
        assert assay.definition.min_count == 100
        # Windows start just after the baseline's last row (the 400th, 9 s apart from T0): the
        # next row is 9 s later, so no window holds a row of the baseline.
        start = T0 + timedelta(seconds=399 * 9, microseconds=1)
        assert assay.definition.start.ToDatetime(tzinfo=UTC) == start
        assert list(assay.baseline.bin_counts) == list(assays.baseline_summary(logged["baseline"]).bin_counts)
    unset = stub.CreateAssay(pb.CreateAssayRequest(definition=definition(workspace, name="defaults")))
    assert unset.definition.min_count == 30 and not unset.definition.HasField("baseline_rows")


def test_a_run_up_to_now_shows_the_window_still_open(
    stub: Stub, workspace: str, logged: object, db: psycopg.Connection
) -> None:
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=10)
    with db.cursor() as cursor:
        cursor.executemany(
            "INSERT INTO inference_logs (workspace, pipeline, pipeline_version, deployment_id, request_id, "
            "time, input_topic, input_partition, input_offset, ok, inputs) "
            "VALUES (%s, 'p', 1, 'd1', %s, %s, 'in', 1, %s, true, %s)",
            [
                (workspace, f"now-{i}", start + timedelta(seconds=i), i, Jsonb({"features": [0, 0, v, 0]}))
                for i, v in enumerate([1.0, 2.0, 3.0, 4.0, 5.0])
            ],
        )
    d = definition(
        workspace, baseline_start=None, baseline_end=None, baseline_data=[1.0, 2.0, 3.0], start=ts(start)
    )
    (still_open,) = stub.RunAssayInteractive(pb.RunAssayInteractiveRequest(definition=d)).results
    assert still_open.status == "Open" and still_open.window_summary.count == 5
    assert still_open.window_end.ToDatetime(tzinfo=UTC) == start + HOUR  # when it closes
    assert still_open.score == assays.score([1.0, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0, 5.0]).score
    # A run that ends earlier stops there: the window extends past its end, named, not shown.
    earlier = stub.RunAssayInteractive(
        pb.RunAssayInteractiveRequest(definition=d, end=ts(start + timedelta(minutes=5)))
    )
    assert not earlier.results
    cut = (earlier.cut_window_start.ToDatetime(tzinfo=UTC), earlier.cut_window_end.ToDatetime(tzinfo=UTC))
    assert cut == (start, start + HOUR)
    # Up to now, nothing is cut.
    assert not stub.RunAssayInteractive(pb.RunAssayInteractiveRequest(definition=d)).HasField(
        "cut_window_start"
    )


def test_event_time_ahead_of_the_wall_clock_closes_windows(
    stub: Stub, workspace: str, logged: object, db: psycopg.Connection
) -> None:
    """As the live assayer, a window has closed once event time passed its end, even if the wall
    clock has not: a run up to a later end scores it, then shows the window open at the latest row."""
    start = datetime.now(UTC).replace(microsecond=0) + HOUR
    values = [float(v) for v in np.random.default_rng(3).uniform(1, 3, 40)] + [1.0, 2.0, 3.0]
    times = [start + timedelta(seconds=i) for i in range(40)] + [
        start + HOUR + timedelta(seconds=i) for i in range(3)
    ]
    with db.cursor() as cursor:
        cursor.executemany(
            "INSERT INTO inference_logs (workspace, pipeline, pipeline_version, deployment_id, request_id, "
            "time, input_topic, input_partition, input_offset, ok, inputs) "
            "VALUES (%s, 'p', 1, 'd1', %s, %s, 'in', 2, %s, true, %s)",
            [
                (workspace, f"ahead-{i}", time, i, Jsonb({"features": [0, 0, v, 0]}))
                for i, (time, v) in enumerate(zip(times, values, strict=True))
            ],
        )
    d = definition(
        workspace, baseline_start=None, baseline_end=None, baseline_data=[1.0, 2.0, 3.0], start=ts(start)
    )
    for end in (start + 5 * HOUR, None):
        request = pb.RunAssayInteractiveRequest(definition=d, end=None if end is None else ts(end))
        closed, still_open = stub.RunAssayInteractive(request).results
        assert closed.window_start.ToDatetime(tzinfo=UTC) == start and closed.window_summary.count == 40
        assert closed.status in ("Ok", "Warning", "Alert")
        assert closed.score == assays.score([1.0, 2.0, 3.0], values[:40]).score
        assert (still_open.status, still_open.window_summary.count) == ("Open", 3)
        assert still_open.window_start.ToDatetime(tzinfo=UTC) == start + HOUR
    # Ending inside the first window, before event time had passed: that window is cut.
    early = stub.RunAssayInteractive(pb.RunAssayInteractiveRequest(definition=d, end=ts(start + 10 * MINUTE)))
    assert not early.results and early.cut_window_start.ToDatetime(tzinfo=UTC) == start


def test_an_assay_that_cannot_be_counted_shows_why_and_logging_goes_on(
    stub: Stub, workspace: str, logged: dict[str, np.ndarray], db: psycopg.Connection, database_url: str
) -> None:
    stub.CreateAssay(pb.CreateAssayRequest(definition=definition(workspace, name="broken")))
    # Written around the registry's checks: an index Postgres's jsonb cannot take (beyond int4).
    db.execute(
        "UPDATE assays SET definition = jsonb_set(definition, '{iopath}', %s) "
        "WHERE name = 'broken' AND workspace_id = (SELECT id FROM workspaces WHERE name = %s)",
        (Jsonb(f"input features {2**40}"), workspace),
    )
    (listed,) = stub.ListAssays(pb.ListAssaysRequest(workspace=workspace)).assays
    assert listed.failure == "" and not listed.HasField("failed_at")
    sink = PostgresLogSink(database_url)
    sink.open()
    try:
        rows = [log_record("p", 10_000 + i, workspace=workspace, time=T0 + 4 * HOUR) for i in range(5)]
        assert sink.write(rows).written == 5
        assert sink.write([log_record("p", 20_000, workspace=workspace)]).written == 1
    finally:
        sink.close()
    (listed,) = stub.ListAssays(pb.ListAssaysRequest(workspace=workspace)).assays
    assert "its values cannot be counted" in listed.failure and "jsonb" in listed.failure, listed.failure
    assert listed.HasField("failed_at")
    resume = pb.SetAssayActiveRequest(workspace=workspace, name="broken", active=True)
    error = rpc_error(lambda: stub.SetAssayActive(resume))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "failed and cannot be resumed" in (error.details() or "")
    pause = stub.SetAssayActive(pb.SetAssayActiveRequest(workspace=workspace, name="broken", active=False))
    assert not pause.active and pause.failure == listed.failure


def test_a_database_outage_while_creating_an_assay_is_no_invalid_argument(
    stub: Stub, workspace: str, logged: dict[str, np.ndarray], db: psycopg.Connection
) -> None:
    stub.CreateAssay(pb.CreateAssayRequest(definition=definition(workspace, name="checked")))
    row = db.execute(
        "SELECT definition FROM assays WHERE name = 'checked' "
        "AND workspace_id = (SELECT id FROM workspaces WHERE name = %s)",
        (workspace,),
    ).fetchone()
    assert row is not None
    stored = AssayDefinition.from_json(workspace, "checked", row[0])
    # Deleted at once: a live assay from 2025 would keep an assayer of a later test busy scoring.
    stub.DeleteAssay(pb.DeleteAssayRequest(workspace=workspace, name="checked"))
    # The same check over a pool whose database cannot be reached (nothing listens on port 1).
    unreachable = Store("postgresql://postgres@127.0.0.1:1/joey?connect_timeout=1")
    unreachable.pool.timeout = 1
    unreachable.pool.open(wait=False)
    try:
        with pytest.raises(PoolTimeout):
            Assays(unreachable, cast(Access, None))._test_compile(stored)
    finally:
        unreachable.close()


def test_an_unreadable_definition_is_listed_failed_with_the_others(
    stub: Stub, workspace: str, logged: dict[str, np.ndarray], db: psycopg.Connection
) -> None:
    for name in ("good", "unreadable"):
        stub.CreateAssay(pb.CreateAssayRequest(definition=definition(workspace, name=name)))
    # Written around the registry's checks (or by another version): it cannot be read.
    db.execute(
        "UPDATE assays SET definition = definition - 'summarizer' "
        "WHERE name = 'unreadable' AND workspace_id = (SELECT id FROM workspaces WHERE name = %s)",
        (workspace,),
    )
    good, unreadable = stub.ListAssays(pb.ListAssaysRequest(workspace=workspace)).assays
    assert good.definition.name == "good" and good.failure == "" and good.baseline.bin_counts
    assert (unreadable.definition.name, unreadable.definition.pipeline) == ("unreadable", "p")
    assert "its definition cannot be read: KeyError" in unreadable.failure, unreadable.failure
    error = rpc_error(
        lambda: stub.GetAssayResults(pb.GetAssayResultsRequest(workspace=workspace, name="unreadable"))
    )
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    for name in ("good", "unreadable"):  # a live assay from 2025 would keep a later assayer busy
        stub.DeleteAssay(pb.DeleteAssayRequest(workspace=workspace, name=name))


def test_a_baseline_range_over_the_bound_is_refused_having_read_no_more(
    stub: Stub, workspace: str, logged: dict[str, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The bound lowered under what the range holds (the registry runs in this process), rather than
    # logging a million rows: the range is read up to one value past it, then refused.
    monkeypatch.setattr(registry_assays, "MAX_BASELINE_VALUES", 10)
    error = rpc_error(lambda: stub.CreateAssay(pb.CreateAssayRequest(definition=definition(workspace))))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "baseline_start/baseline_end select over 10 values" in (error.details() or ""), error.details()
    assert not stub.ListAssays(pb.ListAssaysRequest(workspace=workspace)).assays
