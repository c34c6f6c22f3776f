from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from joey_core.v1 import registry_pb2
from joey_engine.deployment import Deployment, from_proto
from joey_engine.pipeline import Failure, PipelineRunner, Result, Success
from joey_engine.runtime import OnnxRuntime, create_runtime
from joey_engine.settings import EngineSettings

StepFactory = Callable[..., registry_pb2.ResolvedStep]
SETTINGS = EngineSettings(instance_id="unit")


def load(path: Path) -> OnnxRuntime:
    runtime = OnnxRuntime(SETTINGS)
    runtime.load(path)
    return runtime


@pytest.fixture(scope="module")
def iris_runner(iris_model: Path, make_deployment: Callable[..., Deployment]) -> PipelineRunner:
    return PipelineRunner(make_deployment(), [load(iris_model)])


def direct(model: Path, features: list[list[float]]) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    label, probabilities = session.run(
        ["label", "probabilities"], {"features": np.asarray(features, np.float32)}
    )
    return {"label": label, "probabilities": probabilities}


def encode(row: object) -> bytes:
    return json.dumps(row).encode()


ROWS = [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3], [5.9, 2.8, 4.3, 1.3], [6.3, 3.3, 6.0, 2.5]]


def test_runtime_reports_its_signature(iris_model: Path) -> None:
    runtime = create_runtime("onnx", SETTINGS)
    runtime.load(iris_model)
    assert [(t.name, t.dtype, t.shape) for t in runtime.inputs] == [("features", "float32", (-1, 4))]
    assert [(t.name, t.dtype, t.shape) for t in runtime.outputs] == [
        ("label", "int64", (-1,)),
        ("probabilities", "float32", (-1, 3)),
    ]
    with pytest.raises(ValueError, match="unsupported model framework 'pytorch'"):
        create_runtime("pytorch", SETTINGS)


def test_batch_matches_onnxruntime(iris_runner: PipelineRunner, iris_model: Path) -> None:
    rows = ROWS * 10
    results = iris_runner.run([encode({"features": row, "id": i}) for i, row in enumerate(rows)])
    expected = direct(iris_model, rows)
    assert all(isinstance(r, Success) for r in results)
    successes = [r for r in results if isinstance(r, Success)]
    assert [r.outputs["label"] for r in successes] == expected["label"].tolist()
    np.testing.assert_allclose([r.outputs["probabilities"] for r in successes], expected["probabilities"])
    # Fields that are not model inputs travel through untouched; the batch's step time is reported.
    assert [r.inputs["id"] for r in successes] == list(range(len(rows)))
    assert len(successes[0].elapsed_ns) == 1 and successes[0].elapsed_ns[0] > 0
    assert {r.elapsed_ns for r in successes} == {successes[0].elapsed_ns}


BAD_RECORDS = [
    (b"not json", None, "record is not valid JSON"),
    (b"[1, 2, 3]", None, "record must be a JSON object mapping input names to values, got list"),
    (None, None, "empty record"),
    (
        encode({"feature": ROWS[0]}),
        {"feature": ROWS[0]},
        "missing input 'features'; the pipeline expects inputs",
    ),
    (
        encode({"features": [1, 2, 3]}),
        {"features": [1, 2, 3]},
        "input 'features' has shape [3], expected [4]",
    ),
    (encode({"features": [[1, 2, 3, 4]]}), {"features": [[1, 2, 3, 4]]}, "has shape [1, 4], expected [4]"),
    (
        encode({"features": [[1, 2], [3]]}),
        {"features": [[1, 2], [3]]},
        "input 'features' is not a rectangular",
    ),
    (
        encode({"features": "abc"}),
        {"features": "abc"},
        "input 'features' must hold float32 values, got a string (\"abc\")",
    ),
    (
        encode({"features": [1, "a", 2, 3]}),
        {"features": [1, "a", 2, 3]},
        'must hold float32 values, got a string at element [1] ("a")',
    ),
    # A DataFrame's NaN arrives as null: the error says where, and why null is refused.
    (
        encode({"features": [1, 2, None, 3]}),
        {"features": [1, 2, None, 3]},
        "input 'features' must hold float32 values, got null at element [2]: JSON has no NaN",
    ),
    (
        encode({"features": [True] * 4}),
        {"features": [True] * 4},
        "must hold float32 values, got a boolean at element [0] (true)",
    ),
    (b'{"features": [NaN, 1, 2, 3]}', ..., "input 'features' contains NaN/inf at element [0] (nan)"),
    (b'{"features": [1, Infinity, 2, 3]}', ..., "input 'features' contains NaN/inf at element [1] (inf)"),
    (b'{"features": [1, 2, -Infinity, 3]}', ..., "input 'features' contains NaN/inf at element [2] (-inf)"),
    (
        b'{"features": [1, 1e39, 2, 3]}',
        ...,
        "input 'features' has a value out of range for float32 at element [1] (1e+39)",
    ),
    (
        encode({"features": [1, 2**70, 2, 3]}),
        {"features": [1, 2**70, 2, 3]},
        "input 'features' must hold float32 values, got an integer out of range at element [1] "
        "(1180591620717411303424): JSON integers must fit in 64 bits",
    ),
]


