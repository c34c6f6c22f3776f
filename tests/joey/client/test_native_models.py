"""Native models uploaded as data scientists save them, through the SDK, the CLI and the whole stack:
scikit-learn, XGBoost, LightGBM and PyTorch models converted to ONNX by the registry, deployed and
serving what the native library predicts; files that are not what their framework says refused with
nothing stored; a conversion that fails leaves a version in error that no pipeline can deploy; and a
pickle that goes looking for the registry's secrets finds none."""

from __future__ import annotations

import importlib
import json
import pickle
import secrets
from collections.abc import Iterator
from pathlib import Path

import grpc
import joblib
import lightgbm
import numpy as np
import pyarrow as pa
import pytest
import torch
import xgboost
from click.testing import CliRunner
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from joey.client import Client
from joey.client.calls import JoeyError
from joey_cli import main
from joey_core.settings import CommonSettings
from joey_core.v1 import registry_pb2 as pb
from joey_registry.conversion import CHILD_CLAIM
from joey_registry.converters.verify import ATOL, RTOL
from tests.conftest import ADMIN_PASSWORD, SERVICE_TOKEN, Stack
from tests.registry.helpers import Payload, identity_model, token_stub

TORCH_SCHEMA = pa.schema([pa.field("input", pa.list_(pa.float32(), 4))])


@pytest.fixture(scope="module")
def iris() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x, y = load_iris(return_X_y=True)
    train, held_out, train_y, _ = train_test_split(x, y, test_size=12, random_state=3)
    return train.astype(np.float32), train_y, held_out.astype(np.float32)


class Classifier(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.layers(x), dim=-1)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory, iris: tuple[np.ndarray, ...]) -> dict[str, Path]:
    """Each framework's model trained on iris and saved the framework's own way."""
    x, y, _ = iris
    folder = tmp_path_factory.mktemp("native")
    joblib.dump(
        make_pipeline(StandardScaler(), LogisticRegression(max_iter=500)).fit(x, y), folder / "m.joblib"
    )
    xgboost.XGBClassifier(n_estimators=8, max_depth=3).fit(x, y).save_model(folder / "m.ubj")
    model = lightgbm.LGBMClassifier(n_estimators=8, verbose=-1).fit(x, y)
    model.booster_.save_model(folder / "m.txt")
    torch.manual_seed(0)
    torch.jit.save(torch.jit.script(Classifier().eval()), folder / "m.pt")
    return {
        "sklearn": folder / "m.joblib",
        "xgboost": folder / "m.ubj",
        "lightgbm": folder / "m.txt",
        "pytorch": folder / "m.pt",
    }


def native_probabilities(framework: str, path: Path, rows: np.ndarray) -> np.ndarray:
    if framework == "sklearn":
        return joblib.load(path).predict_proba(rows)
    if framework == "xgboost":
        return xgboost.Booster(model_file=str(path)).predict(xgboost.DMatrix(rows))
    if framework == "lightgbm":
        return lightgbm.Booster(model_file=str(path)).predict(rows)
    with torch.no_grad():
        return torch.jit.load(str(path))(torch.from_numpy(rows)).numpy()


@pytest.fixture
def client(stack: Stack, settings: CommonSettings) -> Iterator[Client]:
    client = Client(settings=settings, workspace=f"native-{secrets.token_hex(4)}")
    client.create_workspace(client.workspace)
    yield client
    client.close()


def artifact_files(stack: Stack) -> set[Path]:
    return {p for p in Path(stack.env["JOEY_ARTIFACT_DIR"]).rglob("*") if p.is_file()}


def test_each_framework_serves_what_its_native_library_predicts(
    client: Client, saved: dict[str, Path], iris: tuple[np.ndarray, ...], tmp_path: Path
) -> None:
    held_out = iris[2]
    records = [{"input": row.tolist()} for row in held_out]
    for framework, path in saved.items():
        schema = TORCH_SCHEMA if framework == "pytorch" else None
        mv = client.upload_model(
            framework, path, framework=framework, input_schema=schema, sample_input=held_out[:3]
        )
        assert (mv.status, mv.framework) == ("ready", framework)
        assert [(s.name, s.dtype, s.shape) for s in mv.inputs] == [("input", "float32", (-1, 4))]
        assert "verified on generated inputs" in mv.conversion_log
        assert "verified on the sample input" in mv.conversion_log
        # The child's figures are its claim; the last line says what the registry checked itself.
        assert mv.conversion_log.splitlines()[-1] == CHILD_CLAIM
        # The original beside the ONNX form, both downloadable.
        assert mv.source_sha256 and mv.source_sha256 != mv.sha256
        assert mv.source_size_bytes == path.stat().st_size
        assert mv.download_source(tmp_path).read_bytes() == path.read_bytes()
    # Engines fetch what they run: the service token gets the ONNX form, not the file it came from.
    with grpc.insecure_channel(client.settings.registry_addr) as channel:
        service = token_stub(channel, SERVICE_TOKEN)
        for sha256, served in ((mv.sha256, True), (mv.source_sha256, False)):
            request = pb.DownloadArtifactRequest(workspace=client.workspace, sha256=sha256)
            try:
                assert b"".join(c.data for c in service.DownloadArtifact(request)) and served
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.NOT_FOUND and not served
    pipelines = []
    for framework in saved:
        pipeline = client.build_pipeline(f"{framework}-pipeline").add_model_step(framework)
        pipeline.deploy(timeout=90)
        pipelines.append(pipeline)
    for (framework, path), pipeline in zip(saved.items(), pipelines, strict=True):
        frame = pipeline.infer(records)
        expected = native_probabilities(framework, path, held_out)
        column = "out.output" if framework == "pytorch" else "out.probabilities"
        served = np.array(frame[column].tolist(), dtype=np.float64)
        np.testing.assert_allclose(served, expected, atol=ATOL, rtol=RTOL, err_msg=framework)
        if framework != "pytorch":
            assert frame["out.label"].tolist() == expected.argmax(axis=1).tolist(), framework
        pipeline.undeploy()


