"""A model version's extra files and lineage, tags on models and pipelines, and searches: over gRPC
against the in-process registry."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator

import grpc
import psycopg

from joey_core.v1 import registry_pb2 as pb
from joey_registry.app import RegistryServer
from joey_registry.settings import RegistrySettings
from tests.conftest import SERVICE_TOKEN
from tests.registry.helpers import Person, Stub, identity_model, rpc_error, step, token_stub, upload

MODEL = identity_model("x", "float32", "y")
FILES = {"train.ipynb": b'{"cells": []}', "data/sample.csv": b"a,b\n1,2\n" * 100, "empty.txt": b""}


def manifest(files: dict[str, bytes]) -> list[pb.ArtifactFile]:
    return [
        pb.ArtifactFile(name=name, size_bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
        for name, data in files.items()
    ]


def requests(
    workspace: str,
    name: str,
    declared: list[pb.ArtifactFile],
    payload: bytes,
    chunk: int = 7,
    **lineage: str,
) -> Iterator[pb.UploadModelRequest]:
    """The header with ``declared`` files, the model, then ``payload`` as artifact bytes, in chunks
    that straddle the files' boundaries."""
    header = pb.UploadModelHeader(workspace=workspace, name=name, artifacts=declared, **lineage)  # type: ignore[arg-type]
    yield pb.UploadModelRequest(header=header)
    yield pb.UploadModelRequest(chunk=MODEL)
    for start in range(0, len(payload), chunk):
        yield pb.UploadModelRequest(artifact_chunk=payload[start : start + chunk])


def stored_files(server: RegistryServer) -> set[str]:
    return {p.name for p in server.settings.artifact_dir.rglob("*") if p.is_file()}


def download(stub: Stub, workspace: str, sha256: str) -> bytes:
    request = pb.DownloadArtifactRequest(workspace=workspace, sha256=sha256)
    return b"".join(c.data for c in stub.DownloadArtifact(request))


def test_files_and_lineage_travel_with_the_version(
    stub: Stub, workspace: str, registry_server: RegistryServer, channel: grpc.Channel
) -> None:
    metadata = {"accuracy": 0.97, "params": {"depth": 3}}
    stored = stub.UploadModel(
        requests(
            workspace,
            "m",
            manifest(FILES),
            b"".join(FILES.values()),
            description="Fraud scorer, trained on Q3",
            source="git:4f2a9c1",
            metadata_json=json.dumps(metadata),
        )
    )
    assert (stored.artifact_count, stored.artifact_bytes) == (3, sum(map(len, FILES.values())))
    got = stub.GetModelVersion(pb.GetModelVersionRequest(workspace=workspace, name="m"))
    assert (got.description, got.source, json.loads(got.metadata_json)) == (
        "Fraud scorer, trained on Q3",
        "git:4f2a9c1",
        metadata,
    )
    listed = stub.ListModelArtifacts(pb.ArtifactListRequest(workspace=workspace, name="m"))
    assert listed.version == 1
    assert [(f.name, f.size_bytes) for f in listed.files] == sorted((n, len(d)) for n, d in FILES.items())
    for f in listed.files:
        assert download(stub, workspace, f.sha256) == FILES[f.name]
        assert f.sha256 in stored_files(registry_server)
    # Engines fetch what they run: the service token gets the model, not the files that travel with it.
    service = token_stub(channel, SERVICE_TOKEN)
    assert download(service, workspace, stored.sha256) == MODEL
    refused = rpc_error(lambda: download(service, workspace, listed.files[0].sha256))
    assert refused.code() == grpc.StatusCode.NOT_FOUND

    # A version without files lists none; deleting the one with them removes its files from the store.
    upload(stub, workspace, "m", MODEL)
    assert not stub.ListModelArtifacts(pb.ArtifactListRequest(workspace=workspace, name="m")).files
    missing = rpc_error(
        lambda: stub.ListModelArtifacts(pb.ArtifactListRequest(workspace=workspace, name="m", version=9))
    )
    assert (missing.code(), missing.details()) == (
        grpc.StatusCode.NOT_FOUND,
        f"model 'm' has no version 9 in workspace {workspace!r} (latest is 2)",
    )
    stub.DeleteModel(pb.DeleteModelRequest(workspace=workspace, name="m", version=1))
    assert not {f.sha256 for f in listed.files} & stored_files(registry_server)
    assert stored.sha256 in stored_files(registry_server)  # version 2 has the same model bytes