def test_each_bad_record_fails_alone(iris_runner: PipelineRunner, iris_model: Path) -> None:
    values: list[bytes | None] = []
    for value, _, _ in BAD_RECORDS:
        values += [encode({"features": ROWS[len(values) % 4]}), value]
    results = iris_runner.run(values)
    good, bad = results[0::2], results[1::2]
    expected = direct(iris_model, [ROWS[(2 * i) % 4] for i in range(len(BAD_RECORDS))])
    assert [r.outputs["label"] if isinstance(r, Success) else r for r in good] == expected["label"].tolist()
    for result, (value, parsed, reason) in zip(bad, BAD_RECORDS, strict=True):
        assert isinstance(result, Failure), value
        assert reason in result.reason, (value, result.reason)
        if parsed is not ...:
            assert result.inputs == parsed
    # The expected inputs are listed for a missing one, and the fields the record has instead.
    assert bad[3].reason == (  # type: ignore[union-attr]
        "missing input 'features'; the pipeline expects inputs 'features' (float32 [4]); "
        "the record has fields 'feature'"
    )


def max_model_of(directory: Path, name: str, element: int, dims: list[int | str]) -> Path:
    """``name`` of ``element`` type and shape ``dims`` -> the maximum of each record's value, ``top``."""
    graph = helper.make_graph(
        [helper.make_node("ReduceMax", [name], ["top"], axes=list(range(1, len(dims))), keepdims=0)],
        f"{name}-max",
        [helper.make_tensor_value_info(name, element, dims)],
        [helper.make_tensor_value_info("top", element, ["N"])],
    )
    path = directory / f"{name}-max.onnx"
    path.write_bytes(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
    )
    return path


def runner_of(model: Path, make_deployment: Callable[..., Deployment]) -> PipelineRunner:
    step = registry_pb2.ResolvedStep(model=model.stem, version=1, sha256="5" * 64, framework="onnx")
    return PipelineRunner(make_deployment(steps=[step]), [load(model)])


@pytest.mark.parametrize(
    ("counts", "reason"),
    [
        ([1, 1.5, 2], "input 'counts' must hold int64 values, got a non-integer number at element [1] (1.5)"),
        (
            [1, 2.0, 3],
            "input 'counts' must hold int64 values, got a number written as a float at element [1] (2.0)",
        ),
        (
            [1, 2, 2**70],
            "input 'counts' must hold int64 values, got an integer out of range for int64 at element [2] "
            "(1180591620717411303424)",
        ),
        (
            [1, 2, 2**64 - 1],
            "input 'counts' must hold int64 values, got an integer out of range for int64 at element [2] "
            "(18446744073709551615)",
        ),
        ([[1, 2]], "input 'counts' has shape [1, 2], expected [-1]"),
        (None, "input 'counts' must hold int64 values, got null"),
    ],
)
def test_an_integer_input_names_what_it_got(
    tmp_path: Path, make_deployment: Callable[..., Deployment], counts: object, reason: str
) -> None:
    runner = runner_of(max_model_of(tmp_path, "counts", TensorProto.INT64, ["N", "K"]), make_deployment)
    good, bad, missing = runner.run([encode({"counts": [1, 7, 3]}), encode({"counts": counts}), b"{}"])
    assert isinstance(good, Success) and good.outputs["top"] == 7
    assert isinstance(bad, Failure) and bad.reason == reason
    # Any size is -1, as signatures show it.
    assert isinstance(missing, Failure) and "expects inputs 'counts' (int64 [-1])" in missing.reason


def test_a_wrong_element_at_the_end_of_a_large_input_is_named(
    tmp_path: Path, make_deployment: Callable[..., Deployment]
) -> None:
    # How fast it is found is a benchmark's business, not a test's.
    runner = runner_of(
        max_model_of(tmp_path, "image", TensorProto.FLOAT, ["N", 224, 224, 3]), make_deployment
    )
    image = np.random.default_rng(5).random((224, 224, 3)).tolist()
    image[223][223][2] = None
    (result,) = runner.run([encode({"image": image})])
    assert isinstance(result, Failure)
    assert result.reason.startswith(
        "input 'image' must hold float32 values, got null at element [223, 223, 2]"
    )


def test_records_failed_before_running_keep_their_place(
    iris_runner: PipelineRunner, iris_model: Path
) -> None:
    """Records a replica drops (past their deadline) come back as given, in their places, without being
    read; the others run and each gets its own result."""
    dropped = Failure("deadline exceeded 5 ms before a replica reached the record; not processed", None)
    values = [encode({"features": row, "id": i}) for i, row in enumerate(ROWS)] + [b"not json"]
    results = iris_runner.run(values, {1: dropped, 4: dropped})
    assert results[1] is dropped and results[4] is dropped, "a dropped record is not decoded"
    ran = [results[i] for i in (0, 2, 3)]
    assert all(isinstance(r, Success) for r in ran), ran
    assert [r.inputs["id"] for r in ran if isinstance(r, Success)] == [0, 2, 3]
    expected = direct(iris_model, [ROWS[0], ROWS[2], ROWS[3]])["label"].tolist()
    assert [r.outputs["label"] for r in ran if isinstance(r, Success)] == expected
    assert iris_runner.run(values[:2], {0: dropped, 1: dropped}) == [dropped, dropped]