def test_files_that_are_not_what_their_framework_says_are_refused_and_nothing_is_stored(
    client: Client, stack: Stack, saved: dict[str, Path], tmp_path: Path
) -> None:
    (tmp_path / "list.pkl").write_bytes(pickle.dumps([1, 2, 3]))
    (tmp_path / "cut.ubj").write_bytes(saved["xgboost"].read_bytes()[:100])
    (tmp_path / "notes.txt").write_text("tree\nthis is not a booster\n")
    (tmp_path / "whole.pt").write_bytes(b"PK\x03\x04 not a zip archive")
    lying = {
        "sklearn": (
            tmp_path / "list.pkl",
            "framework 'sklearn': the file holds a builtins.list, not a scikit-learn",
        ),
        "xgboost": (
            tmp_path / "cut.ubj",
            "framework 'xgboost': the file is not a model saved with save_model",
        ),
        "lightgbm": (
            tmp_path / "notes.txt",
            "framework 'lightgbm': the file is not a booster saved with save_model",
        ),
        "pytorch": (
            tmp_path / "whole.pt",
            "framework 'pytorch': the file is not a TorchScript or ExportedProgram",
        ),
    }
    before = artifact_files(stack)
    for framework, (path, reason) in lying.items():
        schema = TORCH_SCHEMA if framework == "pytorch" else None
        with pytest.raises(JoeyError) as refused:
            client.upload_model("liar", path, framework=framework, input_schema=schema)
        assert refused.value.code == "INVALID_ARGUMENT"
        assert reason in refused.value.message
        assert "nothing was stored" in refused.value.message
    # Each framework's own file under another framework's name: refused too.
    with pytest.raises(JoeyError, match="framework 'lightgbm'"):
        client.upload_model("liar", saved["sklearn"], framework="lightgbm")
    assert "liar" not in client.list_models()
    assert artifact_files(stack) == before


def test_a_failed_conversion_is_an_error_no_pipeline_deploys(client: Client, saved: dict[str, Path]) -> None:
    # The sample has 3 features, the model takes 4: it loads, then its verification fails.
    with pytest.raises(JoeyError, match="sample input 'input' has shape \\[1, 3\\]") as failed:
        client.upload_model("short", saved["sklearn"], framework="sklearn", sample_input=[[1.0, 2.0, 3.0]])
    assert "conversion log:\nloaded a scikit-learn Pipeline (StandardScaler, LogisticRegression)" in str(
        failed.value
    )
    mv = client.get_model("short")
    assert (mv.status, mv.sha256, mv.inputs) == ("error", "", ())
    with pytest.raises(JoeyError, match="model 'short' version 1 is error, not ready") as refused:
        client.build_pipeline("never").add_model_step("short").deploy(timeout=30)
    assert refused.value.code == "FAILED_PRECONDITION"


def test_the_cli_shows_the_conversion(client: Client, saved: dict[str, Path]) -> None:
    cli = ["--registry", client.settings.registry_addr, "-w", client.workspace, "model", "upload"]
    result = CliRunner().invoke(main, [*cli, "boosted", str(saved["lightgbm"]), "--framework", "lightgbm"])
    assert result.exit_code == 0, result.output
    assert "loaded a LightGBM booster (multiclass, 24 trees, 4 features)" in result.output
    assert "verified on generated inputs: label: equal; probabilities: at most" in result.output
    assert "boosted version 1 ready sha256" in result.output
    assert "output probabilities: float32 [-1, 3]" in result.output


