"""Workspace members: owners manage them, every member lists them, a workspace keeps an owner."""

from __future__ import annotations

import secrets
from collections.abc import Callable

import grpc

from joey_core.v1 import registry_pb2 as pb
from tests.registry.helpers import Person, Stub, rpc_error


def test_a_workspace_keeps_an_owner(stub: Stub, new_person: Callable[..., Person]) -> None:
    owner, other = new_person(), new_person()
    workspace = owner.stub.CreateWorkspace(pb.CreateWorkspaceRequest(name=f"own-{secrets.token_hex(4)}")).name

    def members() -> list[tuple[str, str]]:
        reply = owner.stub.ListWorkspaceMembers(pb.ListWorkspaceMembersRequest(workspace=workspace))
        return [(m.username, m.role) for m in reply.members]

    assert members() == [(owner.username, "owner")]
    for call in (
        lambda: owner.stub.RemoveWorkspaceMember(
            pb.RemoveWorkspaceMemberRequest(workspace=workspace, username=owner.username)
        ),
        lambda: owner.stub.AddWorkspaceMember(
            pb.AddWorkspaceMemberRequest(workspace=workspace, username=owner.username, role="collaborator")
        ),
    ):
        assert rpc_error(call).code() == grpc.StatusCode.FAILED_PRECONDITION
    bad_role = rpc_error(
        lambda: owner.stub.AddWorkspaceMember(
            pb.AddWorkspaceMemberRequest(workspace=workspace, username=other.username, role="boss")
        )
    )
    assert bad_role.code() == grpc.StatusCode.INVALID_ARGUMENT
    owner.stub.AddWorkspaceMember(pb.AddWorkspaceMemberRequest(workspace=workspace, username=other.username))
    assert other.stub.ListModels(pb.ListModelsRequest(workspace=workspace)).models == []
    owner.stub.AddWorkspaceMember(
        pb.AddWorkspaceMemberRequest(workspace=workspace, username=other.username, role="owner")
    )
    owner.stub.RemoveWorkspaceMember(
        pb.RemoveWorkspaceMemberRequest(workspace=workspace, username=owner.username)
    )
    # The former owner lost access.
    gone = rpc_error(lambda: owner.stub.ListModels(pb.ListModelsRequest(workspace=workspace)))
    assert (gone.code(), gone.details()) == (grpc.StatusCode.NOT_FOUND, f"workspace {workspace!r} not found")
    reply = other.stub.ListWorkspaceMembers(pb.ListWorkspaceMembersRequest(workspace=workspace))
    assert [(m.username, m.role) for m in reply.members] == [(other.username, "owner")]
