"""Listings, descriptions and deletes through the SDK, against the stack's registry and engine."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from joey.client import Client, JoeyError, ModelSummary, PipelineSummary
from joey_core.settings import CommonSettings
from tests.conftest import Stack


@pytest.fixture
def client(stack: Stack, settings: CommonSettings) -> Iterator[Client]:
    client = Client(settings=settings, workspace=f"ws-{secrets.token_hex(4)}")
    client.create_workspace(client.workspace)
    yield client
    client.close()


def test_listings_are_tables_of_what_each_thing_is(client: Client, iris_model: Path) -> None:
    client.upload_model("iris", iris_model)
    client.upload_model("iris", iris_model)
    client.build_pipeline("idle").add_model_step("iris").create()
    live = client.build_pipeline("live").add_model_step("iris", 1)
    live.deploy(replicas=1)

    pipelines = client.list_pipelines()
    assert all(isinstance(p, PipelineSummary) for p in pipelines)
    assert [str(p) for p in pipelines] == ["idle", "live"] and "live" in pipelines and "nope" not in pipelines
    idle, running = pipelines
    assert (idle.latest_version, idle.deployed, idle.replicas, idle.status) == (1, False, None, "Undeployed")
    assert (running.deployed, running.deployed_version, running.replicas, running.status) == (
        True,
        1,
        1,
        "Running",
    )
    frame = pipelines.to_frame()
    assert list(frame.columns) == ["name", "latest", "deployed", "replicas", "status", "updated"]
    assert frame["deployed"].tolist() == ["no", "v1"]
    assert repr(pipelines).splitlines()[0].split() == [
        "name",
        "latest",
        "deployed",
        "replicas",
        "status",
        "updated",
    ]

    models = client.list_models()
    assert isinstance(models[0], ModelSummary) and [m.name for m in models] == ["iris"]
    assert (models[0].version, len(models[0].versions), models[0].framework) == (2, 2, "onnx")
    row = models.to_frame().iloc[0].to_dict()
    assert row["inputs"] == "features float32[-1,4]"
    assert row["outputs"] == "label int64[-1], probabilities float32[-1,3]"
    assert client.model_versions("iris").to_frame()["version"].tolist() == [1, 2]

    described = client.describe_model("iris")
    assert [str(u) for u in described.used_by(1)] == ["live v1 (deployed)"]
    assert [str(u) for u in described.used_by(2)] == ["idle v1"]
    assert "    used by: live v1 (deployed)" in str(described).splitlines()

    text = str(live.describe()).splitlines()
    assert text[0] == f"pipeline live (workspace {client.workspace}), 1 versions"
    assert text[1].startswith("  version 1 (created ") and text[1].endswith("): iris:1")
    assert text[2].startswith("deployment: Running, version 1, 1 replicas: 1/1 replicas ready")
    assert text[3] == (
        f"topics: inputs joey.{client.workspace}.live.inputs, outputs joey.{client.workspace}.live.outputs, "
        f"errors joey.{client.workspace}.live.errors"
    )
    assert text[4] == "assays: none"
    live.undeploy()


def test_deletes_refuse_while_in_use_and_say_what_to_do(client: Client, iris_model: Path) -> None:
    client.upload_model("iris", iris_model)
    client.upload_model("iris", iris_model)
    live = client.build_pipeline("live").add_model_step("iris", 1)
    live.deploy(replicas=1)

    with pytest.raises(JoeyError) as refused:
        client.delete_model("iris", 1)
    assert refused.value.code == "FAILED_PRECONDITION"
    assert refused.value.message.startswith("version 1 of model 'iris' is in use by deployed pipeline 'live'")
    with pytest.raises(JoeyError) as refused:
        live.delete()
    assert refused.value.code == "FAILED_PRECONDITION"
    assert refused.value.message.endswith("undeploy it first: `joey pipeline undeploy live`")
    with pytest.raises(JoeyError) as refused:
        client.delete_workspace(client.workspace)
    assert refused.value.code == "FAILED_PRECONDITION"
    assert [m.version for m in client.model_versions("iris")] == [1, 2]

    assert str(client.delete_model("iris", 2)) == "deleted model iris version 2"
    live.undeploy()
    assert str(live.delete()) == "deleted pipeline live: 1 versions, 0 logged inferences"
    assert client.list_pipelines() == []
    deleted = client.delete_model("iris")
    assert (deleted.versions, deleted.model_deleted) == ((1,), True)
    client.delete_workspace(client.workspace)
    assert client.workspace not in client.list_workspaces()
