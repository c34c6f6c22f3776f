"""Rows/s the logger stores in Postgres when it catches up on a backlog of ``joey.logs``, in one run.

After an outage the logger must store rows faster than the engine logs them (issue 14: >= 1.5x the
engine's records/s). Each run fills a fresh ``joey.logs`` (a fresh embedded broker, ``--partitions``
partitions) with ``--rows`` inference logs of the example iris pipeline (4 float inputs, 3 outputs),
then starts ``joey serve logger`` processes against a scratch database and times until every row is
stored. Systems, run side by side, their order rotating from one repetition to the next:

* ``old xN``: one ``joey.v1.InferenceLog`` record per row (what engines before issue 14 wrote),
  N loggers;
* ``batched xN``: ``joey.v1.InferenceLogBatch`` records of ``--batch`` rows (what the engine writes
  now), N loggers;
* ``... checkout``: with ``--checkout DIR``, the same with the loggers run from another source tree
  (``git archive <commit> | tar -x -C DIR``): a before/after of the logger in one run;
* ``copy floor``: a plain COPY of the same rows into a table of the same shape, from one connection,
  no Kafka and no idempotency: what Postgres alone takes.

Rows/s runs from the first row stored to the last (the processes' start and group join are left
out: a logger catching up after an outage is running already). On a shared, loaded machine wall time
says little alone, so each run also takes the CPU time of the writers (the logger processes, or the
COPY's process) and of their Postgres backends, per row: what a row costs whatever the load. Each
logger's Prometheus counters give the profile: seconds per stage (``joey_logger_stage_seconds_total``)
per row stored.

    python bench/logger_catchup.py --rows 100000 --repeats 3 --loggers 1 2
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from confluent_kafka import Producer

from joey_cli.broker import EmbeddedBroker
from joey_core import topics
from joey_core.kafka import DeliveryTracker, admin_client, ensure_topics, platform_topics, producer_config
from joey_core.records import (
    CONTENT_TYPE_HEADER,
    LOG_BATCH_CONTENT_TYPE,
    LOG_CONTENT_TYPE,
    encode_log,
    encode_log_batch,
)
from joey_core.settings import CommonSettings
from joey_logger.sink import COLUMNS, COPY_TYPES, row_values

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import measure  # noqa: E402
from engine_throughput import (  # noqa: E402
    REDIS_URL,
    Process,
    free_port,
    interrupt,
    scratch_database,
    scratch_redis_prefix,
    wait_until,
)

WORKSPACE, PIPELINE = "default", "iris"
T0 = datetime(2026, 1, 1, tzinfo=UTC)
STALL_S = 60.0
"""A run that stores nothing for this long has lost rows: fail rather than wait forever."""
STAGES = ("consume", "decode", "prepare", "copy", "undone", "insert", "commit")


def rows_of(count: int) -> list[dict[str, Any]]:
    """Engine-like logs of the iris pipeline: one per input record, unique identities."""
    return [
        measure.log_record(
            WORKSPACE,
            PIPELINE,
            i,
            T0 + timedelta(microseconds=100 * i),
            f'{{"sepal_length":{5 + i % 30 / 10},"sepal_width":3.4,"petal_length":1.5,"petal_width":0.2}}',
        )
        | {"outputs": f'{{"label":[{i % 3}],"probabilities":[0.1,0.2,0.7]}}', "elapsed_ns": [41_000, 3_000]}
        for i in range(count)
    ]


def fill(settings: CommonSettings, rows: list[dict[str, Any]], batch: int, partitions: int) -> int:
    """Write the rows to joey.logs (one record per row when ``batch`` is 0); the records written."""
    producer = Producer(producer_config(settings, **{"queue.buffering.max.messages": len(rows) + 1}))
    tracker = DeliveryTracker()
    if batch:
        content_type = LOG_BATCH_CONTENT_TYPE
        values: Iterator[bytes] = (encode_log_batch(rows[i : i + batch]) for i in range(0, len(rows), batch))
    else:
        content_type, values = LOG_CONTENT_TYPE, (encode_log(r) for r in rows)
    headers = [(CONTENT_TYPE_HEADER, content_type.encode())]
    written = 0
    for written, value in enumerate(values, start=1):
        producer.produce(
            topics.LOGS,
            value,
            partition=written % partitions,
            headers=headers,
            on_delivery=tracker.on_delivery,
        )
        producer.poll(0)
    tracker.flush(producer, timeout=300)
    return written


def stored(conn: psycopg.Connection[Any]) -> int:
    """Rows stored so far: the identity sequence, as no row of the run is a duplicate (cheaper than count)."""
    row = conn.execute("SELECT coalesce(max(id), 0) FROM inference_logs").fetchone()
    return int(row[0]) if row else 0


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process so far (the machine is shared: wall time says little alone)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_of(processes: list[Process]) -> float:
    return sum(cpu_seconds(p.process.pid) for p in processes if p.process is not None)


def backends(conn: psycopg.Connection[Any]) -> list[int]:
    """Postgres backends of the scratch database but this connection: the loggers' sessions."""
    rows = conn.execute(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
    ).fetchall()
    return [int(r[0]) for r in rows]


