"""`pipeline.infer()` with an Apache Arrow table: records in, a table with the DataFrame's columns out."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from joey.client import Client
from joey_core.settings import CommonSettings
from tests.conftest import Stack
from train_model import make_records


def test_infer_accepts_and_returns_arrow_tables(
    stack: Stack, settings: CommonSettings, iris_model: Path
) -> None:
    client = Client(settings=settings)
    model = client.upload_model("iris-arrow", iris_model)
    pipeline = client.build_pipeline("iris-arrow").add_model_step(model)
    pipeline.deploy(replicas=1, timeout=90)
    try:
        records = make_records(6, seed=11) + [{"features": [1.0, 2.0]}]
        table = pa.Table.from_pylist(records)
        result = pipeline.infer(table, timeout=60)
        frame = pipeline.infer(records, timeout=60)

        assert isinstance(result, pa.Table)
        assert result.column_names == list(frame.columns)
        assert result.num_rows == 7
        assert result.column("in.features").to_pylist() == [r["features"] for r in records]
        assert result.column("out.label").to_pylist()[:6] == frame["out.label"].tolist()[:6]
        errors = result.column("error").to_pylist()
        assert errors[:6] == [None] * 6 and "features" in errors[6]
    finally:
        pipeline.undeploy()
