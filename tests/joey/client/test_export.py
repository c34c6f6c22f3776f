"""Exporting a pipeline's whole log through the SDK and the CLI, against the stack's registry.

Rows are inserted straight into inference_logs: the export path is what is tested, and it
does not care how the rows got there.
"""

from __future__ import annotations

import json
import random
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from psycopg.types.json import Jsonb

from joey.client import Client, Pipeline
from joey.client.log_export import JSON_ENCODING
from joey_cli import main
from joey_core.settings import CommonSettings
from tests.conftest import Stack

T0 = datetime(2025, 3, 1, 8, 0, tzinfo=UTC)
ROWS = 230


@dataclass
class Logged:
    client: Client
    pipeline: Pipeline
    database_url: str
    rows: list[dict[str, Any]]  # as exported, chronological: (time, id) order


def insert(db: psycopg.Connection, workspace: str, rows: list[dict[str, Any]], sha: str) -> list[int]:
    ids = []
    for row in rows:
        found = db.execute(
            """
            INSERT INTO inference_logs (workspace, pipeline, pipeline_version, deployment_id, request_id,
                time, input_topic, input_partition, input_offset, ok, error, inputs, outputs,
                check_failures, models, elapsed_ns)
            VALUES (%s, 'p', 1, 'd1', %s, %s, 'in', %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING id
            """,
            (
                workspace,
                row["request_id"],
                row["time"],
                row["partition"],
                row["offset"],
                row["ok"],
                row["error"],
                Jsonb({k.removeprefix("in."): v for k, v in row.items() if k.startswith("in.")}),
                Jsonb({"label": row["out.label"]}) if row["ok"] else None,
                Jsonb(row["check_failures"]),
                Jsonb([{"name": "iris", "version": 1, "sha256": sha}]),
                Jsonb(row["elapsed_ns"]),
            ),
        ).fetchone()
        assert found is not None
        ids.append(found[0])
    return ids


