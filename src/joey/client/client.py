"""The Python SDK. Verbs follow what Wallaroo users know::

client = joey.Client()  # the token of `joey login` / `joey up`, or JOEY_TOKEN; or Client.login(user, pw)
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

import weakref
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from joey.client.assays import AssayClientMixin
from joey.client.auth import Bearer
from joey.client.calls import call_rpc
from joey.client.catalog import (
    DeletedModel,
    DeletedPipeline,
    Listing,
    ModelDescription,
    ModelSummary,
    PipelineSummary,
)
from joey.client.connections import ConnectionClientMixin
from joey.client.identity import IdentityClientMixin
from joey.client.pipelines import Pipeline, PipelineDescription, load_pipeline
from joey.client.signatures import Schema, tensor_specs
from joey.client.streaming import Streams
from joey.client.workspaces import WorkspaceClientMixin
from joey_core import tls
from joey_core.models import ModelConfig, ModelVersion
from joey_core.settings import CommonSettings
from joey_core.v1 import registry_pb2 as pb
from joey_core.v1 import registry_pb2_grpc

UPLOAD_CHUNK_BYTES = 1 << 20


class Client(AssayClientMixin, ConnectionClientMixin, IdentityClientMixin, WorkspaceClientMixin):
    """Connection to a Joey registry, working in one workspace at a time.

    It calls with ``token``, else ``$JOEY_TOKEN``, else the token `joey login` (or `joey up`) stored
    for its registry in the credentials file (``$JOEY_CREDENTIALS``, default ``~/.config/joey/credentials``);
    :meth:`login` makes one with a password instead.

    ``pipeline.infer`` keeps one producer and one reply reader per pipeline open across calls (made on
    its first call), and remembers a deployed pipeline's status for ``status_cache_s`` seconds, so that a
    call costs about one trip through the pipeline. :meth:`close` (or leaving a ``with Client(...)``
    block, or the interpreter's exit) closes them; a closed client refuses to infer."""

    def __init__(
        self,
        registry_addr: str | None = None,
        workspace: str = "default",
        *,
        kafka_bootstrap: str | None = None,
        token: str | None = None,
        settings: CommonSettings | None = None,
        status_cache_s: float = 2.0,
    ) -> None:
        overrides = {"registry_addr": registry_addr, "kafka_bootstrap": kafka_bootstrap}
        base = settings or CommonSettings()
        self.settings = base.model_copy(update={k: v for k, v in overrides.items() if v})
        self.workspace = workspace
        self._token = token
        self._bearer: Bearer | None = None
        self.session_expires_at: datetime | None = None
        """When the session of :meth:`login` expires (None for a client given a token)."""
        self._channel = tls.channel(
            self.settings.registry_addr,
            self.settings,
            options=[("grpc.max_receive_message_length", 64 << 20)],
        )
        self._stub = registry_pb2_grpc.RegistryStub(self._channel)
        self.streams = Streams(self.settings, status_cache_s, self.settings.stream_idle_s)
        # At exit too (or when the client is collected): readers and producers stop, without hanging.
        self._close_streams = weakref.finalize(self, self.streams.close)

    @classmethod
    def login(
        cls,
        username: str,
        password: str,
        registry_addr: str | None = None,
        workspace: str = "default",
        *,
        expires_in_s: int | None = None,
        store: bool = False,
        kafka_bootstrap: str | None = None,
        settings: CommonSettings | None = None,
    ) -> Client:
        """A client logged in as ``username``: its session token expires after ``expires_in_s`` (default:
        the registry's session lifetime, 12 h) or at :meth:`logout`. The token is kept in the client
        only, unless ``store`` writes it to the credentials file for the registry (as `joey login` does),
        where every later ``joey.Client()`` and `joey` command finds it."""
        client = cls(registry_addr, workspace, kafka_bootstrap=kafka_bootstrap, settings=settings)
        client._log_in(username, password, expires_in_s, store)
        return client

    @property
    def bearer(self) -> Bearer:
        """The token every call carries, found on the first call (so that a client that never calls
        reads no credentials)."""
        if self._bearer is None:
            self._bearer = Bearer.resolve(self._token, self.settings.registry_addr)
        return self._bearer

    @bearer.setter
    def bearer(self, bearer: Bearer) -> None:
        self._bearer = bearer

    def call(self, name: str, request: Any, timeout: float = 60.0, *, anonymous: bool = False) -> Any:
        """Call registry RPC ``name``; ``anonymous`` sends no token (only Login needs none)."""
        self.streams.before_call(name, request)
        try:
            return self._call(getattr(self._stub, name), request, timeout, anonymous)
        finally:
            # Even a failed call (a deadline) may have changed the deployment.
            self.streams.after_call(name, request)

    def _call(self, fn: Callable[..., Any], request: Any, timeout: float, anonymous: bool = False) -> Any:
        if anonymous:
            return call_rpc(fn, request, timeout=timeout)
        bearer = self.bearer
        return call_rpc(fn, request, timeout=timeout, metadata=bearer.metadata, token_sent=bearer.sent)

    def close(self) -> None:
        """Close the pipelines' streams and the registry connection; closing again does nothing."""
        self._close_streams()
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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

        # Beyond the registry's defaults: 900 s to arrive (JOEY_UPLOAD_DEADLINE_S), 120 s to check.
        return ModelVersion.from_proto(self._call(self._stub.UploadModel, chunks(), timeout=1080))

    def configure_model(
        self,
        name: str,
        version: int | None = None,
        batch_config: str | None = None,
        max_batch_delay_ms: int | None = None,
        batch_size_target: int | None = None,
    ) -> ModelVersion:
        """Set how the engine runs a version of ``name`` (the latest by default), as Wallaroo's
        ``model.configure``: ``batch_config="single"`` runs the model on one record per call (None:
        batches); ``max_batch_delay_ms`` and ``batch_size_target`` lower the engine's batching for any
        pipeline using it (None: the engine's settings). Each call sets the whole config. It applies to
        pipeline versions created after it: the next ``pipeline.deploy()`` of the current steps."""
        config = ModelConfig(batch_config, max_batch_delay_ms, batch_size_target)  # ValueError naming a field
        request = pb.ConfigureModelRequest(
            workspace=self.workspace, name=name, version=version or 0, config=config.to_proto()
        )
        return ModelVersion.from_proto(self.call("ConfigureModel", request))

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
