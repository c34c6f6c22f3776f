"""A/B splits through the SDK, the CLI and the real stack: arms chosen in proportion, sticky hash keys,
key routing, and the chosen model in every result and log row."""

from __future__ import annotations

import math
import secrets
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pandas as pd
import pytest
from click.testing import CliRunner
from skl2onnx import to_onnx
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression

from joey.client import Client, KeySplitStep, ModelStep, PipelineVersion, RandomSplitStep
from joey.client.pipelines import replies_to_frame
from joey_cli import main
from joey_core.replies import Reply
from joey_core.settings import CommonSettings
from joey_core.v1 import registry_pb2 as pb
from tests.conftest import Stack, wait_until
from train_model import make_records  # examples/, put on sys.path by conftest


def test_frames_show_the_chosen_model() -> None:
    replies = [
        Reply("a", True, {"time": "2025-05-01T09:00:00+00:00", "out": {"label": 1, "_model_split": "b"}}),
        Reply(
            "b", True, {"time": "2025-05-01T09:00:00+00:00", "out": {"label": 2, "_model_split": ["a", "c"]}}
        ),
    ]
    frame = replies_to_frame(replies)
    assert frame["out._model_split"].tolist() == ["b", ["a", "c"]]


def test_split_steps_are_typed_and_listed_readably() -> None:
    arm = pb.ResolvedStep(model="a", version=1, sha256="ab" * 32)
    other = pb.ResolvedStep(model="b", version=2, sha256="cd" * 32, input_mapping={"features": "f"})
    message = pb.PipelineVersion(
        steps=[
            pb.ResolvedStep(arms=[arm, other], weights=[2, 0.5], hash_key="user"),
            pb.ResolvedStep(arms=[arm, other], meta_key="tier", routes={"gold": "b", "1": "b"}),
        ]
    )
    version = PipelineVersion.from_proto(message)
    a, b = ModelStep("a", 1, "ab" * 32), ModelStep("b", 2, "cd" * 32, {"features": "f"})
    assert version.steps == (
        RandomSplitStep(((2.0, a), (0.5, b)), "user"),
        KeySplitStep(a, "tier", {"1": b, "gold": b}),
    )
    assert [str(s) for s in version.steps] == [
        "random_split(2*a:1, 0.5*b:2(features<-f); hash_key=user)",
        "key_split(tier: 1->b:2(features<-f), gold->b:2(features<-f); default a:1)",
    ]


def test_sdk_refuses_malformed_arms() -> None:
    pipeline = Client(registry_addr="127.0.0.1:1").build_pipeline("p")
    with pytest.raises(ValueError, match=r"each arm is a \(weight, model\) pair"):
        pipeline.add_random_split(["iris", "iris-b"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="expected 'name' or 'name:version'"):
        pipeline.add_key_split("iris", "tier", {"gold": "iris-b:x"})


def test_key_split_options_are_matched_as_the_engine_compares_values() -> None:
    pipeline = Client(registry_addr="127.0.0.1:1").build_pipeline("p")
    pipeline.add_key_split("a", "tier", {"gold": "b", 7: "b", False: "c", 2.5: "c"})
    (step,) = pipeline._steps
    assert {value: ref.model for value, ref in step.key_split.routes.items()} == {
        "gold": "b",
        "7": "b",
        "false": "c",
        "2.5": "c",
    }


def create_args(*args: str, registry: str = "127.0.0.1:1", workspace: str = "default") -> list[str]:
    return ["--registry", registry, "-w", workspace, "pipeline", "create", "p", *args]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--split", "x:iris"], "expected WEIGHT:MODEL[:VERSION] with a positive WEIGHT"),
        (["--split", "0:iris"], "expected WEIGHT:MODEL[:VERSION] with a positive WEIGHT"),
        (["--split", "1:iris:v2"], "expected WEIGHT:MODEL[:VERSION]"),
        (["--key-split", "tier", "--default", "a", "--route", "gold"], "expected VALUE=MODEL[:VERSION]"),
        (["--hash-key", "user", "-m", "iris"], "applies to a --split step"),
        (
            ["--key-split", "tier", "--route", "gold=b"],
            "a key split needs --key-split FIELD, --default MODEL",
        ),
        ([], "give at least one --model, --split or --key-split"),
    ],
)
def test_cli_refuses_malformed_splits(args: list[str], message: str) -> None:
    result = CliRunner().invoke(main, create_args(*args))
    assert result.exit_code == 2, result.output
    assert message in result.output


def train_logistic(path: Path) -> Path:
    """A second iris classifier with the example's signature (features -> label, probabilities)."""
    iris = load_iris()
    x = iris.data.astype(np.float32)
    model = LogisticRegression(max_iter=500).fit(x, iris.target)
    onnx_model = to_onnx(model, X=x[:1], options={id(model): {"zipmap": False}}, target_opset=17)
    onnx_model.graph.input[0].name = "features"
    for node in onnx_model.graph.node:
        node.input[:] = ["features" if name == "X" else name for name in node.input]
    path.write_bytes(onnx_model.SerializeToString())
    return path


@pytest.fixture(scope="module")
def models(iris_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {"forest": iris_model, "logistic": train_logistic(tmp_path_factory.mktemp("logistic") / "m.onnx")}


@pytest.fixture
def client(stack: Stack, settings: CommonSettings, models: dict[str, Path]) -> Client:
    client = Client(settings=settings, workspace=f"ws-{secrets.token_hex(4)}")
    client.create_workspace(client.workspace)
    for name, path in models.items():
        client.upload_model(name, path)
    return client


def direct(models: dict[str, Path], rows: list[dict]) -> dict[str, np.ndarray]:
    """Each model's probabilities for every row, straight from onnxruntime."""
    features = np.asarray([r["features"] for r in rows], np.float32)
    return {
        name: ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
            ["probabilities"], {"features": features}
        )[0]
        for name, path in models.items()
    }


