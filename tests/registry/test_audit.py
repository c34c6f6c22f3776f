"""The audit trail: management calls are recorded, refused ones included; only platform admins read it."""

from __future__ import annotations

import secrets
from collections.abc import Callable

import grpc

from joey_core.v1 import registry_pb2 as pb
from tests.registry.helpers import Person, Stub, rpc_error


def entries(stub: Stub, **filters: object) -> list[pb.AuditEntry]:
    return list(stub.QueryAudit(pb.QueryAuditRequest(**filters)).entries)  # type: ignore[arg-type]


def test_only_platform_admins_read_the_trail(anonymous_stub: Stub, new_person: Callable[..., Person]) -> None:
    person = new_person()
    assert rpc_error(lambda: entries(person.stub)).code() == grpc.StatusCode.PERMISSION_DENIED
    assert rpc_error(lambda: entries(anonymous_stub)).code() == grpc.StatusCode.UNAUTHENTICATED


def test_management_calls_are_recorded_refused_or_not(
    stub: Stub, anonymous_stub: Stub, new_person: Callable[..., Person]
) -> None:
    person = new_person()
    workspace = f"audit-{secrets.token_hex(4)}"
    person.stub.CreateWorkspace(pb.CreateWorkspaceRequest(name=workspace))
    person.stub.ListModels(pb.ListModelsRequest(workspace=workspace))  # a read: not recorded
    rpc_error(lambda: person.stub.CreateUser(pb.CreateUserRequest(username="x" + secrets.token_hex(4))))
    rpc_error(lambda: anonymous_stub.Deploy(pb.DeployRequest(workspace=workspace, pipeline="p")))
    rpc_error(
        lambda: anonymous_stub.Login(pb.LoginRequest(username=person.username, password="wrong-password"))
    )

    mine = entries(stub, username=person.username)
    assert [(e.action, e.workspace, e.outcome) for e in mine][:3] == [
        ("Login", "", "UNAUTHENTICATED"),
        ("CreateUser", "", "PERMISSION_DENIED"),
        ("CreateWorkspace", workspace, "OK"),
    ]
    assert "ListModels" not in {e.action for e in mine}
    assert mine[1].message.startswith("only platform admins")
    assert "wrong-password" not in mine[0].target + mine[0].message
    anonymous = entries(stub, workspace=workspace, action="Deploy")
    assert [(e.username, e.target, e.outcome) for e in anonymous] == [("", "pipeline=p", "UNAUTHENTICATED")]


def test_the_limit_is_bounded(stub: Stub) -> None:
    assert len(entries(stub, limit=1)) == 1
    error = rpc_error(lambda: entries(stub, limit=10_001))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
