"""Time of scoring one assay window: from the log's rows (interactive runs) and from the window's
counts (the live assayer, whose loggers counted the rows as they stored them).

Systems, on the same rows of a scratch database (one pipeline, ``inputs.features[2]`` ~ N(0, 1)):

* fetch-only: the SQL and server-side cursor reading the window's values into numpy, nothing
  else. What reading the rows costs, the floor of any scorer reading the log.
* interactive: ``joey_core.assays.runs.window_results``: the same read, counted chunk by chunk into
  ``WindowCounts``, then summarised and scored against a baseline of 10,000 values (5 quantile
  bins, PSI).
* live close: what the assayer does when the window closes: read the window's one
  ``assay_panes`` row, summarise and score it. Its cost does not grow with the rows.
* live close, 1,440 panes: the same for a window that slides every 2.5 s, so it is made of
  1,440 panes (the most a definition may have) to read and merge.

The panes are filled by the code the loggers and the assayer's backfill use
(``AssayDefinition.count``, ``joey_core.assays.panes.add_counts``), and the bench checks that each
live result equals the interactive one.

Each figure is the median of ``--repeats`` timed runs after one warm-up run.

    python bench/assay_window.py --rows 1000000 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from joey_core.assays.panes import add_counts
from joey_core.assays.runs import (
    AssayDefinition,
    IoPath,
    WindowResult,
    log_values,
    result_of,
    timed_value_chunks,
    window_results,
)
from joey_core.assays.streaming import WindowCounts

sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine_throughput import scratch_database  # noqa: E402

T0 = datetime(2025, 1, 1, tzinfo=UTC)


def fill(conn: psycopg.Connection[Any], rows: int, seed: int) -> None:
    values = np.random.default_rng(seed).normal(0, 1, rows).tolist()
    step_us = 3_600_000_000 // rows
    with conn.cursor().copy(
        "COPY inference_logs (workspace, pipeline, pipeline_version, deployment_id, request_id, time, "
        "input_topic, input_partition, input_offset, ok, inputs, outputs) FROM STDIN"
    ) as copy:
        for i, v in enumerate(values):
            copy.write_row(
                (
                    "default",
                    "bench",
                    1,
                    "d",
                    f"r{i}",
                    T0 + timedelta(microseconds=i * step_us),
                    "in",
                    0,
                    i,
                    True,
                    f'{{"features": [5.0, 3.0, {v!r}, 1.0]}}',
                    '{"label": 1}',
                )
            )
    conn.commit()
    conn.execute("ANALYZE inference_logs")


def create_assay(conn: psycopg.Connection[Any], definition: AssayDefinition) -> int:
    """An assay whose panes hold the counts the loggers would have added, row by row."""
    row = conn.execute(
        "INSERT INTO assays (workspace_id, name, pipeline, definition) "
        "SELECT id, %s, %s, %s FROM workspaces WHERE name = 'default' RETURNING id",
        (definition.name, definition.pipeline, Jsonb(definition.to_json())),
    ).fetchone()
    assert row is not None
    panes: dict[datetime, WindowCounts] = {}
    for micros, values in timed_value_chunks(conn, definition, sql.SQL("TRUE")):
        definition.count(micros, values, panes)
    add_counts(conn, {(row[0], start): counts for start, counts in panes.items()})
    conn.commit()
    return int(row[0])


def live_close(conn: psycopg.Connection[Any], definition: AssayDefinition, assay_id: int) -> WindowResult:
    """What the assayer does when the window from T0 closes."""
    assert definition.start is not None
    rows = conn.execute(
        "SELECT pane_start, counts FROM assay_panes WHERE assay_id = %s", (assay_id,)
    ).fetchall()
    counts = definition.window_counts(
        definition.start, {start: WindowCounts.from_bytes(data) for start, data in rows}
    )
    return result_of(definition, definition.start, definition.start + definition.width, counts)


def timed(run: Callable[[], object], repeats: int) -> list[float]:
    run()
    samples = []
    for _ in range(repeats):
        began = time.perf_counter()
        run()
        samples.append(time.perf_counter() - began)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()

    with scratch_database() as url, psycopg.connect(url) as conn:
        began = time.perf_counter()
        fill(conn, args.rows, args.seed)
        print(f"wrote {args.rows:,} log rows in {time.perf_counter() - began:.1f} s")
        end = T0 + timedelta(hours=1)
        tumbling = AssayDefinition(
            workspace="default",
            name="bench",
            pipeline="bench",
            iopath=IoPath.parse("input features 2"),
            start=T0,
            width=end - T0,
        ).with_baseline(np.random.default_rng(args.seed + 1).normal(0, 1, 10_000))
        sliding = replace(tumbling, name="bench-sliding", interval=(end - T0) / 1440)
        assert sliding.width // sliding.pane == 1440
        assert log_values(conn, tumbling, T0, end).size == args.rows
        ids = {d.name: create_assay(conn, d) for d in (tumbling, sliding)}
        systems: dict[str, Callable[[], object]] = {
            "fetch-only": lambda: log_values(conn, tumbling, T0, end),
            "interactive": lambda: window_results(conn, tumbling, end),
            "live close": lambda: live_close(conn, tumbling, ids[tumbling.name]),
            "live close, 1,440 panes": lambda: live_close(conn, sliding, ids[sliding.name]),
        }
        for d in (tumbling, sliding):
            assert [live_close(conn, d, ids[d.name])] == window_results(conn, d, end)
        results = {system: timed(run, args.repeats) for system, run in systems.items()}

    floor = statistics.median(results["fetch-only"])
    print(f"\nwindow of {args.rows:,} rows, median of {args.repeats} runs\n")
    print("| system | median ms | min ms | rows/s | time / fetch-only |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for system, samples in results.items():
        median = statistics.median(samples)
        print(
            f"| {system} | {median * 1000:.0f} | {min(samples) * 1000:.0f} | "
            f"{args.rows / median:,.0f} | {median / floor:.2f}x |"
        )


if __name__ == "__main__":
    main()
