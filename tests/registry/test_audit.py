"""The audit trail: management calls are recorded, refused ones included, and refused reads; only platform
admins read it."""

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
    person.stub.ListModels(pb.ListModelsRequest(workspace=workspace))  # an answered read: not recorded
    rpc_error(lambda: person.stub.CreateUser(pb.CreateUserRequest(username="x" + secrets.token_hex(4))))
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


def test_refused_reads_are_recorded(stub: Stub, new_person: Callable[..., Person]) -> None:
    person, outsider = new_person(), new_person()
    workspace = person.stub.CreateWorkspace(
        pb.CreateWorkspaceRequest(name=f"audit-{secrets.token_hex(4)}")
    ).name
    rpc_error(lambda: person.stub.ListUsers(pb.ListUsersRequest()))
    rpc_error(lambda: outsider.stub.ListModels(pb.ListModelsRequest(workspace=workspace)))
    rpc_error(
        lambda: person.stub.GetModel(pb.GetModelRequest(workspace=workspace, name="nope"))
    )  # no refusal
    mine = entries(stub, username=person.username)
    assert [(e.action, e.outcome) for e in mine][:2] == [
        ("ListUsers", "PERMISSION_DENIED"),
        ("CreateWorkspace", "OK"),
    ]
    theirs = entries(stub, username=outsider.username)
    assert [(e.action, e.workspace, e.outcome) for e in theirs][:1] == [
        ("ListModels", workspace, "NOT_FOUND")
    ]


def test_calls_without_a_token_are_not_recorded_and_login_names_are_checked(
    stub: Stub, anonymous_stub: Stub
) -> None:
    workspace = f"audit-{secrets.token_hex(4)}"
    rpc_error(lambda: anonymous_stub.Deploy(pb.DeployRequest(workspace=workspace, pipeline="p")))
    rpc_error(lambda: anonymous_stub.ListModels(pb.ListModelsRequest(workspace=workspace)))
    assert entries(stub, workspace=workspace) == []
    pasted = f"Pasted Password {secrets.token_hex(4)}!"
    rpc_error(lambda: anonymous_stub.Login(pb.LoginRequest(username=pasted, password="x")))
    logins = entries(stub, action="Login", username="<invalid>")
    assert logins and logins[0].outcome == "UNAUTHENTICATED"
    assert all(pasted not in e.username + e.target + e.message for e in entries(stub, limit=10_000))


def test_the_limit_is_bounded(stub: Stub) -> None:
    assert len(entries(stub, limit=1)) == 1
    error = rpc_error(lambda: entries(stub, limit=10_001))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
