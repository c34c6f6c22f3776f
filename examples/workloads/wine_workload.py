"""A production-shaped ML workload over an external Postgres store (docs/workloads.md): a streaming
feed and a nightly batch job scoring the same table with the same pipeline.

- **Streaming**: a source bridge sends every row of ``wine_in`` (existing and new, in id order) to the
  ``wine`` pipeline, and a sink bridge upserts each result into ``wine_out``, one row per input.
- **Nightly**: the ``nightly-batch`` orchestration (``nightly/main.py``) scores one day's rows, upserts
  them into ``wine_scores`` and writes a Parquet file per day. Here it runs once, for yesterday; in
  production it would be ``run_scheduled("nightly", schedule="0 2 * * *")``.

The model is a scikit-learn pipeline, uploaded as its joblib file. Needs a running stack
(`joey up --detach`); `make demo` runs it after the main demo.

    python examples/workloads/wine_workload.py

The external store is the database ``joey_wine_demo`` beside Joey's own (JOEY_DEMO_STORE_URL to use
another), recreated on each run.
"""

from __future__ import annotations

import datetime as dt
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import joblib
import numpy as np
import psycopg
import pyarrow.parquet as pq
from psycopg import sql
from sklearn.datasets import load_wine
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import joey
import joey.client
from joey_core.settings import DatabaseSettings

HERE = Path(__file__).resolve().parent
PIPELINE = "wine"
YESTERDAY_ROWS = 120
TODAY_ROWS = 30
LATE_ROWS = 20
BRIDGES = ("wine-feed", "wine-results", "wine-parquet")


def store_url() -> str:
    if url := os.environ.get("JOEY_DEMO_STORE_URL"):
        return url
    joey_db = urlsplit(DatabaseSettings().database_url.get_secret_value())
    return urlunsplit(joey_db._replace(path="/joey_wine_demo"))


def recreate_store(url: str) -> None:
    name = psycopg.conninfo.conninfo_to_dict(url)["dbname"]
    admin = psycopg.conninfo.make_conninfo(url, dbname="postgres")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    with psycopg.connect(url) as conn:
        conn.execute(
            "CREATE TABLE wine_in (id bigint PRIMARY KEY, day date NOT NULL, input float8[] NOT NULL)"
        )


def add_rows(url: str, features: np.ndarray, first_id: int, day: dt.date) -> int:
    with psycopg.connect(url) as conn, conn.cursor() as cursor:
        cursor.executemany(
            "INSERT INTO wine_in VALUES (%s, %s, %s)",
            [(first_id + i, day, row.tolist()) for i, row in enumerate(features)],
        )
    return first_id + len(features)


def count(url: str, table: str) -> int:
    with psycopg.connect(url) as conn:
        found = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table))).fetchone()
    return int(found[0]) if found else 0


def scored_rows(url: str) -> int:
    """The rows of wine_in with their result in wine_out."""
    try:
        with psycopg.connect(url) as conn:
            found = conn.execute(
                "SELECT count(*) FROM wine_in i JOIN wine_out o ON o.source_key = i.id::text"
            ).fetchone()
    except psycopg.errors.UndefinedTable:
        return 0  # the sink creates its table with its first write
    return int(found[0]) if found else 0


def parquet_holds(folder: Path, source_keys: list[str]) -> bool:
    """Every one of ``source_keys`` has its result in the Parquet files (files hold whole results
    only: each is renamed into place once written)."""
    files = list(folder.glob("*.parquet"))
    found = {key for f in files for key in pq.read_table(f, columns=["source_key"]).column(0).to_pylist()}
    return found.issuperset(source_keys)


def wait_for(what: str, done: Callable[[], bool], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.2)


def describe(status: joey.client.BridgeStatus) -> str:
    return f"{status}, {status.rows_moved} rows moved, lag {status.lag}"


def replace_connection(client: joey.Client, name: str, type_: str, details: dict[str, object]) -> None:
    if any(c.name == name for c in client.list_connections()):
        client.get_connection(name).delete()
    client.create_connection(name, type_, details)


def remove_bridges(client: joey.Client, *names: str) -> None:
    for bridge in client.list_bridges():
        if bridge.name in names:
            bridge.delete()


