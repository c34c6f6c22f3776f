from __future__ import annotations

import hashlib
import json
import pickle
import random
import threading
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import grpc
import joblib
import numpy as np
import onnx
import psycopg
import pytest
from sklearn.linear_model import LinearRegression

from joey_core import db
from joey_core.v1 import registry_pb2 as pb
from joey_registry.app import RegistryServer
from joey_registry.settings import RegistrySettings
from joey_registry.store import Store
from tests.conftest import scratch_database, wait_until
from tests.registry.helpers import Stub, heavy_step, rpc_error, token_stub, upload, upload_requests


def artifact_files(server: RegistryServer) -> list[Path]:
    """Every file under the artifact dir, staged uploads included."""
    return sorted(p for p in server.settings.artifact_dir.rglob("*") if p.is_file())


def specs(items: object) -> list[tuple[str, str, list[int]]]:
    return [(s.name, s.dtype, list(s.shape)) for s in items]  # type: ignore[attr-defined]


def test_upload_creates_versions_with_recorded_specs(
    stub: Stub, workspace: str, iris_bytes: bytes, registry_server: RegistryServer
) -> None:
    sha = hashlib.sha256(iris_bytes).hexdigest()
    first = upload(stub, workspace, "iris", iris_bytes)
    second = upload(stub, workspace, "iris", iris_bytes, framework="onnx")

    assert (first.version, second.version) == (1, 2)
    assert first.sha256 == second.sha256 == sha
    assert first.size_bytes == len(iris_bytes)
    assert first.framework == "onnx"
    assert specs(first.inputs) == [("features", "float32", [-1, 4])]
    assert specs(first.outputs) == [("label", "int64", [-1]), ("probabilities", "float32", [-1, 3])]
    # Same bytes, one stored copy.
    assert [p.name for p in artifact_files(registry_server)].count(sha) == 1

    model = stub.GetModel(pb.GetModelRequest(workspace=workspace, name="iris"))
    assert [v.version for v in model.versions] == [1, 2]
    assert specs(model.versions[1].outputs) == specs(first.outputs)
    latest = stub.GetModelVersion(pb.GetModelVersionRequest(workspace=workspace, name="iris", version=0))
    assert latest.version == 2
    v1 = stub.GetModelVersion(pb.GetModelVersionRequest(workspace=workspace, name="iris", version=1))
    assert v1.created_at.ToDatetime() <= latest.created_at.ToDatetime()
    listed = stub.ListModels(pb.ListModelsRequest(workspace=workspace)).models
    assert [(m.name, len(m.versions)) for m in listed] == [("iris", 2)]


