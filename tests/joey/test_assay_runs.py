"""Scoring a window from the inference log: in memory, and chunk by chunk for large windows."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime, timedelta

import numpy as np
import psycopg
import pytest
from psycopg.types.json import Jsonb

from joey import assay_runs, assays
from joey.assay_runs import AssayDefinition, IoPath, window_result

T0 = datetime(2025, 6, 1, tzinfo=UTC)


def test_large_windows_are_binned_in_chunks_with_the_same_scores(
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
            workspace=workspace, name="a", pipeline="p", iopath=IoPath.parse("input x 1")
        ).with_baseline(baseline)
        end = T0 + timedelta(hours=1)
        exact = window_result(conn, definition, T0, end)
        chunked = window_result(conn, definition, T0, end, max_in_memory=100)
    expected = assays.score(baseline, values)
    assert exact is not None and chunked is not None
    assert exact.window == expected.window_summary and exact.scores.score == expected.score
    assert chunked.scores == exact.scores  # counts are exact, so every score and the status are too
    assert chunked.window.bin_counts == exact.window.bin_counts
    assert (chunked.window.count, chunked.window.min, chunked.window.max) == (
        1001,
        values.min(),
        values.max(),
    )
    assert chunked.window.mean == pytest.approx(values.mean(), rel=1e-12)
    assert chunked.window.std == pytest.approx(values.std(), rel=1e-12)
    assert chunked.window.median == pytest.approx(np.median(values), rel=1e-12)
