"""Scoring windows from the inference log, read in chunks into the live assayer's counts."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime, timedelta

import numpy as np
import psycopg
import pytest
from psycopg.types.json import Jsonb

from joey_core import assays
from joey_core.assays import runs as assay_runs
from joey_core.assays.runs import AssayDefinition, IoPath, window_results
from joey_core.assays.streaming import WindowCounts

T0 = datetime(2025, 6, 1, tzinfo=UTC)


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
