"""The Python SDK. Verbs follow what Wallaroo users know::

client = joey.Client()
model = client.upload_model("iris", "iris.onnx")
pipeline = client.build_pipeline("iris-pipeline").add_model_step(model)
pipeline.add_validations(too_sure="out.probabilities[0] > 0.99")
pipeline.add_shadow_deploy("iris-b", ["iris-c"])  # iris-c sees every record; iris-b answers
# or A/B: pipeline.add_random_split([(2, "iris"), (1, "iris-b")], hash_key="user_id")
pipeline.deploy(replicas=2)
results = pipeline.infer([{"features": [5.1, 3.5, 1.4, 0.2]}])
pipeline.logs(limit=10)
pipeline.logs(anomalies_only=True)  # records where a validation check was true
pipeline.export_logs("exports/")  # every logged inference, as Parquet files
pipeline.undeploy()
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from joey.client.assays import AssayClientMixin
from joey.client.calls import call_rpc
from joey.client.catalog import (
    DeletedModel,
    DeletedPipeline,
    Listing,
    ModelDescription,
    ModelSummary,
    PipelineSummary,
)
from joey.client.pipelines import Pipeline, PipelineDescription, load_pipeline
from joey.client.signatures import Schema, tensor_specs
from joey_core import tls
from joey_core.models import ModelVersion
from joey_core.settings import CommonSettings
from joey_core.v1 import registry_pb2 as pb
from joey_core.v1 import registry_pb2_grpc

UPLOAD_CHUNK_BYTES = 1 << 20


class Client(AssayClientMixin):
    """Connection to a Joey registry, working in one workspace at a time."""

    def __init__(
        self,
        registry_addr: str | None = None,
        workspace: str = "default",
        *,
        kafka_bootstrap: str | None = None,
        token: str | None = None,
        settings: CommonSettings | None = None,
    ) -> None:
        overrides = {"registry_addr": registry_addr, "kafka_bootstrap": kafka_bootstrap}
        base = settings or CommonSettings()
        self.settings = base.model_copy(update={k: v for k, v in overrides.items() if v})
        self.workspace = workspace
        token = token or os.environ.get("JOEY_TOKEN")
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._channel = tls.channel(
            self.settings.registry_addr,
            self.settings,
            options=[("grpc.max_receive_message_length", 64 << 20)],
        )
        self._stub = registry_pb2_grpc.RegistryStub(self._channel)

    def call(self, name: str, request: Any, timeout: float = 60.0) -> Any:
        return call_rpc(getattr(self._stub, name), request, timeout=timeout, metadata=self._metadata)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Workspaces
    def create_workspace(self, name: str) -> str:
        return str(self.call("CreateWorkspace", pb.CreateWorkspaceRequest(name=name)).name)

    def list_workspaces(self) -> list[str]:
        return [w.name for w in self.call("ListWorkspaces", pb.ListWorkspacesRequest()).workspaces]

    def set_current_workspace(self, name: str) -> None:
        self.workspace = name

    def delete_workspace(self, name: str) -> None:
        """Delete an empty workspace; refused while it holds models, pipelines or assays, and for
        ``default``. Its contents are never deleted along with it: delete each first."""
        self.call("DeleteWorkspace", pb.DeleteWorkspaceRequest(name=name))

    # Models
    def upload_model(
        self,
        name: str,
        path: str | Path,
        framework: str = "onnx",
        progress: Callable[[int, int], None] | None = None,
        input_schema: Schema | None = None,
        output_schema: Schema | None = None,
    ) -> ModelVersion:
        """Upload a model file as a new version of ``name``; it is validated by loading it.

        A python step (``framework="python"``, a ``.py`` file defining ``process_data``) needs its
        ``input_schema`` and ``output_schema``: a ``pyarrow.Schema`` or see :mod:`joey.client.signatures`.
        """
        path = Path(path)
        total = path.stat().st_size
        header = pb.UploadModelHeader(
            workspace=self.workspace,
            name=name,
            framework=framework,
            inputs=tensor_specs(input_schema) if input_schema is not None else [],
            outputs=tensor_specs(output_schema) if output_schema is not None else [],
        )

        def chunks() -> Iterator[pb.UploadModelRequest]:
            yield pb.UploadModelRequest(header=header)
            sent = 0
            with path.open("rb") as f:
                while block := f.read(UPLOAD_CHUNK_BYTES):
                    sent += len(block)
                    yield pb.UploadModelRequest(chunk=block)
                    if progress:
                        progress(sent, total)

        return ModelVersion.from_proto(
            call_rpc(self._stub.UploadModel, chunks(), timeout=600, metadata=self._metadata)
        )

    def get_model(self, name: str, version: int | None = None) -> ModelVersion:
        request = pb.GetModelVersionRequest(workspace=self.workspace, name=name, version=version or 0)
        return ModelVersion.from_proto(self.call("GetModelVersion", request))

    def model_versions(self, name: str | ModelSummary) -> Listing[ModelVersion]:
        """Every version of ``name``, oldest first, as a table (``.to_frame()`` for a DataFrame)."""
        model = self.call("GetModel", pb.GetModelRequest(workspace=self.workspace, name=str(name)))
        return Listing(ModelVersion.from_proto(v) for v in model.versions)

    def list_models(self) -> Listing[ModelSummary]:
        """Every model of the workspace with its versions; each item reads as its latest version
        (``m.version``, ``m.framework``, ``m.inputs``...), the listing prints as a table. A model
        whose versions were all deleted one by one is listed with none."""
        response = self.call("ListModels", pb.ListModelsRequest(workspace=self.workspace))
        return Listing(ModelSummary.from_proto(m) for m in response.models)

    def describe_model(self, name: str | ModelSummary) -> ModelDescription:
        """Every version of ``name`` with its signature, and the pipeline versions using each."""
        request = pb.DescribeModelRequest(workspace=self.workspace, name=str(name))
        return ModelDescription.from_proto(self.call("DescribeModel", request))

    def delete_model(self, name: str | ModelSummary, version: int | None = None) -> DeletedModel:
        """Delete ``version`` of ``name`` (the model stays, and its numbering goes on), or without a
        version every version and the model. Refused while the current version of a deployed pipeline
        uses a version to delete (the error names the pipeline). A deleted version's number is never
        given to a later upload of the model."""
        request = pb.DeleteModelRequest(workspace=self.workspace, name=str(name))
        if version is None:
            request.all_versions = True
        else:
            request.version = version
        response = self.call("DeleteModel", request)
        return DeletedModel(str(name), tuple(response.versions), response.model_deleted)

    # Pipelines
    def build_pipeline(self, name: str) -> Pipeline:
        """A pipeline builder; nothing is stored until ``create()`` or ``deploy()``."""
        return Pipeline(self, name)

    def get_pipeline(self, name: str | PipelineSummary) -> Pipeline:
        """Stored pipeline ``name`` (or an item of ``list_pipelines()``) with its latest version's steps."""
        response = self.call("GetPipeline", pb.GetPipelineRequest(workspace=self.workspace, name=str(name)))
        return load_pipeline(self, response)

    def list_pipelines(self) -> Listing[PipelineSummary]:
        """Every pipeline of the workspace: latest version, deployed or not, replicas, status and when it
        last changed. Prints as a table; ``str(p)`` / ``p.name`` is the name, ``"name" in listing`` works,
        ``client.get_pipeline(p.name)`` gives the pipeline itself."""
        response = self.call("ListPipelines", pb.ListPipelinesRequest(workspace=self.workspace))
        return Listing(PipelineSummary.from_proto(p) for p in response.pipelines)

    def describe_pipeline(self, name: str | PipelineSummary) -> PipelineDescription:
        """Versions and steps, deployment and status, topics and assays of pipeline ``name``."""
        return Pipeline(self, str(name)).describe()

    def delete_pipeline(self, name: str | PipelineSummary) -> DeletedPipeline:
        """Delete an undeployed pipeline with its versions and logged inferences (see ``Pipeline.delete``)."""
        return Pipeline(self, str(name)).delete()