BAD_UPLOADS: dict[str, tuple[Callable[[str], Iterator[pb.UploadModelRequest]], str]] = {
    "traversal": (
        lambda ws: requests(ws, "bad", manifest({"../escape.py": b"x"}), b"x"),
        "artifact name '../escape.py' refused: it has an empty, '.' or '..' part ('..')",
    ),
    "absolute": (
        lambda ws: requests(ws, "bad", manifest({"/etc/cron.d/x": b"x"}), b"x"),
        "artifact name '/etc/cron.d/x' refused: it is an absolute path",
    ),
    "windows path": (
        lambda ws: requests(ws, "bad", manifest({"..\\x": b"x"}), b"x"),
        "artifact name '..\\\\x' refused: it holds a backslash or a colon",
    ),
    "file and directory": (
        lambda ws: requests(ws, "bad", manifest({"a": b"1", "a/b": b"2"}), b"12"),
        "artifact 'a' is both a file and the directory of 'a/b'",
    ),
    "too many": (
        lambda ws: requests(ws, "bad", manifest({f"f{i}": b"" for i in range(1001)}), b""),
        "1001 artifact files; a model version carries at most 1000 (JOEY_MAX_ARTIFACTS)",
    ),
    # Declared, never sent: refused before any byte is read.
    "too large": (
        lambda ws: requests(
            ws, "bad", [pb.ArtifactFile(name="big.parquet", size_bytes=3 << 30, sha256="0" * 64)], b""
        ),
        f"the artifact files hold {3 << 30} bytes; a model version carries at most {2 << 30}",
    ),
    "corrupted": (
        lambda ws: requests(ws, "bad", manifest({"a.txt": b"hello"}), b"HELLO"),
        "artifact 'a.txt' arrived with sha256",
    ),
    "short": (
        lambda ws: requests(ws, "bad", manifest({"a.txt": b"hello"}), b"hel"),
        "the upload ended 3 bytes into artifact 'a.txt', which declares 5",
    ),
    "long": (
        lambda ws: requests(ws, "bad", manifest({"a.txt": b"hello"}), b"hello!"),
        "the upload sent more artifact bytes than its files declare",
    ),
    "metadata not an object": (
        lambda ws: requests(ws, "bad", [], b"", metadata_json="[1, 2]"),
        "metadata must be a JSON object, got list",
    ),
    "metadata too large": (
        lambda ws: requests(ws, "bad", [], b"", metadata_json=json.dumps({"x": "y" * 70_000})),
        f"metadata is {len(json.dumps({'x': 'y' * 70_000}))} bytes of JSON; at most 65536 are kept",
    ),
}


def test_refused_uploads_store_nothing(
    stub: Stub, workspace: str, registry_server: RegistryServer, db: psycopg.Connection
) -> None:
    before = stored_files(registry_server)
    for case, (make, message) in BAD_UPLOADS.items():
        error = rpc_error(lambda make=make: stub.UploadModel(make(workspace)))  # type: ignore[misc]
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, case
        assert error.details().startswith(message), (case, error.details())
    assert stored_files(registry_server) == before
    rows = db.execute(
        "SELECT count(*) FROM models m JOIN workspaces w ON w.id = m.workspace_id WHERE w.name = %s",
        (workspace,),
    ).fetchone()
    assert rows == (0,)


def tag(stub: Stub, workspace: str, tag: str, remove: bool = False, **target: str) -> list[str]:
    request = pb.TagRequest(workspace=workspace, tag=tag, **target)  # type: ignore[arg-type]
    return list((stub.RemoveTag if remove else stub.AddTag)(request).tags)


def names(models: object) -> list[tuple[str, list[int]]]:
    return [(m.name, [v.version for v in m.versions]) for m in models.models]  # type: ignore[attr-defined]


def search(stub: Stub, workspace: str, **filters: object) -> list[tuple[str, list[int]]]:
    return names(stub.SearchModels(pb.SearchModelsRequest(workspace=workspace, **filters)))  # type: ignore[arg-type]