def test_integers_are_valid_floats(iris_runner: PipelineRunner, iris_model: Path) -> None:
    [result] = iris_runner.run([encode({"features": [6, 3, 5, 2]})])
    assert isinstance(result, Success)
    assert result.outputs["label"] == direct(iris_model, [[6, 3, 5, 2]])["label"][0]


def test_two_steps_chain_by_name(
    iris_model: Path, max_model: Path, make_deployment: Callable[..., Deployment], make_step: StepFactory
) -> None:
    max_step = registry_pb2.ResolvedStep(model="max", version=2, sha256="1" * 64, framework="onnx")
    deployment = make_deployment(steps=[make_step("0" * 64), max_step])
    runner = PipelineRunner(deployment, [load(iris_model), load(max_model)])
    results = runner.run([encode({"features": row}) for row in ROWS] + [b"{}"])
    expected = direct(iris_model, ROWS)["probabilities"].max(axis=1)
    successes = [r for r in results if isinstance(r, Success)]
    assert list(successes[0].outputs) == ["max_probability"]
    np.testing.assert_allclose([r.outputs["max_probability"] for r in successes], expected)
    assert len(successes[0].elapsed_ns) == 2
    assert isinstance(results[-1], Failure) and "missing input 'features'" in results[-1].reason


def test_chain_with_unmatched_names_is_rejected(
    iris_model: Path, make_deployment: Callable[..., Deployment], make_step: StepFactory
) -> None:
    deployment = make_deployment(steps=[make_step("0" * 64), make_step("1" * 64)])
    with pytest.raises(ValueError, match=r"step 2 \(model 'iris'\) needs inputs \['features'\]"):
        PipelineRunner(deployment, [load(iris_model), load(iris_model)])


def test_fixed_batch_of_one_runs_per_record(
    tmp_path: Path, iris_model: Path, make_deployment: Callable[..., Deployment]
) -> None:
    import onnx

    model = onnx.load(str(iris_model))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    path = tmp_path / "iris-one.onnx"
    onnx.save(model, str(path))
    runtime = load(path)
    assert runtime.inputs[0].shape == (1, 4)
    results = PipelineRunner(make_deployment(), [runtime]).run([encode({"features": row}) for row in ROWS])
    assert [r.outputs["label"] for r in results if isinstance(r, Success)] == direct(iris_model, ROWS)[
        "label"
    ].tolist()


def test_failing_batch_falls_back_to_single_records(
    iris_model: Path, make_deployment: Callable[..., Deployment]
) -> None:
    class Picky(OnnxRuntime):
        """Fails any batch holding a record whose first feature is negative."""

        def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            if (inputs["features"][:, 0] < 0).any():
                raise RuntimeError("negative feature")
            return super().predict(inputs)

    runtime = Picky(SETTINGS)
    runtime.load(iris_model)
    values = [encode({"features": row}) for row in ROWS] + [encode({"features": [-1, 1, 1, 1]})]
    results = PipelineRunner(make_deployment(), [runtime]).run(values)
    assert all(isinstance(r, Success) for r in results[:-1])
    failure = results[-1]
    assert isinstance(failure, Failure)
    assert failure.reason == "step 1 (model 'iris' v1) failed: negative feature"


@pytest.mark.parametrize(
    "odd",
    [
        [True, True, False, True],
        [1.0, 2.0, None, 4.0],
        [1.0, 2.0, "3", 4.0],
        [1.0, 2.0, 3.0],
        [1.0, 2.0, 3.0, 1e400],
    ],
)
def test_a_batch_gives_each_record_the_verdict_it_gets_alone(iris_runner: PipelineRunner, odd: list) -> None:
    """The column-wise fast path must never accept what record-by-record validation rejects."""
    alone = iris_runner.run([encode({"features": odd})])[0]
    assert isinstance(alone, Failure)
    batch = iris_runner.run([encode({"features": row}) for row in ROWS] + [encode({"features": odd})])
    assert all(isinstance(r, Success) for r in batch[:-1])
    assert batch[-1] == alone


def test_integer_records_feed_a_float_model_in_one_batch(iris_runner: PipelineRunner) -> None:
    as_ints = [[5, 3, 1, 0], [6, 3, 5, 2]]
    batch = iris_runner.run([encode({"features": row}) for row in as_ints])
    one_by_one = [iris_runner.run([encode({"features": row})])[0] for row in as_ints]
    assert all(isinstance(r, Success) for r in batch + one_by_one)
    assert [(r.inputs, r.outputs) for r in batch] == [(r.inputs, r.outputs) for r in one_by_one]  # type: ignore[union-attr]


CHECKS = {"too_sure": "out.probabilities[0] > 0.99", "wide": "in.features[0] > 7.0"}
# Two iris-setosa rows (class 0, certain), two wide ones (first feature above 7) and the usual mix.
CHECKED_ROWS = ROWS + [[4.9, 3.0, 1.4, 0.2], [7.7, 3.0, 6.1, 2.3], [7.2, 3.6, 6.1, 2.5]]


