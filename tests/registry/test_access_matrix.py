"""Every RPC of the registry against every kind of caller, generated from the service definition: an
RPC added without a rule here fails the test.

A call is judged by the class of its answer: OK or a domain error (the call got past access control:
a missing pipeline, a workspace that is not empty) against PERMISSION_DENIED, the NOT_FOUND of a
workspace hidden from a non-member, and UNAUTHENTICATED.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import psycopg
import pytest

from joey_core.v1 import registry_pb2 as pb
from joey_registry import grpc_server
from joey_registry.settings import RegistrySettings
from tests.conftest import SERVICE_TOKEN, wait_until
from tests.registry.helpers import Person, Stub, identity_model, step, token_stub, upload, upload_requests

ALLOWED, HIDDEN, DENIED, UNAUTHENTICATED = "allowed", "hidden", "permission denied", "unauthenticated"
ROLES = (
    "admin",
    "owner",
    "collaborator",
    "non-member",
    "deactivated",
    "expired session",
    "bad token",
    "no token",
    "service",
)
RPCS = [method.name for method in pb.DESCRIPTOR.services_by_name["Registry"].methods]


def _expect(**by_role: str) -> dict[str, str]:
    # Whatever a call needs, a caller who cannot be authenticated is refused as such.
    refused = dict.fromkeys(("deactivated", "expired session", "bad token", "no token"), UNAUTHENTICATED)
    return refused | by_role


IN_WORKSPACE = _expect(
    admin=ALLOWED, owner=ALLOWED, collaborator=ALLOWED, **{"non-member": HIDDEN}, service=DENIED
)
ARTIFACT = IN_WORKSPACE | {"service": ALLOWED}
MANAGE = IN_WORKSPACE | {"collaborator": DENIED}
RUN_BRIDGE = IN_WORKSPACE | {"owner": DENIED, "collaborator": DENIED, "service": ALLOWED}
# Orchestrators' calls: the service token only, not even platform admins (a task token acts as a user).
SERVICE_ONLY = _expect(
    admin=DENIED, owner=DENIED, collaborator=DENIED, **{"non-member": DENIED}, service=ALLOWED
)
PLATFORM_ADMIN = _expect(
    admin=ALLOWED, owner=DENIED, collaborator=DENIED, **{"non-member": DENIED}, service=DENIED
)
ANY_USER = _expect(
    admin=ALLOWED, owner=ALLOWED, collaborator=ALLOWED, **{"non-member": ALLOWED}, service=DENIED
)
PUBLIC = dict.fromkeys(ROLES, ALLOWED)


@dataclass
class World:
    workspace: str
    """Owned by `owner`, with `collaborator` and the deactivated user as collaborators and a model."""
    model: str
    sha256: str
    pipeline: str
    login: Person
    """Logs in in the Login rule, whoever calls."""
    extra: Person
    """A user the admin-only and member rules act on, harmlessly."""
    people: dict[str, Person]
    stubs: dict[str, Stub]
    channel: grpc.Channel

    def fresh(self, role: str) -> Stub:
        """A stub on a new session of the role's user, for calls that end the token they carry."""
        person = self.people.get(role)
        if person is None:
            return self.stubs[role]
        anonymous = self.stubs["no token"]
        session = anonymous.Login(pb.LoginRequest(username=person.username, password=person.password))
        return token_stub(self.channel, session.token)


