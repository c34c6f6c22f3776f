"""Time of the logger's Postgres sink writing a batch of inference logs, with and without live assays.

``PostgresLogSink.write`` stores a batch in ``inference_logs`` and, in the same transaction, counts the
rows it inserted into the open windows of every assay of their pipeline (``joey_core.assays.panes``). This
asks whether the logger still keeps up with the engine's log rate once assays are counted live.

One scratch database, one sink (one connection, as in one logger), one pipeline per system:

* 0 assays: the pipeline has no assay, so the write is the COPY and INSERT it was before live
  counting (plus the shared advisory lock and one lookup that finds no assay). The baseline.
* 1 and 4 assays: assays on ``input features <k>`` (k = 0..3), baselines of 10,000 N(0, 1) values,
  5 quantile bins, 1-hour windows starting at the first log time.
* 4 assays, replayed: a batch the sink already stored written again; it inserts and counts nothing.

Every batch has ``--rows-per-batch`` records (the logger's default batch size) with distinct
identities, ``inputs`` ``{"features": [f0, f1, f2, f3]}`` of N(0, 1) floats and times spread
uniformly over the first window, so every batch adds to windows already holding counts. Each
system first writes ``--batches`` untimed batches (connection, cached definitions, window rows
created); then the log table is analyzed, as autovacuum does in a live database (see
:func:`measure` for what counting costs before it has); then the systems take turns, one batch
each, so the growing log table weighs on all of them alike. Each figure is the median of
``--repeats`` timed writes; rows/s counts the records of the batch (the replayed batch stores
none of them). Before printing, the bench checks that the log holds every row written and that
every assay's stored window counts add up to the rows written to its pipeline.

    python bench/assay_counting.py --repeats 15
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
from psycopg.types.json import Jsonb

from joey_core.assays.runs import AssayDefinition, IoPath
from joey_core.assays.streaming import WindowCounts
from joey_logger.sink import PostgresLogSink

sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine_throughput import scratch_database  # noqa: E402
from measure import log_record  # noqa: E402

T0 = datetime(2025, 1, 1, tzinfo=UTC)
WIDTH = timedelta(hours=1)
WORKSPACE = "bench"
ASSAY_COUNTS = (0, 1, 4)


@dataclass(frozen=True)
class System:
    assays: int
    replayed: bool = False

    @property
    def pipeline(self) -> str:
        return f"assays-{self.assays}"

    @property
    def label(self) -> str:
        return f"{self.assays}, replayed" if self.replayed else str(self.assays)


SYSTEMS = [System(n) for n in ASSAY_COUNTS] + [System(ASSAY_COUNTS[-1], replayed=True)]


@dataclass
class Records:
    """Log records of the bench's pipelines, each with an identity no other record has."""

    rng: np.random.Generator
    next_offset: int = 0

    def batch(self, pipeline: str, rows: int) -> list[dict[str, Any]]:
        features = self.rng.normal(0, 1, (rows, 4)).tolist()
        seconds = self.rng.uniform(0, WIDTH.total_seconds(), rows).tolist()
        first = self.next_offset
        self.next_offset += rows
        return [
            log_record(WORKSPACE, pipeline, first + i, T0 + timedelta(seconds=s), json.dumps({"features": f}))
            for i, (s, f) in enumerate(zip(seconds, features, strict=True))
        ]


def create_assays(conn: psycopg.Connection[Any], seed: int) -> None:
    """The bench's workspace and, for each system, its pipeline's assays, all counted live from T0."""
    row = conn.execute("INSERT INTO workspaces (name) VALUES (%s) RETURNING id", (WORKSPACE,)).fetchone()
    assert row is not None
    rng = np.random.default_rng(seed)
    for assays in ASSAY_COUNTS:
        pipeline = System(assays).pipeline
        for k in range(assays):
            definition = AssayDefinition(
                workspace=WORKSPACE,
                name=f"{pipeline}-features-{k}",
                pipeline=pipeline,
                iopath=IoPath.parse(f"input features {k}"),
                width=WIDTH,
                start=T0,
            ).with_baseline(rng.normal(0, 1, 10_000))
            conn.execute(
                "INSERT INTO assays (workspace_id, name, pipeline, definition, backfill_until) "
                "VALUES (%s, %s, %s, %s, NULL)",
                (row[0], definition.name, definition.pipeline, Jsonb(definition.to_json())),
            )
    conn.commit()


