"""`joey assay ...` as a user types it, in a subprocess against the session stack."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import psycopg
import pytest
from psycopg.types.json import Jsonb

from joey.client import Client
from joey_core.settings import CommonSettings
from tests.conftest import Stack

T0 = datetime(2025, 5, 1, tzinfo=UTC)
HOUR = timedelta(hours=1)


@pytest.fixture
def workspace(stack: Stack, settings: CommonSettings, iris_model: Path, database_url: str) -> str:
    """Pipeline "p" with 200 logged values of features[2] in the first hour, 150 in the second and
    3 in the third; the rows of each hour share their time, as the rows of one batch do."""
    client = Client(settings=settings, workspace=f"ws-{secrets.token_hex(4)}")
    client.create_workspace(client.workspace)
    client.upload_model("iris", iris_model)
    client.build_pipeline("p").add_model_step("iris").create()
    rng = np.random.default_rng(4)
    hours = [rng.normal(0, 1, 200), rng.normal(1.5, 1, 150), np.array([4.0, 5.0, 6.0])]
    rows = [(T0 + k * HOUR, float(v)) for k, values in enumerate(hours) for v in values]
    with psycopg.connect(database_url) as conn, conn.cursor() as cursor:
        cursor.executemany(
            "INSERT INTO inference_logs (workspace, pipeline, pipeline_version, deployment_id, request_id, "
            "time, input_topic, input_partition, input_offset, ok, inputs) "
            "VALUES (%s, 'p', 1, 'd', %s, %s, 'in', 0, %s, true, %s)",
            [
                (client.workspace, f"r{i}", time, i, Jsonb({"features": [5.0, 3.0, v, 1.0]}))
                for i, (time, v) in enumerate(rows)
            ],
        )
    return client.workspace


def joey(env: dict[str, str], workspace: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "joey_cli", "-w", workspace, "assay", *args],
        env=os.environ | env,
        capture_output=True,
        text=True,
        timeout=120,
    )


RUN = ["run", "drift", "-p", "p", "--iopath", "input features 2", "--width", "3600"]
UNTIL = ["--end", (T0 + 3 * HOUR).isoformat()]


def test_assay_run_names_the_assay_and_marks_small_windows(env: dict[str, str], workspace: str) -> None:
    # The baseline is the first hour's 200 rows, which share their time: only rows can pick them.
    ran = joey(env, workspace, *RUN, "--baseline-first", "200", *UNTIL)
    assert ran.returncode == 0, ran.stderr
    header, *rows = ran.stdout.splitlines()
    assert header.split()[:5] == ["assay", "window_start", "window_end", "score", "status"]
    # The windows start just after the baseline's last row: no window holds the baseline itself.
    first, second, small, cut = rows
    assert first.split()[0] == second.split()[0] == "drift"
    assert first.split()[1:3] == ["2025-05-01", "00:00:00.000001+00:00"]
    assert [(line.split()[6], line.split()[9]) for line in (first, second)] == [
        ("Alert", "150"),
        ("NoData", "3"),
    ]
    assert small == (
        "1 of 2 windows hold fewer than 30 values (min_count): NoData, "
        "their scores are not judged against the thresholds"
    )
    # The run's end cuts the third window: said, not dropped silently.
    assert cut == (
        "window 2025-05-01T02:00:00.000001+00:00 to 2025-05-01T03:00:00.000001+00:00 "
        "extends past end: not shown"
    )
    judged = joey(env, workspace, *RUN, "--baseline-first", "200", "--min-count", "0", *UNTIL)
    assert judged.returncode == 0 and judged.stdout.splitlines()[2].split()[6] == "Alert"


def test_a_row_baseline_splitting_a_batch_shares_its_time_with_the_first_window(
    env: dict[str, str], workspace: str
) -> None:
    # The first 100 of the first hour's 200 rows: the other 100 share their time, so the windows
    # start at it, and the first holds all 200 (the documented overlap) rather than leaving 100 out.
    ran = joey(env, workspace, *RUN, "--baseline-first", "100", *UNTIL)
    assert ran.returncode == 0, ran.stderr
    _, *rows, note = ran.stdout.splitlines()
    assert [(r.split()[1:3], r.split()[9]) for r in rows] == [
        (["2025-05-01", "00:00:00+00:00"], "200"),
        (["2025-05-01", "01:00:00+00:00"], "150"),
        (["2025-05-01", "02:00:00+00:00"], "3"),
    ]
    # The end is exactly at the next window's start: nothing cut.
    assert note.startswith("1 of 3 windows hold fewer than 30 values")


def test_baseline_last_and_min_count_in_stored_assays(env: dict[str, str], workspace: str) -> None:
    base = ["-p", "p", "--iopath", "input features 2"]
    last = joey(env, workspace, "preview", "drift", *base, "--baseline-last", "3")
    assert last.returncode == 0, last.stderr
    assert last.stdout.splitlines()[0].startswith("count 3  min 4  max 6  mean 5  median 5")
    created = joey(env, workspace, "create", "drift", *base, "--baseline-first", "200", "--min-count", "50")
    assert created.returncode == 0, created.stderr
    listed = joey(env, workspace, "list")
    got = joey(env, workspace, "get", "drift")
    for shown in (created, listed, got):
        assert shown.returncode == 0, shown.stderr
        first = shown.stdout.splitlines()[0]
        assert first.startswith("drift\tp\tinput features 2\tactive") and first.endswith("\tmin_count 50")


def test_assay_run_refuses_what_it_cannot_do(env: dict[str, str], workspace: str) -> None:
    two = joey(env, workspace, *RUN, "--baseline-first", "10", "--baseline-last", "10")
    assert (two.returncode, two.stderr.splitlines()[0]) == (
        1,
        "Error: give one of --baseline-first or --baseline-last, not several",
    )
    many = joey(env, workspace, *RUN, "--baseline-rows", "100:1000")
    assert many.returncode == 1
    assert many.stderr.splitlines()[0] == (
        "Error: the baseline is values 100 to 1000 (0-based, stop excluded), but the logs of "
        "pipeline 'p' hold only 353 values at input features 2: choose fewer rows, or log more first "
        "(INVALID_ARGUMENT)"
    )
    bad = joey(env, workspace, *RUN, "--baseline-rows", "100-1000")
    assert (bad.returncode, bad.stderr.splitlines()[0]) == (
        1,
        "Error: --baseline-rows: expected START:STOP, e.g. 0:5000, got '100-1000'",
    )
    negative = joey(env, workspace, *RUN, "--baseline-first", "10", "--min-count", "-1")
    assert (negative.returncode, negative.stderr.splitlines()[0]) == (
        1,
        "Error: min_count must be 0 or more (0 judges every window with a value), got -1 (INVALID_ARGUMENT)",
    )
    for option, n in (("--baseline-last", "-3"), ("--baseline-first", "0")):
        none = joey(env, workspace, *RUN, option, n)
        assert (none.returncode, none.stderr.splitlines()[0]) == (1, f"Error: {option} needs N >= 1, got {n}")
