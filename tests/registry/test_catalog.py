"""Listings that say what each thing is and how it is used, and deletes that refuse while in use."""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import grpc
import psycopg
import pytest
import redis
from psycopg.types.json import Jsonb

from joey_core import topics
from joey_core.v1 import registry_pb2 as pb
from joey_registry.app import RegistryServer
from joey_registry.settings import RegistrySettings
from tests.conftest import free_port, wait_until
from tests.registry.helpers import Stub, identity_model, rpc_error, step, upload


def create(stub: Stub, workspace: str, name: str, *steps: pb.PipelineStep) -> pb.PipelineVersion:
    return stub.CreatePipeline(pb.CreatePipelineRequest(workspace=workspace, name=name, steps=list(steps)))


def deploy(stub: Stub, workspace: str, pipeline: str, version: int = 0) -> pb.Deployment:
    request = pb.DeployRequest(workspace=workspace, pipeline=pipeline, pipeline_version=version)
    return stub.Deploy(request, timeout=30)


def undeploy(stub: Stub, workspace: str, pipeline: str) -> None:
    stub.Undeploy(pb.UndeployRequest(workspace=workspace, pipeline=pipeline))


def delete_model(stub: Stub, workspace: str, name: str, version: int | None = None) -> pb.DeleteModelResponse:
    """Delete ``version``, or every version and the model."""
    request = pb.DeleteModelRequest(workspace=workspace, name=name)
    if version is None:
        request.all_versions = True
    else:
        request.version = version
    return stub.DeleteModel(request)


def versions(stub: Stub, workspace: str, name: str) -> list[int]:
    return [v.version for v in stub.GetModel(pb.GetModelRequest(workspace=workspace, name=name)).versions]


def has_artifact(server: RegistryServer, sha256: str) -> bool:
    return any(p.name == sha256 for p in server.settings.artifact_dir.rglob("*") if p.is_file())


def stamp(ts: object) -> datetime:
    return ts.ToDatetime(tzinfo=UTC)  # type: ignore[attr-defined]


def test_list_pipelines_reports_status_and_when_it_changed(
    stub: Stub, workspace: str, iris_bytes: bytes
) -> None:
    upload(stub, workspace, "iris", iris_bytes)
    idle = create(stub, workspace, "idle", step("iris"))
    create(stub, workspace, "live", step("iris"))
    deployed = deploy(stub, workspace, "live")

    listed = {p.name: p for p in stub.ListPipelines(pb.ListPipelinesRequest(workspace=workspace)).pipelines}
    assert listed["idle"].status == "Undeployed" and not listed["idle"].HasField("deployment")
    assert stamp(listed["idle"].updated_at) == stamp(idle.created_at)
    # No engine runs in these tests: the deployment waits for replicas.
    assert listed["live"].status == "Starting"
    assert listed["live"].deployment.replicas == 1 and listed["live"].deployment.active
    assert stamp(listed["live"].updated_at) == stamp(deployed.updated_at)

    undeploy(stub, workspace, "live")
    live = stub.ListPipelines(pb.ListPipelinesRequest(workspace=workspace)).pipelines[1]
    assert (live.name, live.status) == ("live", "Undeployed")
    assert stamp(live.updated_at) > stamp(deployed.updated_at)


def test_describe_model_names_every_pipeline_version_using_it(
    stub: Stub, workspace: str, iris_bytes: bytes
) -> None:
    upload(stub, workspace, "iris", iris_bytes)
    upload(stub, workspace, "iris", iris_bytes)
    upload(stub, workspace, "iris-b", iris_bytes)
    create(stub, workspace, "plain", step("iris", 1))
    create(stub, workspace, "plain", step("iris", 2))
    split = pb.RandomSplitStep(
        arms=[
            pb.WeightedModel(weight=1, model=pb.ModelStep(model="iris-b")),
            pb.WeightedModel(weight=1, model=pb.ModelStep(model="iris", version=1)),
        ]
    )
    create(stub, workspace, "ab", pb.PipelineStep(random_split=split))
    deploy(stub, workspace, "plain", 1)

    described = stub.DescribeModel(pb.DescribeModelRequest(workspace=workspace, name="iris"))
    assert [v.version for v in described.model.versions] == [1, 2]
    assert [(u.model_version, u.pipeline, u.pipeline_version, u.deployed) for u in described.uses] == [
        (1, "ab", 1, False),
        (1, "plain", 1, True),
        (2, "plain", 2, False),
    ]
    error = rpc_error(lambda: stub.DescribeModel(pb.DescribeModelRequest(workspace=workspace, name="nope")))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert error.details() == f"model 'nope' not found in workspace '{workspace}'"


