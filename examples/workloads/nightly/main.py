"""Nightly batch scoring, run by the orchestrator as a task: one day's rows of the ``source`` connection
(yesterday's by default) through ``pipeline``, the results upserted into the ``scores`` connection's
table by row id and written to one Parquet file per day in the ``files`` connection's directory.

Arguments (``json_args``): ``day`` (YYYY-MM-DD), ``source``, ``scores``, ``files``, ``pipeline``.
A rerun for the same day rewrites the same rows and the same file: the job is idempotent.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path

import pandas as pd
import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
from psycopg import sql

import joey


def main() -> None:
    args = joey.task_args()
    day = dt.date.fromisoformat(args["day"]) if "day" in args else dt.date.today() - dt.timedelta(days=1)
    client = joey.Client()
    source = client.get_connection(args.get("source", "wine-db")).details()
    scores = client.get_connection(args.get("scores", "wine-scores")).details()
    files = client.get_connection(args.get("files", "wine-files")).details()

    with psycopg.connect(source["url"]) as conn:
        rows = conn.execute(
            sql.SQL("SELECT id, input FROM {} WHERE day = %s ORDER BY id").format(
                sql.Identifier(*source["table"].split("."))
            ),
            (day,),
        ).fetchall()
    print(f"{len(rows)} rows of {day} in {source['table']}", flush=True)
    if not rows:
        return

    pipeline = client.get_pipeline(args.get("pipeline", "wine"))
    results = pipeline.infer(pd.DataFrame({"input": [r[1] for r in rows]}))
    ids = [r[0] for r in rows]
    labels = [int(label) for label in results["out.label"]]
    probabilities = [list(map(float, p)) for p in results["out.probabilities"]]

    table = sql.Identifier(*scores["table"].split("."))
    with psycopg.connect(scores["url"]) as conn:
        conn.execute(
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} (id bigint PRIMARY KEY, day date, label integer, "
                "probabilities jsonb, scored_at timestamptz DEFAULT now())"
            ).format(table)
        )
        with conn.cursor() as cursor:
            cursor.executemany(
                sql.SQL(
                    "INSERT INTO {} (id, day, label, probabilities) VALUES (%s, %s, %s, %s) "
                    "ON CONFLICT (id) DO UPDATE SET label = EXCLUDED.label, "
                    "probabilities = EXCLUDED.probabilities, scored_at = now()"
                ).format(table),
                [
                    (i, day, label, json.dumps(p))
                    for i, label, p in zip(ids, labels, probabilities, strict=True)
                ],
            )
    print(f"{len(ids)} scores upserted into {scores['table']}", flush=True)

    # Written under a temporary name and renamed: a reader never sees half a file.
    target = Path(files["path"]) / f"wine-scores-{day}.parquet"
    partial = target.with_name(f".{target.name}.{os.getpid()}")
    pq.write_table(pa.table({"id": ids, "label": labels, "probabilities": probabilities}), partial)
    partial.replace(target)
    print(f"wrote {target}", flush=True)


if __name__ == "__main__":
    main()
