"""Python steps through the SDK, the CLI and the whole stack: schemas as users write them, a pipeline
``python pre -> iris -> python post``, user exceptions failing only their records, and a step that
crashes its process on a poison record without losing anything or disturbing another pipeline."""

from __future__ import annotations

import secrets
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pyarrow as pa
import pytest
from click.testing import CliRunner

from joey.client import Client, Pipeline, TensorSpec
from joey.client.signatures import parse_option, tensor_specs
from joey_cli import main
from joey_core.settings import CommonSettings
from tests.conftest import Stack, wait_until
from train_model import make_records  # examples/, put on sys.path by conftest

STEPS = Path(__file__).resolve().parents[3] / "examples" / "steps"
FIELDS = ("sepal_length_mm", "sepal_width_mm", "petal_length_mm", "petal_width_mm")
SPECIES = ["setosa", "versicolor", "virginica"]


def as_specs(schema: object) -> list[tuple[str, str, list[int]]]:
    return [(s.name, s.dtype, list(s.shape)) for s in tensor_specs(schema)]  # type: ignore[arg-type]


def test_schemas_convert_to_tensor_specs() -> None:
    arrow = pa.schema(
        [
            ("vector", pa.list_(pa.float32(), 4)),
            ("ragged", pa.list_(pa.int64())),
            ("name", pa.string()),
            ("image", pa.fixed_shape_tensor(pa.uint8(), [2, 3])),
            ("flag", pa.bool_()),
        ]
    )
    assert as_specs(arrow) == [
        ("vector", "float32", [-1, 4]),
        ("ragged", "int64", [-1, -1]),
        ("name", "string", [-1]),
        ("image", "uint8", [-1, 2, 3]),
        ("flag", "bool", [-1]),
    ]
    assert as_specs({"x": (np.float32, (-1, 4)), "s": (str, (-1,)), "n": ("int64", [-1])}) == [
        ("x", "float32", [-1, 4]),
        ("s", "string", [-1]),
        ("n", "int64", [-1]),
    ]
    assert as_specs([TensorSpec("y", "float64", (-1, 2))]) == [("y", "float64", [-1, 2])]
    with pytest.raises(ValueError, match="field 'when' has arrow type timestamp"):
        tensor_specs(pa.schema([("when", pa.timestamp("s"))]))


def test_cli_option_parsing() -> None:
    assert parse_option("features:float32:-1,4") == ("features", ("float32", (-1, 4)))
    assert parse_option("name:str:-1") == ("name", ("string", (-1,)))
    with pytest.raises(ValueError, match="is not NAME:DTYPE:SHAPE"):
        parse_option("features:float32")
    with pytest.raises(ValueError, match="shape '-1;4' is not comma-separated integers"):
        parse_option("features:float32:-1;4")


def test_cli_refuses_a_malformed_schema_option() -> None:
    path = str(STEPS / "iris_preprocess.py")
    args = ["--registry", "127.0.0.1:1", "model", "upload", "p", path, "--framework", "python"]
    result = CliRunner().invoke(main, [*args, "--input", "x:float32"])
    assert result.exit_code == 2, result.output
    assert "'x:float32' is not NAME:DTYPE:SHAPE" in result.output


# --- through the stack ---

PREP_INPUTS = pa.schema([(name, pa.float64()) for name in FIELDS])
PREP_OUTPUTS = pa.schema([("features", pa.list_(pa.float32(), 4))])
POST_INPUTS = {"label": ("int64", (-1,)), "probabilities": ("float32", (-1, 3))}
POST_OUTPUTS = {"species": ("string", (-1,)), "confidence": ("float32", (-1,))}

# Crashes its own process on a poison record (sepal length 666), hangs on another (777).
GUARD = """
import os, time

def process_data(inputs):
    if (inputs["features"][:, 0] == 666).any():
        os._exit(1)
    if (inputs["features"][:, 0] == 777).any():
        time.sleep(3600)
    return {"features": inputs["features"]}
"""


@pytest.fixture
def client(stack: Stack, settings: CommonSettings) -> Client:
    client = Client(settings=settings, workspace=f"py-{secrets.token_hex(4)}")
    client.create_workspace(client.workspace)
    return client