def test_delete_model_refuses_versions_a_deployment_runs(
    stub: Stub, workspace: str, iris_bytes: bytes, registry_server: RegistryServer
) -> None:
    iris_sha = hashlib.sha256(iris_bytes).hexdigest()
    other = identity_model("features", "float32", "copy", width=4)
    other_sha = hashlib.sha256(other).hexdigest()
    upload(stub, workspace, "iris", iris_bytes)
    upload(stub, workspace, "iris", other)
    create(stub, workspace, "p", step("iris", 1))
    deploy(stub, workspace, "p")

    for version, what in ((1, "version 1 of model 'iris'"), (None, "model 'iris'")):
        error = rpc_error(lambda v=version: delete_model(stub, workspace, "iris", v))  # type: ignore[misc]
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error.details() == (
            f"{what} is in use by deployed pipeline 'p' (version 1 uses iris v1); undeploy it first "
            "(`joey pipeline undeploy p`) or deploy a pipeline version without it"
        )
    assert versions(stub, workspace, "iris") == [1, 2]

    error = rpc_error(lambda: delete_model(stub, workspace, "iris", 7))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert error.details() == f"model 'iris' has no version 7 in workspace '{workspace}' (versions: 1, 2)"

    deleted = delete_model(stub, workspace, "iris", 2)
    assert (list(deleted.versions), deleted.model_deleted) == ([2], False)
    assert not has_artifact(registry_server, other_sha) and has_artifact(registry_server, iris_sha)
    # A deleted number never comes back: "iris v2" keeps meaning the deleted artifact in old logs.
    assert upload(stub, workspace, "iris", other).version == 3

    undeploy(stub, workspace, "p")
    deleted = delete_model(stub, workspace, "iris")
    assert (list(deleted.versions), deleted.model_deleted) == ([1, 3], True)
    error = rpc_error(lambda: stub.GetModel(pb.GetModelRequest(workspace=workspace, name="iris")))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert not has_artifact(registry_server, other_sha)

    # The pipeline version still names iris v1: deploying it is refused, saying why.
    error = rpc_error(lambda: deploy(stub, workspace, "p"))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error.details() == (
        "pipeline 'p' version 1 uses deleted model versions iris v1; create a new pipeline version "
        "with models that exist and deploy that"
    )


def test_delete_model_version_must_be_named_and_positive(
    stub: Stub, workspace: str, iris_bytes: bytes
) -> None:
    upload(stub, workspace, "iris", iris_bytes)
    for version in (0, -1):
        error = rpc_error(lambda v=version: delete_model(stub, workspace, "iris", v))  # type: ignore[misc]
        assert (error.code(), error.details()) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            f"version of model 'iris' to delete must be 1 or more, got {version}; to delete every version "
            "and the model, ask for all versions (`joey model delete NAME`)",
        )
    both = pb.DeleteModelRequest(workspace=workspace, name="iris", version=1, all_versions=True)
    error = rpc_error(lambda: stub.DeleteModel(both))
    assert (error.code(), error.details()) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "give either version (1) or all_versions to delete model 'iris', not both",
    )
    assert versions(stub, workspace, "iris") == [1]


def test_deleting_the_last_version_keeps_the_model_and_its_numbering(
    stub: Stub, workspace: str, iris_bytes: bytes
) -> None:
    upload(stub, workspace, "iris", iris_bytes)
    deleted = delete_model(stub, workspace, "iris", 1)
    assert (list(deleted.versions), deleted.model_deleted) == ([1], False)
    assert versions(stub, workspace, "iris") == []
    assert upload(stub, workspace, "iris", iris_bytes).version == 2
    deleted = delete_model(stub, workspace, "iris")
    assert (list(deleted.versions), deleted.model_deleted) == ([2], True)
    assert upload(stub, workspace, "iris", iris_bytes).version == 1


def test_deleting_an_artifact_another_workspace_shares_keeps_the_file(
    stub: Stub, workspace: str, iris_bytes: bytes, registry_server: RegistryServer
) -> None:
    other = f"{workspace}-2"
    stub.CreateWorkspace(pb.CreateWorkspaceRequest(name=other))
    upload(stub, workspace, "iris", iris_bytes)
    upload(stub, other, "iris", iris_bytes)
    delete_model(stub, workspace, "iris")
    assert has_artifact(registry_server, hashlib.sha256(iris_bytes).hexdigest())
    assert versions(stub, other, "iris") == [1]