def test_random_split_end_to_end(client: Client, models: dict[str, Path], tmp_path: Path) -> None:
    pipeline = client.build_pipeline("ab").add_random_split([(2, "forest"), (1, "logistic")], hash_key="user")
    assert [str(s) for s in pipeline.create().steps] == [
        "random_split(2*forest:1, 1*logistic:1; hash_key=user)"
    ]
    pipeline.deploy(replicas=2, timeout=90)
    started = datetime.now(UTC)
    n = 10_000
    rows: list[dict] = make_records(n, seed=3)
    # Then 200 users, 5 records each, interleaved.
    sticky = [{**r, "user": f"user-{i % 200}"} for i, r in enumerate(make_records(1000, seed=4))]
    results = pipeline.infer(rows + sticky, timeout=300)
    assert results["error"].isna().all()
    chosen = results["out._model_split"].tolist()
    assert set(chosen) == {"forest", "logistic"}
    # Each record was answered by the model it names.
    expected = direct(models, rows + sticky)
    for i, name in enumerate(chosen):
        np.testing.assert_allclose(
            results["out.probabilities"].iloc[i], expected[name][i], rtol=1e-5, atol=1e-6
        )
    assert [[m["name"] for m in models_] for models_ in results["metadata.models"]] == [[c] for c in chosen]
    # Without a hash key, records are split 2:1.
    to_logistic = chosen[:n].count("logistic")
    assert abs(to_logistic - n / 3) <= 4 * math.sqrt(n * (1 / 3) * (2 / 3)), to_logistic
    # With one, every record of a user went to one model, whichever replica served it.
    by_user: dict[str, set[str]] = {}
    for row, name in zip(sticky, chosen[n:], strict=True):
        by_user.setdefault(row["user"], set()).add(name)
    assert all(len(names) == 1 for names in by_user.values())
    users_to_logistic = sum(names == {"logistic"} for names in by_user.values())
    assert abs(users_to_logistic - 200 / 3) <= 4 * math.sqrt(200 * (1 / 3) * (2 / 3)), users_to_logistic
    # Again after a restart of the deployment: the same users go to the same models.
    pipeline.undeploy()
    pipeline.deploy(replicas=1, timeout=90)
    again = pipeline.infer(sticky[:200], timeout=60)
    assert again["out._model_split"].tolist() == chosen[n : n + 200]

    total = n + len(sticky) + 200
    wait_until(lambda: pipeline.log_count(start=started) == total, 120, "every inference logged")
    # More rows than one logs() page: export them all.
    files = pipeline.export_logs(tmp_path, format="jsonl", start=started)
    logs = pd.concat([pd.read_json(f, lines=True) for f in files])
    assert len(logs) == total
    served = dict(zip(results["request_id"], chosen, strict=True))
    first = logs[logs["request_id"].isin(served)]
    assert len(first) == n + len(sticky)
    assert (first["out._model_split"] == first["request_id"].map(served)).all()
    assert all(
        models_ == [f"{served[r]}:1"] for r, models_ in zip(first["request_id"], first["models"], strict=True)
    )
    pipeline.undeploy()


def test_key_split_end_to_end(client: Client, models: dict[str, Path], settings: CommonSettings) -> None:
    result = CliRunner().invoke(
        main,
        [
            *create_args(registry=settings.registry_addr, workspace=client.workspace),
            "--key-split",
            "tier",
            "--default",
            "forest",
            "--route",
            "gold=logistic",
            "--route",
            "1=logistic:1",
        ],
    )
    assert result.exit_code == 0, result.output
    assert (
        result.output.strip()
        == "p version 1: key_split(tier: 1->logistic:1, gold->logistic:1; default forest:1)"
    )
    pipeline = client.get_pipeline("p")
    pipeline.deploy(timeout=90)
    started = datetime.now(UTC)
    tiers: list[object] = ["gold", "silver", None, 1, "1", 2, "Gold"] * 20
    rows = [{**r, "tier": t} for r, t in zip(make_records(len(tiers), seed=5), tiers, strict=True)]
    rows += [{"features": [5.1, 3.5, 1.4, 0.2]}, {"features": [1, 2]}]  # no tier; not a valid input
    results = pipeline.infer(rows, timeout=60)
    routed = ["logistic" if t in ("gold", 1, "1") else "forest" for t in tiers] + ["forest"]
    assert results["out._model_split"].tolist()[:-1] == routed
    expected = direct(models, rows[:-1])
    for i, name in enumerate(routed):
        np.testing.assert_allclose(
            results["out.probabilities"].iloc[i], expected[name][i], rtol=1e-5, atol=1e-6
        )
    assert "has shape [2]" in results["error"].iloc[-1]

    wait_until(lambda: pipeline.log_count(start=started) == len(rows), 60, "every inference logged")
    logs = pipeline.logs(start=started, limit=len(rows)).set_index("request_id").loc[results["request_id"]]
    assert logs["out._model_split"].tolist()[:-1] == routed
    assert logs["models"].tolist() == [[f"{name}:1"] for name in routed] + [[]]
    assert logs["error"].iloc[-1] == results["error"].iloc[-1]
    pipeline.undeploy()