def expected_flags(model: Path, rows: list[list[float]]) -> list[tuple[str, ...]]:
    """The checks of CHECKS computed directly; the thresholds must not sit on a value the model gives."""
    setosa = direct(model, rows)["probabilities"][:, 0]
    assert not np.isclose(setosa, 0.99, atol=1e-4).any()
    return [
        tuple(name for name, hit in (("too_sure", p > 0.99), ("wide", row[0] > 7.0)) if hit)
        for p, row in zip(setosa, rows, strict=True)
    ]


@pytest.fixture(scope="module")
def checked_runner(
    iris_model: Path,
    make_deployment: Callable[..., Deployment],
    make_step: StepFactory,
    make_validations: StepFactory,
) -> PipelineRunner:
    deployment = make_deployment(steps=[make_step("0" * 64), make_validations(**CHECKS)])
    assert deployment.check_names == ("too_sure", "wide")
    assert deployment.models == [{"name": "iris", "version": 1, "sha256": "0" * 64}]
    return PipelineRunner(deployment, [load(iris_model)])


def successes(results: list[Result]) -> list[Success]:
    assert all(isinstance(r, Success) for r in results), results
    return [r for r in results if isinstance(r, Success)]


def test_checks_flag_records_after_the_model_step(
    checked_runner: PipelineRunner, iris_runner: PipelineRunner, iris_model: Path
) -> None:
    values = [encode({"features": row}) for row in CHECKED_ROWS]
    results = successes(checked_runner.run(values))
    expected = expected_flags(iris_model, CHECKED_ROWS)
    assert {(), ("too_sure",), ("wide",)} <= set(expected)  # the test sees every outcome
    assert [r.check_failures for r in results] == expected
    assert all(r.check_errors == () for r in results)
    # The checks' time is a step of its own; the outputs are the model's, untouched by the checks.
    assert len(results[0].elapsed_ns) == 2 and all(t > 0 for t in results[0].elapsed_ns)
    plain = successes(iris_runner.run(values))
    assert [r.outputs for r in results] == [r.outputs for r in plain]
    assert all(r.check_failures == () and len(r.elapsed_ns) == 1 for r in plain)
    # Alone, each record gets the verdict it got in the batch.
    assert [successes(checked_runner.run([v]))[0].check_failures for v in values] == expected


def test_check_on_a_field_missing_from_some_records_flags_only_them(
    iris_model: Path,
    make_deployment: Callable[..., Deployment],
    make_step: StepFactory,
    make_validations: StepFactory,
) -> None:
    checks = {"risky": "in.score > 0.5", "many_tags": "len(in.tags) > 2"}
    deployment = make_deployment(steps=[make_step("0" * 64), make_validations(**checks)])
    runner = PipelineRunner(deployment, [load(iris_model)])
    rows: list[dict[str, object]] = [
        {"features": ROWS[0], "score": 0.9, "tags": ["a", "b", "c"]},
        {"features": ROWS[1], "tags": ["a"]},  # no score: "risky" cannot be evaluated
        {"features": ROWS[2], "score": 0.1, "tags": []},
        {"features": ROWS[3], "score": "high", "tags": ["a", "b"]},  # a string is not a number
    ]
    # Tags of different lengths do not make a column: "many_tags" goes record by record, without failing any.
    # A bad record sends the batch down the record-by-record validation: the checks see the good ones only.
    *results, bad = runner.run([encode(row) for row in rows] + [b'{"features": [1, 2, 3]}'])
    assert isinstance(bad, Failure) and "has shape [3]" in bad.reason
    results = successes(results)
    assert [r.check_failures for r in results[:4]] == [("many_tags", "risky"), ("risky",), (), ("risky",)]
    assert results[1].check_errors == ("check 'risky' cannot be evaluated: the record has no field 'score'",)
    assert len(results[3].check_errors) == 1 and results[3].check_errors[0].startswith("check 'risky'")
    assert results[0].check_errors == results[2].check_errors == ()
    # Still answered: the model's outputs are there as without checks.
    assert [r.outputs["label"] for r in results[:4]] == direct(iris_model, ROWS)["label"].tolist()


def test_validations_step_between_two_models_checks_the_first(
    iris_model: Path,
    max_model: Path,
    make_deployment: Callable[..., Deployment],
    make_step: StepFactory,
    make_validations: StepFactory,
) -> None:
    max_step = registry_pb2.ResolvedStep(model="max", version=2, sha256="1" * 64, framework="onnx")
    deployment = make_deployment(steps=[make_step("0" * 64), make_validations(**CHECKS), max_step])
    assert [m["name"] for m in deployment.models] == ["iris", "max"]
    runner = PipelineRunner(deployment, [load(iris_model), load(max_model)])
    results = successes(runner.run([encode({"features": row}) for row in CHECKED_ROWS]))
    assert [r.check_failures for r in results] == expected_flags(iris_model, CHECKED_ROWS)
    expected = direct(iris_model, CHECKED_ROWS)["probabilities"].max(axis=1)
    np.testing.assert_allclose([r.outputs["max_probability"] for r in results], expected)
    assert list(results[0].outputs) == ["max_probability"]
    assert len(results[0].elapsed_ns) == 3