def in_millimetres(records: list[dict]) -> list[dict]:
    return [{name: round(v * 10, 3) for name, v in zip(FIELDS, r["features"], strict=True)} for r in records]


def direct(model_path: Path, records: list[dict]) -> tuple[list[int], list[float]]:
    """Labels and the highest probability of each record, straight from onnxruntime."""
    session = ort.InferenceSession(str(model_path))
    features = np.array([r["features"] for r in records], dtype=np.float32)
    labels, probabilities = session.run(["label", "probabilities"], {"features": features})
    return [int(v) for v in labels], probabilities.max(axis=1).tolist()


def direct_labels(model_path: Path, records: list[dict]) -> list[int]:
    return direct(model_path, records)[0]


def test_python_pre_and_post_steps_around_iris(client: Client, iris_model: Path) -> None:
    prep = client.upload_model(
        "iris-prep",
        STEPS / "iris_preprocess.py",
        framework="python",
        input_schema=PREP_INPUTS,
        output_schema=PREP_OUTPUTS,
    )
    assert prep.framework == "python"
    assert [(s.name, s.shape) for s in prep.outputs] == [("features", (-1, 4))]
    runner = CliRunner()
    cli = ["--registry", client.settings.registry_addr, "-w", client.workspace, "model", "upload"]
    post_options = ["--input", "label:int64:-1", "--input", "probabilities:float32:-1,3"]
    post_options += ["--output", "species:string:-1", "--output", "confidence:float32:-1"]
    result = runner.invoke(
        main, [*cli, "iris-post", str(STEPS / "iris_postprocess.py"), "--framework", "python", *post_options]
    )
    assert result.exit_code == 0, result.output
    assert "output species: string [-1]" in result.output
    client.upload_model("iris", iris_model)
    pipeline = client.build_pipeline("pre-post").add_model_step("iris-prep")
    pipeline.add_model_step("iris").add_model_step("iris-post")
    pipeline.deploy(timeout=90)

    started = datetime.now(UTC)
    good = make_records(40, seed=5)
    rows = in_millimetres(good)
    # The pre-processing step raises for non-positive measurements: those records fail alone.
    bad = [dict(rows[3], petal_width_mm=0.0), dict(rows[7], sepal_length_mm=-5.0)]
    records = rows[:10] + bad[:1] + rows[10:30] + bad[1:] + rows[30:]
    results = pipeline.infer(records, timeout=90)

    assert len(results) == len(records)
    ok = results[results["error"].isna()]
    failed = results[results["error"].notna()]
    labels, confidence = direct(iris_model, good)
    assert list(ok["out.species"]) == [SPECIES[label] for label in labels]
    assert list(ok["out.confidence"]) == pytest.approx(confidence, rel=1e-5)
    assert failed[[f"in.{name}" for name in FIELDS]].values.tolist() == [list(b.values()) for b in bad]
    assert list(failed["error"]) == [
        "step 1 (model 'iris-prep' v1) failed: ValueError: petal_width_mm must be positive, got 0.0 "
        '(line 23, in process_data: raise ValueError(f"{name} must be positive, got {column.min()}"))',
        "step 1 (model 'iris-prep' v1) failed: ValueError: sepal_length_mm must be positive, got -5.0 "
        '(line 23, in process_data: raise ValueError(f"{name} must be positive, got {column.min()}"))',
    ]

    wait_until(lambda: pipeline.log_count(start=started) == len(records), 60, "every inference logged")
    logged_failures = pipeline.logs(valid=False, start=started)
    assert sorted(logged_failures["error"]) == sorted(failed["error"])
    pipeline.undeploy()


def deploy_guarded(client: Client, iris_model: Path, tmp_path: Path) -> tuple[Pipeline, Pipeline]:
    """``guard -> iris``, and a plain iris pipeline beside it."""
    guard = tmp_path / "guard.py"
    guard.write_text(GUARD)
    features = {"features": ("float32", (-1, 4))}
    client.upload_model("guard", guard, framework="python", input_schema=features, output_schema=features)
    client.upload_model("iris", iris_model)
    guarded = client.build_pipeline("guarded").add_model_step("guard").add_model_step("iris")
    steady = client.build_pipeline("steady").add_model_step("iris")
    guarded.deploy(timeout=90)
    steady.deploy(timeout=90)
    return guarded, steady