def make_row(i: int) -> dict[str, Any]:
    ok = i % 7 != 3
    return {
        # Four rows per second: ties in time are ordered by id.
        "time": T0 + timedelta(seconds=i // 4),
        "request_id": f"r{i}",
        "pipeline_version": 1,
        "ok": ok,
        "error": None if ok else f"error {i}",
        "in.features": [i * 0.5, 1.25, 2.0, 3.75],
        **({"out.label": [i % 3]} if ok else {}),  # a failure has no outputs
        "check_failures": ["too small"] if i % 11 == 0 else [],
        "models": ["iris:1"],
        "elapsed_ns": [1000 + i],
        "partition": i % 2,
        "offset": i,
    }


@pytest.fixture
def logged(stack: Stack, settings: CommonSettings, iris_model: Path, database_url: str) -> Logged:
    client = Client(settings=settings, workspace=f"ws-{secrets.token_hex(4)}")
    client.create_workspace(client.workspace)
    sha = client.upload_model("iris", iris_model).sha256
    pipeline = client.build_pipeline("p").add_model_step("iris")
    pipeline.create()
    rows = [make_row(i) for i in range(ROWS)]
    shuffled = random.Random(3).sample(rows, len(rows))
    with psycopg.connect(database_url, autocommit=True) as db:
        ids = insert(db, client.workspace, shuffled, sha)
    by_id = dict(zip(ids, shuffled, strict=True))
    ordered = [by_id[i] for i in sorted(ids, key=lambda i: (by_id[i]["time"], i))]
    return Logged(client, pipeline, database_url, ordered)


def read_parquet(files: list[Path]) -> list[dict[str, Any]]:
    return [row for f in files for row in pq.read_table(f).to_pylist()]


def filled(rows: list[dict[str, Any]], files: list[Path]) -> list[dict[str, Any]]:
    """``rows`` as a Parquet file stores them: every column of the file, None where a row has none."""
    names = pq.read_schema(files[0]).names
    assert all(pq.read_schema(f).names == names for f in files)
    assert all(set(row) <= set(names) for row in rows)
    return [{name: row.get(name) for name in names} for row in rows]


def read_jsonl(files: list[Path]) -> list[dict[str, Any]]:
    return [json.loads(line) for f in files for line in f.read_text().splitlines()]


def as_json(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [row | {"time": row["time"].isoformat()} for row in rows]


def test_parquet_export_splits_at_rows_per_file(logged: Logged, tmp_path: Path) -> None:
    seen: list[tuple[int, int]] = []
    files = logged.pipeline.export_logs(
        tmp_path / "out", page_size=40, rows_per_file=100, progress=lambda n, t: seen.append((n, t))
    )
    assert [f.name for f in files] == ["p-00001.parquet", "p-00002.parquet", "p-00003.parquet"]
    assert [pq.read_metadata(f).num_rows for f in files] == [100, 100, 30]
    assert read_parquet(files) == filled(logged.rows, files)
    assert seen == [(min(n, ROWS), ROWS) for n in range(40, ROWS + 40, 40)]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [f.name for f in files]


def test_jsonl_export_of_a_range(logged: Logged, tmp_path: Path) -> None:
    start, end = T0 + timedelta(seconds=10), T0 + timedelta(seconds=40)
    files = logged.pipeline.export_logs(
        tmp_path, "jsonl", start=start, end=end, file_prefix="range", page_size=25, rows_per_file=50
    )
    want = [r for r in logged.rows if start <= r["time"] < end]
    assert [f.name for f in files] == ["range-00001.jsonl", "range-00002.jsonl", "range-00003.jsonl"]
    assert [len(f.read_text().splitlines()) for f in files] == [50, 50, 20]
    assert read_jsonl(files) == as_json(want)


def test_failures_only(logged: Logged, tmp_path: Path) -> None:
    files = logged.pipeline.export_logs(tmp_path, valid=False, page_size=10)
    failed = [r for r in logged.rows if not r["ok"]]
    assert len(files) == 1 and read_parquet(files) == failed
    assert "out.label" not in pq.read_schema(files[0]).names


def test_refuses_to_overwrite_unless_asked(logged: Logged, tmp_path: Path) -> None:
    first = logged.pipeline.export_logs(tmp_path, "jsonl", page_size=100, rows_per_file=100)
    assert len(first) == 3
    other = tmp_path / "p-00001.parquet"  # another format, another set of files
    other.write_text("keep")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        logged.pipeline.export_logs(tmp_path, "jsonl")
    assert read_jsonl(first) == as_json(logged.rows)
    again = logged.pipeline.export_logs(tmp_path, "jsonl", overwrite=True)
    assert [f.name for f in again] == ["p-00001.jsonl"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p-00001.jsonl", "p-00001.parquet"]
    assert read_jsonl(again) == as_json(logged.rows) and other.read_text() == "keep"


def test_bad_arguments(logged: Logged, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="use one of: parquet, jsonl"):
        logged.pipeline.export_logs(tmp_path, "csv")
    with pytest.raises(ValueError, match="plain file name"):
        logged.pipeline.export_logs(tmp_path, file_prefix="../escape")
    with pytest.raises(ValueError, match="rows_per_file"):
        logged.pipeline.export_logs(tmp_path, rows_per_file=0)
    assert list(tmp_path.iterdir()) == []


def test_nothing_to_export(logged: Logged, tmp_path: Path) -> None:
    assert logged.pipeline.export_logs(tmp_path, start=T0 + timedelta(days=1)) == []


def test_rows_that_change_shape_start_a_new_parquet_file(logged: Logged, tmp_path: Path) -> None:
    """Pages of two rows: a new column, then a float where the file holds integers, then a list and
    a string in the same column each start a new file; the last is kept as JSON text."""
    rows = [make_row(1000 + i) | {"time": T0 + timedelta(hours=1, seconds=i)} for i in range(8)]
    rows[2]["in.note"] = "new column"
    rows[5]["out.label"] = [0.5]  # a file of int64 labels must not truncate it to 0
    rows[7]["in.features"] = "oops"
    with psycopg.connect(logged.database_url, autocommit=True) as db:
        insert(db, logged.client.workspace, rows, logged.client.get_model("iris").sha256)
    files = logged.pipeline.export_logs(tmp_path, start=T0 + timedelta(minutes=30), page_size=2)
    assert [pq.read_metadata(f).num_rows for f in files] == [2, 2, 2, 2]
    for number, f in enumerate(files[:3]):
        assert read_parquet([f]) == filled(rows[2 * number : 2 * number + 2], [f])
    assert "in.note" in pq.read_schema(files[1]).names
    last = pq.read_table(files[3])
    assert last.schema.field("in.features").metadata == JSON_ENCODING
    assert [json.loads(v) for v in last.column("in.features").to_pylist()] == [
        r["in.features"] for r in rows[6:]
    ]


def test_cli_export(logged: Logged, tmp_path: Path) -> None:
    args = ["--registry", logged.client.settings.registry_addr, "-w", logged.client.workspace]
    args += ["export-logs", "p", "--dir", str(tmp_path), "--format", "jsonl", "--rows-per-file", "200"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    files = [tmp_path / "p-00001.jsonl", tmp_path / "p-00002.jsonl"]
    assert [str(f) for f in files] == result.stdout.split()
    assert f"wrote {ROWS} rows to 2 file(s)" in result.stderr
    assert read_jsonl(files) == as_json(logged.rows)
    refused = CliRunner().invoke(main, [*args, "--failed"])
    assert refused.exit_code != 0 and "overwrite" in refused.output
    failed = CliRunner().invoke(main, [*args, "--failed", "--overwrite"])
    assert failed.exit_code == 0, failed.output
    assert read_jsonl(files[:1]) == as_json([r for r in logged.rows if not r["ok"]])
    assert not files[1].exists()