def test_checks_evaluated_when_records_run_one_at_a_time(
    iris_model: Path,
    make_deployment: Callable[..., Deployment],
    make_step: StepFactory,
    make_validations: StepFactory,
) -> None:
    class Picky(OnnxRuntime):
        def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            if (inputs["features"][:, 0] < 0).any():
                raise RuntimeError("negative feature")
            return super().predict(inputs)

    runtime = Picky(SETTINGS)
    runtime.load(iris_model)
    deployment = make_deployment(steps=[make_step("0" * 64), make_validations(**CHECKS)])
    runner = PipelineRunner(deployment, [runtime])
    *results, failure = runner.run(
        [encode({"features": row}) for row in CHECKED_ROWS] + [encode({"features": [-1, 1, 1, 1]})]
    )
    assert isinstance(failure, Failure) and "negative feature" in failure.reason
    assert [r.check_failures for r in successes(results)] == expected_flags(iris_model, CHECKED_ROWS)


@pytest.mark.parametrize(
    ("steps", "error"),
    [
        (
            ["iris", {"shaky": "out.probabilities[0] >"}],
            r"step 2 \(validations\): check 'shaky' is invalid: ",
        ),
        (
            ["iris", {"odd": "out.score > 1"}],
            r"step 2 \(validations\): checks refer to outputs \['score'\] that the model step before them "
            r"does not produce; it produces \['label', 'probabilities'\]",
        ),
        (
            [{"early": "out.label == 0"}, "iris"],
            r"step 1 \(validations\): checks refer to model outputs \['label'\] but no model step comes",
        ),
    ],
)
def test_unusable_checks_fail_the_load(
    iris_model: Path,
    make_deployment: Callable[..., Deployment],
    make_step: StepFactory,
    make_validations: StepFactory,
    steps: list[str | dict[str, str]],
    error: str,
) -> None:
    deployment = make_deployment(
        steps=[make_validations(**s) if isinstance(s, dict) else make_step("0" * 64) for s in steps]
    )
    with pytest.raises(ValueError, match=error):
        PipelineRunner(deployment, [load(iris_model)])


def test_checks_on_inputs_alone_may_come_first(
    iris_model: Path,
    make_deployment: Callable[..., Deployment],
    make_step: StepFactory,
    make_validations: StepFactory,
) -> None:
    deployment = make_deployment(steps=[make_validations(wide="in.features[0] > 7.0"), make_step("0" * 64)])
    runner = PipelineRunner(deployment, [load(iris_model)])
    results = successes(runner.run([encode({"features": row}) for row in CHECKED_ROWS]))
    assert [r.check_failures for r in results] == [("wide",) if row[0] > 7.0 else () for row in CHECKED_ROWS]
    assert [r.outputs["label"] for r in results] == direct(iris_model, CHECKED_ROWS)["label"].tolist()


@pytest.fixture(scope="module")
def petals_runner(iris_model: Path, make_deployment: Callable[..., Deployment]) -> PipelineRunner:
    """Iris fed from the record field ``petals`` instead of ``features``."""
    return PipelineRunner(make_deployment(input_mapping={"features": "petals"}), [load(iris_model)])


def test_first_step_reads_inputs_from_the_mapped_record_field(
    petals_runner: PipelineRunner, iris_model: Path
) -> None:
    values = [encode({"petals": row, "id": i}) for i, row in enumerate(ROWS)]
    expected = direct(iris_model, ROWS)["label"].tolist()
    results = successes(petals_runner.run(values))
    assert [r.outputs["label"] for r in results] == expected
    # A mapping must not cost the column-wise fast path.
    assert petals_runner._stack_batch([json.loads(v) for v in values], values) is not None
    # ``in`` stays the record as received.
    assert [r.inputs for r in results] == [{"petals": row, "id": i} for i, row in enumerate(ROWS)]
    # The same through the record-by-record path, which a bad record in the batch forces.
    *mixed, bad = petals_runner.run(values + [encode({"petals": [1, 2, 3]})])
    assert [r.outputs["label"] for r in successes(mixed)] == expected
    assert isinstance(bad, Failure)


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        (
            {"features": ROWS[0]},
            "missing input 'features' (the pipeline reads it from record field 'petals'); "
            "the pipeline expects inputs 'features' (record field 'petals', float32 [4]); "
            "the record has fields 'features'",
        ),
        ({"petals": [1, 2, 3]}, "input 'features' (record field 'petals') has shape [3], expected [4]"),
        (
            {"petals": "abc"},
            "input 'features' (record field 'petals') must hold float32 values, got a string (\"abc\")",
        ),
        ({"petals": [1, 2], "features": ROWS[0]}, "input 'features' (record field 'petals') has shape [2]"),
    ],
)
def test_bad_mapped_field_is_named_in_the_error(
    petals_runner: PipelineRunner, row: dict[str, object], reason: str
) -> None:
    alone = petals_runner.run([encode(row)])[0]
    assert isinstance(alone, Failure) and alone.inputs == row
    assert alone.reason.startswith(reason), alone.reason
    *good, in_batch = petals_runner.run([encode({"petals": r}) for r in ROWS] + [encode(row)])
    assert len(successes(good)) == len(ROWS)
    assert in_batch == alone