def stage_seconds(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    seconds: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("joey_logger_stage_seconds_total{"):
            stage = line.split('stage="', 1)[1].split('"', 1)[0]
            seconds[stage] = float(line.rsplit(" ", 1)[1])
    return seconds


class Result:
    def __init__(
        self, rows_per_s: float, records: int, profile: dict[str, float], client_us: float, server_us: float
    ) -> None:
        self.rows_per_s = rows_per_s
        self.records = records
        self.profile = profile
        """µs per row stored, per stage (summed over the loggers)."""
        self.client_us = client_us
        """CPU µs per row of the writing processes (the loggers, or the COPY's), whole run."""
        self.server_us = server_us
        """CPU µs per row of their Postgres backends."""


def logger_run(
    args: argparse.Namespace, rows: list[dict[str, Any]], batch: int, loggers: int, tree: Path | None
) -> Result:
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="joey-catchup-")))
        # A fresh broker every run: the embedded broker's fetches slow down as a topic grows.
        broker = stack.enter_context(EmbeddedBroker(free_port(), work / "tansu.log"))
        url = stack.enter_context(scratch_database())
        settings = CommonSettings(kafka_bootstrap=broker.bootstrap, logs_partitions=args.partitions)
        ensure_topics(admin_client(settings), platform_topics(settings))
        records = fill(settings, rows, batch, args.partitions)
        prefix = stack.enter_context(scratch_redis_prefix())
        ports = [free_port() for _ in range(loggers)]
        processes = []
        for n, port in enumerate(ports):
            env = {
                "JOEY_KAFKA_BOOTSTRAP": broker.bootstrap,
                "JOEY_DATABASE_URL": url,
                "JOEY_REDIS_URL": REDIS_URL,
                "JOEY_REDIS_PREFIX": prefix,
                "JOEY_LOGS_PARTITIONS": str(args.partitions),
                "JOEY_INSTANCE_ID": f"catchup-{n}-{secrets.token_hex(3)}",
                "JOEY_METRICS_PORT": str(port),
                **dict(setting.split("=", 1) for setting in args.env),
            }
            if tree is not None:  # ahead of the installed (editable) packages
                env["PYTHONPATH"] = os.pathsep.join(str(tree / d) for d in ("src", "services/logger"))
            argv = [sys.executable, "-m", "joey_cli", "serve", "logger"]
            process = Process(f"logger-{n}", argv, env, work).start()
            stack.callback(process.stop)
            processes.append(process)

        watch = stack.enter_context(psycopg.connect(url, autocommit=True))

        def first_rows() -> int:
            for process in processes:
                process.check()
            return stored(watch)

        wait_until(first_rows, 120, "the first rows")
        began, at_start = time.perf_counter(), stored(watch)
        # From here on: the processes' start (imports, about a second of CPU) is not the rows' cost.
        client_before = cpu_of(processes)
        server_before = sum(cpu_seconds(pid) for pid in backends(watch))
        last, last_at = at_start, began
        while last < len(rows):
            time.sleep(0.05)
            for process in processes:
                process.check()
            now_stored = stored(watch)
            if now_stored > last:
                last, last_at = now_stored, time.perf_counter()
            elif time.perf_counter() - last_at > STALL_S:
                raise TimeoutError(f"{last} of {len(rows)} rows stored, then none for {STALL_S:.0f}s")
        elapsed = last_at - began
        row = watch.execute("SELECT count(*) FROM inference_logs").fetchone()
        if row is None or row[0] != len(rows):
            raise RuntimeError(f"{row} rows stored, {len(rows)} expected")
        client = cpu_of(processes) - client_before
        server = sum(cpu_seconds(pid) for pid in backends(watch)) - server_before
        profile: dict[str, float] = {}
        for port in ports:
            for stage, seconds in stage_seconds(port).items():
                profile[stage] = profile.get(stage, 0.0) + seconds * 1e6 / len(rows)
    per_row = 1e6 / (len(rows) - at_start)
    return Result((len(rows) - at_start) / elapsed, records, profile, client * per_row, server * per_row)