def test_delete_pipeline_only_when_undeployed_and_unwatched(
    stub: Stub,
    workspace: str,
    iris_bytes: bytes,
    db: psycopg.Connection,
    registry_settings: RegistrySettings,
) -> None:
    upload(stub, workspace, "iris", iris_bytes)
    create(stub, workspace, "p", step("iris"))
    create(
        stub,
        workspace,
        "p",
        step("iris"),
        pb.PipelineStep(validations=pb.ValidationsStep(checks={"c": "out.label > 5"})),
    )
    deployment = deploy(stub, workspace, "p")
    db.execute(
        "INSERT INTO inference_logs (workspace, pipeline, pipeline_version, deployment_id, request_id, time, "
        "input_topic, input_partition, input_offset, ok, inputs) VALUES "
        "(%s, 'p', 2, 'd', 'r1', now(), 'in', 0, 0, true, %s)",
        (workspace, Jsonb({"features": [1, 2, 3, 4]})),
    )

    def delete() -> pb.DeletePipelineResponse:
        return stub.DeletePipeline(pb.DeletePipelineRequest(workspace=workspace, name="p"))

    error = rpc_error(delete)
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error.details() == (
        f"pipeline 'p' is deployed (version 2, 1 replica, deployment {deployment.deployment_id}); "
        "undeploy it first: `joey pipeline undeploy p`"
    )
    undeploy(stub, workspace, "p")
    assay = pb.AssayDefinition(
        workspace=workspace, name="drift", pipeline="p", iopath="input features 2", baseline_data=[1.0, 2.0]
    )
    stub.CreateAssay(pb.CreateAssayRequest(definition=assay))
    error = rpc_error(delete)
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert (
        error.details()
        == "pipeline 'p' is watched by assays 'drift'; delete them first: `joey assay delete drift`"
    )
    assert len(stub.GetPipeline(pb.GetPipelineRequest(workspace=workspace, name="p")).versions) == 2

    stub.DeleteAssay(pb.DeleteAssayRequest(workspace=workspace, name="drift"))
    # An engine's note of records it was processing must not outlive the pipeline (see attempts.py).
    notes = topics.attempt_notes_key(registry_settings.redis_prefix, topics.engine_group(workspace, "p"))
    client = redis.Redis.from_url(registry_settings.redis_url.get_secret_value())
    client.hset(notes, "topic:0", "0:9:2")
    deleted = delete()
    assert not client.exists(notes), "the attempt notes are deleted with the pipeline"
    assert (deleted.version_count, deleted.log_entries) == (2, 1)
    error = rpc_error(lambda: stub.GetPipeline(pb.GetPipelineRequest(workspace=workspace, name="p")))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    error = rpc_error(delete)
    assert (error.code(), error.details()) == (
        grpc.StatusCode.NOT_FOUND,
        f"pipeline 'p' not found in workspace {workspace!r}",
    )
    # A new pipeline of the same name starts afresh: version 1, no logs of the old one.
    assert create(stub, workspace, "p", step("iris")).version == 1
    assert stub.QueryLogs(pb.QueryLogsRequest(workspace=workspace, pipeline="p")).total == 0


def test_delete_workspace_only_when_empty_and_never_default(
    stub: Stub, workspace: str, iris_bytes: bytes
) -> None:
    def delete(name: str) -> pb.DeleteWorkspaceResponse:
        return stub.DeleteWorkspace(pb.DeleteWorkspaceRequest(name=name))

    def names() -> list[str]:
        return [w.name for w in stub.ListWorkspaces(pb.ListWorkspacesRequest()).workspaces]

    error = rpc_error(lambda: delete("default"))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error.details() == "the 'default' workspace cannot be deleted: clients start in it"

    upload(stub, workspace, "iris", iris_bytes)
    create(stub, workspace, "p", step("iris"))
    error = rpc_error(lambda: delete(workspace))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error.details() == (
        f"workspace {workspace!r} is not empty: it holds pipelines 'p'; models 'iris'; delete them first, "
        f"in that order (`joey -w {workspace} pipeline delete p`, `joey -w {workspace} model delete iris`)"
    )
    assert workspace in names()

    stub.DeletePipeline(pb.DeletePipelineRequest(workspace=workspace, name="p"))
    delete_model(stub, workspace, "iris")
    delete(workspace)
    assert workspace not in names()
    error = rpc_error(lambda: delete(workspace))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert error.details() == f"workspace {workspace!r} not found"