def _name(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


MODEL = identity_model("x", "float32", "y")


def _assay(w: World, **fields: object) -> pb.AssayDefinition:
    return pb.AssayDefinition(
        workspace=w.workspace,
        name="drift",
        pipeline="nope",
        iopath="input x 0",
        baseline_data=[1.0, 2.0],
        **fields,  # type: ignore[arg-type]
    )


Rule = tuple[dict[str, str], Callable[[Stub, World, str], object]]

RULES: dict[str, Rule] = {
    "CreateWorkspace": (
        ANY_USER,
        lambda s, w, r: s.CreateWorkspace(pb.CreateWorkspaceRequest(name=_name("ws"))),
    ),
    "ListWorkspaces": (ANY_USER, lambda s, w, r: s.ListWorkspaces(pb.ListWorkspacesRequest())),
    "UploadModel": (IN_WORKSPACE, lambda s, w, r: upload(s, w.workspace, _name("m"), MODEL)),
    "ListModels": (IN_WORKSPACE, lambda s, w, r: s.ListModels(pb.ListModelsRequest(workspace=w.workspace))),
    "GetModel": (
        IN_WORKSPACE,
        lambda s, w, r: s.GetModel(pb.GetModelRequest(workspace=w.workspace, name=w.model)),
    ),
    "GetModelVersion": (
        IN_WORKSPACE,
        lambda s, w, r: s.GetModelVersion(pb.GetModelVersionRequest(workspace=w.workspace, name=w.model)),
    ),
    "ConfigureModel": (
        IN_WORKSPACE,
        lambda s, w, r: s.ConfigureModel(
            pb.ConfigureModelRequest(
                workspace=w.workspace, name=w.model, config=pb.ModelConfig(max_batch_delay_ms=1)
            )
        ),
    ),
    "DownloadArtifact": (
        ARTIFACT,
        lambda s, w, r: list(
            s.DownloadArtifact(pb.DownloadArtifactRequest(workspace=w.workspace, sha256=w.sha256))
        ),
    ),
    "CreatePipeline": (
        IN_WORKSPACE,
        lambda s, w, r: s.CreatePipeline(
            pb.CreatePipelineRequest(workspace=w.workspace, name=w.pipeline, steps=[step(w.model)])
        ),
    ),
    "GetPipeline": (
        IN_WORKSPACE,
        lambda s, w, r: s.GetPipeline(pb.GetPipelineRequest(workspace=w.workspace, name=w.pipeline)),
    ),
    "ListPipelines": (
        IN_WORKSPACE,
        lambda s, w, r: s.ListPipelines(pb.ListPipelinesRequest(workspace=w.workspace)),
    ),
    "Deploy": (
        IN_WORKSPACE,
        lambda s, w, r: s.Deploy(pb.DeployRequest(workspace=w.workspace, pipeline="nope")),
    ),
    "Rollback": (
        IN_WORKSPACE,
        lambda s, w, r: s.Rollback(pb.RollbackRequest(workspace=w.workspace, pipeline="nope")),
    ),
    "Undeploy": (
        IN_WORKSPACE,
        lambda s, w, r: s.Undeploy(pb.UndeployRequest(workspace=w.workspace, pipeline="nope")),
    ),
    "GetDeploymentStatus": (
        IN_WORKSPACE,
        lambda s, w, r: s.GetDeploymentStatus(
            pb.GetDeploymentStatusRequest(workspace=w.workspace, pipeline=w.pipeline)
        ),
    ),
    "QueryLogs": (
        IN_WORKSPACE,
        lambda s, w, r: s.QueryLogs(pb.QueryLogsRequest(workspace=w.workspace, pipeline=w.pipeline)),
    ),
    # Past access control: the connection is missing (NOT_FOUND), or its details are refused.
    "CreateConnection": (
        IN_WORKSPACE,
        lambda s, w, r: s.CreateConnection(
            pb.ConnectionCreateRequest(workspace=w.workspace, name="conn", type="files")
        ),
    ),
    "ListConnections": (
        IN_WORKSPACE,
        lambda s, w, r: s.ListConnections(pb.ConnectionListRequest(workspace=w.workspace)),
    ),
    "GetConnection": (
        IN_WORKSPACE,
        lambda s, w, r: s.GetConnection(pb.ConnectionGetRequest(workspace=w.workspace, name="nope")),
    ),
    "DeleteConnection": (
        IN_WORKSPACE,
        lambda s, w, r: s.DeleteConnection(pb.ConnectionDeleteRequest(workspace=w.workspace, name="nope")),
    ),
    "TestConnection": (
        IN_WORKSPACE,
        lambda s, w, r: s.TestConnection(pb.ConnectionTestRequest(workspace=w.workspace, name="nope")),
    ),
    # Sharing hands a connection's secrets to another workspace: owners of its own workspace only.
    "AddWorkspaceConnection": (
        MANAGE,
        lambda s, w, r: s.AddWorkspaceConnection(
            pb.ConnectionShareRequest(workspace=w.workspace, name="nope", owner_workspace=w.workspace)
        ),
    ),
    "RemoveWorkspaceConnection": (
        IN_WORKSPACE,
        lambda s, w, r: s.RemoveWorkspaceConnection(
            pb.ConnectionUnshareRequest(workspace=w.workspace, name="nope")
        ),
    ),
    "CreateBridge": (
        IN_WORKSPACE,
        lambda s, w, r: s.CreateBridge(
            pb.BridgeCreateRequest(workspace=w.workspace, name="b", kind="sink", pipeline="nope")
        ),
    ),
    "ListBridges": (IN_WORKSPACE, lambda s, w, r: s.ListBridges(pb.BridgeListRequest(workspace=w.workspace))),
    "GetBridgeStatus": (
        IN_WORKSPACE,
        lambda s, w, r: s.GetBridgeStatus(pb.BridgeRequest(workspace=w.workspace, name="nope")),
    ),
    "PauseBridge": (
        IN_WORKSPACE,
        lambda s, w, r: s.PauseBridge(pb.BridgeRequest(workspace=w.workspace, name="nope")),
    ),
    "ResumeBridge": (
        IN_WORKSPACE,
        lambda s, w, r: s.ResumeBridge(pb.BridgeRequest(workspace=w.workspace, name="nope")),
    ),
    "DeleteBridge": (
        IN_WORKSPACE,
        lambda s, w, r: s.DeleteBridge(pb.BridgeRequest(workspace=w.workspace, name="nope")),
    ),
    # A bridge's connection in full: the connector-bridges' service token (and platform admins) only.
    "GetBridgeConnection": (
        RUN_BRIDGE,
        lambda s, w, r: s.GetBridgeConnection(pb.BridgeRequest(workspace=w.workspace, name="nope")),
    ),
    "UploadOrchestration": (
        IN_WORKSPACE,
        lambda s, w, r: s.UploadOrchestration(
            iter(
                [
                    pb.OrchestrationUploadRequest(
                        header=pb.OrchestrationUploadHeader(workspace=w.workspace, name="o")
                    ),
                    pb.OrchestrationUploadRequest(chunk=b"not a zip"),
                ]
            )
        ),
    ),
    "ListOrchestrations": (
        IN_WORKSPACE,
        lambda s, w, r: s.ListOrchestrations(pb.OrchestrationListRequest(workspace=w.workspace)),
    ),
    "GetOrchestration": (
        IN_WORKSPACE,
        lambda s, w, r: s.GetOrchestration(pb.OrchestrationRequest(workspace=w.workspace, name="nope")),
    ),
    # Members download an orchestration's zip, and so do the orchestrators (the service token).
    "DownloadOrchestration": (
        ARTIFACT,
        lambda s, w, r: list(
            s.DownloadOrchestration(pb.OrchestrationRequest(workspace=w.workspace, name="nope"))
        ),
    ),
    "DeleteOrchestration": (
        IN_WORKSPACE,
        lambda s, w, r: s.DeleteOrchestration(pb.OrchestrationRequest(workspace=w.workspace, name="nope")),
    ),
    "CreateTask": (
        IN_WORKSPACE,
        lambda s, w, r: s.CreateTask(
            pb.TaskCreateRequest(workspace=w.workspace, name="t", orchestration="nope", kind="once")
        ),
    ),
    "ListTasks": (IN_WORKSPACE, lambda s, w, r: s.ListTasks(pb.TaskListRequest(workspace=w.workspace))),
    "GetTask": (IN_WORKSPACE, lambda s, w, r: s.GetTask(pb.TaskRequest(workspace=w.workspace, name="nope"))),
    "KillTask": (
        IN_WORKSPACE,
        lambda s, w, r: s.KillTask(pb.TaskRequest(workspace=w.workspace, name="nope")),
    ),
    "DeleteTask": (
        IN_WORKSPACE,
        lambda s, w, r: s.DeleteTask(pb.TaskRequest(workspace=w.workspace, name="nope")),
    ),
    "ListTaskRuns": (
        IN_WORKSPACE,
        lambda s, w, r: s.ListTaskRuns(pb.TaskRunsRequest(workspace=w.workspace, name="nope")),
    ),
    "GetTaskRunLogs": (
        IN_WORKSPACE,
        lambda s, w, r: s.GetTaskRunLogs(pb.TaskRunLogsRequest(workspace=w.workspace, task="nope")),
    ),
    "IssueTaskToken": (SERVICE_ONLY, lambda s, w, r: s.IssueTaskToken(pb.TaskTokenRequest(run_id=-1))),
    "RevokeTaskToken": (SERVICE_ONLY, lambda s, w, r: s.RevokeTaskToken(pb.TaskTokenRequest(run_id=-1))),
    "CreateAssay": (IN_WORKSPACE, lambda s, w, r: s.CreateAssay(pb.CreateAssayRequest(definition=_assay(w)))),
    "ListAssays": (IN_WORKSPACE, lambda s, w, r: s.ListAssays(pb.ListAssaysRequest(workspace=w.workspace))),
    "GetAssay": (
        IN_WORKSPACE,
        lambda s, w, r: s.GetAssay(pb.GetAssayRequest(workspace=w.workspace, name="nope")),
    ),
    "SetAssayActive": (
        IN_WORKSPACE,
        lambda s, w, r: s.SetAssayActive(
            pb.SetAssayActiveRequest(workspace=w.workspace, name="nope", active=True)
        ),
    ),
    "DeleteAssay": (
        IN_WORKSPACE,
        lambda s, w, r: s.DeleteAssay(pb.DeleteAssayRequest(workspace=w.workspace, name="nope")),
    ),
    "PreviewBaseline": (
        IN_WORKSPACE,
        lambda s, w, r: s.PreviewBaseline(pb.PreviewBaselineRequest(definition=_assay(w))),
    ),
    "RunAssayInteractive": (
        IN_WORKSPACE,
        lambda s, w, r: s.RunAssayInteractive(pb.RunAssayInteractiveRequest(definition=_assay(w))),
    ),
    "GetAssayResults": (
        IN_WORKSPACE,
        lambda s, w, r: s.GetAssayResults(pb.GetAssayResultsRequest(workspace=w.workspace, name="nope")),
    ),
    "DescribeModel": (
        IN_WORKSPACE,
        lambda s, w, r: s.DescribeModel(pb.DescribeModelRequest(workspace=w.workspace, name=w.model)),
    ),
    "DeleteModel": (
        IN_WORKSPACE,
        lambda s, w, r: s.DeleteModel(pb.DeleteModelRequest(workspace=w.workspace, name="nope", version=1)),
    ),
    "DeletePipeline": (
        IN_WORKSPACE,
        lambda s, w, r: s.DeletePipeline(pb.DeletePipelineRequest(workspace=w.workspace, name="nope")),
    ),
    # Refused while the workspace holds its model: FAILED_PRECONDITION, past access control.
    "DeleteWorkspace": (
        MANAGE,
        lambda s, w, r: s.DeleteWorkspace(pb.DeleteWorkspaceRequest(name=w.workspace)),
    ),
    "Login": (
        PUBLIC,
        lambda s, w, r: s.Login(pb.LoginRequest(username=w.login.username, password=w.login.password)),
    ),
    "Logout": (ANY_USER, lambda s, w, r: w.fresh(r).Logout(pb.LogoutRequest())),
    "WhoAmI": (ANY_USER, lambda s, w, r: s.WhoAmI(pb.WhoAmIRequest())),
    "ChangePassword": (
        ANY_USER,
        lambda s, w, r: s.ChangePassword(
            pb.ChangePasswordRequest(old_password=_password(w, r), new_password=_password(w, r))
        ),
    ),
    "CreateToken": (ANY_USER, lambda s, w, r: s.CreateToken(pb.CreateTokenRequest(name=_name("t")))),
    "ListTokens": (ANY_USER, lambda s, w, r: s.ListTokens(pb.ListTokensRequest())),
    "RevokeToken": (ANY_USER, lambda s, w, r: s.RevokeToken(pb.RevokeTokenRequest(name="nope"))),
    "CreateUser": (
        PLATFORM_ADMIN,
        lambda s, w, r: s.CreateUser(
            pb.CreateUserRequest(username=_name("u"), password="long-enough-password")
        ),
    ),
    "ListUsers": (PLATFORM_ADMIN, lambda s, w, r: s.ListUsers(pb.ListUsersRequest())),
    "SetUserActive": (
        PLATFORM_ADMIN,
        lambda s, w, r: s.SetUserActive(pb.SetUserActiveRequest(username=w.extra.username, active=True)),
    ),
    "AddWorkspaceMember": (
        MANAGE,
        lambda s, w, r: s.AddWorkspaceMember(
            pb.AddWorkspaceMemberRequest(
                workspace=w.workspace, username=w.extra.username, role="collaborator"
            )
        ),
    ),
    # The login user is no member: NOT_FOUND naming them, past access control.
    "RemoveWorkspaceMember": (
        MANAGE,
        lambda s, w, r: s.RemoveWorkspaceMember(
            pb.RemoveWorkspaceMemberRequest(workspace=w.workspace, username=w.login.username)
        ),
    ),
    "ListWorkspaceMembers": (
        IN_WORKSPACE,
        lambda s, w, r: s.ListWorkspaceMembers(pb.ListWorkspaceMembersRequest(workspace=w.workspace)),
    ),
    "Authorize": (
        IN_WORKSPACE,
        lambda s, w, r: s.Authorize(pb.AuthorizeRequest(workspace=w.workspace, action="infer")),
    ),
    "QueryAudit": (PLATFORM_ADMIN, lambda s, w, r: s.QueryAudit(pb.QueryAuditRequest(limit=1))),
    "ListModelArtifacts": (
        IN_WORKSPACE,
        lambda s, w, r: s.ListModelArtifacts(pb.ArtifactListRequest(workspace=w.workspace, name=w.model)),
    ),
    "AddTag": (
        IN_WORKSPACE,
        lambda s, w, r: s.AddTag(pb.TagRequest(workspace=w.workspace, model=w.model, tag="matrix")),
    ),
    "RemoveTag": (
        IN_WORKSPACE,
        lambda s, w, r: s.RemoveTag(pb.TagRequest(workspace=w.workspace, pipeline=w.pipeline, tag="matrix")),
    ),
    "SearchModels": (
        IN_WORKSPACE,
        lambda s, w, r: s.SearchModels(pb.SearchModelsRequest(workspace=w.workspace, tag="matrix")),
    ),
    "SearchPipelines": (
        IN_WORKSPACE,
        lambda s, w, r: s.SearchPipelines(pb.SearchPipelinesRequest(workspace=w.workspace, search_term="p")),
    ),
}


def _password(w: World, role: str) -> str:
    person = w.people.get(role)
    return person.password if person else "not-a-password"


@pytest.fixture(scope="module")
def world(
    stub: Stub, anonymous_stub: Stub, channel: grpc.Channel, new_person: Callable[..., Person]
) -> World:
    people = {
        "admin": new_person(admin=True),
        "owner": new_person(),
        "collaborator": new_person(),
        "non-member": new_person(),
        "deactivated": new_person(),
    }
    owner = people["owner"].stub
    workspace = owner.CreateWorkspace(pb.CreateWorkspaceRequest(name=_name("matrix"))).name
    for role in ("collaborator", "deactivated"):
        owner.AddWorkspaceMember(
            pb.AddWorkspaceMemberRequest(workspace=workspace, username=people[role].username)
        )
    stub.SetUserActive(pb.SetUserActiveRequest(username=people["deactivated"].username, active=False))
    model = owner.UploadModel(upload_requests(workspace, "model", MODEL))
    owner.CreatePipeline(pb.CreatePipelineRequest(workspace=workspace, name="pipe", steps=[step("model")]))
    stubs = {role: person.stub for role, person in people.items()} | {
        "expired session": _expired_session(anonymous_stub, channel, people["owner"]),
        "bad token": token_stub(channel, f"joey_{secrets.token_urlsafe(32)}"),
        "no token": anonymous_stub,
        "service": token_stub(channel, SERVICE_TOKEN),
    }
    return World(workspace, "model", model.sha256, "pipe", new_person(), new_person(), people, stubs, channel)


def _expired_session(anonymous: Stub, channel: grpc.Channel, person: Person) -> Stub:
    """A stub on a session of the workspace owner that has expired."""
    reply = anonymous.Login(
        pb.LoginRequest(username=person.username, password=person.password, expires_in_s=1)
    )
    session = token_stub(channel, reply.token)

    def expired() -> bool:
        try:
            session.WhoAmI(pb.WhoAmIRequest())
        except grpc.RpcError as exc:
            return exc.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined,no-any-return]
        return False

    wait_until(expired, 30, "the session to expire")
    return session