def test_mapping_an_input_the_model_lacks_fails_the_load(
    iris_model: Path, make_deployment: Callable[..., Deployment]
) -> None:
    deployment = make_deployment(input_mapping={"petals": "features"})
    with pytest.raises(
        ValueError,
        match=r"step 1 \(model 'iris'\) maps inputs \['petals'\] that it does not have; "
        r"its inputs are \['features'\]",
    ):
        PipelineRunner(deployment, [load(iris_model)])


def x_step(**input_mapping: str) -> registry_pb2.ResolvedStep:
    return registry_pb2.ResolvedStep(
        model="top", version=1, sha256="2" * 64, framework="onnx", input_mapping=input_mapping
    )


def test_two_steps_chain_by_mapping_across_validations(
    iris_model: Path,
    x_max_model: Path,
    make_deployment: Callable[..., Deployment],
    make_step: StepFactory,
    make_validations: StepFactory,
) -> None:
    checks = {"too_sure": "out.probabilities[0] > 0.99", "wide": "in.petals[0] > 7.0"}
    deployment = make_deployment(
        steps=[
            make_step("0" * 64, input_mapping={"features": "petals"}),
            make_validations(**checks),
            x_step(x="probabilities"),
        ]
    )
    runner = PipelineRunner(deployment, [load(iris_model), load(x_max_model)])
    results = successes(runner.run([encode({"petals": row}) for row in CHECKED_ROWS]))
    expected = direct(iris_model, CHECKED_ROWS)["probabilities"].max(axis=1)
    assert list(results[0].outputs) == ["top"]
    np.testing.assert_allclose([r.outputs["top"] for r in results], expected)
    assert [r.check_failures for r in results] == expected_flags(iris_model, CHECKED_ROWS)
    assert len(results[0].elapsed_ns) == 3


@pytest.mark.parametrize(
    ("mapping", "error"),
    [
        ({}, r"step 2 \(model 'top'\) needs inputs \['x'\] that step 1 \(model 'iris'\) does not produce"),
        ({"x": "probs"}, r"needs inputs \['x<-probs'\] .* it produces \['label', 'probabilities'\]"),
    ],
)
def test_chain_mapped_to_missing_outputs_is_rejected(
    iris_model: Path,
    x_max_model: Path,
    make_deployment: Callable[..., Deployment],
    make_step: StepFactory,
    mapping: dict[str, str],
    error: str,
) -> None:
    deployment = make_deployment(steps=[make_step("0" * 64), x_step(**mapping)])
    with pytest.raises(ValueError, match=error):
        PipelineRunner(deployment, [load(iris_model), load(x_max_model)])


def sums(rows: list[list[float]]) -> list[float]:
    return np.asarray(rows, np.float32).sum(axis=1).tolist()


@pytest.fixture(scope="module")
def shadow_runner(
    iris_model: Path,
    sum_model: Path,
    make_deployment: Callable[..., Deployment],
    make_step: StepFactory,
    make_challenger: StepFactory,
) -> PipelineRunner:
    """Iris as the champion, ``sum`` (row sums of the same ``features``) as its challenger."""
    deployment = make_deployment(steps=[make_step("0" * 64, challengers=[make_challenger("sum")])])
    assert deployment.has_shadow and [m["name"] for m in deployment.models] == ["iris"]
    return PipelineRunner(deployment, [load(iris_model), load(sum_model)])


def test_shadow_step_answers_with_the_champion_and_records_each_challenger(
    shadow_runner: PipelineRunner, iris_runner: PipelineRunner
) -> None:
    values = [encode({"features": row, "id": i}) for i, row in enumerate(ROWS)]
    results = successes(shadow_runner.run(values))
    plain = successes(iris_runner.run(values))
    assert [(r.inputs, r.outputs) for r in results] == [(r.inputs, r.outputs) for r in plain]
    np.testing.assert_allclose([r.shadow["sum"]["total"] for r in results if r.shadow], sums(ROWS), rtol=1e-6)
    assert all(r.shadow is not None and list(r.shadow) == ["sum"] for r in results)
    assert all(r.shadow_errors == {} for r in results)
    # One time per step: the shadow step's covers the champion and its challengers.
    assert len(results[0].elapsed_ns) == 1
    # Without a shadow step there is nothing of it.
    assert all(r.shadow is None and r.shadow_errors is None for r in plain)
    # Through the record-by-record path too, which a bad record in the batch forces.
    *mixed, bad = shadow_runner.run(values + [encode({"features": [1, 2, 3]})])
    assert [r.shadow for r in successes(mixed)] == [r.shadow for r in results]
    assert isinstance(bad, Failure) and "has shape [3]" in bad.reason


