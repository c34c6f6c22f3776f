"""Time of scoring one assay window: from the log's rows (interactive runs) and from the window's
counts (the live assayer, whose loggers counted the rows as they stored them).

Systems, on the same rows of a scratch database (one pipeline, ``inputs.features[2]`` ~ N(0, 1)):

* fetch-only: the SQL and server-side cursor reading the window's values into numpy, nothing
  else. What reading the rows costs, the floor of any scorer reading the log.
* interactive: ``joey.assay_runs.window_results``: the same read, counted chunk by chunk into
  ``WindowCounts``, then summarised and scored against a baseline of 10,000 values (5 quantile
  bins, PSI).
* live close: what the assayer does when the window closes: read the window's one
  ``assay_panes`` row, summarise and score it. Its cost does not grow with the rows.

Each figure is the median of ``--repeats`` timed runs after one warm-up run.

    python bench/assay_window.py --rows 1000000 --repeats 5
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import psycopg
from psycopg.types.json import Jsonb

from joey import db
from joey.assay_runs import AssayDefinition, IoPath, log_values, result_of, window_results
from joey.assays.streaming import WindowCounts

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


def store_counts(conn: psycopg.Connection[Any], definition: AssayDefinition, values: Any) -> int:
    """An assay whose window holds the counts the loggers would have added, row by row."""
    assert definition.baseline is not None
    row = conn.execute(
        "INSERT INTO assays (workspace_id, name, pipeline, definition) "
        "SELECT id, %s, %s, %s FROM workspaces WHERE name = 'default' RETURNING id",
        (definition.name, definition.pipeline, Jsonb(definition.to_json())),
    ).fetchone()
    assert row is not None
    counts = WindowCounts.of(values, definition.baseline.bins)
    conn.execute(
        "INSERT INTO assay_panes (assay_id, pane_start, counts) VALUES (%s, %s, %s)",
        (row[0], T0, counts.to_bytes()),
    )
    conn.commit()
    return int(row[0])


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
    parser.add_argument("--server", default="postgresql://postgres@127.0.0.1:5432")
    args = parser.parse_args()

    name = f"bench_assay_{secrets.token_hex(4)}"
    with psycopg.connect(f"{args.server}/postgres", autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = f"{args.server}/{name}"
    try:
        db.prepare(url)
        with psycopg.connect(url) as conn:
            began = time.perf_counter()
            fill(conn, args.rows, args.seed)
            print(f"wrote {args.rows:,} log rows in {time.perf_counter() - began:.1f} s")
            end = T0 + timedelta(hours=2)
            definition = AssayDefinition(
                workspace="default",
                name="bench",
                pipeline="bench",
                iopath=IoPath.parse("input features 2"),
                start=T0,
                width=end - T0,
            ).with_baseline(np.random.default_rng(args.seed + 1).normal(0, 1, 10_000))
            assert log_values(conn, definition, T0, end).size == args.rows
            assay_id = store_counts(conn, definition, log_values(conn, definition, T0, end))

            def live_close() -> object:
                row = conn.execute(
                    "SELECT counts FROM assay_panes WHERE assay_id = %s", (assay_id,)
                ).fetchone()
                assert row is not None
                return result_of(definition, T0, end, WindowCounts.from_bytes(row[0]))

            systems = {
                "fetch-only": lambda: log_values(conn, definition, T0, end),
                "interactive": lambda: window_results(conn, definition, end),
                "live close": live_close,
            }
            assert [live_close()] == window_results(conn, definition, end)
            results = {system: timed(run, args.repeats) for system, run in systems.items()}
    finally:
        with psycopg.connect(f"{args.server}/postgres", autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

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