@pytest.fixture(scope="module")
def task_stub(world: World, registry_settings: RegistrySettings, channel: grpc.Channel) -> Stub:
    """The token of a running run of the owner's task, running the owner's own version: as strong as a
    task's token gets."""
    with psycopg.connect(registry_settings.database_url.get_secret_value(), autocommit=True) as conn:
        row = conn.execute(
            "WITH ws AS (SELECT id FROM workspaces WHERE name = %(ws)s), "
            "o AS (INSERT INTO orchestrations (workspace_id, name, version, sha256, size_bytes, files, "
            "status, created_by) SELECT id, 'job', 1, 'x', 1, 1, 'ready', %(owner)s FROM ws), "
            "t AS (INSERT INTO tasks (workspace_id, name, orchestration, kind, owner) "
            "SELECT id, 'job', 'job', 'once', %(owner)s FROM ws RETURNING id) "
            "INSERT INTO task_runs (task_id, status, orchestration_version, started_at) "
            "SELECT id, 'running', 1, now() FROM t RETURNING id",
            {"ws": world.workspace, "owner": world.people["owner"].username},
        ).fetchone()
    assert row is not None
    issued = world.stubs["service"].IssueTaskToken(pb.TaskTokenRequest(run_id=row[0]))
    return token_stub(channel, issued.token)


