from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import psycopg
import pytest

from joey_core.v1 import registry_pb2 as pb
from tests.conftest import wait_until
from tests.registry.helpers import Stub, rpc_error, step, upload, upload_requests


def test_create_and_list_workspaces(stub: Stub, workspace: str) -> None:
    names = [w.name for w in stub.ListWorkspaces(pb.ListWorkspacesRequest()).workspaces]
    assert "default" in names
    assert workspace in names

    error = rpc_error(lambda: stub.CreateWorkspace(pb.CreateWorkspaceRequest(name=workspace)))
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    assert workspace in error.details()


@pytest.mark.parametrize("name", ["", "Has-Upper", "-dash", "under_score", "x" * 64])
def test_invalid_workspace_name(stub: Stub, name: str) -> None:
    error = rpc_error(lambda: stub.CreateWorkspace(pb.CreateWorkspaceRequest(name=name)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "invalid workspace name" in error.details()


@pytest.mark.parametrize(
    "call",
    [
        lambda s: s.ListModels(pb.ListModelsRequest(workspace="nope")),
        lambda s: s.GetModel(pb.GetModelRequest(workspace="nope", name="m")),
        lambda s: s.GetModelVersion(pb.GetModelVersionRequest(workspace="nope", name="m")),
        lambda s: s.UploadModel(upload_requests("nope", "m", b"abc")),
        lambda s: list(s.DownloadArtifact(pb.DownloadArtifactRequest(workspace="nope", sha256="0" * 64))),
        lambda s: s.CreatePipeline(pb.CreatePipelineRequest(workspace="nope", name="p", steps=[step("m")])),
        lambda s: s.GetPipeline(pb.GetPipelineRequest(workspace="nope", name="p")),
        lambda s: s.ListPipelines(pb.ListPipelinesRequest(workspace="nope")),
        lambda s: s.Deploy(pb.DeployRequest(workspace="nope", pipeline="p")),
        lambda s: s.Undeploy(pb.UndeployRequest(workspace="nope", pipeline="p")),
        lambda s: s.GetDeploymentStatus(pb.GetDeploymentStatusRequest(workspace="nope", pipeline="p")),
        lambda s: s.QueryLogs(pb.QueryLogsRequest(workspace="nope", pipeline="p")),
        lambda s: s.DescribeModel(pb.DescribeModelRequest(workspace="nope", name="m")),
        lambda s: s.DeleteModel(pb.DeleteModelRequest(workspace="nope", name="m")),
        lambda s: s.DeletePipeline(pb.DeletePipelineRequest(workspace="nope", name="p")),
        lambda s: s.DeleteWorkspace(pb.DeleteWorkspaceRequest(name="nope")),
    ],
)
def test_unknown_workspace_is_not_found(stub: Stub, call) -> None:  # type: ignore[no-untyped-def]
    error = rpc_error(lambda: call(stub))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert error.details() == "workspace 'nope' not found"


def test_token_is_refused_until_tokens_exist(stub: Stub) -> None:
    error = rpc_error(
        lambda: stub.ListWorkspaces(pb.ListWorkspacesRequest(), metadata=[("authorization", "Bearer abc")])
    )
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "token" in error.details()


def test_an_upload_into_a_workspace_being_deleted_is_not_found(
    stub: Stub, workspace: str, iris_bytes: bytes, db: psycopg.Connection, database_url: str
) -> None:
    with ThreadPoolExecutor(1) as pool, psycopg.connect(database_url) as deleting:
        # DeleteWorkspace's transaction: the row locked, found empty, deleted, not yet committed.
        deleting.execute("DELETE FROM workspaces WHERE name = %s", (workspace,))
        uploading = pool.submit(lambda: upload(stub, workspace, "iris", iris_bytes))
        wait_until(
            lambda: (
                uploading.done()
                or db.execute(
                    "SELECT 1 FROM pg_stat_activity WHERE datname = current_database() "
                    "AND wait_event_type = 'Lock'"
                ).fetchone()
            ),
            30,
            "the upload to wait for the workspace's row",
        )
        deleting.commit()
        error = rpc_error(uploading.result)
    assert (error.code(), error.details()) == (
        grpc.StatusCode.NOT_FOUND,
        f"workspace {workspace!r} was deleted; create it again (`joey workspace create {workspace}`)",
    )
