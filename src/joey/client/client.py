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

import json
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, overload

from google.protobuf.timestamp_pb2 import Timestamp

from joey.client import artifacts as artifact_files
from joey.client.assays import AssayClientMixin
from joey.client.auth import Bearer
from joey.client.bridges import BridgeClientMixin
from joey.client.calls import JoeyError, call_rpc
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
from joey.client.models import ModelVersion, configure
from joey.client.orchestrations import OrchestrationClientMixin
from joey.client.pipelines import Pipeline, PipelineDescription, load_pipeline
from joey.client.signatures import Schema, sample_json, tensor_specs
from joey.client.streaming import Streams
from joey.client.workspaces import WorkspaceClientMixin
from joey_core import tls
from joey_core.models import CONVERTING, ERROR, ModelConfig
from joey_core.settings import CommonSettings
from joey_core.v1 import registry_pb2 as pb
from joey_core.v1 import registry_pb2_grpc

UPLOAD_CHUNK_BYTES = 1 << 20
# How often wait_for_model reads a converting version's state: a conversion takes seconds.
_CONVERSION_POLL_S = 0.5


class Client(
    AssayClientMixin,
    BridgeClientMixin,
    ConnectionClientMixin,
    IdentityClientMixin,
    OrchestrationClientMixin,
    WorkspaceClientMixin,
):
    """Connection to a Joey registry, working in one workspace at a time.

    It calls with ``token``, else ``$JOEY_TOKEN``, else the token `joey login` (or `joey up`) stored
    for its registry in the credentials file (``$JOEY_CREDENTIALS``, default ``~/.config/joey/credentials``);
    :meth:`login` makes one with a password instead. It starts in ``workspace``, else ``$JOEY_WORKSPACE``,
    else ``default`` (in a task's run: the task's token and workspace, from its environment).

    ``pipeline.infer`` keeps one producer and one reply reader per pipeline open across calls (made on
    its first call), and remembers a deployed pipeline's status for ``status_cache_s`` seconds, so that a
    call costs about one trip through the pipeline. :meth:`close` (or leaving a ``with Client(...)``
    block, or the interpreter's exit) closes them; a closed client refuses to infer."""

    def __init__(
        self,
        registry_addr: str | None = None,
        workspace: str | None = None,
        *,
        kafka_bootstrap: str | None = None,
        token: str | None = None,
        settings: CommonSettings | None = None,
        status_cache_s: float = 2.0,
    ) -> None:
        overrides = {"registry_addr": registry_addr, "kafka_bootstrap": kafka_bootstrap}
        base = settings or CommonSettings()
        self.settings = base.model_copy(update={k: v for k, v in overrides.items() if v})
        self.workspace = workspace or self.settings.workspace
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
        workspace: str | None = None,
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
        *,
        artifacts: artifact_files.ArtifactPaths | None = None,
        description: str | None = None,
        source: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        sample_input: Any = None,
        wait: bool = True,
        timeout_s: float = 900.0,
    ) -> ModelVersion:
        """Upload a model file as a new version of ``name``; it is validated by loading it.

        A python step (``framework="python"``, a ``.py`` file defining ``process_data``) needs its
        ``input_schema`` and ``output_schema``: a ``pyarrow.Schema`` or see :mod:`joey.client.signatures`.

        ``artifacts`` are extra files the version carries (notebooks, training samples, pre- and
        post-processing code, test results): a directory (its files, named relative to it) or a list of
        files and directories. They are stored with the version, or the upload fails and nothing is.
        ``description``, ``source`` (a training run id, a git commit) and ``metadata`` (a JSON object)
        are its lineage. ``progress(sent, total)`` counts the model's and the artifacts' bytes.

        A native model (``framework`` "sklearn", "xgboost", "lightgbm" or "pytorch", saved the
        framework's way: docs/models.md) is converted to ONNX by the registry and verified against the
        native library, on generated inputs and on ``sample_input`` (an array of rows of the one input,
        or ``{input name: rows}``) if given. Its inputs default to one float tensor ``input``; a PyTorch
        model needs ``input_schema``. The version is ``converting`` until then: with ``wait`` (the
        default) this returns it ``ready``, or raises :class:`joey.JoeyError` with the conversion's
        error; ``wait=False`` returns at once (see :meth:`wait_for_model`).
        """
        path = Path(path)
        files = artifact_files.collect(artifacts) if artifacts is not None else []
        described = artifact_files.manifest(files)
        total = path.stat().st_size + sum(f.size_bytes for f in described)
        try:
            metadata_json = json.dumps(dict(metadata)) if metadata is not None else ""
        except (TypeError, ValueError) as exc:
            raise ValueError(f"metadata must be a JSON object: {exc}") from None
        header = pb.UploadModelHeader(
            workspace=self.workspace,
            name=name,
            framework=framework,
            inputs=tensor_specs(input_schema) if input_schema is not None else [],
            outputs=tensor_specs(output_schema) if output_schema is not None else [],
            sample_input_json=sample_json(sample_input) if sample_input is not None else "",
            description=description or "",
            source=source or "",
            metadata_json=metadata_json,
            artifacts=[f.to_proto() for f in described],
        )

        def chunks() -> Iterator[pb.UploadModelRequest]:
            yield pb.UploadModelRequest(header=header)
            sent = 0
            with path.open("rb") as f:
                model_blocks = iter(lambda: f.read(UPLOAD_CHUNK_BYTES), b"")
                for part, blocks in (
                    ("chunk", model_blocks),
                    ("artifact_chunk", artifact_files.blocks(files)),
                ):
                    for block in blocks:
                        sent += len(block)
                        yield pb.UploadModelRequest(**{part: block})  # type: ignore[arg-type]
                        if progress:
                            progress(sent, total)

        # Beyond the registry's defaults: 900 s to arrive (JOEY_UPLOAD_DEADLINE_S), 120 s to check.
        uploaded = ModelVersion.bound(self, self._call(self._stub.UploadModel, chunks(), timeout=1080))
        return self.wait_for_model(uploaded, timeout_s) if wait else uploaded

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
        pipeline using it (None: the engine's settings; a value above the engine's JOEY_MAX_BATCH_DELAY_MS
        or JOEY_MAX_BATCH_SIZE changes nothing: one batch runs through every step). Each call sets the
        whole config. It applies to pipeline versions created after it: the next ``pipeline.deploy()`` of
        the current steps."""
        config = ModelConfig(batch_config, max_batch_delay_ms, batch_size_target)  # ValueError naming a field
        return configure(self, self.workspace, name, version or 0, config)

    def wait_for_model(
        self,
        version: ModelVersion,
        timeout_s: float = 900.0,
        on_poll: Callable[[ModelVersion], None] | None = None,
    ) -> ModelVersion:
        """``version`` once it is no longer converting: ready, or :class:`joey.JoeyError`
        (FAILED_PRECONDITION) with the conversion's error and log. ``on_poll`` sees each state read."""
        deadline = time.monotonic() + timeout_s
        current = version
        while current.status == CONVERTING:
            if on_poll:
                on_poll(current)
            if time.monotonic() > deadline:
                raise JoeyError(
                    "DEADLINE_EXCEEDED",
                    f"model {current.name!r} version {current.version} is still converting after "
                    f"{timeout_s:g} s",
                )
            time.sleep(_CONVERSION_POLL_S)
            current = self.get_model(current.name, current.version)
        if current.status == ERROR:
            raise JoeyError(
                "FAILED_PRECONDITION",
                f"model {current.name!r} version {current.version} ({current.framework}) did not convert: "
                f"{current.conversion_log.splitlines()[-1] if current.conversion_log else 'no log'}\n"
                f"conversion log:\n{current.conversion_log}",
            )
        return current

    def get_model(self, name: str, version: int | None = None) -> ModelVersion:
        request = pb.GetModelVersionRequest(workspace=self.workspace, name=name, version=version or 0)
        return ModelVersion.bound(self, self.call("GetModelVersion", request))

    def model_versions(self, name: str | ModelSummary) -> Listing[ModelVersion]:
        """Every version of ``name``, oldest first, as a table (``.to_frame()`` for a DataFrame)."""
        model = self.call("GetModel", pb.GetModelRequest(workspace=self.workspace, name=str(name)))
        return Listing(ModelVersion.bound(self, v) for v in model.versions)

    def _version(self, message: pb.ModelVersion) -> ModelVersion:
        return ModelVersion.bound(self, message)

    @overload
    def list_models(
        self, all_versions: Literal[False] = False, *, tag: str | None = None, framework: str | None = None
    ) -> Listing[ModelSummary]: ...

    @overload
    def list_models(
        self, all_versions: Literal[True], *, tag: str | None = None, framework: str | None = None
    ) -> Listing[ModelVersion]: ...

    def list_models(
        self, all_versions: bool = False, *, tag: str | None = None, framework: str | None = None
    ) -> Listing[ModelSummary] | Listing[ModelVersion]:
        """Every model of the workspace with its versions; each item reads as its latest version
        (``m.version``, ``m.framework``, ``m.inputs``...), the listing prints as a table. A model
        whose versions were all deleted one by one is listed with none. With ``all_versions``, every
        version instead, one row each. ``tag`` and ``framework`` keep the models with that tag and the
        versions of that framework (as :meth:`search_models`)."""
        if tag or framework:
            models = self._search_models(pb.SearchModelsRequest(tag=tag or "", framework=framework or ""))
        else:
            models = self.call("ListModels", pb.ListModelsRequest(workspace=self.workspace)).models
        if all_versions:
            return Listing(self._version(v) for m in models for v in m.versions)
        return Listing(ModelSummary.from_proto(m, self._version) for m in models)

    def search_models(
        self,
        search_term: str | None = None,
        tag: str | None = None,
        framework: str | None = None,
        uploaded_after: datetime | None = None,
    ) -> Listing[ModelVersion]:
        """Every model version matching all the filters given, by model name and version: ``search_term``
        in the model's name or the version's description (any case), models tagged ``tag``, versions of
        ``framework`` or uploaded after ``uploaded_after`` (a naive datetime is UTC)."""
        request = pb.SearchModelsRequest(
            search_term=search_term or "", tag=tag or "", framework=framework or ""
        )
        if uploaded_after is not None:
            after = uploaded_after if uploaded_after.tzinfo else uploaded_after.replace(tzinfo=UTC)
            stamp = Timestamp()
            stamp.FromDatetime(after.astimezone(UTC))
            request.uploaded_after.CopyFrom(stamp)
        return Listing(self._version(v) for m in self._search_models(request) for v in m.versions)

    def _search_models(self, request: pb.SearchModelsRequest) -> Any:
        request.workspace = self.workspace
        return self.call("SearchModels", request).models

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

    def list_pipelines(self, tag: str | None = None) -> Listing[PipelineSummary]:
        """Every pipeline of the workspace (with ``tag``: those tagged so): latest version, deployed or
        not, replicas, status, tags and when it last changed. Prints as a table; ``str(p)`` / ``p.name``
        is the name, ``"name" in listing`` works, ``client.get_pipeline(p.name)`` gives the pipeline."""
        if tag:
            return self.search_pipelines(tag=tag)
        response = self.call("ListPipelines", pb.ListPipelinesRequest(workspace=self.workspace))
        return Listing(PipelineSummary.from_proto(p) for p in response.pipelines)

    def search_pipelines(
        self, search_term: str | None = None, tag: str | None = None
    ) -> Listing[PipelineSummary]:
        """The pipelines whose name holds ``search_term`` (any case) and that are tagged ``tag``, as
        :meth:`list_pipelines` lists them."""
        request = pb.SearchPipelinesRequest(
            workspace=self.workspace, search_term=search_term or "", tag=tag or ""
        )
        return Listing(PipelineSummary.from_proto(p) for p in self.call("SearchPipelines", request).pipelines)

    def describe_pipeline(self, name: str | PipelineSummary) -> PipelineDescription:
        """Versions and steps, deployment and status, topics and assays of pipeline ``name``."""
        return Pipeline(self, str(name)).describe()

    def delete_pipeline(self, name: str | PipelineSummary) -> DeletedPipeline:
        """Delete an undeployed pipeline with its versions and logged inferences (see ``Pipeline.delete``)."""
        return Pipeline(self, str(name)).delete()