def test_a_crashing_step_loses_nothing_and_leaves_other_pipelines_serving(
    client: Client, iris_model: Path, tmp_path: Path
) -> None:
    guarded, steady = deploy_guarded(client, iris_model, tmp_path)
    started = datetime.now(UTC)

    poison = {"features": [666.0, 3.0, 1.4, 0.2]}
    first = guarded.infer([poison], timeout=60)
    assert first["error"].tolist() == [
        "step 1 (model 'guard' v1) failed: python step 'guard' process exited with code 1"
    ]

    # Another pipeline is a replica of its own: untouched.
    others = make_records(20, seed=8)
    answered = steady.infer(others, timeout=60)
    assert [int(v) for v in answered["out.label"]] == direct_labels(iris_model, others)

    # The step came back: later records are answered.
    later = make_records(30, seed=6)
    results = guarded.infer(later[:15], timeout=90)
    assert [int(v) for v in results["out.label"]] == direct_labels(iris_model, later[:15])

    # A poison among other records fails alone: the crashed batch is retried in halves until it is alone.
    mixed = later[15:] + [poison]
    results = guarded.infer(mixed, timeout=90)
    expected = direct_labels(iris_model, mixed)
    assert results["error"].iloc[-1] == first["error"].iloc[0]
    assert results["error"].iloc[:-1].isna().all()
    assert [int(v) for v in results["out.label"].iloc[:-1]] == expected[:-1]
    failures = 1

    after = make_records(10, seed=7)
    assert [int(v) for v in guarded.infer(after, timeout=60)["out.label"]] == direct_labels(iris_model, after)

    # Nothing lost: every input has an output or an error, and one log row.
    total = 1 + len(later) + 1 + len(after)
    wait_until(lambda: guarded.log_count(start=started) == total, 60, "every inference logged")
    assert guarded.log_count(start=started, valid=False) == 1 + failures
    guarded.undeploy()
    steady.undeploy()


def test_a_hanging_step_is_killed_after_the_timeout_while_other_pipelines_serve(
    client: Client, iris_model: Path, tmp_path: Path
) -> None:
    guarded, steady = deploy_guarded(client, iris_model, tmp_path)
    started = datetime.now(UTC)
    hang = {"features": [777.0, 3.0, 1.4, 0.2]}
    with ThreadPoolExecutor(1) as pool:
        # The stack's engine times python steps out after 3 s: the other pipeline answers meanwhile.
        hung = pool.submit(guarded.infer, [hang], 120)
        others = make_records(20, seed=8)
        answered = steady.infer(others, timeout=60)
        assert [int(v) for v in answered["out.label"]] == direct_labels(iris_model, others)
        first = hung.result()
    assert first["error"].tolist() == [
        "step 1 (model 'guard' v1) failed: python step 'guard' timed out after 3 s; its process was killed"
    ]
    later = make_records(20, seed=6)
    results = guarded.infer(later, timeout=60)
    assert [int(v) for v in results["out.label"]] == direct_labels(iris_model, later)
    wait_until(lambda: guarded.log_count(start=started) == 1 + len(later), 60, "every inference logged")
    assert guarded.log_count(start=started, valid=False) == 1
    guarded.undeploy()
    steady.undeploy()


def test_docs_example_runs(
    stack: Stack, env: dict[str, str], iris_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = STEPS.parents[1]
    text = (root / "docs" / "python-steps.md").read_text()
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    code = code.replace('"examples/model/iris.onnx"', repr(str(iris_model)))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(root)
    scope: dict[str, object] = {}
    exec(code, scope)  # noqa: S102 - the documented example, as a user would run it
    results = scope["results"]
    assert results["error"].isna().tolist() == [True, False]  # type: ignore[index]
    assert results["out.species"].iloc[0] == "setosa"  # type: ignore[index]
    assert "ValueError: sepal_length_mm must be positive, got 0.0" in results["error"].iloc[1]  # type: ignore[index]