def test_an_assay_on_a_pipeline_being_deleted_is_refused(
    stub: Stub, workspace: str, iris_bytes: bytes, db: psycopg.Connection, database_url: str
) -> None:
    upload(stub, workspace, "iris", iris_bytes)
    create(stub, workspace, "p", step("iris"))
    assay = pb.AssayDefinition(
        workspace=workspace, name="drift", pipeline="p", iopath="input features 2", baseline_data=[1.0, 2.0]
    )
    with ThreadPoolExecutor(1) as pool, psycopg.connect(database_url) as deleting:
        # A deletion that has passed its checks (no assay yet) and not committed.
        (pipeline_id,) = deleting.execute(
            "SELECT p.id FROM pipelines p JOIN workspaces w ON w.id = p.workspace_id "
            "WHERE w.name = %s AND p.name = 'p' FOR UPDATE",
            (workspace,),
        ).fetchone()  # type: ignore[misc]
        deleting.execute("DELETE FROM pipeline_versions WHERE pipeline_id = %s", (pipeline_id,))
        deleting.execute("DELETE FROM pipelines WHERE id = %s", (pipeline_id,))
        creating = pool.submit(lambda: stub.CreateAssay(pb.CreateAssayRequest(definition=assay)))
        wait_until(
            lambda: (
                creating.done()
                or db.execute(
                    "SELECT 1 FROM pg_stat_activity WHERE datname = current_database() "
                    "AND wait_event_type = 'Lock'"
                ).fetchone()
            ),
            30,
            "the assay's creation to wait for the pipeline's row",
        )
        deleting.commit()
        error = rpc_error(creating.result)
    assert (error.code(), error.details()) == (
        grpc.StatusCode.NOT_FOUND,
        f"pipeline 'p' not found in workspace {workspace!r}",
    )
    assert not stub.ListAssays(pb.ListAssaysRequest(workspace=workspace)).assays


def test_a_failed_upload_keeps_the_file_an_upload_of_the_same_bytes_recorded_meanwhile(
    stub: Stub,
    workspace: str,
    registry_server: RegistryServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = identity_model("features", "float32", workspace, width=4)  # bytes no other test uploads
    sha256 = hashlib.sha256(data).hexdigest()
    other = f"{workspace}-2"
    stub.CreateWorkspace(pb.CreateWorkspaceRequest(name=other))
    store = registry_server.registry.store
    original = store.add_model_version

    def store_then_fail(ws: Any, name: str, *args: Any, **extras: Any) -> Any:
        *fields, store_artifact = args
        store_artifact()  # this upload writes the file...
        monkeypatch.setattr(store, "add_model_version", original)
        upload(stub, other, "same", data)  # ...which a concurrent one finds and records
        raise RuntimeError("this upload fails before its commit")

    monkeypatch.setattr(store, "add_model_version", store_then_fail)
    error = rpc_error(lambda: upload(stub, workspace, "iris", data))
    assert error.code() in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)
    assert versions(stub, other, "same") == [1]
    assert has_artifact(registry_server, sha256)


def test_list_pipelines_without_redis_says_unknown_and_writes_nothing(
    stub: Stub,
    workspace: str,
    iris_bytes: bytes,
    registry_server: RegistryServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    upload(stub, workspace, "iris", iris_bytes)
    create(stub, workspace, "idle", step("iris"))
    create(stub, workspace, "live", step("iris"))
    deploy(stub, workspace, "live")

    def statuses() -> dict[str, str]:
        listed = stub.ListPipelines(pb.ListPipelinesRequest(workspace=workspace)).pipelines
        return {p.name: p.status for p in listed}

    assert statuses() == {"idle": "Undeployed", "live": "Starting"}
    monkeypatch.setattr(registry_server.registry, "redis", redis.Redis(port=free_port(), socket_timeout=1))
    assert statuses() == {"idle": "Undeployed", "live": "Unknown"}


def test_a_deploy_waits_for_a_deletion_of_its_model_versions(
    stub: Stub, workspace: str, iris_bytes: bytes, db: psycopg.Connection, database_url: str
) -> None:
    upload(stub, workspace, "iris", iris_bytes)
    create(stub, workspace, "p", step("iris"))
    with ThreadPoolExecutor(1) as pool, psycopg.connect(database_url) as deleting:
        # A deletion of iris v1 that has checked its uses (no deployment yet) and not committed.
        deleting.execute(
            "DELETE FROM model_versions v USING models m, workspaces w WHERE m.id = v.model_id "
            "AND w.id = m.workspace_id AND w.name = %s AND m.name = 'iris'",
            (workspace,),
        )
        deploying = pool.submit(lambda: deploy(stub, workspace, "p"))
        wait_until(
            lambda: (
                deploying.done()
                or db.execute(
                    "SELECT 1 FROM pg_stat_activity WHERE datname = current_database() "
                    "AND wait_event_type = 'Lock'"
                ).fetchone()
            ),
            30,
            "the deploy to wait for the model versions",
        )
        deleting.commit()
        error = rpc_error(deploying.result)
    assert (error.code(), error.details()) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "pipeline 'p' version 1 uses deleted model versions iris v1; create a new pipeline version "
        "with models that exist and deploy that",
    )
