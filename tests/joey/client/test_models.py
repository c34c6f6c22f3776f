"""Model versions through the SDK against the stack's registry: the files they carry, uploaded from a
directory and downloaded back, their lineage, and tags and searches of models and pipelines."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from joey.client import Client, JoeyError, ModelVersion
from joey_core.models import ArtifactFile
from joey_core.settings import CommonSettings
from tests.conftest import Stack


@pytest.fixture
def client(stack: Stack, settings: CommonSettings) -> Iterator[Client]:
    client = Client(settings=settings, workspace=f"ws-{secrets.token_hex(4)}")
    client.create_workspace(client.workspace)
    yield client
    client.close()


def training_run(root: Path) -> dict[str, bytes]:
    """What a data scientist keeps beside a model: a notebook, samples, code and test results."""
    files = {
        "train.ipynb": b'{"cells": [], "nbformat": 4}',
        "data/train_sample.csv": b"sepal,petal\n" + b"5.1,3.5\n" * 20_000,
        "code/preprocess.py": b"def pre(x):\n    return x\n",
        "results/metrics.json": b'{"accuracy": 0.97}',
    }
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return files


def test_artifacts_round_trip(client: Client, iris_model: Path, tmp_path: Path) -> None:
    files = training_run(tmp_path / "run")
    mv = client.upload_model(
        "iris",
        iris_model,
        artifacts=tmp_path / "run",
        description="Iris classifier, trained on the bundled data",
        source="git:4f2a9c1",
        metadata={"accuracy": 0.97, "features": ["sepal", "petal"]},
    )
    assert isinstance(mv, ModelVersion)
    assert (mv.artifact_count, mv.artifact_bytes) == (4, sum(map(len, files.values())))
    listed = mv.artifacts()
    assert [(f.name, f.size_bytes, f.sha256) for f in listed] == [
        (name, len(data), hashlib.sha256(data).hexdigest()) for name, data in sorted(files.items())
    ]
    assert listed.to_frame().columns.tolist() == ["name", "size_bytes", "sha256"]

    again = client.get_model("iris")
    assert (again.description, again.source, again.metadata) == (
        "Iris classifier, trained on the bundled data",
        "git:4f2a9c1",
        {"accuracy": 0.97, "features": ["sepal", "petal"]},
    )
    written = again.download_artifacts(tmp_path / "out")
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in written) == sorted(files)
    for name, data in files.items():
        assert (tmp_path / "out" / name).read_bytes() == data
    assert not list((tmp_path / "out").rglob("*.partial"))

    # A list of paths: files by their name, directories under theirs.
    listed_paths = client.upload_model(
        "iris", iris_model, artifacts=[tmp_path / "run" / "train.ipynb", tmp_path / "run" / "results"]
    )
    assert [f.name for f in listed_paths.artifacts()] == ["results/metrics.json", "train.ipynb"]
    assert client.get_model("iris", 1).artifacts() == listed


def test_download_refuses_what_would_leave_the_directory_or_is_not_its_sha256(tmp_path: Path) -> None:
    from joey.client.artifacts import download

    data = b"print('hi')"
    good = hashlib.sha256(data).hexdigest()
    for name in ("../outside.py", "/etc/x", "a/../../b", "a\\b"):
        with pytest.raises(ValueError, match="refused to write artifact"):
            download([ArtifactFile(name, len(data), good)], tmp_path / "out", lambda sha: [data])
    with pytest.raises(ValueError, match="not written"):
        download([ArtifactFile("x.py", len(data), "0" * 64)], tmp_path / "out", lambda sha: [data])
    assert not (tmp_path / "outside.py").exists()
    assert [p.name for p in (tmp_path / "out").rglob("*") if p.is_file()] == []


def test_upload_refusals_store_nothing(client: Client, iris_model: Path, tmp_path: Path) -> None:
    (tmp_path / "odd:name.txt").write_bytes(b"x")
    with pytest.raises(ValueError, match="cannot be named 'odd:name.txt'"):
        client.upload_model("iris", iris_model, artifacts=[tmp_path / "odd:name.txt"])
    with pytest.raises(ValueError, match="metadata must be a JSON object"):
        client.upload_model("iris", iris_model, metadata={"when": datetime.now(UTC)})
    with pytest.raises(JoeyError) as refused:
        client.upload_model("iris", iris_model, source="x" * 1001)
    assert refused.value.code == "INVALID_ARGUMENT"
    assert "iris" not in client.list_models()


def test_tags_and_search(client: Client, iris_model: Path) -> None:
    churn = client.upload_model("churn", iris_model, description="churn of card holders")
    client.upload_model("fraud-scorer", iris_model)
    before = datetime.now(UTC)
    client.upload_model("churn", iris_model, description="retrained on fraud cases")
    pipeline = client.build_pipeline("payments").add_model_step("churn")
    pipeline.create()
    client.build_pipeline("batch").add_model_step("churn").create()

    assert churn.add_tag("fraud") == ("fraud",)
    assert churn.add_tag("fraud") == ("fraud",)
    assert client.get_model("churn", 2).add_tag("prod") == ("fraud", "prod")
    assert churn.remove_tag("prod") == churn.tags() == ("fraud",)
    with pytest.raises(JoeyError, match="tags are lowercase: 'fraud'"):
        churn.add_tag("Fraud")
    assert pipeline.add_tag("team:risk") == pipeline.tags() == ("team:risk",)

    def found(listing: object) -> list[tuple[str, int]]:
        return [(mv.name, mv.version) for mv in listing]  # type: ignore[attr-defined]

    assert found(client.search_models(search_term="FRAUD")) == [("churn", 2), ("fraud-scorer", 1)]
    assert found(client.search_models(tag="fraud")) == [("churn", 1), ("churn", 2)]
    assert found(client.search_models(framework="onnx", uploaded_after=before)) == [("churn", 2)]
    assert found(client.list_models(all_versions=True)) == [("churn", 1), ("churn", 2), ("fraud-scorer", 1)]
    summaries = client.list_models(tag="fraud")
    assert [(m.name, m.tags, len(m.versions)) for m in summaries] == [("churn", ("fraud",), 2)]
    assert client.list_models().to_frame()["tags"].tolist() == ["fraud", "-"]
    assert [p.name for p in client.list_pipelines(tag="team:risk")] == ["payments"]
    assert [p.name for p in client.search_pipelines(search_term="AT")] == ["batch"]
    described = client.describe_model("churn").text().splitlines()
    assert described[0] == f"model churn (workspace {client.workspace}), 2 versions, tags fraud"
    assert "    description: retrained on fraud cases" in described