# Runs in the conversion child as the pickle loads: looks for what the registry holds and tries to
# reach out, then reports all it found in the refusal (the one channel a pickle is sure to have).
SNOOP = """
import json, os, socket
found = {"environ": dict(os.environ)}
for name, path in (("parent", f"/proc/{os.getppid()}/environ"), ("artifacts", ARTIFACTS), ("home", HOME)):
    try:
        found[name] = open(path, "rb").read().decode("latin-1") if os.path.isfile(path) else os.listdir(path)
    except OSError as exc:
        found[name] = f"denied: {exc.strerror}"
try:
    open(OUTSIDE, "w").write("escaped")
    found["write"] = "written"
except OSError as exc:
    found["write"] = f"denied: {exc.strerror}"
try:
    socket.create_connection(("127.0.0.1", 5432), timeout=2).close()
    found["postgres"] = "connected"
except OSError as exc:
    found["postgres"] = f"refused: {exc.strerror}"
try:  # a local Postgres's socket on disk, which neither Landlock nor the network namespace covers
    with socket.socket(socket.AF_UNIX) as unix:
        unix.connect("/var/run/postgresql/.s.PGSQL.5432")
    found["unix"] = "connected"
except OSError as exc:
    found["unix"] = f"refused: {exc.strerror}"
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
found["capabilities"] = status["CapEff"].strip()  # the registry runs as root here
try:
    found["shared memory"] = os.listdir("/dev/shm")  # Postgres's segments
except OSError as exc:
    found["shared memory"] = f"denied: {exc.strerror}"
raise ValueError("SNOOPED " + json.dumps(found))
"""


class Snoop:
    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return exec, (self.code,)


def test_a_pickle_finds_no_secret_and_cannot_write_or_connect(
    client: Client, stack: Stack, tmp_path: Path
) -> None:
    outside = tmp_path / "escaped.txt"
    credentials = tmp_path / "credentials"
    credentials.write_text(SERVICE_TOKEN)
    code = "\n".join(
        [
            f"ARTIFACTS = {stack.env['JOEY_ARTIFACT_DIR']!r}",
            f"HOME = {str(credentials)!r}",
            f"OUTSIDE = {str(outside)!r}",
            SNOOP,
        ]
    )
    (tmp_path / "snoop.pkl").write_bytes(pickle.dumps(Snoop(code)))
    before = artifact_files(stack)
    with pytest.raises(JoeyError) as refused:
        client.upload_model("snoop", tmp_path / "snoop.pkl", framework="sklearn")
    message = refused.value.message
    assert refused.value.code == "INVALID_ARGUMENT"
    found = json.loads(message.split("SNOOPED ", 1)[1].rsplit("; nothing was stored", 1)[0])
    for secret in (SERVICE_TOKEN, ADMIN_PASSWORD, stack.env["JOEY_DATABASE_URL"]):
        assert secret not in message
    assert not any(k.startswith("JOEY_") for k in found["environ"]), found["environ"]
    assert found["parent"].startswith("denied"), found["parent"]
    assert found["artifacts"].startswith("denied"), found["artifacts"]
    assert found["home"].startswith("denied"), found["home"]
    assert found["write"].startswith("denied") and not outside.exists()
    assert found["postgres"] == "refused: Operation not permitted", found["postgres"]
    assert found["unix"] == "refused: Operation not permitted", found["unix"]
    assert found["capabilities"] == "0000000000000000"
    assert found["shared memory"] == "denied: Permission denied"
    assert "snoop" not in client.list_models()
    assert artifact_files(stack) == before


# Runs in the conversion child as the pickle loads: the ONNX file the registry takes becomes a link to
# a file the registry can read and the child cannot.
LINK = """
import pathlib
def write_bytes(path, data):
    path.symlink_to(TARGET)
    return len(data)
pathlib.Path.write_bytes = write_bytes
"""


def test_an_output_linked_to_a_file_outside_is_refused_and_not_stored(
    client: Client, stack: Stack, saved: dict[str, Path], tmp_path: Path
) -> None:
    # Another model's ONNX form, say, which the registry would then serve under this version.
    outside = tmp_path / "outside.onnx"
    outside.write_bytes(identity_model("x", "float32", "y", 2))
    (tmp_path / "link.pkl").write_bytes(pickle.dumps(Payload(f"TARGET = {str(outside)!r}\n{LINK}")))
    before = artifact_files(stack)
    with pytest.raises(JoeyError, match="the conversion left no ONNX file of its own"):
        client.upload_model("linked", tmp_path / "link.pkl", framework="sklearn")
    mv = client.get_model("linked")
    assert (mv.status, mv.sha256) == ("error", "")
    added = artifact_files(stack) - before
    assert [p.read_bytes() for p in added] == [(tmp_path / "link.pkl").read_bytes()]  # the source only


@pytest.mark.parametrize("example", ["sklearn_model", "xgboost_model", "lightgbm_model", "pytorch_model"])
def test_the_examples_run(client: Client, tmp_path: Path, example: str) -> None:
    # examples/ is on sys.path (conftest); each example serves its model and compares, asserting itself.
    module = importlib.import_module(f"native.{example}")
    assert module.main(client, tmp_path) <= 1e-3