def test_failing_challengers_leave_the_result_and_checks_intact(
    iris_model: Path,
    sum_model: Path,
    one_row_model: Path,
    checked_runner: PipelineRunner,
    make_deployment: Callable[..., Deployment],
    make_step: StepFactory,
    make_challenger: StepFactory,
    make_validations: StepFactory,
) -> None:
    class Picky(OnnxRuntime):
        def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            if (inputs["features"][:, 0] > 7).any():
                raise RuntimeError("too wide")
            return super().predict(inputs)

    picky = Picky(SETTINGS)
    picky.load(sum_model)
    challengers = [make_challenger("pooled"), make_challenger("picky"), make_challenger("sum")]
    deployment = make_deployment(
        steps=[make_step("0" * 64, challengers=challengers), make_validations(**CHECKS)]
    )
    runner = PipelineRunner(deployment, [load(iris_model), load(one_row_model), picky, load(sum_model)])
    values = [encode({"features": row}) for row in CHECKED_ROWS]
    results = successes(runner.run(values))
    checked = successes(checked_runner.run(values))
    assert [(r.outputs, r.check_failures, r.check_errors) for r in results] == [
        (r.outputs, r.check_failures, r.check_errors) for r in checked
    ]
    assert len(results[0].elapsed_ns) == 2
    # The batch holds wide rows: "picky" fails all of it; "pooled" never gives one row per record.
    assert all(r.shadow_errors is not None and list(r.shadow_errors) == ["pooled", "picky"] for r in results)
    errors = results[0].shadow_errors or {}
    assert errors["pooled"] == (
        f"challenger 'pooled' v1 of step 1 output 'pooled' has shape [1, 4], expected a first dimension "
        f"of {len(CHECKED_ROWS)} (one row per record)"
    )
    assert errors["picky"] == "challenger 'picky' v1 of step 1 failed: too wide"
    # The challenger that works is still recorded.
    np.testing.assert_allclose(
        [(r.shadow or {})["sum"]["total"] for r in results], sums(CHECKED_ROWS), rtol=1e-6
    )
    assert all(list(r.shadow or {}) == ["sum"] for r in results)
    # Alone, a narrow record suits "picky"; and "pooled" gives the one row a single record needs.
    [alone] = successes(runner.run([values[0]]))
    assert alone.shadow_errors == {} and list(alone.shadow or {}) == ["pooled", "picky", "sum"]


def test_challenger_reads_its_own_record_field(
    iris_model: Path,
    sum_model: Path,
    iris_runner: PipelineRunner,
    make_deployment: Callable[..., Deployment],
    make_step: StepFactory,
    make_challenger: StepFactory,
) -> None:
    challenger = make_challenger("sum", features="petals")
    deployment = make_deployment(steps=[make_step("0" * 64, challengers=[challenger])])
    runner = PipelineRunner(deployment, [load(iris_model), load(sum_model)])
    rows: list[dict[str, object]] = [
        {"features": ROWS[0], "petals": ROWS[1]},
        {"features": ROWS[1]},  # nothing for the challenger: only it fails on this record
        {"features": ROWS[2], "petals": [1, 2]},
        {"features": ROWS[3], "petals": ROWS[0]},
    ]
    values = [encode(row) for row in rows]
    results = successes(runner.run(values))
    assert [r.outputs for r in results] == [r.outputs for r in successes(iris_runner.run(values))]
    assert results[0].shadow == {"sum": {"total": pytest.approx(sums([ROWS[1]])[0])}}
    assert results[3].shadow == {"sum": {"total": pytest.approx(sums([ROWS[0]])[0])}}
    assert results[1].shadow == results[2].shadow == {}
    assert results[1].shadow_errors == {
        "sum": "missing input 'features' (the pipeline reads it from record field 'petals'); "
        "the model expects inputs 'features' (record field 'petals', float32 [4]); "
        "the record has fields 'features'"
    }
    assert results[2].shadow_errors == {
        "sum": "input 'features' (record field 'petals') has shape [2], expected [4]"
    }
    assert results[0].shadow_errors == results[3].shadow_errors == {}


def test_shadow_step_after_a_model_chains_from_its_outputs(
    iris_model: Path,
    max_model: Path,
    x_max_model: Path,
    make_deployment: Callable[..., Deployment],
    make_step: StepFactory,
    make_challenger: StepFactory,
) -> None:
    champion = registry_pb2.ResolvedStep(
        model="max",
        version=2,
        sha256="1" * 64,
        framework="onnx",
        challengers=[make_challenger("top", x="probabilities")],
    )
    deployment = make_deployment(steps=[make_step("0" * 64), champion])
    runner = PipelineRunner(deployment, [load(iris_model), load(max_model), load(x_max_model)])
    results = successes(runner.run([encode({"features": row}) for row in ROWS]))
    expected = direct(iris_model, ROWS)["probabilities"].max(axis=1)
    np.testing.assert_allclose([r.outputs["max_probability"] for r in results], expected)
    np.testing.assert_allclose([(r.shadow or {})["top"]["top"] for r in results], expected)
    assert list(results[0].outputs) == ["max_probability"] and len(results[0].elapsed_ns) == 2


@pytest.mark.parametrize(
    ("mapping", "error"),
    [
        (
            {},
            r"challenger 'top' v1 of step 2 needs inputs \['x'\] that step 1 \(model 'iris'\) does not "
            r"produce",
        ),
        ({"y": "probabilities"}, r"challenger 'top' v1 of step 2 maps inputs \['y'\] that it does not have"),
    ],
)
def test_challenger_that_cannot_be_fed_fails_the_load(
    iris_model: Path,
    max_model: Path,
    x_max_model: Path,
    make_deployment: Callable[..., Deployment],
    make_step: StepFactory,
    make_challenger: StepFactory,
    mapping: dict[str, str],
    error: str,
) -> None:
    champion = registry_pb2.ResolvedStep(
        model="max", version=2, sha256="1" * 64, challengers=[make_challenger("top", **mapping)]
    )
    deployment = make_deployment(steps=[make_step("0" * 64), champion])
    with pytest.raises(ValueError, match=error):
        PipelineRunner(deployment, [load(iris_model), load(max_model), load(x_max_model)])