def test_missing_model_and_version(stub: Stub, workspace: str, iris_bytes: bytes) -> None:
    upload(stub, workspace, "iris", iris_bytes)
    error = rpc_error(lambda: stub.GetModel(pb.GetModelRequest(workspace=workspace, name="ghost")))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert "'ghost'" in error.details()
    error = rpc_error(
        lambda: stub.GetModelVersion(pb.GetModelVersionRequest(workspace=workspace, name="iris", version=7))
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert "no version 7" in error.details() and "latest is 1" in error.details()


def test_concurrent_uploads_get_distinct_versions(
    registry_settings: RegistrySettings, workspace: str, iris_bytes: bytes, admin_token: str
) -> None:
    # Four at once from one caller: more than JOEY_UPLOAD_PER_CALLER allows by default.
    limits = {"upload_per_caller": 4}
    with (
        private_registry(registry_settings, admin_token, **limits) as (_, stub),
        ThreadPoolExecutor(4) as pool,
    ):
        versions = list(pool.map(lambda _: upload(stub, workspace, "iris", iris_bytes).version, range(4)))
    assert sorted(versions) == [1, 2, 3, 4]


def _joblib(tmp: Path, compress: int | tuple[str, int]) -> bytes:
    """A scikit-learn model as users save it: ``joblib.dump``."""
    model = LinearRegression().fit(np.arange(12.0).reshape(4, 3), np.arange(4.0))
    joblib.dump(model, tmp / "model.joblib", compress=compress)
    return (tmp / "model.joblib").read_bytes()


def _torch_zip(tmp: Path) -> bytes:
    """The layout ``torch.save`` writes: a zip archive with ``<name>/data.pkl``."""
    with zipfile.ZipFile(tmp / "model.pt", "w") as archive:
        archive.writestr("model/data.pkl", pickle.dumps({"weight": [1.0, 2.0]}))
        archive.writestr("model/version", "3\n")
    return (tmp / "model.pt").read_bytes()


def _zip(tmp: Path, files: dict[str, bytes]) -> bytes:
    with zipfile.ZipFile(tmp / "archive.zip", "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return (tmp / "archive.zip").read_bytes()


# The shape of ``Booster.save_model("model.json")`` (xgboost itself is not a dependency).
XGBOOST_JSON = json.dumps(
    {
        "learner": {
            "attributes": {},
            "feature_names": [],
            "gradient_booster": {"name": "gbtree", "model": {"trees": []}},
            "learner_model_param": {"base_score": "5E-1", "num_feature": "4"},
            "objective": {"name": "reg:squarederror"},
        },
        "version": [2, 1, 0],
    }
).encode()


def _model(nodes: list[onnx.NodeProto], **extra: object) -> bytes:
    """A model of ``nodes``, which compute ``total`` (a scalar): y = x + total."""
    graph = onnx.helper.make_graph(
        [*nodes, onnx.helper.make_node("Add", ["x", "total"], ["y"])],
        "folds",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [None, 1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [None, 1])],
        **extra,  # type: ignore[arg-type]
    )
    model = onnx.helper.make_model(graph, opset_imports=[_OPSET, _LOCAL], ir_version=8)
    return model.SerializeToString()


_OPSET = onnx.helper.make_opsetid("", 17)
_LOCAL = onnx.helper.make_opsetid("local", 1)


def _sum_of_ones(shape: list[int]) -> list[onnx.NodeProto]:
    """Nodes that fill ``shape`` with ones (ConstantOfShape) and sum them into ``total``."""
    dims = onnx.numpy_helper.from_array(np.array(shape, dtype=np.int64), "shape")
    one = onnx.helper.make_tensor("one", onnx.TensorProto.FLOAT, [1], [1.0])
    return [
        onnx.helper.make_node("Constant", [], ["shape"], value=dims),
        onnx.helper.make_node("ConstantOfShape", ["shape"], ["big"], value=one),
        onnx.helper.make_node("ReduceSum", ["big"], ["total"], keepdims=0),
    ]


def _folds_into_gigabytes() -> bytes:
    """A model of 200 bytes whose ConstantOfShape fills [100000, 100000] floats (40 GB)."""
    return _model(_sum_of_ones([100_000, 100_000]))


def _folds_inside_if() -> bytes:
    """The same, in the branch of an If whose condition is a constant."""
    scalar = [onnx.helper.make_tensor_value_info("total", onnx.TensorProto.FLOAT, [])]
    zero = onnx.helper.make_tensor("zero", onnx.TensorProto.FLOAT, [], [0.0])
    then = onnx.helper.make_graph(_sum_of_ones([100_000, 100_000]), "then", [], scalar)
    other = onnx.helper.make_graph(
        [onnx.helper.make_node("Constant", [], ["total"], value=zero)], "else", [], scalar
    )
    true = onnx.helper.make_tensor("true", onnx.TensorProto.BOOL, [], [True])
    return _model(
        [
            onnx.helper.make_node("Constant", [], ["condition"], value=true),
            onnx.helper.make_node("If", ["condition"], ["total"], then_branch=then, else_branch=other),
        ]
    )


def _folds_inside_a_function() -> bytes:
    """The same, in a model-local function the graph calls."""
    function = onnx.helper.make_function(
        "local", "Ones", [], ["total"], _sum_of_ones([100_000, 100_000]), [_OPSET]
    )
    nodes = [onnx.helper.make_node("Ones", [], ["total"], domain="local")]
    graph = onnx.ModelProto()
    graph.ParseFromString(_model(nodes))
    graph.functions.append(function)
    return graph.SerializeToString()


def _sparse_initializer() -> bytes:
    """A sparse initializer of one value, [40000, 40000] dense (6.4 GB once onnxruntime expands it)."""
    values = onnx.numpy_helper.from_array(np.array([1.0], dtype=np.float32), "big")
    indices = onnx.numpy_helper.from_array(np.array([0], dtype=np.int64), "indices")
    sparse = onnx.helper.make_sparse_tensor(values, indices, [40_000, 40_000])
    nodes = [onnx.helper.make_node("ReduceSum", ["big"], ["total"], keepdims=0)]
    return _model(nodes, sparse_initializer=[sparse])


def _bad_uploads(iris: bytes, tmp: Path) -> dict[str, tuple[list[pb.UploadModelRequest], str]]:
    def requests(data: bytes, framework: str = "") -> list[pb.UploadModelRequest]:
        return list(upload_requests("WS", "bad", data, framework))

    return {
        "empty": (requests(b""), "empty upload"),
        "truncated": (
            requests(iris[: len(iris) // 2]),
            "not a loadable ONNX model: this looks like an ONNX model cut short",
        ),
        # Bytes that look like nothing known: onnxruntime's own reason is passed on.
        "random": (
            requests(random.Random(11).randbytes(5000)),
            "not a loadable ONNX model: Protobuf parsing failed",
        ),
        "joblib": (requests(_joblib(tmp, 0)), "looks like a Python pickle (protocol 4)"),
        "joblib-compressed": (requests(_joblib(tmp, 3)), "looks like a pickle compressed with zlib"),
        **{
            f"joblib-{kind}": (
                requests(_joblib(tmp, (kind, 3))),
                f"looks like a pickle compressed with {kind}, as joblib.dump(compress=...) writes",
            )
            for kind in ("gzip", "bz2", "xz")
        },
        "hdf5": (
            requests(b"\x89HDF\r\n\x1a\n" + bytes(4000)),
            "this looks like an HDF5 file (a Keras .h5 model?). Joey runs ONNX models: convert it with "
            "tf2onnx",
        ),
        "lightgbm": (
            requests(b"tree\nversion=v4\nnum_class=1\nmax_feature_idx=3\n"),
            "this looks like a LightGBM text model. Joey runs ONNX models: convert it with onnxmltools",
        ),
        "keras": (
            requests(_zip(tmp, {"metadata.json": b"{}", "config.json": b"{}", "model.weights.h5": b""})),
            "this looks like a Keras .keras model. Joey runs ONNX models: convert it with tf2onnx",
        ),
        "zipped-onnx": (
            requests(_zip(tmp, {"export/iris.onnx": iris})),
            "this is a zip archive holding export/iris.onnx: extract the .onnx file and upload it",
        ),
        "onnx-without-graph": (
            requests(onnx.ModelProto(ir_version=8, producer_name="skl2onnx").SerializeToString()),
            "this looks like the start of an ONNX model without its graph",
        ),
        "xgboost-json": (requests(XGBOOST_JSON), "looks like an XGBoost model saved as JSON"),
        "torch": (requests(_torch_zip(tmp)), "looks like a PyTorch model"),
        "python-step": (
            requests(b"def process_data(inputs):\n    return inputs\n"),
            "upload it with framework 'python'",
        ),
        "folds-into-gigabytes": (
            requests(_folds_into_gigabytes()),
            "tensor 'big' of the model has shape [100000, 100000] (37.3 GiB), more than the 4096 MiB a "
            "model check may use (JOEY_UPLOAD_CHECK_MEMORY_MB)",
        ),
        "folds-inside-if": (
            requests(_folds_inside_if()),
            "tensor 'big' of the model has shape [100000, 100000]",
        ),
        "folds-inside-a-function": (
            requests(_folds_inside_a_function()),
            "of the model has shape [100000, 100000]",
        ),
        "sparse-initializer": (
            requests(_sparse_initializer()),
            "tensor 'big' of the model has shape [40000, 40000] (6.0 GiB), more than the 4096 MiB",
        ),
        "header-missing": (requests(iris)[1:], "first UploadModel message must be the header"),
        "header-twice": (requests(iris)[:2] + requests(iris), "second header"),
        "unknown-framework": (requests(iris, framework="tensorflow"), "unsupported framework 'tensorflow'"),
        "invalid-name": (
            [pb.UploadModelRequest(header=pb.UploadModelHeader(workspace="WS", name="Bad Name"))],
            "invalid model name",
        ),
    }


@pytest.mark.parametrize(
    "case",
    [
        "empty",
        "truncated",
        "random",
        "joblib",
        "joblib-compressed",
        "joblib-gzip",
        "joblib-bz2",
        "joblib-xz",
        "hdf5",
        "lightgbm",
        "keras",
        "zipped-onnx",
        "onnx-without-graph",
        "xgboost-json",
        "torch",
        "python-step",
        "folds-into-gigabytes",
        "folds-inside-if",
        "folds-inside-a-function",
        "sparse-initializer",
        "header-missing",
        "header-twice",
        "unknown-framework",
        "invalid-name",
    ],
)
def test_bad_upload_is_rejected_and_stores_nothing(
    stub: Stub,
    workspace: str,
    iris_bytes: bytes,
    registry_server: RegistryServer,
    db: psycopg.Connection,
    tmp_path: Path,
    case: str,
) -> None:
    before = artifact_files(registry_server)
    requests, expected = _bad_uploads(iris_bytes, tmp_path)[case]
    for request in requests:
        if request.HasField("header"):
            request.header.workspace = workspace

    error = rpc_error(lambda: stub.UploadModel(iter(requests), timeout=30))

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert expected in error.details()
    rows = db.execute(
        "SELECT count(*) FROM models m JOIN workspaces w ON w.id = m.workspace_id WHERE w.name = %s",
        (workspace,),
    ).fetchone()
    assert rows == (0,)
    assert artifact_files(registry_server) == before


def test_unknown_framework_lists_supported(stub: Stub, workspace: str, iris_bytes: bytes) -> None:
    error = rpc_error(lambda: upload(stub, workspace, "m", iris_bytes, framework="pickle"))
    assert (
        error.details()
        == "unsupported framework 'pickle'; supported: lightgbm, onnx, python, pytorch, sklearn, xgboost"
    )


def test_upload_over_the_size_limit(
    registry_settings: RegistrySettings, workspace: str, iris_bytes: bytes, admin_token: str
) -> None:
    settings = registry_settings.model_copy(update={"max_upload_bytes": 1000})
    server = RegistryServer(settings)
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = token_stub(channel, admin_token)
            error = rpc_error(lambda: upload(stub, workspace, "big", iris_bytes))
    finally:
        server.stop()
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "exceeds the limit of 1000 bytes (JOEY_MAX_UPLOAD_BYTES)" in error.details()
    assert not list(settings.artifact_dir.glob("staging/*"))


def test_download_round_trips(stub: Stub, workspace: str, iris_bytes: bytes) -> None:
    version = upload(stub, workspace, "iris", iris_bytes)
    chunks = list(
        stub.DownloadArtifact(pb.DownloadArtifactRequest(workspace=workspace, sha256=version.sha256))
    )
    data = b"".join(c.data for c in chunks)
    assert data == iris_bytes
    assert hashlib.sha256(data).hexdigest() == version.sha256


def test_download_needs_a_model_version_in_the_workspace(
    stub: Stub, workspace: str, iris_bytes: bytes
) -> None:
    sha = upload(stub, workspace, "iris", iris_bytes).sha256
    stub.CreateWorkspace(pb.CreateWorkspaceRequest(name=f"{workspace}-other"))
    error = rpc_error(
        lambda: list(
            stub.DownloadArtifact(pb.DownloadArtifactRequest(workspace=f"{workspace}-other", sha256=sha))
        )
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert sha in error.details()
    error = rpc_error(
        lambda: list(stub.DownloadArtifact(pb.DownloadArtifactRequest(workspace=workspace, sha256="abc")))
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_migrating_a_database_that_holds_model_versions_keeps_their_numbering() -> None:
    with scratch_database("joey_migrate") as url:
        # The database as it was before migration 0010, holding iris v1..v3 of which v3 was deleted.
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("ALTER TABLE models DROP COLUMN last_version")
            conn.execute("DROP TABLE deleted_deployments")
            conn.execute("DELETE FROM schema_migrations WHERE version = 10")
            (model_id,) = conn.execute(
                "INSERT INTO models (workspace_id, name) SELECT id, 'iris' FROM workspaces "
                "WHERE name = 'default' RETURNING id"
            ).fetchone()  # type: ignore[misc]
            for version in (1, 2):
                conn.execute(
                    "INSERT INTO model_versions (model_id, version, sha256, size_bytes, framework, inputs, "
                    "outputs) VALUES (%s, %s, %s, 1, 'onnx', '[]', '[]')",
                    (model_id, version, f"{version:064x}"),
                )
        assert db.migrate(url) == ["0010_catalog.sql"]
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT last_version FROM models WHERE id = %s", (model_id,)).fetchone() == (
                2,
            )
            # Even should last_version lag behind the versions, numbering goes on from the highest.
            conn.execute("UPDATE models SET last_version = 0 WHERE id = %s", (model_id,))
            conn.commit()
        store = Store(url, max_size=1)
        store.open()
        try:
            ws = store.workspace("default")
            assert ws is not None
            added = store.add_model_version(ws, "iris", "f" * 64, 1, "onnx", (), (), lambda: None)
        finally:
            store.close()
        assert added.version == 3


@contextmanager
def private_registry(
    registry_settings: RegistrySettings, admin_token: str, **overrides: object
) -> Iterator[tuple[RegistryServer, Stub]]:
    """A registry of its own with ``overrides``, on the session's database (so its workspaces)."""
    server = RegistryServer(registry_settings.model_copy(update=overrides))
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            yield server, token_stub(channel, admin_token)
    finally:
        server.stop()


def staged(server: RegistryServer) -> list[Path]:
    return list(server.settings.artifact_dir.glob("staging/*"))


def test_a_model_that_would_fold_into_gigabytes_is_refused_from_its_shapes(
    stub: Stub, workspace: str, iris_bytes: bytes
) -> None:
    # Refused by the static size check, before anything is allocated: nothing reaches a memory limit.
    error = rpc_error(lambda: upload(stub, workspace, "bomb", _folds_into_gigabytes()))

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "[100000, 100000]" in error.details() and "JOEY_UPLOAD_CHECK_MEMORY_MB" in error.details()
    assert upload(stub, workspace, "iris", iris_bytes).version == 1


def test_a_check_over_its_memory_is_contained_and_the_registry_serves_on(
    registry_settings: RegistrySettings, workspace: str, iris_bytes: bytes, admin_token: str
) -> None:
    # The step's syntax tree really is built in the check process, and needs more than its 512 MiB.
    spec = pb.TensorSpec(name="x", dtype="float32", shape=[-1])
    header = pb.UploadModelHeader(
        workspace=workspace, name="heavy", framework="python", inputs=[spec], outputs=[spec]
    )
    source = heavy_step()
    requests = [pb.UploadModelRequest(header=header)] + [
        pb.UploadModelRequest(chunk=source[at : at + (1 << 20)]) for at in range(0, len(source), 1 << 20)
    ]
    with private_registry(registry_settings, admin_token, upload_check_memory_mb=512) as (server, stub):
        error = rpc_error(lambda: stub.UploadModel(iter(requests), timeout=120))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "needed more than 512 MiB of memory (JOEY_UPLOAD_CHECK_MEMORY_MB)" in error.details()
        assert not staged(server)
        assert stub.WhoAmI(pb.WhoAmIRequest(), timeout=10).username == "admin"
        assert upload(stub, workspace, "iris", iris_bytes).version == 1
        assert [m.name for m in stub.ListModels(pb.ListModelsRequest(workspace=workspace)).models] == ["iris"]


def test_a_check_over_its_timeout_is_refused(
    registry_settings: RegistrySettings, workspace: str, iris_bytes: bytes, admin_token: str
) -> None:
    # No interpreter starts, let alone loads onnxruntime, in a millisecond.
    with private_registry(registry_settings, admin_token, upload_check_timeout_s=0.001) as (server, stub):
        error = rpc_error(lambda: upload(stub, workspace, "slow", iris_bytes))
        assert not staged(server)
        assert not stub.ListModels(pb.ListModelsRequest(workspace=workspace)).models
    # Far below its CPU limit: the wall clock ran out on load, not on the model.
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "took longer than 0.001 s (JOEY_UPLOAD_CHECK_TIMEOUT_S)" in error.details()
    assert "the registry is busy; retry" in error.details()


def _stalled(workspace: str, name: str, release: threading.Event) -> Iterator[pb.UploadModelRequest]:
    """A client that sends a header and a first chunk, then nothing until released."""
    yield pb.UploadModelRequest(header=pb.UploadModelHeader(workspace=workspace, name=name))
    yield pb.UploadModelRequest(chunk=b"\x08\x08" * 1000)
    release.wait()


def _code(future: grpc.Future) -> grpc.StatusCode:
    error = future.exception()
    return grpc.StatusCode.OK if error is None else error.code()  # type: ignore[no-any-return]


def test_stalled_uploads_hold_only_their_pool(
    registry_settings: RegistrySettings, workspace: str, iris_bytes: bytes, admin_token: str
) -> None:
    # Six threads in all: without a pool of their own, six stalled uploads would take every one. The idle
    # timeout is far beyond the test, so only the release ends the four admitted.
    limits = {
        "grpc_max_workers": 6,
        "upload_concurrency": 4,
        "upload_per_caller": 5,  # above the pool: the pool is what is full
        "upload_idle_timeout_s": 3600.0,
    }
    release = threading.Event()
    with private_registry(registry_settings, admin_token, **limits) as (server, stub):
        try:
            calls = [
                stub.UploadModel.future(_stalled(workspace, f"stalled-{i}", release), timeout=600)
                for i in range(16)
            ]

            def refused() -> list[grpc.Future]:
                return [c for c in calls if c.done() and _code(c) == grpc.StatusCode.RESOURCE_EXHAUSTED]

            wait_until(lambda: len(refused()) == 12, 60, "12 uploads refused while 4 are admitted")
            admitted = [c for c in calls if c not in refused()]
            for _ in range(20):
                listed = stub.ListWorkspaces(pb.ListWorkspacesRequest(), timeout=10).workspaces
                assert workspace in [w.name for w in listed]
                assert stub.WhoAmI(pb.WhoAmIRequest(), timeout=10).username == "admin"
            assert not any(c.done() for c in admitted)
            error = rpc_error(lambda: upload(stub, workspace, "one-more", iris_bytes))
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "(JOEY_UPLOAD_CONCURRENCY)" in error.details()
        finally:
            release.set()
        # Released, each ends its stream: the bytes it sent are no model.
        wait_until(lambda: all(c.done() for c in admitted), 120, "the released uploads to end")
        assert [_code(c) for c in admitted] == [grpc.StatusCode.INVALID_ARGUMENT] * 4
        _assert_slots_free_again(server, stub, workspace, iris_bytes)


def _assert_slots_free_again(server: RegistryServer, stub: Stub, workspace: str, iris_bytes: bytes) -> None:
    assert not staged(server)
    # The threads that read them ended with their calls.
    wait_until(
        lambda: not [t for t in threading.enumerate() if t.name == "upload-reader"],
        30,
        "the stalled uploads' readers to end",
    )
    assert upload(stub, workspace, "iris", iris_bytes).version == 1
    assert [m.name for m in stub.ListModels(pb.ListModelsRequest(workspace=workspace)).models] == ["iris"]


def test_one_caller_holds_at_most_its_share_of_the_upload_slots(
    registry_settings: RegistrySettings, workspace: str, iris_bytes: bytes, admin_token: str
) -> None:
    limits = {"upload_concurrency": 4, "upload_per_caller": 2, "upload_idle_timeout_s": 3600.0}
    release = threading.Event()
    with private_registry(registry_settings, admin_token, **limits) as (server, stub):
        try:
            calls = [
                stub.UploadModel.future(_stalled(workspace, f"stalled-{i}", release), timeout=600)
                for i in range(3)
            ]
            wait_until(lambda: sum(c.done() for c in calls) == 1, 60, "one of three uploads refused")
            refused = next(c for c in calls if c.done())
            # Refused for its caller's share, though two of the registry's four slots are free.
            assert _code(refused) == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert (
                "you are sending 2 uploads already (JOEY_UPLOAD_PER_CALLER)" in refused.exception().details()
            )
        finally:
            release.set()
        wait_until(lambda: all(c.done() for c in calls), 120, "the released uploads to end")
        _assert_slots_free_again(server, stub, workspace, iris_bytes)


def test_stalled_uploads_are_cut_off_at_the_idle_timeout(
    registry_settings: RegistrySettings, workspace: str, iris_bytes: bytes, admin_token: str
) -> None:
    limits = {"grpc_max_workers": 4, "upload_concurrency": 2, "upload_idle_timeout_s": 1.0}
    release = threading.Event()
    with private_registry(registry_settings, admin_token, **limits) as (server, stub):
        try:
            calls = [
                stub.UploadModel.future(_stalled(workspace, f"stalled-{i}", release), timeout=600)
                for i in range(2)
            ]
            wait_until(lambda: all(c.done() for c in calls), 120, "the stalled uploads to be cut off")
        finally:
            release.set()
        assert [_code(c) for c in calls] == [grpc.StatusCode.DEADLINE_EXCEEDED] * 2
        assert "sent nothing for 1 s (JOEY_UPLOAD_IDLE_TIMEOUT_S)" in calls[0].exception().details()
        _assert_slots_free_again(server, stub, workspace, iris_bytes)


def test_an_upload_slower_than_its_deadline_is_cut_off(
    registry_settings: RegistrySettings, workspace: str, admin_token: str
) -> None:
    release = threading.Event()
    limits = {"upload_deadline_s": 1.0, "upload_idle_timeout_s": 60.0}
    with private_registry(registry_settings, admin_token, **limits) as (server, stub):
        try:
            error = rpc_error(lambda: stub.UploadModel(_stalled(workspace, "late", release), timeout=60))
        finally:
            release.set()
        assert not staged(server)
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "did not arrive within its deadline (JOEY_UPLOAD_DEADLINE_S)" in error.details()
