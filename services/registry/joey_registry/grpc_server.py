"""The gRPC transport: resolve the caller, convert messages, map registry errors to status codes,
and write the audit trail.

Every handler is declared with one of three decorators, so no RPC can skip resolving its caller by
accident: ``_read`` (a token is required; refusals are recorded in the audit trail, answered reads are
not: Authorize runs on every inference), ``_audited`` (a token is required, and the call is recorded,
refused or not) and ``_public`` (no token: only Login, recorded too).

A call carrying no token at all is not recorded (but Login): anyone could grow the trail with such
calls, and they learn nothing.
"""

from __future__ import annotations

import functools
import inspect
import logging
import secrets
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, TypeVar

import grpc
import psycopg
from google.protobuf.message import Message

from joey_core.v1 import registry_pb2 as pb
from joey_core.v1 import registry_pb2_grpc
from joey_registry import (
    assay_convert,
    bridge_convert,
    connection_convert,
    convert,
    errors,
    orchestration_convert,
)
from joey_registry.access import Caller
from joey_registry.domain import AuditEntry
from joey_registry.identity import USERNAME_PATTERN
from joey_registry.service import Registry
from joey_registry.upload_gate import UploadGate

log = logging.getLogger(__name__)

_CODES: dict[type[errors.RegistryError], grpc.StatusCode] = {
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
}

READ, AUDITED, PUBLIC = "read", "audited", "public"
RPC_KINDS: dict[str, str] = {}
"""How each RPC is guarded, by name: filled by the decorators, checked by the tests."""

# Request fields that name what a call acts on, for the audit trail. A list of what to keep rather
# than what to drop: a secret field added later stays out of the trail.
_TARGET_FIELDS = frozenset(
    {
        "name",
        "pipeline",
        "model",
        "username",
        "role",
        "version",
        "pipeline_version",
        "replicas",
        "active",
        "all_versions",
        "admin",
        "action",
        "tag",
        "type",
        "owner_workspace",
        "kind",
        "connection",
        "what",
        "orchestration",
        "orchestration_version",
        "schedule",
        "task",
        "run_id",
    }
)
_WORKSPACE_NAMED = frozenset({"CreateWorkspace", "DeleteWorkspace"})

Request = TypeVar("Request")
Response = TypeVar("Response")
Method = Callable[[Any, Any, Caller], Any]
Handler = Callable[[Any, Any, grpc.ServicerContext], Any]

_NO_CALLER = Caller(user=None, token_id=None, is_service=False)
INVALID_USERNAME = "<invalid>"
"""Recorded for a refused login whose username is not one: it may be a password pasted in its place."""


def _refusal(exc: Exception) -> bool:
    """A read refused by access control, worth recording: not a missing model or a bad argument."""
    return isinstance(exc, errors.PermissionDenied | errors.WorkspaceNotFound | errors.Unauthenticated)


def _attempted(request: Message) -> str:
    """The username a request names, for the audit trail (a refused login is recorded under it), if
    it is one."""
    username = str(getattr(request, "username", ""))
    return username if not username or USERNAME_PATTERN.fullmatch(username) else INVALID_USERNAME


def _token_presented(context: grpc.ServicerContext) -> bool:
    return any(key.lower() == "authorization" for key, _ in context.invocation_metadata() or ())


def _status(rpc: str, exc: Exception) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, errors.RegistryError):
        code = next((_CODES[c] for c in type(exc).__mro__ if c in _CODES), grpc.StatusCode.UNKNOWN)
        log.info("%s: %s %s", rpc, code.name, exc)
        return code, str(exc)
    # The exception may name hosts, paths or SQL: the detail stays in the log, the caller gets a reference.
    reference = secrets.token_hex(4)
    if isinstance(exc, psycopg.OperationalError):
        # A lost or refused connection, or a pool that found none in time: worth retrying, not a bug.
        log.warning("%s: the database is unavailable (reference %s): %s", rpc, reference, exc)
        return grpc.StatusCode.UNAVAILABLE, (
            f"the registry's database is unavailable; retry later (reference {reference})"
        )
    log.exception("%s failed (reference %s)", rpc, reference)
    return grpc.StatusCode.INTERNAL, f"internal error in {rpc} (reference {reference}); see the registry log"


