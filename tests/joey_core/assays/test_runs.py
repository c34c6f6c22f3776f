"""Scoring windows from the inference log, read in chunks into the live assayer's counts."""

from __future__ import annotations

import math
import secrets
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import numpy as np
import psycopg
import pytest
from psycopg.types.json import Jsonb

from joey_core import assays
from joey_core.assays import runs as assay_runs
from joey_core.assays.runs import AssayDefinition, BaselineRows, IoPath, window_results
from joey_core.assays.streaming import WindowCounts

T0 = datetime(2025, 6, 1, tzinfo=UTC)
HOUR = timedelta(hours=1)


def test_windows_read_in_chunks_equal_their_values_counted_at_once(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(assay_runs, "FETCH_ROWS", 64)  # 16 chunks, the last one partial
    workspace = f"runs-{secrets.token_hex(3)}"
    values = np.random.default_rng(5).lognormal(0, 1, 1001)
    with psycopg.connect(database_url) as conn:
        with conn.cursor() as cursor:
            cursor.executemany(
                "INSERT INTO inference_logs (workspace, pipeline, pipeline_version, deployment_id, "
                "request_id, time, input_topic, input_partition, input_offset, ok, inputs, outputs) "
                "VALUES (%s, 'p', 1, 'd', %s, %s, 'in', 0, %s, true, %s, %s)",
                [
                    (workspace, f"r{i}", T0 + timedelta(seconds=i), i, Jsonb({"x": [0, float(v)]}), Jsonb({}))
                    for i, v in enumerate(values)
                ],
            )
        baseline = np.random.default_rng(6).lognormal(0.2, 1, 500)
        definition = AssayDefinition(
            workspace=workspace,
            name="a",
            pipeline="p",
            iopath=IoPath.parse("input x 1"),
            start=T0 - timedelta(hours=1),
            width=timedelta(hours=1),
        ).with_baseline(baseline)
        # The first window holds nothing and has no result; the third has not closed yet.
        (result,) = window_results(conn, definition, T0 + timedelta(hours=1, minutes=59))
    assert (result.window_start, result.window_end) == (T0, T0 + timedelta(hours=1))
    bins = result.baseline.bins
    assert result.window == WindowCounts.of(values[::-1], bins).summary(bins, "density")
    expected = assays.score(baseline, values)
    assert result.scores.score == expected.score and result.scores.status == expected.status
    assert result.window.bin_counts == expected.window_summary.bin_counts
    assert (result.window.count, result.window.min, result.window.max) == (1001, values.min(), values.max())


def insert(conn: psycopg.Connection, workspace: str, rows: list[tuple[datetime, float]]) -> None:
    with conn.cursor() as cursor:
        cursor.executemany(
            "INSERT INTO inference_logs (workspace, pipeline, pipeline_version, deployment_id, "
            "request_id, time, input_topic, input_partition, input_offset, ok, inputs, outputs) "
            "VALUES (%s, 'p', 1, 'd', %s, %s, 'in', 0, %s, true, %s, %s)",
            [
                (workspace, f"r{i}", time, i, Jsonb({"x": [0, value]}), Jsonb({}))
                for i, (time, value) in enumerate(rows)
            ],
        )


def definition_of(workspace: str, **fields: object) -> AssayDefinition:
    values: dict[str, object] = {
        "workspace": workspace,
        "name": "a",
        "pipeline": "p",
        "iopath": IoPath.parse("input x 1"),
        "start": T0,
        "width": timedelta(hours=1),
    }
    return AssayDefinition(**(values | fields)).with_baseline(np.arange(1.0, 11.0))  # type: ignore[arg-type]


def test_small_windows_are_no_data_and_the_open_window_is_counted_so_far(database_url: str) -> None:
    workspace = f"runs-{secrets.token_hex(3)}"
    rng = np.random.default_rng(8)
    big, small, later = rng.uniform(1, 10, 40), [9.5, 9.7], rng.uniform(1, 10, 25)
    rows = [(T0 + timedelta(seconds=i), float(v)) for i, v in enumerate(big)]
    rows += [(T0 + timedelta(hours=1, seconds=i), v) for i, v in enumerate(small)]
    rows += [(T0 + timedelta(hours=2, minutes=i), float(v)) for i, v in enumerate(later)]
    end = T0 + timedelta(hours=2, minutes=20)  # 20 of the third hour's 25 rows are before it
    with psycopg.connect(database_url) as conn:
        insert(conn, workspace, rows)
        definition = definition_of(workspace, min_count=30)
        closed = window_results(conn, definition, end)
        full, few, still_open = window_results(conn, definition, end, include_open=True)
        empty_open = window_results(conn, definition, T0 + timedelta(hours=3, minutes=5), include_open=True)
    assert closed == [full, few]  # the open window only when asked for
    assert full.scores == definition.score(full.window) and full.scores.status in ("Ok", "Warning", "Alert")
    # Two values: scored exactly as offline, but not judged.
    offline = assays.score(np.arange(1.0, 11.0), small)
    assert few.window.count == 2 and few.scores.score == offline.score and offline.status == "Alert"
    assert few.scores.status == "NoData"
    assert (still_open.window_start, still_open.window_end) == (T0 + 2 * HOUR, T0 + 3 * HOUR)
    assert still_open.scores.status == "Open" and still_open.window.count == 20
    assert still_open.scores.score == assays.score(np.arange(1.0, 11.0), later[:20]).score
    # The window after the last row has started and holds nothing yet: shown, empty.
    assert [r.scores.status for r in empty_open][1:] == ["NoData", "NoData", "Open"]  # 25 < min_count
    last = empty_open[-1]
    assert (last.window_start, last.window.count, math.isnan(last.scores.score)) == (T0 + 3 * HOUR, 0, True)


def test_row_baselines_follow_log_order_also_within_one_timestamp(database_url: str) -> None:
    workspace = f"runs-{secrets.token_hex(3)}"
    values = np.random.default_rng(9).normal(0, 1, 30)
    # Three batches of ten rows, each batch sharing its time, inserted out of time order.
    times = [T0 + timedelta(minutes=2), T0, T0 + timedelta(minutes=1)]
    rows = [(times[i // 10], float(v)) for i, v in enumerate(values)]
    with psycopg.connect(database_url) as conn:
        insert(conn, workspace, rows)
        definition = definition_of(workspace)
        # In log order: the second batch (T0), the third, then the first; ids order each batch.
        in_order = np.concatenate([values[10:20], values[20:30], values[:10]])
        micros, first = assay_runs.row_values(conn, definition, BaselineRows(0, 15))
        _, last = assay_runs.row_values(conn, definition, BaselineRows(0, 12, from_end=True))
        _, middle = assay_runs.row_values(conn, definition, BaselineRows(5, 25))
        _, beyond = assay_runs.row_values(conn, definition, BaselineRows(25, 40))
        assert assay_runs.count_values(conn, definition) == 30
    assert first.tolist() == in_order[:15].tolist()
    assert assay_runs.time_of(int(micros[-1])) == T0 + timedelta(minutes=1)
    assert last.tolist() == in_order[-12:].tolist()
    assert middle.tolist() == in_order[5:25].tolist()
    assert beyond.tolist() == in_order[25:].tolist()
    assert str(BaselineRows(0, 15)) == "the first 15 values"
    assert str(BaselineRows(0, 12, from_end=True)) == "the last 12 values"
    with pytest.raises(ValueError, match="0 <= start < stop, got start 5, stop 5"):
        BaselineRows(5, 5).check()


def test_definitions_stored_before_min_count_and_row_baselines_read_with_the_defaults() -> None:
    definition = definition_of("w", min_count=7, baseline_rows=BaselineRows(0, 10, from_end=True))
    stored = definition.to_json()
    assert AssayDefinition.from_json("w", "a", stored) == replace(definition, interval=definition.step)
    del stored["min_count"], stored["baseline_rows"]
    older = AssayDefinition.from_json("w", "a", stored)
    assert (older.min_count, older.baseline_rows) == (assay_runs.DEFAULT_MIN_COUNT, None)