class _Tripping(PipelineRunner):
    """A runner with a bug that one record trips over (its value raises past the validation)."""

    def _validate(self, row: dict[str, object]) -> dict[str, np.ndarray]:
        if row.get("trip"):
            raise KeyError("a bug")
        return super()._validate(row)  # type: ignore[arg-type]


def test_an_exception_escaping_the_runner_fails_only_the_record_that_raises_it(
    iris_model: Path, make_deployment: Callable[..., Deployment]
) -> None:
    runner = _Tripping(make_deployment(), [load(iris_model)])
    rows: list[dict[str, object]] = [{"features": row} for row in ROWS]
    rows.insert(2, {"features": ROWS[0], "trip": True})
    late = Failure("deadline exceeded", None)
    results = runner.run([encode(row) for row in rows], {4: late})
    assert [type(r).__name__ for r in results] == ["Success", "Success", "Failure", "Success", "Failure"]
    assert results[2] == Failure("the engine failed on this record: KeyError: 'a bug'", None)
    assert results[4] is late, "a record failed before the run keeps its failure"
    expected = direct(iris_model, [ROWS[0], ROWS[1], ROWS[2]])["label"].tolist()
    assert [r.outputs["label"] for r in results if isinstance(r, Success)] == expected


class _Counting(_Tripping):
    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.sizes: list[int] = []

    def _run(self, values: Sequence[bytes | None], failed: Mapping[int, Failure]) -> list[Result]:
        self.sizes.append(len(values))
        return super()._run(values, failed)


def test_a_batch_that_makes_the_runner_raise_is_run_whole_once_then_in_parts(
    iris_model: Path, make_deployment: Callable[..., Deployment]
) -> None:
    runner = _Counting(make_deployment(), [load(iris_model)])
    rows: list[dict[str, object]] = [{"features": row} for row in ROWS]
    rows.insert(1, {"features": ROWS[0], "trip": True})
    runner.run([encode(row) for row in rows])
    assert runner.sizes.count(len(rows)) == 1, runner.sizes


class _Broken(PipelineRunner):
    """A runner every record breaks, as a broken runtime or a full machine would."""

    def __init__(self, *args: Any, error: Exception) -> None:
        super().__init__(*args)
        self.error = error

    def _run(self, values: object, failed: object) -> list[Result]:
        raise self.error


@pytest.mark.parametrize("error", [KeyError("a bug"), OSError(11, "Resource temporarily unavailable")])
def test_an_exception_no_record_escapes_raises_instead_of_failing_every_record(
    iris_model: Path, make_deployment: Callable[..., Deployment], error: Exception
) -> None:
    runner = _Broken(make_deployment(), [load(iris_model)], error=error)
    rows = [encode({"features": row}) for row in ROWS]
    with pytest.raises(type(error)):
        runner.run(rows)


def test_a_record_alone_that_makes_the_runner_raise_is_answered_by_its_failure_unless_the_machine_is_short(
    iris_model: Path, make_deployment: Callable[..., Deployment]
) -> None:
    one = [encode({"features": ROWS[0]})]
    bug = _Broken(make_deployment(), [load(iris_model)], error=KeyError("a bug"))
    assert bug.run(one) == [Failure("the engine failed on this record: KeyError: 'a bug'", None)]
    short = _Broken(make_deployment(), [load(iris_model)], error=OSError(24, "Too many open files"))
    with pytest.raises(OSError, match="Too many open files"):
        short.run(one)


class CountingRuntime(OnnxRuntime):
    """The ONNX runtime, noting how many records each call ran on."""

    def __init__(self) -> None:
        super().__init__(SETTINGS)
        self.calls: list[int] = []

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.calls.append(len(next(iter(inputs.values()))))
        return super().predict(inputs)


def test_a_single_step_runs_each_record_of_a_batch_alone_with_the_batchs_results(
    iris_model: Path, make_spec: Callable[..., registry_pb2.DeploymentSpec], make_step: StepFactory
) -> None:
    rows = ROWS * 3
    records = [encode({"features": row}) for row in rows]
    runs = []
    for batch_config in ("", "single"):
        step = make_step("0" * 64)
        step.config.batch_config = batch_config
        runtime = CountingRuntime()
        runtime.load(iris_model)
        results = PipelineRunner(from_proto(make_spec("w", "p", steps=[step])), [runtime]).run(records)
        runs.append((runtime.calls, [r.outputs["label"] for r in results if isinstance(r, Success)]))
    (batched_calls, batched), (single_calls, single) = runs
    assert (batched_calls, single_calls) == ([len(rows)], [1] * len(rows))
    assert single == batched == direct(iris_model, rows)["label"].tolist()
