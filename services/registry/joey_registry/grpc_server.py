"""The gRPC transport: resolve the caller, convert messages, map registry errors to status codes."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from typing import Any, NoReturn, TypeVar

import grpc

from joey_core.v1 import registry_pb2 as pb
from joey_core.v1 import registry_pb2_grpc
from joey_registry import assay_convert, convert, errors
from joey_registry.access import Caller, caller_from_metadata
from joey_registry.service import Registry

log = logging.getLogger(__name__)

_CODES: dict[type[errors.RegistryError], grpc.StatusCode] = {
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
}

Request = TypeVar("Request")
Response = TypeVar("Response")


def _abort(context: grpc.ServicerContext, rpc: str, exc: Exception) -> NoReturn:
    if isinstance(exc, errors.RegistryError):
        code = _CODES.get(type(exc), grpc.StatusCode.UNKNOWN)
        log.info("%s: %s %s", rpc, code.name, exc)
        context.abort(code, str(exc))
    else:
        # The detail stays in the log: an unexpected error's text may quote anything, a connection string too.
        log.exception("%s failed", rpc)
        context.abort(grpc.StatusCode.INTERNAL, f"internal error in {rpc}; see the registry log")
    raise AssertionError("context.abort returned")


def _unary(
    method: Callable[[Any, Request, Caller], Response],
) -> Callable[[Any, Request, grpc.ServicerContext], Response]:
    @functools.wraps(method)
    def handler(self: Any, request: Request, context: grpc.ServicerContext) -> Response:
        try:
            return method(self, request, caller_from_metadata(context.invocation_metadata()))
        except Exception as exc:
            _abort(context, method.__name__, exc)

    return handler


def _streaming(
    method: Callable[[Any, Request, Caller], Iterator[Response]],
) -> Callable[[Any, Request, grpc.ServicerContext], Iterator[Response]]:
    @functools.wraps(method)
    def handler(self: Any, request: Request, context: grpc.ServicerContext) -> Iterator[Response]:
        try:
            yield from method(self, request, caller_from_metadata(context.invocation_metadata()))
        except Exception as exc:
            _abort(context, method.__name__, exc)

    return handler


def _upload_parts(requests: Iterator[pb.UploadModelRequest]) -> tuple[pb.UploadModelHeader, Iterator[bytes]]:
    first = next(requests, None)
    if first is None or first.WhichOneof("part") != "header":
        raise errors.InvalidArgument(
            "the first UploadModel message must be the header (workspace, name, framework)"
        )

    def chunks() -> Iterator[bytes]:
        for message in requests:
            if message.WhichOneof("part") == "header":
                raise errors.InvalidArgument("UploadModel got a second header; send one header, then chunks")
            yield message.chunk

    return first.header, chunks()


class RegistryServicer(registry_pb2_grpc.RegistryServicer):
    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    @_unary
    def CreateWorkspace(self, request: pb.CreateWorkspaceRequest, caller: Caller) -> pb.Workspace:
        return convert.workspace(self.registry.create_workspace(caller, request.name))

    @_unary
    def ListWorkspaces(self, request: pb.ListWorkspacesRequest, caller: Caller) -> pb.ListWorkspacesResponse:
        return pb.ListWorkspacesResponse(
            workspaces=[convert.workspace(w) for w in self.registry.list_workspaces(caller)]
        )

    @_unary
    def UploadModel(self, request: Iterator[pb.UploadModelRequest], caller: Caller) -> pb.ModelVersion:
        header, chunks = _upload_parts(request)
        return self.registry.upload_model(caller, convert.upload_header(header), chunks).to_proto()

    @_unary
    def ListModels(self, request: pb.ListModelsRequest, caller: Caller) -> pb.ListModelsResponse:
        models = self.registry.list_models(caller, request.workspace)
        return pb.ListModelsResponse(models=[convert.model(m) for m in models])

    @_unary
    def GetModel(self, request: pb.GetModelRequest, caller: Caller) -> pb.Model:
        return convert.model(self.registry.get_model(caller, request.workspace, request.name))

    @_unary
    def GetModelVersion(self, request: pb.GetModelVersionRequest, caller: Caller) -> pb.ModelVersion:
        version = self.registry.get_model_version(caller, request.workspace, request.name, request.version)
        return version.to_proto()

    @_streaming
    def DownloadArtifact(
        self, request: pb.DownloadArtifactRequest, caller: Caller
    ) -> Iterator[pb.ArtifactChunk]:
        for data in self.registry.artifact_chunks(caller, request.workspace, request.sha256):
            yield pb.ArtifactChunk(data=data)

    @_unary
    def CreatePipeline(self, request: pb.CreatePipelineRequest, caller: Caller) -> pb.PipelineVersion:
        steps = convert.step_requests(list(request.steps))
        version = self.registry.create_pipeline(caller, request.workspace, request.name, steps)
        return convert.pipeline_version(version)

    @_unary
    def GetPipeline(self, request: pb.GetPipelineRequest, caller: Caller) -> pb.Pipeline:
        return convert.pipeline(self.registry.get_pipeline(caller, request.workspace, request.name))

    @_unary
    def ListPipelines(self, request: pb.ListPipelinesRequest, caller: Caller) -> pb.ListPipelinesResponse:
        pipelines = self.registry.list_pipelines(caller, request.workspace)
        return pb.ListPipelinesResponse(pipelines=[convert.pipeline(p) for p in pipelines])

    @_unary
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

    @_unary
    def Rollback(self, request: pb.RollbackRequest, caller: Caller) -> pb.Deployment:
        deployment = self.registry.rollback(
            caller, request.workspace, request.pipeline, request.pipeline_version
        )
        return convert.deployment(deployment)

    @_unary
    def Undeploy(self, request: pb.UndeployRequest, caller: Caller) -> pb.Deployment:
        return convert.deployment(self.registry.undeploy(caller, request.workspace, request.pipeline))

    @_unary
    def GetDeploymentStatus(
        self, request: pb.GetDeploymentStatusRequest, caller: Caller
    ) -> pb.DeploymentStatus:
        status = self.registry.deployment_status(caller, request.workspace, request.pipeline)
        return convert.deployment_status(status)

    @_unary
    def QueryLogs(self, request: pb.QueryLogsRequest, caller: Caller) -> pb.QueryLogsResponse:
        return convert.log_page(self.registry.query_logs(caller, convert.log_query(request)))

    # --- assays ---

    @_unary
    def CreateAssay(self, request: pb.CreateAssayRequest, caller: Caller) -> pb.Assay:
        stored = self.registry.assays.create(caller, assay_convert.definition(request.definition))
        return assay_convert.assay(stored)

    @_unary
    def ListAssays(self, request: pb.ListAssaysRequest, caller: Caller) -> pb.ListAssaysResponse:
        assays = self.registry.assays.list_all(caller, request.workspace, request.pipeline)
        return pb.ListAssaysResponse(assays=[assay_convert.assay(a) for a in assays])

    @_unary
    def GetAssay(self, request: pb.GetAssayRequest, caller: Caller) -> pb.Assay:
        return assay_convert.assay(self.registry.assays.get(caller, request.workspace, request.name))

    @_unary
    def SetAssayActive(self, request: pb.SetAssayActiveRequest, caller: Caller) -> pb.Assay:
        stored = self.registry.assays.set_active(caller, request.workspace, request.name, request.active)
        return assay_convert.assay(stored)

    @_unary
    def DeleteAssay(self, request: pb.DeleteAssayRequest, caller: Caller) -> pb.DeleteAssayResponse:
        self.registry.assays.delete(caller, request.workspace, request.name)
        return pb.DeleteAssayResponse()

    @_unary
    def PreviewBaseline(self, request: pb.PreviewBaselineRequest, caller: Caller) -> pb.AssaySummary:
        summary = self.registry.assays.preview_baseline(caller, assay_convert.definition(request.definition))
        return assay_convert.summary(summary)

    @_unary
    def RunAssayInteractive(self, request: pb.RunAssayInteractiveRequest, caller: Caller) -> pb.AssayResults:
        end = convert.optional_datetime(request, "end")  # type: ignore[arg-type]
        definition = assay_convert.definition(request.definition)
        results, cut = self.registry.assays.run_interactive(caller, definition, end)
        return assay_convert.results(results, definition, cut=cut)

    @_unary
    def GetAssayResults(self, request: pb.GetAssayResultsRequest, caller: Caller) -> pb.AssayResults:
        start = convert.optional_datetime(request, "start")  # type: ignore[arg-type]
        end = convert.optional_datetime(request, "end")  # type: ignore[arg-type]
        definition, results = self.registry.assays.results(
            caller, request.workspace, request.name, start, end
        )
        return assay_convert.results(results, definition)

    # --- catalog: descriptions and deletes ---

    @_unary
    def DescribeModel(self, request: pb.DescribeModelRequest, caller: Caller) -> pb.ModelDescription:
        return convert.model_description(
            self.registry.describe_model(caller, request.workspace, request.name)
        )

    @_unary
    def DeleteModel(self, request: pb.DeleteModelRequest, caller: Caller) -> pb.DeleteModelResponse:
        deleted = self.registry.delete_model(
            caller, request.workspace, request.name, request.version, request.all_versions
        )
        return pb.DeleteModelResponse(versions=deleted.versions, model_deleted=deleted.model_deleted)

    @_unary
    def DeletePipeline(self, request: pb.DeletePipelineRequest, caller: Caller) -> pb.DeletePipelineResponse:
        deleted = self.registry.delete_pipeline(caller, request.workspace, request.name)
        return pb.DeletePipelineResponse(version_count=deleted.versions, log_entries=deleted.log_entries)

    @_unary
    def DeleteWorkspace(
        self, request: pb.DeleteWorkspaceRequest, caller: Caller
    ) -> pb.DeleteWorkspaceResponse:
        self.registry.delete_workspace(caller, request.name)
        return pb.DeleteWorkspaceResponse()