def run_workloads(client: joey.Client, folder: Path) -> None:
    url = store_url()
    print("\n== an external store: database", psycopg.conninfo.conninfo_to_dict(url)["dbname"])
    recreate_store(url)
    x, y = load_wine(return_X_y=True)
    rng = np.random.default_rng(7)
    today = dt.date.today()
    yesterday = today - dt.timedelta(days=1)
    # Ids new on every run: the pipeline's outputs topic still holds an earlier run's results.
    first_id = int(time.time()) * 1000
    next_id = add_rows(url, x[rng.integers(0, len(x), YESTERDAY_ROWS)], first_id, yesterday)
    next_id = add_rows(url, x[rng.integers(0, len(x), TODAY_ROWS)], next_id, today)
    print(f"wine_in: {YESTERDAY_ROWS} rows of {yesterday}, {TODAY_ROWS} of {today}")

    print("\n== a scikit-learn pipeline, uploaded as its joblib file and served as ONNX")
    path = folder / "wine.joblib"
    joblib.dump(make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(x, y), path)
    model = client.upload_model("wine-classifier", path, framework="sklearn", sample_input=x[:5])
    print(f"model {model.name} v{model.version}: {model.status}")
    pipeline = client.build_pipeline(PIPELINE).add_model_step(model)
    pipeline.deploy()

    files = folder / "scores"
    stream_files = folder / "stream"
    files.mkdir()
    stream_files.mkdir()
    remove_bridges(client, *BRIDGES)
    replace_connection(client, "wine-db", "postgres", {"url": url, "table": "wine_in", "key": "id"})
    replace_connection(client, "wine-out", "postgres", {"url": url, "table": "wine_out"})
    replace_connection(client, "wine-scores", "postgres", {"url": url, "table": "wine_scores"})
    replace_connection(client, "wine-files", "files", {"path": str(files)})
    # Parquet files of the stream's results, one written every 2 s or 100 results (by partition).
    replace_connection(
        client, "wine-lake", "files", {"path": str(stream_files), "roll_rows": 100, "roll_seconds": 2}
    )
    print(client.list_connections())

    print("\n== streaming: wine_in -> source wine-feed -> pipeline wine -> sink wine-results (wine_out)")
    print("   and wine-parquet (Parquet files)")
    source = client.create_source("wine-feed", connection="wine-db", pipeline=PIPELINE)
    sink = client.create_sink("wine-results", pipeline=PIPELINE, connection="wine-out")
    client.create_sink("wine-parquet", pipeline=PIPELINE, connection="wine-lake")
    total = YESTERDAY_ROWS + TODAY_ROWS
    wait_for("the existing rows in wine_out", lambda: scored_rows(url) == total)
    print(f"wine_out: {total} results, one per row")
    add_rows(url, x[rng.integers(0, len(x), LATE_ROWS)], next_id, today)
    wait_for("the new rows in wine_out", lambda: scored_rows(url) == total + LATE_ROWS)
    print(f"{LATE_ROWS} rows inserted later are scored as they come: wine_out has {total + LATE_ROWS}")
    print(f"source {describe(source.status())}; sink {describe(sink.status())}")
    ids = [str(i) for i in range(first_id, first_id + total + LATE_ROWS)]
    wait_for("the stream's Parquet files", lambda: parquet_holds(stream_files, ids))
    names = sorted(p.name for p in stream_files.glob("*.parquet"))
    print(f"wine-parquet: {len(names)} files hold every result, e.g. {names[0]}")

    print("\n== nightly batch: orchestration nightly-batch, run once for yesterday")
    orchestration = client.upload_orchestration("nightly-batch", HERE / "nightly")
    print(f"orchestration {orchestration.name}: {orchestration.status()}")
    for earlier in client.list_tasks():
        if earlier.name == "nightly-backfill":  # an earlier run of this example's
            earlier.kill().delete()
    task = orchestration.run_once("nightly-backfill", json_args={"day": yesterday.isoformat()}, timeout=300)
    task.wait(timeout_s=300)
    run = task.last_runs()[0]
    print(f"task {task.name}: {task.status()}, exit code {run.exit_code}; its log:")
    for line in run.logs():
        print(f"  [{line.stream}] {line.text}")
    if task.status() != "success":
        raise SystemExit("the nightly task failed")
    scored = count(url, "wine_scores")
    written = pq.read_table(files / f"wine-scores-{yesterday}.parquet").num_rows
    print(f"wine_scores: {scored} rows, Parquet: {written} rows (yesterday had {YESTERDAY_ROWS})")
    agree(url)

    remove_bridges(client, *BRIDGES)
    pipeline.undeploy()


def agree(url: str) -> None:
    """The batch and the stream scored yesterday's rows with the same pipeline: same labels."""
    with psycopg.connect(url) as conn:
        found = conn.execute(
            "SELECT count(*), count(*) FILTER (WHERE (o.outputs->>'label')::int = s.label) "
            "FROM wine_scores s JOIN wine_out o ON o.source_key = s.id::text"
        ).fetchone()
    both, same = found if found else (0, 0)
    print(f"batch and stream agree on {same} of the {both} rows both scored")
    if both != YESTERDAY_ROWS or same != both:
        raise SystemExit("the batch and the stream disagree")


def main() -> None:
    with joey.Client() as client, tempfile.TemporaryDirectory() as folder:
        run_workloads(client, Path(folder))


if __name__ == "__main__":
    sys.exit(main())