_Item = TypeVar("_Item")
_Listing = TypeVar("_Listing", bound=Message)


def _listing(
    response: type[_Listing], to_proto: Callable[[_Item], Message], found: Iterable[_Item]
) -> _Listing:
    """A list response of ``found``, each item converted by ``to_proto``: every list response of the API
    holds its items in its one (repeated) field."""
    (items,) = response.DESCRIPTOR.fields
    return response(**{items.name: [to_proto(item) for item in found]})


class _Recorded:
    """A request stream that keeps its first message, which names what the call acts on."""

    def __init__(self, requests: Iterator[Message]) -> None:
        self._requests = requests
        self.first: Message | None = None

    def __iter__(self) -> _Recorded:
        return self

    def __next__(self) -> Message:
        message = next(self._requests)
        if self.first is None:
            self.first = message
        return message


def _subject(rpc: str, request: Message | None) -> tuple[str, str]:
    """The workspace and target of a call, from its request (never a secret)."""
    if request is None:
        return "", ""
    for wrapper in ("definition", "header"):
        if wrapper in request.DESCRIPTOR.fields_by_name and request.HasField(wrapper):
            request = getattr(request, wrapper)
    fields = {fd.name: value for fd, value in request.ListFields() if fd.type != fd.TYPE_MESSAGE}
    if "username" in fields:
        fields["username"] = _attempted(request)
    if rpc in _WORKSPACE_NAMED:
        return str(fields.get("name", "")), ""
    target = " ".join(f"{name}={fields[name]}" for name in sorted(fields) if name in _TARGET_FIELDS)
    return str(fields.get("workspace", "")), target