def _outcome(call: Callable[[], object], workspace: str) -> str:
    try:
        call()
    except grpc.RpcError as exc:
        code, details = exc.code(), exc.details()  # type: ignore[attr-defined]
        if code == grpc.StatusCode.UNAUTHENTICATED:
            return UNAUTHENTICATED
        if code == grpc.StatusCode.PERMISSION_DENIED:
            return DENIED
        if code == grpc.StatusCode.NOT_FOUND and details == f"workspace {workspace!r} not found":
            return HIDDEN
        assert code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), details
        return f"{ALLOWED} ({code.name}: {details})"
    return ALLOWED


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("rpc", RPCS)
def test_access_matrix(world: World, rpc: str, role: str) -> None:
    rule = RULES.get(rpc)
    if rule is None:
        pytest.fail(f"{rpc} has no rule in the access matrix: add one to RULES")
    expected, call = rule
    got = _outcome(lambda: call(world.stubs[role], world, role), world.workspace)
    assert got.split(" (")[0] == expected[role], f"{rpc} as {role}: {got}"


@pytest.mark.parametrize("rpc", [rpc for rpc, (expected, _) in RULES.items() if expected is MANAGE])
def test_a_task_token_manages_nothing_even_its_owners(world: World, task_stub: Stub, rpc: str) -> None:
    # Its code may be a collaborator's (a task left on the latest version runs whatever is uploaded).
    with pytest.raises(grpc.RpcError) as refused:
        RULES[rpc][1](task_stub, world, "owner")
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]
    assert "a task's token may not manage its workspace" in refused.value.details()  # type: ignore[attr-defined]


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("action", ["read", "infer"])
def test_authorize_for_reads_and_inferences(world: World, action: str, role: str) -> None:
    request = pb.AuthorizeRequest(workspace=world.workspace, action=action)
    got = _outcome(lambda: world.stubs[role].Authorize(request), world.workspace)
    assert got.split(" (")[0] == IN_WORKSPACE[role], f"Authorize {action} as {role}: {got}"


def test_every_rule_is_of_an_rpc() -> None:
    assert set(RULES) == set(RPCS)


def test_every_rpc_resolves_its_caller_and_only_login_is_public() -> None:
    assert set(grpc_server.RPC_KINDS) == set(RPCS)
    assert [rpc for rpc, kind in grpc_server.RPC_KINDS.items() if kind == grpc_server.PUBLIC] == ["Login"]


def test_workspaces_are_listed_with_the_callers_role(world: World) -> None:
    def listed(role: str) -> dict[str, str]:
        reply = world.stubs[role].ListWorkspaces(pb.ListWorkspacesRequest())
        return {w.name: w.role for w in reply.workspaces}

    assert listed("owner")[world.workspace] == "owner"
    assert listed("collaborator")[world.workspace] == "collaborator"
    assert world.workspace not in listed("non-member")
    every = listed("admin")
    assert every[world.workspace] == "" and "default" in every
