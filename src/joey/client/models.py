"""Model versions as the SDK hands them out: the registry's record of a version, with the verbs on
the files it carries and on its model's tags."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc

from joey.client import artifacts
from joey.client.calls import JoeyError, RegistryCaller
from joey.client.catalog import Listing
from joey.client.tags import set_tag
from joey_core import models
from joey_core.models import ArtifactFile, ModelConfig
from joey_core.v1 import registry_pb2 as pb

DOWNLOAD_TIMEOUT_S = 3600.0


@dataclass(frozen=True)
class ModelVersion(models.ModelVersion):
    """One uploaded version of a model (what ``upload_model``, ``get_model`` and searches return).

    ``description``, ``source`` and ``metadata`` are its lineage; ``artifact_count`` and
    ``artifact_bytes`` sum up the files it carries, which ``artifacts()`` lists and
    ``download_artifacts(dir)`` fetches. Tags belong to the model: every version reads and sets the
    same."""

    client: RegistryCaller | None = field(default=None, repr=False, compare=False)

    @classmethod
    def bound(cls, client: RegistryCaller, message: pb.ModelVersion) -> ModelVersion:
        return replace(cls.from_proto(message), client=client)

    def _client(self) -> RegistryCaller:
        if self.client is None:
            raise RuntimeError(
                "this ModelVersion was not made by a joey.Client; get it with client.get_model()"
            )
        return self.client

    def artifacts(self) -> Listing[ArtifactFile]:
        """The files this version carries, by name, with their sizes and sha256s (a table)."""
        request = pb.ArtifactListRequest(workspace=self.workspace, name=self.name, version=self.version)
        response = self._client().call("ListModelArtifacts", request)
        return Listing(ArtifactFile.from_proto(f) for f in response.files)

    def download_artifacts(self, directory: str | os.PathLike[str]) -> list[Path]:
        """Download every file of this version under ``directory``, keeping their relative paths; each is
        checked against its sha256 before it takes its name. Returns the paths written."""
        return artifacts.download(self.artifacts(), directory, self._fetch)

    def download_source(self, directory: str | os.PathLike[str]) -> Path:
        """Download the file a native model (sklearn, xgboost, lightgbm, pytorch) was uploaded as, checked
        against ``source_sha256``, to ``directory/<name>-v<version>.<framework>``; engines serve its ONNX
        form (``sha256``). Returns the path written."""
        if not self.source_sha256:
            raise ValueError(
                f"model {self.name!r} version {self.version} ({self.framework}) was not converted: its one "
                f"file is the model engines serve, sha256 {self.sha256}"
            )
        name = f"{self.name}-v{self.version}.{self.framework}"
        source = ArtifactFile(name, self.source_size_bytes, self.source_sha256)
        return artifacts.download([source], directory, self._fetch)[0]

    def _fetch(self, sha256: str) -> Iterator[bytes]:
        request = pb.DownloadArtifactRequest(workspace=self.workspace, sha256=sha256)
        stream = self._client().call("DownloadArtifact", request, timeout=DOWNLOAD_TIMEOUT_S)
        try:
            for chunk in stream:
                yield chunk.data
        except grpc.RpcError as exc:
            raise JoeyError(exc.code().name, exc.details()) from None  # type: ignore[attr-defined]

    def configure(
        self,
        batch_config: str | None = None,
        max_batch_delay_ms: int | None = None,
        batch_size_target: int | None = None,
    ) -> ModelVersion:
        """This version with its new config: see ``Client.configure_model``."""
        config = ModelConfig(batch_config, max_batch_delay_ms, batch_size_target)  # ValueError naming a field
        return configure(self._client(), self.workspace, self.name, self.version, config)

    def tags(self) -> tuple[str, ...]:
        """The model's tags now."""
        model = self._client().call("GetModel", pb.GetModelRequest(workspace=self.workspace, name=self.name))
        return tuple(model.tags)

    def add_tag(self, tag: str) -> tuple[str, ...]:
        """Tag the model (every version of it); adding a tag it has changes nothing. Returns its tags."""
        return set_tag(self._client(), self.workspace, "model", self.name, tag, add=True)

    def remove_tag(self, tag: str) -> tuple[str, ...]:
        """Untag the model; removing a tag it has not changes nothing. Returns its tags."""
        return set_tag(self._client(), self.workspace, "model", self.name, tag, add=False)


def configure(
    client: RegistryCaller, workspace: str, name: str, version: int, config: ModelConfig
) -> ModelVersion:
    """Set the config of version ``version`` of ``name`` (0: the latest)."""
    request = pb.ConfigureModelRequest(
        workspace=workspace, name=name, version=version, config=config.to_proto()
    )
    return ModelVersion.bound(client, client.call("ConfigureModel", request))
