"""`joey infer --file` with every file format the SDK's infer_from_file reads, against the CLI's stack."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq

from tests.joey_cli.conftest import CliStack, joey
from train_model import make_records


def test_infer_reads_parquet_and_arrow_files(cli_stack: CliStack, iris_model: Path, tmp_path: Path) -> None:
    env = cli_stack.env
    joey(env, "model", "upload", "iris-file", str(iris_model))
    joey(env, "pipeline", "create", "iris-file", "--model", "iris-file")
    joey(env, "pipeline", "deploy", "iris-file", "--replicas", "1")
    try:
        records = [*make_records(12, seed=51), {"features": [1.0, 2.0]}]
        table = pa.Table.from_pylist(records)
        parquet = tmp_path / "records.parquet"
        pq.write_table(table, parquet, row_group_size=5)
        written = tmp_path / "results.jsonl"

        inferred = joey(env, "infer", "iris-file", "--file", str(parquet), "-o", str(written), check=False)

        assert inferred.returncode == 1, inferred.stderr
        assert inferred.stderr.splitlines()[-1] == "13 records, 1 failed"
        assert "inferring" in inferred.stderr, "a progress bar"
        results = [json.loads(line) for line in written.read_text().splitlines()]
        assert [r["in.features"] for r in results] == [r["features"] for r in records]
        assert [r["error"] is None for r in results] == [True] * 12 + [False]

        # A suffix that says nothing, and the format named instead.
        arrow = tmp_path / "records.bin"
        feather.write_feather(table.slice(0, 12), arrow)
        shown = joey(env, "infer", "iris-file", "--file", str(arrow), "--format", "arrow")
        assert shown.stderr.splitlines()[-1] == "12 records, 0 failed"
        assert "out.label" in shown.stdout
    finally:
        joey(env, "pipeline", "undeploy", "iris-file", check=False)