def test_tags_and_search(stub: Stub, workspace: str) -> None:
    stub.UploadModel(requests(workspace, "fraud-scorer", [], b"", description="Scores card payments"))
    upload(stub, workspace, "churn", MODEL)
    cut = stub.GetModelVersion(pb.GetModelVersionRequest(workspace=workspace, name="churn")).created_at
    stub.UploadModel(requests(workspace, "churn", [], b"", description="retrained on FRAUD cases"))
    stub.CreatePipeline(pb.CreatePipelineRequest(workspace=workspace, name="payments", steps=[step("churn")]))
    stub.CreatePipeline(pb.CreatePipelineRequest(workspace=workspace, name="batch", steps=[step("churn")]))

    assert tag(stub, workspace, "fraud", model="churn") == ["fraud"]
    assert tag(stub, workspace, "fraud", model="churn") == ["fraud"]  # idempotent
    assert tag(stub, workspace, "prod", model="churn") == ["fraud", "prod"]
    assert tag(stub, workspace, "prod", remove=True, model="churn") == ["fraud"]
    assert tag(stub, workspace, "prod", remove=True, model="churn") == ["fraud"]
    assert tag(stub, workspace, "team:risk", pipeline="payments") == ["team:risk"]
    for bad, why in (("Fraud", "(tags are lowercase: 'fraud')"), ("a b", ""), ("x" * 65, ""), ("", "")):
        error = rpc_error(lambda bad=bad: tag(stub, workspace, bad, model="churn"))  # type: ignore[misc]
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error.details().startswith(f"tag {bad!r} refused{' ' + why if why else ''}:"), error.details()
    error = rpc_error(lambda: tag(stub, workspace, "x", model="nope"))
    assert (error.code(), error.details()) == (
        grpc.StatusCode.NOT_FOUND,
        f"model 'nope' not found in workspace {workspace!r}",
    )
    assert rpc_error(lambda: tag(stub, workspace, "x")).code() == grpc.StatusCode.INVALID_ARGUMENT

    models = {m.name: list(m.tags) for m in stub.ListModels(pb.ListModelsRequest(workspace=workspace)).models}
    assert models == {"churn": ["fraud"], "fraud-scorer": []}
    # A term matches names and descriptions in any case; each model comes with its matching versions.
    assert search(stub, workspace, search_term="FrAuD") == [("churn", [2]), ("fraud-scorer", [1])]
    assert search(stub, workspace, search_term="50%_") == []  # no wildcards
    assert search(stub, workspace, tag="fraud") == [("churn", [1, 2])]
    assert search(stub, workspace, tag="fraud", search_term="scorer") == []
    assert search(stub, workspace, framework="onnx", uploaded_after=cut) == [("churn", [2])]
    assert search(stub, workspace) == [("churn", [1, 2]), ("fraud-scorer", [1])]
    error = rpc_error(lambda: search(stub, workspace, framework="caffe"))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "supported: " in error.details()

    def pipelines(**filters: str) -> list[tuple[str, list[str]]]:
        found = stub.SearchPipelines(pb.SearchPipelinesRequest(workspace=workspace, **filters))  # type: ignore[arg-type]
        return [(p.name, list(p.tags)) for p in found.pipelines]

    assert pipelines(tag="team:risk") == [("payments", ["team:risk"])]
    assert pipelines(search_term="BAT") == [("batch", [])]
    assert pipelines() == [("batch", []), ("payments", ["team:risk"])]
    got = stub.GetPipeline(pb.GetPipelineRequest(workspace=workspace, name="payments"))
    assert list(got.tags) == ["team:risk"]

    trail = stub.QueryAudit(pb.QueryAuditRequest(workspace=workspace, action="RemoveTag")).entries
    assert [(e.target, e.outcome) for e in trail] == [("model=churn tag=prod", "OK")] * 2


def test_a_non_member_can_neither_tag_nor_see(
    stub: Stub, workspace: str, new_person: Callable[..., Person]
) -> None:
    upload(stub, workspace, "m", MODEL)
    outsider = new_person()
    for call in (
        lambda: tag(outsider.stub, workspace, "x", model="m"),
        lambda: outsider.stub.SearchModels(pb.SearchModelsRequest(workspace=workspace, search_term="m")),
        lambda: outsider.stub.ListModelArtifacts(pb.ArtifactListRequest(workspace=workspace, name="m")),
    ):
        error = rpc_error(call)
        assert (error.code(), error.details()) == (
            grpc.StatusCode.NOT_FOUND,
            f"workspace {workspace!r} not found",
        )
    assert not stub.GetModel(pb.GetModelRequest(workspace=workspace, name="m")).tags


def test_the_limits_are_settings(
    registry_settings: RegistrySettings, workspace: str, admin_token: str
) -> None:
    server = RegistryServer(
        registry_settings.model_copy(update={"max_artifacts": 2, "max_artifacts_bytes": 4})
    )
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = token_stub(channel, admin_token)
            files = {"a": b"12", "b": b"34"}
            assert stub.UploadModel(requests(workspace, "m", manifest(files), b"1234")).artifact_count == 2
            over = rpc_error(
                lambda: stub.UploadModel(requests(workspace, "m", manifest(files | {"c": b""}), b"1234"))
            )
            assert over.details().startswith("3 artifact files; a model version carries at most 2")
            big = rpc_error(
                lambda: stub.UploadModel(requests(workspace, "m", manifest({"a": b"12345"}), b"12345"))
            )
            assert big.details().startswith(
                "the artifact files hold 5 bytes; a model version carries at most 4"
            )
    finally:
        server.stop()
