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
        windows = definition.run_windows(None, end)
        assert windows.open == (T0 + 2 * HOUR, T0 + 3 * HOUR) and windows.cut is None
        full, few, still_open = window_results(conn, definition, end, open_window=windows.open)
        after = T0 + timedelta(hours=3, minutes=5)
        empty_open = window_results(
            conn, definition, after, open_window=definition.run_windows(None, after).open
        )
    assert closed == [full, few]  # the open window only when asked for
    assert full.scores == definition.score(full.window) and full.scores.status in ("Ok", "Warning", "Alert")
    # Two values: scored exactly as offline, but not judged.
    offline = assays.score(np.arange(1.0, 11.0), small)
    assert few.window.count == 2 and few.scores.score == offline.score and offline.status == "Alert"
    assert few.scores.status == "NoData"
    assert (still_open.window_start, still_open.window_end) == (T0 + 2 * HOUR, T0 + 3 * HOUR)
    # Every value logged in the open window so far, also those after the run's end.
    assert still_open.scores.status == "Open" and still_open.window.count == 25
    assert still_open.scores.score == assays.score(np.arange(1.0, 11.0), later).score
    # The window after the last row has started and holds nothing yet: shown, empty.
    assert [r.scores.status for r in empty_open][1:] == ["NoData", "NoData", "Open"]  # 25 < min_count
    last = empty_open[-1]
    assert (last.window_start, last.window.count, math.isnan(last.scores.score)) == (T0 + 3 * HOUR, 0, True)
    # One score per bin, as for every window: NaN while empty.
    assert len(last.scores.scores) == len(full.scores.scores) and all(map(math.isnan, last.scores.scores))


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
        # The row after a selection, in log order: none after the newest.
        after = [
            assay_runs.time_after(conn, definition, rows)
            for rows in (
                BaselineRows(0, 15),
                BaselineRows(0, 20),
                BaselineRows(0, 30),
                BaselineRows(0, 5, True),
            )
        ]
        assert after[:3] == [micros[-1], micros_of(T0 + timedelta(minutes=2)), None] and after[3] is None
        assert assay_runs.time_after(conn, definition, BaselineRows(10, 20, from_end=True)) == micros_of(
            T0 + timedelta(minutes=2)
        )
    assert first.tolist() == in_order[:15].tolist()
    assert assay_runs.time_of(int(micros[-1])) == T0 + timedelta(minutes=1)
    assert last.tolist() == in_order[-12:].tolist()
    assert middle.tolist() == in_order[5:25].tolist()
    assert beyond.tolist() == in_order[25:].tolist()
    assert str(BaselineRows(0, 15)) == "the first 15 values"
    assert str(BaselineRows(0, 12, from_end=True)) == "the last 12 values"
    with pytest.raises(ValueError, match="baseline_rows needs 0 <= start < stop, got start 5, stop 5"):
        BaselineRows(5, 5).check()
    with pytest.raises(ValueError, match="baseline_last needs N >= 1, got -3"):
        BaselineRows(0, -3, from_end=True).check()
    with pytest.raises(ValueError, match="baseline_first needs N >= 1, got 0"):
        BaselineRows(0, 0).check()


def test_definitions_stored_before_min_count_and_row_baselines_read_with_the_defaults() -> None:
    definition = definition_of("w", min_count=7, baseline_rows=BaselineRows(0, 10, from_end=True))
    stored = definition.to_json()
    assert AssayDefinition.from_json("w", "a", stored) == replace(definition, interval=definition.step)
    del stored["min_count"], stored["baseline_rows"]
    older = AssayDefinition.from_json("w", "a", stored)
    # The rule they were created under: every window judged. New ones default to 30.
    assert (older.min_count, older.baseline_rows) == (0, None)
    assert definition_of("w").min_count == assay_runs.DEFAULT_MIN_COUNT == 30


def micros_of(time: datetime) -> int:
    return (time - assay_runs.EPOCH) // assay_runs.MICROSECOND


def test_which_windows_an_interactive_run_shows() -> None:
    """Closed windows end by the run's end and by when windows have closed (``closed_by``)."""
    tumbling = definition_of("w")
    now = T0 + timedelta(hours=2, minutes=30)
    # Up to when windows have closed (no end, or a later one): the open window after them.
    for end in (None, now, T0 + 5 * HOUR):
        windows = tumbling.run_windows(end, now)
        assert windows.closed == [(T0, T0 + HOUR), (T0 + HOUR, T0 + 2 * HOUR)]
        assert (windows.until, windows.open, windows.cut) == (now, (T0 + 2 * HOUR, T0 + 3 * HOUR), None)
    # An earlier end cutting a window: it is named, not shown, and nothing is open.
    early = tumbling.run_windows(T0 + timedelta(hours=1, minutes=10), now)
    assert (early.closed, early.open, early.cut) == ([(T0, T0 + HOUR)], None, (T0 + HOUR, T0 + 2 * HOUR))
    # An end exactly at a window's start cuts nothing: that window holds no value before it.
    exact = tumbling.run_windows(T0 + HOUR, now)
    assert (exact.closed, exact.open, exact.cut) == ([(T0, T0 + HOUR)], None, None)
    # Closed by exactly a window's start (a row at that time): that window has started, open.
    assert tumbling.run_windows(None, T0 + HOUR).open == (T0 + HOUR, T0 + 2 * HOUR)
    # Sliding windows (an hour every 15 minutes): of the four started and not closed, the first to close.
    sliding = definition_of("w", interval=timedelta(minutes=15))
    windows = sliding.run_windows(None, T0 + timedelta(hours=1, minutes=40))
    assert windows.closed[-1] == (T0 + timedelta(minutes=30), T0 + timedelta(hours=1, minutes=30))
    assert windows.open == (T0 + timedelta(minutes=45), T0 + timedelta(hours=1, minutes=45))
    # Gaps (10 minutes every hour): closed by a time in a gap, no window is open; an end in a gap cuts none.
    gaps = definition_of("w", width=timedelta(minutes=10), interval=HOUR)
    in_gap = T0 + timedelta(hours=1, minutes=30)
    windows = gaps.run_windows(None, in_gap)
    assert (len(windows.closed), windows.open, windows.cut) == (2, None, None)
    windows = gaps.run_windows(in_gap, now)
    assert (len(windows.closed), windows.open, windows.cut) == (2, None, None)
    assert gaps.run_windows(T0 + timedelta(hours=2, minutes=5), now).cut == (
        T0 + 2 * HOUR,
        T0 + timedelta(hours=2, minutes=10),
    )