def check_counts(conn: psycopg.Connection[Any], written: dict[str, int]) -> None:
    """The log holds the rows written, and every assay's windows together counted each of its pipeline's."""
    stored = dict(conn.execute("SELECT pipeline, count(*) FROM inference_logs GROUP BY pipeline").fetchall())
    if stored != written:
        raise RuntimeError(f"the log holds {stored} rows per pipeline, {written} were written")
    counted_by: dict[tuple[str, str], int] = {}
    for name, pipeline, counts in conn.execute(
        "SELECT a.name, a.pipeline, w.counts FROM assays a LEFT JOIN assay_panes w ON w.assay_id = a.id"
    ).fetchall():
        added = 0 if counts is None else WindowCounts.from_bytes(counts).count
        counted_by[(name, pipeline)] = counted_by.get((name, pipeline), 0) + added
    if len(counted_by) != sum(ASSAY_COUNTS):
        raise RuntimeError(f"expected {sum(ASSAY_COUNTS)} assays, found {len(counted_by)}")
    for (name, pipeline), counted in counted_by.items():
        if counted != written[pipeline]:
            raise RuntimeError(f"assay {name} counted {counted} rows, {written[pipeline]} were written")
    print(f"counts checked: {len(counted_by)} assays, each counted every row written to its pipeline")


def measure(url: str, args: argparse.Namespace) -> dict[System, list[float]]:
    records = Records(np.random.default_rng(args.seed))
    sink = PostgresLogSink(url)
    written = dict.fromkeys((s.pipeline for s in SYSTEMS), 0)
    last_batch: dict[str, list[dict[str, Any]]] = {}
    samples: dict[System, list[float]] = {s: [] for s in SYSTEMS}

    def write(system: System) -> float:
        if system.replayed:
            batch, expected = last_batch[system.pipeline], 0
        else:
            batch, expected = records.batch(system.pipeline, args.rows_per_batch), args.rows_per_batch
            last_batch[system.pipeline] = batch
        began = time.perf_counter()
        result = sink.write(batch)
        elapsed = time.perf_counter() - began
        if result.written != expected:
            raise RuntimeError(f"{system.label}: wrote {result.written} rows, expected {expected}")
        written[system.pipeline] += result.written
        return elapsed

    try:
        for _ in range(args.batches):
            for system in SYSTEMS:
                write(system)
        # As autovacuum would in a live database, so this measures counting with statistics that
        # know the pipelines. Without them (a new table, or a pipeline newer than the last ANALYZE)
        # the planner reads the rows just inserted through the pipeline's time index, filtering
        # every row of the pipeline by id: each assay's count then grows with the pipeline's log.
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("ANALYZE inference_logs")
        for round_ in range(args.repeats):
            # Turns rotate so that no system always follows the same one.
            shift = round_ % len(SYSTEMS)
            for system in SYSTEMS[shift:] + SYSTEMS[:shift]:
                samples[system].append(write(system))
    finally:
        sink.close()
    with psycopg.connect(url) as conn:
        check_counts(conn, written)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batches", type=int, default=3, help="untimed warm-up batches per system")
    parser.add_argument("--repeats", type=int, default=9, help="timed batches per system")
    parser.add_argument("--rows-per-batch", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    if args.batches < 1:
        parser.error("--batches must be at least 1: the replayed batch is one of them")

    with scratch_database() as url:
        with psycopg.connect(url) as conn:
            create_assays(conn, args.seed + 1)
        results = measure(url, args)

    baseline = statistics.median(results[SYSTEMS[0]])
    print(
        f"\nbatches of {args.rows_per_batch:,} records, median of {args.repeats} batches "
        f"after {args.batches} warm-up batches per system\n"
    )
    print("| assays | median ms per batch | rows/s | time / no-assays |")
    print("| --- | ---: | ---: | ---: |")
    for system, samples in results.items():
        median = statistics.median(samples)
        print(
            f"| {system.label} | {median * 1000:.0f} | {args.rows_per_batch / median:,.0f} | "
            f"{median / baseline:.2f}x |"
        )


if __name__ == "__main__":
    main()