def copy_floor(args: argparse.Namespace, rows: list[dict[str, Any]]) -> Result:
    with scratch_database() as url, psycopg.connect(url) as conn:
        conn.execute("CREATE TABLE floor (LIKE inference_logs INCLUDING ALL)")
        conn.commit()
        backend = conn.info.backend_pid
        columns = ", ".join(COLUMNS)
        server_before, client_before = cpu_seconds(backend), time.process_time()
        began = time.perf_counter()
        with conn.cursor() as cursor, cursor.copy(f"COPY floor ({columns}) FROM STDIN") as copy:
            copy.set_types(COPY_TYPES)
            for record in rows:
                copy.write_row(row_values(record))
        conn.commit()
        elapsed = time.perf_counter() - began
        client, server = time.process_time() - client_before, cpu_seconds(backend) - server_before
    per_row = 1e6 / len(rows)
    return Result(len(rows) / elapsed, 0, {}, client * per_row, server * per_row)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=256, help="rows per batch record (the engine's batch)")
    parser.add_argument("--partitions", type=int, default=8, help="partitions of joey.logs")
    parser.add_argument(
        "--loggers", type=int, nargs="+", default=[1], help="logger processes, one system each"
    )
    parser.add_argument("--formats", nargs="+", default=["batched", "old"], choices=["batched", "old"])
    parser.add_argument("--env", nargs="*", default=[], help="JOEY_X=value settings of the loggers")
    parser.add_argument("--checkout", type=Path, help="also run the loggers from this source tree")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, interrupt)

    rows = rows_of(args.rows)
    systems: dict[str, Callable[[], Result]] = {"copy floor": lambda: copy_floor(args, rows)}
    trees: dict[str, Path | None] = {"": None}
    if args.checkout is not None:
        trees[" checkout"] = args.checkout.resolve()
    for name in args.formats:
        for n in args.loggers:
            for suffix, tree in trees.items():
                batch = args.batch if name == "batched" else 0
                systems[f"{name} x{n}{suffix}"] = lambda batch=batch, n=n, tree=tree: logger_run(  # type: ignore[misc]
                    args, rows, batch, n, tree
                )
    names = list(systems)
    results: dict[str, list[Result]] = {name: [] for name in names}
    for repeat in range(args.repeats):
        for name in names[repeat % len(names) :] + names[: repeat % len(names)]:
            result = systems[name]()
            results[name].append(result)
            print(f"  run {repeat + 1} {name}: {result.rows_per_s:,.0f} rows/s", flush=True)

    floor = statistics.median(r.rows_per_s for r in results["copy floor"])
    print(
        f"\n{args.rows:,} rows, joey.logs of {args.partitions} partitions, batch records of {args.batch}, "
        f"median of {args.repeats} runs\n"
    )
    floor_cpu = statistics.median(r.client_us + r.server_us for r in results["copy floor"])
    print(
        "| system | records | rows/s median | spread (min-max) | vs copy floor "
        "| CPU µs/row writer + postgres "
        "| CPU vs copy floor |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, runs in results.items():
        speeds = [r.rows_per_s for r in runs]
        median = statistics.median(speeds)
        client = statistics.median(r.client_us for r in runs)
        server = statistics.median(r.server_us for r in runs)
        cpu = statistics.median(r.client_us + r.server_us for r in runs)
        print(
            f"| {name} | {runs[0].records:,} | {median:,.0f} | {min(speeds):,.0f}-{max(speeds):,.0f} | "
            f"{median / floor:.2f}x | {client:.0f} + {server:.0f} | {cpu / floor_cpu:.2f}x |"
        )
    print("\nµs per row stored, per stage (median over runs; consume includes idle polls):\n")
    print("| system | " + " | ".join(STAGES) + " |")
    print("| --- |" + " ---: |" * len(STAGES))
    for name, runs in results.items():
        if runs[0].profile:
            cells = [statistics.median(r.profile.get(stage, 0.0) for r in runs) for stage in STAGES]
            print(f"| {name} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")


if __name__ == "__main__":
    main()