def _guarded(kind: str) -> Callable[[Method], Handler]:
    def decorate(method: Method) -> Handler:
        rpc = method.__name__
        RPC_KINDS[rpc] = kind

        def caller_of(self: RegistryServicer, context: grpc.ServicerContext) -> Caller:
            if kind == PUBLIC:
                return replace(_NO_CALLER, peer=context.peer())
            return self.registry.identity.resolve(context.invocation_metadata())

        if inspect.isgeneratorfunction(method):
            if kind != READ:
                raise TypeError(f"{rpc}: streamed responses are reads; audit needs a unary handler")

            @functools.wraps(method)
            def stream(self: RegistryServicer, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                who = ""
                try:
                    caller = caller_of(self, context)
                    who = caller.name
                    yield from method(self, request, caller)
                except Exception as exc:
                    code, message = _status(rpc, exc)
                    if _refusal(exc) and _token_presented(context):
                        self.audit(rpc, who, request, code.name, message)
                    context.abort(code, message)

            return stream

        @functools.wraps(method)
        def unary(self: RegistryServicer, request: Any, context: grpc.ServicerContext) -> Any:
            recorded = None if isinstance(request, Message) else _Recorded(request)
            who = _attempted(request) if kind == PUBLIC else ""
            recordable = kind == PUBLIC or _token_presented(context)
            try:
                caller = caller_of(self, context)
                who = caller.name or who
                response = method(self, recorded or request, caller)
            except Exception as exc:
                code, message = _status(rpc, exc)
                if recordable and (kind != READ or _refusal(exc)):
                    self.audit(rpc, who, recorded.first if recorded else request, code.name, message)
                context.abort(code, message)
            if kind != READ:
                self.audit(rpc, who, recorded.first if recorded else request, "OK", "")
            return response

        return unary

    return decorate


_read = _guarded(READ)
_audited = _guarded(AUDITED)
_public = _guarded(PUBLIC)


class _UploadParts:
    """An UploadModel stream split in its parts: the header, the model's bytes, then the bytes of
    the artifact files (read on from where the model's ended)."""

    def __init__(self, requests: Iterator[pb.UploadModelRequest]) -> None:
        first = next(requests, None)
        if first is None or first.WhichOneof("part") != "header":
            raise errors.InvalidArgument(
                "the first UploadModel message must be the header (workspace, name, framework)"
            )
        self.header = first.header
        self._requests = requests
        self._first_artifact_bytes: bytes | None = None

    def _parts(self) -> Iterator[tuple[str | None, bytes]]:
        for message in self._requests:
            part = message.WhichOneof("part")
            if part == "header":
                raise errors.InvalidArgument("UploadModel got a second header; send one header, then chunks")
            yield part, message.artifact_chunk if part == "artifact_chunk" else message.chunk

    def model(self) -> Iterator[bytes]:
        for part, data in self._parts():
            if part == "artifact_chunk":
                self._first_artifact_bytes = data
                return
            yield data

    def artifacts(self) -> Iterator[bytes]:
        if self._first_artifact_bytes is not None:
            yield self._first_artifact_bytes
        for part, data in self._parts():
            if part == "chunk":
                raise errors.InvalidArgument(
                    "UploadModel got model bytes after artifact bytes; send the model's chunks first"
                )
            yield data


class RegistryServicer(registry_pb2_grpc.RegistryServicer):
    def __init__(self, registry: Registry, uploads: UploadGate) -> None:
        self.registry = registry
        self.uploads = uploads

    def audit(self, rpc: str, who: str, request: Message | None, outcome: str, message: str) -> None:
        workspace, target = _subject(rpc, request)
        entry = AuditEntry(datetime.now(UTC), who, rpc, workspace, target, outcome, message)
        try:
            self.registry.identity.record(entry)
        except Exception:
            # The call's outcome stands (it may have changed state already); the log keeps the entry.
            log.exception("could not record the audit entry %s", entry)

    @_audited
    def CreateWorkspace(self, request: pb.CreateWorkspaceRequest, caller: Caller) -> pb.Workspace:
        return convert.workspace(self.registry.create_workspace(caller, request.name))

    @_read
    def ListWorkspaces(self, request: pb.ListWorkspacesRequest, caller: Caller) -> pb.ListWorkspacesResponse:
        return pb.ListWorkspacesResponse(
            workspaces=[convert.workspace(w) for w in self.registry.list_workspaces(caller)]
        )

    @_audited
    def UploadModel(self, request: Iterator[pb.UploadModelRequest], caller: Caller) -> pb.ModelVersion:
        with self.uploads.admitted(caller.name), self.uploads.receive(request) as messages:
            parts = _UploadParts(messages)
            header = convert.upload_header(parts.header)
            return self.registry.upload_model(caller, header, parts.model(), parts.artifacts()).to_proto()

    @_read
    def ListModels(self, request: pb.ListModelsRequest, caller: Caller) -> pb.ListModelsResponse:
        models = self.registry.list_models(caller, request.workspace)
        return _listing(pb.ListModelsResponse, convert.model, models)

    @_read
    def GetModel(self, request: pb.GetModelRequest, caller: Caller) -> pb.Model:
        return convert.model(self.registry.get_model(caller, request.workspace, request.name))

    @_read
    def GetModelVersion(self, request: pb.GetModelVersionRequest, caller: Caller) -> pb.ModelVersion:
        version = self.registry.get_model_version(caller, request.workspace, request.name, request.version)
        return version.to_proto()

    @_audited
    def ConfigureModel(self, request: pb.ConfigureModelRequest, caller: Caller) -> pb.ModelVersion:
        config = convert.model_config(request.config)
        version = self.registry.configure_model(
            caller, request.workspace, request.name, request.version, config
        )
        return version.to_proto()

    @_read
    def DownloadArtifact(
        self, request: pb.DownloadArtifactRequest, caller: Caller
    ) -> Iterator[pb.ArtifactChunk]:
        for data in self.registry.artifact_chunks(caller, request.workspace, request.sha256):
            yield pb.ArtifactChunk(data=data)

    @_audited
    def CreatePipeline(self, request: pb.CreatePipelineRequest, caller: Caller) -> pb.PipelineVersion:
        steps = convert.step_requests(list(request.steps))
        version = self.registry.create_pipeline(caller, request.workspace, request.name, steps)
        return convert.pipeline_version(version)

    @_read
    def GetPipeline(self, request: pb.GetPipelineRequest, caller: Caller) -> pb.Pipeline:
        return convert.pipeline(self.registry.get_pipeline(caller, request.workspace, request.name))

    @_read
    def ListPipelines(self, request: pb.ListPipelinesRequest, caller: Caller) -> pb.ListPipelinesResponse:
        pipelines = self.registry.list_pipelines(caller, request.workspace)
        return _listing(pb.ListPipelinesResponse, convert.pipeline, pipelines)

    @_audited
    def Deploy(self, request: pb.DeployRequest, caller: Caller) -> pb.Deployment:
        deployment = self.registry.deploy(
            caller,
            request.workspace,
            request.pipeline,
            request.pipeline_version,
            request.replicas if request.HasField("replicas") else None,
            convert.autoscale_from(request),
            convert.resources_from(request),
        )
        return convert.deployment(deployment)

    @_audited
    def Rollback(self, request: pb.RollbackRequest, caller: Caller) -> pb.Deployment:
        deployment = self.registry.rollback(
            caller, request.workspace, request.pipeline, request.pipeline_version
        )
        return convert.deployment(deployment)

    @_audited
    def Undeploy(self, request: pb.UndeployRequest, caller: Caller) -> pb.Deployment:
        return convert.deployment(self.registry.undeploy(caller, request.workspace, request.pipeline))

    @_read
    def GetDeploymentStatus(
        self, request: pb.GetDeploymentStatusRequest, caller: Caller
    ) -> pb.DeploymentStatus:
        status = self.registry.deployment_status(caller, request.workspace, request.pipeline)
        return convert.deployment_status(status)

    @_read
    def QueryLogs(self, request: pb.QueryLogsRequest, caller: Caller) -> pb.QueryLogsResponse:
        return convert.log_page(self.registry.query_logs(caller, convert.log_query(request)))

    # --- connections ---

    @_audited
    def CreateConnection(self, request: pb.ConnectionCreateRequest, caller: Caller) -> pb.Connection:
        created = self.registry.connections.create(
            caller, request.workspace, request.name, request.type, connection_convert.details(request)
        )
        return connection_convert.connection(created)

    @_read
    def ListConnections(self, request: pb.ConnectionListRequest, caller: Caller) -> pb.ConnectionListResponse:
        found = self.registry.connections.list_all(caller, request.workspace)
        return _listing(pb.ConnectionListResponse, connection_convert.connection, found)

    # Audited although a read: it hands out secrets, and who read them is worth knowing.
    @_audited
    def GetConnection(self, request: pb.ConnectionGetRequest, caller: Caller) -> pb.Connection:
        found = self.registry.connections.get(caller, request.workspace, request.name)
        return connection_convert.connection(found)

    @_audited
    def DeleteConnection(
        self, request: pb.ConnectionDeleteRequest, caller: Caller
    ) -> pb.ConnectionDeleteResponse:
        self.registry.connections.delete(caller, request.workspace, request.name)
        return pb.ConnectionDeleteResponse()

    @_audited
    def TestConnection(self, request: pb.ConnectionTestRequest, caller: Caller) -> pb.ConnectionTestResult:
        return connection_convert.report(
            self.registry.connections.test(caller, request.workspace, request.name)
        )

    @_audited
    def AddWorkspaceConnection(
        self, request: pb.ConnectionShareRequest, caller: Caller
    ) -> pb.ConnectionShareResponse:
        self.registry.connections.share(caller, request.owner_workspace, request.name, request.workspace)
        return pb.ConnectionShareResponse()

    @_audited
    def RemoveWorkspaceConnection(
        self, request: pb.ConnectionUnshareRequest, caller: Caller
    ) -> pb.ConnectionUnshareResponse:
        self.registry.connections.unshare(caller, request.workspace, request.name)
        return pb.ConnectionUnshareResponse()

    # --- bridges ---

    @_audited
    def CreateBridge(self, request: pb.BridgeCreateRequest, caller: Caller) -> pb.Bridge:
        created = self.registry.bridges.create(
            caller,
            request.workspace,
            request.name,
            request.kind,
            request.pipeline,
            request.connection,
            request.what,
            request.from_pipeline,
        )
        return bridge_convert.bridge(created)

    @_read
    def ListBridges(self, request: pb.BridgeListRequest, caller: Caller) -> pb.BridgeListResponse:
        found = self.registry.bridges.list_all(caller, request.workspace)
        return _listing(pb.BridgeListResponse, bridge_convert.bridge, found)

    @_read
    def GetBridgeStatus(self, request: pb.BridgeRequest, caller: Caller) -> pb.Bridge:
        return bridge_convert.bridge(self.registry.bridges.status(caller, request.workspace, request.name))

    @_audited
    def PauseBridge(self, request: pb.BridgeRequest, caller: Caller) -> pb.Bridge:
        paused = self.registry.bridges.set_paused(caller, request.workspace, request.name, True)
        return bridge_convert.bridge(paused)

    @_audited
    def ResumeBridge(self, request: pb.BridgeRequest, caller: Caller) -> pb.Bridge:
        resumed = self.registry.bridges.set_paused(caller, request.workspace, request.name, False)
        return bridge_convert.bridge(resumed)

    @_audited
    def DeleteBridge(self, request: pb.BridgeRequest, caller: Caller) -> pb.BridgeDeleteResponse:
        self.registry.bridges.delete(caller, request.workspace, request.name)
        return pb.BridgeDeleteResponse()

    # Not audited: every connector-bridge reads it for each bridge it starts; the service token only.
    @_read
    def GetBridgeConnection(self, request: pb.BridgeRequest, caller: Caller) -> pb.Connection:
        found = self.registry.bridges.connection(caller, request.workspace, request.name)
        return connection_convert.connection(found)

    # --- orchestrations and tasks ---

    @_audited
    def UploadOrchestration(
        self, request: Iterator[pb.OrchestrationUploadRequest], caller: Caller
    ) -> pb.Orchestration:
        with self.uploads.admitted(caller.name), self.uploads.receive(request) as messages:
            first = next(messages, None)
            if first is None or first.WhichOneof("part") != "header":
                raise errors.InvalidArgument("the first UploadOrchestration message must be the header")

            def chunks() -> Iterator[bytes]:
                for message in messages:
                    if message.WhichOneof("part") != "chunk":
                        raise errors.InvalidArgument("UploadOrchestration got a second header")
                    yield message.chunk

            header = first.header
            stored = self.registry.orchestrations.upload(caller, header.workspace, header.name, chunks())
            return orchestration_convert.orchestration(stored)

    @_read
    def ListOrchestrations(
        self, request: pb.OrchestrationListRequest, caller: Caller
    ) -> pb.OrchestrationListResponse:
        found = self.registry.orchestrations.list_all(caller, request.workspace)
        return pb.OrchestrationListResponse(
            orchestrations=[orchestration_convert.orchestration(o) for o in found]
        )

    @_read
    def GetOrchestration(self, request: pb.OrchestrationRequest, caller: Caller) -> pb.Orchestration:
        found = self.registry.orchestrations.get(caller, request.workspace, request.name, request.version)
        return orchestration_convert.orchestration(found)

    @_read
    def DownloadOrchestration(
        self, request: pb.OrchestrationRequest, caller: Caller
    ) -> Iterator[pb.ArtifactChunk]:
        orchestrations = self.registry.orchestrations
        for data in orchestrations.zip_chunks(caller, request.workspace, request.name, request.version):
            yield pb.ArtifactChunk(data=data)

    @_audited
    def DeleteOrchestration(
        self, request: pb.OrchestrationRequest, caller: Caller
    ) -> pb.OrchestrationDeleteResponse:
        versions = self.registry.orchestrations.delete(caller, request.workspace, request.name)
        return pb.OrchestrationDeleteResponse(versions=versions)

    @_audited
    def CreateTask(self, request: pb.TaskCreateRequest, caller: Caller) -> pb.Task:
        definition = orchestration_convert.definition(request)
        return orchestration_convert.task(self.registry.tasks.create(caller, request.workspace, definition))

    @_read
    def ListTasks(self, request: pb.TaskListRequest, caller: Caller) -> pb.TaskListResponse:
        found = self.registry.tasks.list_all(caller, request.workspace)
        return pb.TaskListResponse(tasks=[orchestration_convert.task(t) for t in found])

    @_read
    def GetTask(self, request: pb.TaskRequest, caller: Caller) -> pb.Task:
        return orchestration_convert.task(self.registry.tasks.get(caller, request.workspace, request.name))

    @_audited
    def KillTask(self, request: pb.TaskRequest, caller: Caller) -> pb.Task:
        return orchestration_convert.task(self.registry.tasks.kill(caller, request.workspace, request.name))

    @_audited
    def DeleteTask(self, request: pb.TaskRequest, caller: Caller) -> pb.TaskDeleteResponse:
        self.registry.tasks.delete(caller, request.workspace, request.name)
        return pb.TaskDeleteResponse()

    @_read
    def ListTaskRuns(self, request: pb.TaskRunsRequest, caller: Caller) -> pb.TaskRunsResponse:
        runs = self.registry.tasks.runs(caller, request.workspace, request.name, request.limit)
        return pb.TaskRunsResponse(runs=[orchestration_convert.run(r) for r in runs])

    @_read
    def GetTaskRunLogs(self, request: pb.TaskRunLogsRequest, caller: Caller) -> pb.TaskRunLogsResponse:
        run_id, lines, finished = self.registry.tasks.logs(
            caller, request.workspace, request.task, request.run_id, request.after_seq, request.limit
        )
        return pb.TaskRunLogsResponse(
            run_id=run_id, lines=[orchestration_convert.log_line(line) for line in lines], finished=finished
        )

    # Not audited: every run of every task asks for one; the service token only.
    @_read
    def IssueTaskToken(self, request: pb.TaskTokenRequest, caller: Caller) -> pb.TaskToken:
        token, expires_at, workspace = self.registry.tasks.issue_token(caller, request.run_id)
        return pb.TaskToken(token=token, expires_at=convert.timestamp(expires_at), workspace=workspace)

    @_read
    def RevokeTaskToken(self, request: pb.TaskTokenRequest, caller: Caller) -> pb.TaskTokenRevoked:
        self.registry.tasks.revoke_token(caller, request.run_id)
        return pb.TaskTokenRevoked()

    # --- assays ---

    @_audited
    def CreateAssay(self, request: pb.CreateAssayRequest, caller: Caller) -> pb.Assay:
        stored = self.registry.assays.create(caller, assay_convert.definition(request.definition))
        return assay_convert.assay(stored)

    @_read
    def ListAssays(self, request: pb.ListAssaysRequest, caller: Caller) -> pb.ListAssaysResponse:
        assays = self.registry.assays.list_all(caller, request.workspace, request.pipeline)
        return _listing(pb.ListAssaysResponse, assay_convert.assay, assays)

    @_read
    def GetAssay(self, request: pb.GetAssayRequest, caller: Caller) -> pb.Assay:
        return assay_convert.assay(self.registry.assays.get(caller, request.workspace, request.name))

    @_audited
    def SetAssayActive(self, request: pb.SetAssayActiveRequest, caller: Caller) -> pb.Assay:
        stored = self.registry.assays.set_active(caller, request.workspace, request.name, request.active)
        return assay_convert.assay(stored)

    @_audited
    def DeleteAssay(self, request: pb.DeleteAssayRequest, caller: Caller) -> pb.DeleteAssayResponse:
        self.registry.assays.delete(caller, request.workspace, request.name)
        return pb.DeleteAssayResponse()

    @_read
    def PreviewBaseline(self, request: pb.PreviewBaselineRequest, caller: Caller) -> pb.AssaySummary:
        summary = self.registry.assays.preview_baseline(caller, assay_convert.definition(request.definition))
        return assay_convert.summary(summary)

    @_read
    def RunAssayInteractive(self, request: pb.RunAssayInteractiveRequest, caller: Caller) -> pb.AssayResults:
        end = convert.optional_datetime(request, "end")  # type: ignore[arg-type]
        definition = assay_convert.definition(request.definition)
        results, cut = self.registry.assays.run_interactive(caller, definition, end)
        return assay_convert.results(results, definition, cut=cut)

    @_read
    def GetAssayResults(self, request: pb.GetAssayResultsRequest, caller: Caller) -> pb.AssayResults:
        start = convert.optional_datetime(request, "start")  # type: ignore[arg-type]
        end = convert.optional_datetime(request, "end")  # type: ignore[arg-type]
        definition, results = self.registry.assays.results(
            caller, request.workspace, request.name, start, end
        )
        return assay_convert.results(results, definition)

    # --- catalog: descriptions and deletes ---

    @_read
    def DescribeModel(self, request: pb.DescribeModelRequest, caller: Caller) -> pb.ModelDescription:
        return convert.model_description(
            self.registry.describe_model(caller, request.workspace, request.name)
        )

    @_audited
    def DeleteModel(self, request: pb.DeleteModelRequest, caller: Caller) -> pb.DeleteModelResponse:
        deleted = self.registry.delete_model(
            caller, request.workspace, request.name, request.version, request.all_versions
        )
        return pb.DeleteModelResponse(versions=deleted.versions, model_deleted=deleted.model_deleted)

    @_audited
    def DeletePipeline(self, request: pb.DeletePipelineRequest, caller: Caller) -> pb.DeletePipelineResponse:
        deleted = self.registry.delete_pipeline(caller, request.workspace, request.name)
        return pb.DeletePipelineResponse(version_count=deleted.versions, log_entries=deleted.log_entries)

    @_audited
    def DeleteWorkspace(
        self, request: pb.DeleteWorkspaceRequest, caller: Caller
    ) -> pb.DeleteWorkspaceResponse:
        self.registry.delete_workspace(caller, request.name)
        return pb.DeleteWorkspaceResponse()

    # --- identity ---

    @_public
    def Login(self, request: pb.LoginRequest, caller: Caller) -> pb.LoginResponse:
        expires_in_s = request.expires_in_s if request.HasField("expires_in_s") else None
        token, expires_at, user = self.registry.identity.login(
            request.username, request.password, expires_in_s, caller.peer
        )
        return pb.LoginResponse(
            token=token, expires_at=convert.timestamp(expires_at), user=convert.user(user)
        )

    @_audited
    def Logout(self, request: pb.LogoutRequest, caller: Caller) -> pb.LogoutResponse:
        self.registry.identity.logout(caller)
        return pb.LogoutResponse()

    @_read
    def WhoAmI(self, request: pb.WhoAmIRequest, caller: Caller) -> pb.User:
        return convert.user(self.registry.identity.whoami(caller))

    @_audited
    def ChangePassword(self, request: pb.ChangePasswordRequest, caller: Caller) -> pb.ChangePasswordResponse:
        self.registry.identity.change_password(caller, request.old_password, request.new_password)
        return pb.ChangePasswordResponse()

    @_audited
    def CreateToken(self, request: pb.CreateTokenRequest, caller: Caller) -> pb.CreateTokenResponse:
        expires_in_s = request.expires_in_s if request.HasField("expires_in_s") else None
        token, info = self.registry.identity.create_token(caller, request.name, expires_in_s)
        return pb.CreateTokenResponse(token=token, info=convert.token_info(info))

    @_read
    def ListTokens(self, request: pb.ListTokensRequest, caller: Caller) -> pb.ListTokensResponse:
        tokens = self.registry.identity.list_tokens(caller)
        return _listing(pb.ListTokensResponse, convert.token_info, tokens)

    @_audited
    def RevokeToken(self, request: pb.RevokeTokenRequest, caller: Caller) -> pb.RevokeTokenResponse:
        self.registry.identity.revoke_token(caller, request.name)
        return pb.RevokeTokenResponse()

    @_audited
    def CreateUser(self, request: pb.CreateUserRequest, caller: Caller) -> pb.User:
        user = self.registry.identity.create_user(
            caller, request.username, request.password, request.email, request.admin
        )
        return convert.user(user)

    @_read
    def ListUsers(self, request: pb.ListUsersRequest, caller: Caller) -> pb.ListUsersResponse:
        return pb.ListUsersResponse(
            users=[convert.user(u) for u in self.registry.identity.list_users(caller)]
        )

    @_audited
    def SetUserActive(self, request: pb.SetUserActiveRequest, caller: Caller) -> pb.User:
        return convert.user(self.registry.identity.set_user_active(caller, request.username, request.active))

    @_audited
    def AddWorkspaceMember(self, request: pb.AddWorkspaceMemberRequest, caller: Caller) -> pb.WorkspaceMember:
        added = self.registry.identity.set_member(caller, request.workspace, request.username, request.role)
        return convert.member(added)

    @_audited
    def RemoveWorkspaceMember(
        self, request: pb.RemoveWorkspaceMemberRequest, caller: Caller
    ) -> pb.RemoveWorkspaceMemberResponse:
        self.registry.identity.remove_member(caller, request.workspace, request.username)
        return pb.RemoveWorkspaceMemberResponse()

    @_read
    def ListWorkspaceMembers(
        self, request: pb.ListWorkspaceMembersRequest, caller: Caller
    ) -> pb.ListWorkspaceMembersResponse:
        members = self.registry.identity.members(caller, request.workspace)
        return _listing(pb.ListWorkspaceMembersResponse, convert.member, members)

    @_read
    def Authorize(self, request: pb.AuthorizeRequest, caller: Caller) -> pb.User:
        return convert.user(self.registry.identity.authorize(caller, request.workspace, request.action))

    @_read
    def QueryAudit(self, request: pb.QueryAuditRequest, caller: Caller) -> pb.QueryAuditResponse:
        entries = self.registry.identity.audit(caller, convert.audit_query(request))
        return _listing(pb.QueryAuditResponse, convert.audit_entry, entries)

    # --- catalog: artifacts, tags and search ---

    @_read
    def ListModelArtifacts(self, request: pb.ArtifactListRequest, caller: Caller) -> pb.ArtifactListResponse:
        version, files = self.registry.model_artifacts(
            caller, request.workspace, request.name, request.version
        )
        return pb.ArtifactListResponse(version=version, files=[f.to_proto() for f in files])

    @_audited
    def AddTag(self, request: pb.TagRequest, caller: Caller) -> pb.TagResponse:
        return self._tag(request, caller, add=True)

    @_audited
    def RemoveTag(self, request: pb.TagRequest, caller: Caller) -> pb.TagResponse:
        return self._tag(request, caller, add=False)

    def _tag(self, request: pb.TagRequest, caller: Caller, add: bool) -> pb.TagResponse:
        kind = request.WhichOneof("target") or ""
        name = getattr(request, kind) if kind else ""
        return pb.TagResponse(
            tags=self.registry.set_tag(caller, request.workspace, kind, name, request.tag, add)
        )

    @_read
    def SearchModels(self, request: pb.SearchModelsRequest, caller: Caller) -> pb.ListModelsResponse:
        models = self.registry.search_models(caller, request.workspace, convert.model_search(request))
        return _listing(pb.ListModelsResponse, convert.model, models)

    @_read
    def SearchPipelines(self, request: pb.SearchPipelinesRequest, caller: Caller) -> pb.ListPipelinesResponse:
        pipelines = self.registry.list_pipelines(caller, request.workspace, convert.pipeline_search(request))
        return _listing(pb.ListPipelinesResponse, convert.pipeline, pipelines)
