"""Split steps in the engine: the spec's arms, each record's arm (random, sticky by hash key, or by key),
one sub-batch per arm scattered back in order, and the chosen model in outputs, errors and logs."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from joey_core import records
from joey_core.kafka import ConsumedRecord
from joey_core.records import REQUEST_ID_HEADER
from joey_core.v1 import registry_pb2
from joey_engine.deployment import Deployment, Split
from joey_engine.pipeline import MODEL_SPLIT, Failure, PipelineRunner, Result, Success
from joey_engine.produced_records import Produced, error_value, log_entry, log_record, output_value
from joey_engine.runtime import OnnxRuntime
from joey_engine.settings import EngineSettings

StepFactory = Callable[..., registry_pb2.ResolvedStep]
SETTINGS = EngineSettings(instance_id="unit")
ROWS = [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3], [5.9, 2.8, 4.3, 1.3], [6.3, 3.3, 6.0, 2.5]]
# Arm "b" adds this to every output, so a result shows which arm served it.
SHIFT = 100


class Arm(OnnxRuntime):
    """A real ONNX model whose outputs are shifted by ``shift``; records each batch size it ran and
    fails any batch holding a record whose first feature is negative (when ``picky``)."""

    def __init__(self, path: Path, shift: int = 0, picky: bool = False) -> None:
        super().__init__(SETTINGS)
        self.load(path)
        self.shift, self.picky = shift, picky
        self.batches: list[int] = []

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        first = next(iter(inputs.values()))
        if self.picky and (first.reshape(len(first), -1)[:, 0] < 0).any():
            raise RuntimeError("negative feature")
        self.batches.append(len(first))
        return {name: value + self.shift for name, value in super().predict(inputs).items()}


def encode(row: object) -> bytes:
    return json.dumps(row).encode()


def successes(results: list[Result]) -> list[Success]:
    assert all(isinstance(r, Success) for r in results), [r for r in results if isinstance(r, Failure)]
    return [r for r in results if isinstance(r, Success)]


def random_split(make_step: StepFactory, *weights: float, hash_key: str = "") -> registry_pb2.ResolvedStep:
    arms = [make_step("0" * 64, model=name) for name in ("a", "b", "c")[: len(weights)]]
    return registry_pb2.ResolvedStep(arms=arms, weights=list(weights), hash_key=hash_key)


def key_split(make_step: StepFactory, **routes: str) -> registry_pb2.ResolvedStep:
    arms = [make_step("0" * 64, model=name) for name in ("a", "b", "c")]
    return registry_pb2.ResolvedStep(arms=arms, meta_key="tier", routes=routes)


def served_by(result: Success) -> str:
    """Which arm's model produced the result, from its outputs alone."""
    return "b" if result.outputs["label"] >= SHIFT else "a"


def logged(record: Produced) -> dict[str, Any]:
    [entry] = records.decode_log_entries(record.headers, record.value)
    return entry


def test_spec_of_a_split_loads_its_arms(
    make_deployment: Callable[..., Deployment], make_step: StepFactory
) -> None:
    deployment = make_deployment(steps=[random_split(make_step, 2, 1, hash_key="user")])
    (split,) = deployment.steps
    assert isinstance(split, Split) and deployment.splits == (split,)
    assert (split.weights, split.hash_key, [a.model for a in split.arms]) == ((2.0, 1.0), "user", ["a", "b"])
    assert [s.model for s in deployment.artifact_steps] == ["a", "b"]
    assert [m["name"] for m in deployment.models_of(("b",))] == ["b"]
    assert deployment.models_of(None) == []
    keyed = make_deployment(steps=[key_split(make_step, gold="b", silver="c")])
    (by_key,) = keyed.splits
    assert (by_key.meta_key, by_key.routes, by_key.weights) == ("tier", (("gold", "b"), ("silver", "c")), ())
    assert [a.model for a in by_key.arms] == ["a", "b", "c"]
    # The registry accepts a route for records whose key is empty: the engine must not refuse it.
    (empty_key,) = make_deployment(steps=[key_split(make_step, **{"": "b"})]).splits
    assert empty_key.routes == (("", "b"),)


@pytest.mark.parametrize(
    ("step", "message"),
    [
        (
            registry_pb2.ResolvedStep(
                arms=[registry_pb2.ResolvedStep(model="a", sha256="0" * 64)], weights=[1]
            ),
            "random split needs 2 or more arms",
        ),
        (
            registry_pb2.ResolvedStep(
                arms=[registry_pb2.ResolvedStep(model="a"), registry_pb2.ResolvedStep(model="b")],
                weights=[1, 0],
            ),
            "one positive weight each",
        ),
        (
            registry_pb2.ResolvedStep(
                arms=[registry_pb2.ResolvedStep(model="a"), registry_pb2.ResolvedStep(model="a")],
                weights=[1, 1],
            ),
            "split arms ['a', 'a'] are not distinct models",
        ),
        (
            registry_pb2.ResolvedStep(
                arms=[registry_pb2.ResolvedStep(model="a"), registry_pb2.ResolvedStep(model="b")],
                meta_key="tier",
                routes={"gold": "z"},
            ),
            "routing to ['z'], not among its arms ['a', 'b']",
        ),
        (
            registry_pb2.ResolvedStep(model="a", arms=[registry_pb2.ResolvedStep(model="b")]),
            "a split step has arms and nothing else",
        ),
    ],
)
def test_unusable_split_specs_are_rejected(
    make_deployment: Callable[..., Deployment], step: registry_pb2.ResolvedStep, message: str
) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        make_deployment(steps=[step])


def test_random_split_runs_each_arm_once_per_batch_in_proportion(
    iris_model: Path, make_deployment: Callable[..., Deployment], make_step: StepFactory
) -> None:
    a, b = Arm(iris_model), Arm(iris_model, SHIFT)
    runner = PipelineRunner(make_deployment(steps=[random_split(make_step, 2, 1)]), [a, b])
    n = 3000
    rows = [ROWS[i % 4] for i in range(n)]
    results = successes(runner.run([encode({"features": row}) for row in rows]))
    # One vectorised call per arm, covering the batch between them.
    assert len(a.batches) == len(b.batches) == 1 and a.batches[0] + b.batches[0] == n
    plain = Arm(iris_model).predict({"features": np.asarray(rows, np.float32)})
    for i, result in enumerate(results):
        # Scattered back in order: each record has its own outputs, from the model it names.
        assert result.split == (served_by(result),)
        assert result.outputs[MODEL_SPLIT] == served_by(result)
        shift = SHIFT if served_by(result) == "b" else 0
        assert result.outputs["label"] == plain["label"][i] + shift
        np.testing.assert_allclose(
            result.outputs["probabilities"], plain["probabilities"][i] + shift, rtol=1e-6
        )
    to_b = sum(r.split == ("b",) for r in results)
    assert abs(to_b - n / 3) <= 4 * math.sqrt(n * (1 / 3) * (2 / 3)), to_b


def test_hash_key_is_sticky_across_runners_and_batches(
    iris_model: Path, make_deployment: Callable[..., Deployment], make_step: StepFactory
) -> None:
    deployment = make_deployment(steps=[random_split(make_step, 2, 1, hash_key="user")])
    values = [encode({"features": ROWS[i % 4], "user": f"u{i % 300}"}) for i in range(1200)]
    first = successes(PipelineRunner(deployment, [Arm(iris_model), Arm(iris_model, SHIFT)]).run(values))
    again = PipelineRunner(deployment, [Arm(iris_model), Arm(iris_model, SHIFT)])
    second = successes(
        [r for chunk in range(0, 1200, 50) for r in again.run(values[chunk : chunk + 50][::-1])[::-1]]
    )
    by_user: dict[str, set[str]] = {}
    for result in first + second:
        by_user.setdefault(result.inputs["user"], set()).add(served_by(result))
    assert all(len(arms) == 1 for arms in by_user.values())
    # Users, not records, are split 2:1.
    to_b = sum(arms == {"b"} for arms in by_user.values())
    assert abs(to_b - 100) <= 4 * math.sqrt(300 * (1 / 3) * (2 / 3)), to_b
    # Any JSON value is a key; records without one are assigned at random (so both arms serve them).
    keyed = [encode({"features": ROWS[0], "user": {"id": 7, "org": [1, 2]}})] * 20
    assert len({served_by(r) for r in successes(again.run(keyed))}) == 1
    # Even text that cannot be encoded as UTF-8 (a lone surrogate) is a key.
    surrogate = [b'{"features": [1, 2, 3, 4], "user": "\\ud800"}'] * 20
    assert len({served_by(r) for r in successes(again.run(surrogate))}) == 1
    unkeyed = successes(again.run([encode({"features": ROWS[0]})] * 200))
    assert {served_by(r) for r in unkeyed} == {"a", "b"}


def test_key_split_routes_by_value_and_defaults(
    iris_model: Path, make_deployment: Callable[..., Deployment], make_step: StepFactory
) -> None:
    deployment = make_deployment(steps=[key_split(make_step, gold="b", silver="c", **{"1": "c"})])
    runner = PipelineRunner(deployment, [Arm(iris_model), Arm(iris_model, SHIFT), Arm(iris_model, 2 * SHIFT)])
    tiers: list[object] = ["gold", "silver", "bronze", None, 1, "1", "GOLD", 1.0, "gold"]
    rows: list[dict[str, object]] = [{"features": ROWS[i % 4], "tier": tier} for i, tier in enumerate(tiers)]
    rows.append({"features": ROWS[0]})  # no tier at all
    results = successes(runner.run([encode(row) for row in rows]))
    expected = ["b", "c", "a", "a", "c", "c", "a", "a", "b", "a"]
    assert [r.outputs[MODEL_SPLIT] for r in results] == expected
    assert [r.outputs["label"] // SHIFT for r in results] == [" abc".index(m) - 1 for m in expected]


def test_a_record_whose_arm_fails_fails_alone(
    iris_model: Path, make_deployment: Callable[..., Deployment], make_step: StepFactory
) -> None:
    deployment = make_deployment(steps=[key_split(make_step, gold="b")])
    runner = PipelineRunner(
        deployment, [Arm(iris_model), Arm(iris_model, SHIFT, picky=True), Arm(iris_model)]
    )
    rows = [{"features": row, "tier": "gold"} for row in ROWS]
    rows += [{"features": [-1, 1, 1, 1], "tier": "gold"}, {"features": [-1, 1, 1, 1]}, {"features": [1, 2]}]
    *served, bad_b, negative_a, invalid = runner.run([encode(row) for row in rows])
    assert [r.outputs[MODEL_SPLIT] for r in successes(served)] == ["b"] * 4
    assert isinstance(bad_b, Failure) and bad_b.split == ("b",)
    assert bad_b.reason == "step 1 (split arm 'b' v1) failed: negative feature"
    # Arm "a" is not picky: the same features succeed there.
    assert isinstance(negative_a, Success) and negative_a.split == ("a",)
    # A record that is not valid input never had an arm chosen.
    assert isinstance(invalid, Failure) and invalid.split is None and "has shape [2]" in invalid.reason


def test_steps_after_a_split_run_on_the_merged_batch(
    iris_model: Path,
    max_model: Path,
    make_deployment: Callable[..., Deployment],
    make_step: StepFactory,
    make_challenger: StepFactory,
    make_validations: StepFactory,
) -> None:
    values = [encode({"features": ROWS[i % 4]}) for i in range(400)]
    plain = Arm(iris_model).predict({"features": np.asarray([ROWS[i % 4] for i in range(400)], np.float32)})
    tops = plain["probabilities"].max(axis=1)
    # A model step after a split.
    then_max = make_deployment(steps=[random_split(make_step, 1, 1), make_challenger("max")])
    results = successes(
        PipelineRunner(then_max, [Arm(iris_model), Arm(iris_model, SHIFT), Arm(max_model)]).run(values)
    )
    for i, result in enumerate(results):
        shift = SHIFT if result.outputs[MODEL_SPLIT] == "b" else 0
        assert result.outputs["max_probability"] == pytest.approx(tops[i] + shift, rel=1e-6)
    assert [m["name"] for m in then_max.models_of(("b",))] == ["b", "max"]
    # Checks, then a second split, after a split.
    later = registry_pb2.ResolvedStep(
        arms=[make_challenger("max-a"), make_challenger("max-b")], weights=[1, 1]
    )
    steps = [random_split(make_step, 1, 1), make_validations(shifted="out.probabilities[0] > 50"), later]
    twice = make_deployment(steps=steps)
    runtimes = [Arm(iris_model), Arm(iris_model, SHIFT), Arm(max_model), Arm(max_model, SHIFT)]
    results = successes(PipelineRunner(twice, runtimes).run(values))
    for i, result in enumerate(results):
        first, second = result.outputs[MODEL_SPLIT]
        assert result.split == (first, second)
        shift = (SHIFT if first == "b" else 0) + (SHIFT if second == "max-b" else 0)
        assert result.outputs["max_probability"] == pytest.approx(tops[i] + shift, rel=1e-6)
        assert result.check_failures == (("shifted",) if first == "b" else ())
    assert {r.split for r in results} == {("a", "max-a"), ("a", "max-b"), ("b", "max-a"), ("b", "max-b")}
    assert [m["name"] for m in twice.models_of(("b", "max-a"))] == ["b", "max-a"]


NOW = datetime(2026, 11, 25, 12, 0, 0, tzinfo=UTC)


def test_outputs_errors_and_logs_name_the_models_that_served_each_record(
    make_deployment: Callable[..., Deployment], make_step: StepFactory
) -> None:
    deployment = make_deployment(steps=[random_split(make_step, 1, 1)])
    raw = b'{"features": [1, 2, 3, 4]}'
    source = ConsumedRecord("joey.w.p.inputs", 2, 7, b"key", raw, [(REQUEST_ID_HEADER, b"req-7")])
    ok = Success(json.loads(raw), {"label": 1, MODEL_SPLIT: "b"}, (10,), split=("b",))
    body = json.loads(output_value(deployment, source, ok, NOW))
    assert body["out"] == {"label": 1, "_model_split": "b"}
    b_ref = {"name": "b", "version": 1, "sha256": "0" * 64}
    assert body["metadata"]["models"] == [b_ref]
    assert list(body["metadata"]) == [
        "workspace",
        "pipeline",
        "pipeline_version",
        "deployment_id",
        "models",
        "partition",
        "offset",
        "elapsed_ns",
    ]
    log = logged(log_record([log_entry(deployment, source, ok, NOW)]))
    assert log["models"] == [b_ref] and json.loads(log["outputs"])[MODEL_SPLIT] == "b"
    failed = Failure("step 1 (split arm 'b' v1) failed: boom", json.loads(raw), ("b",))
    assert json.loads(error_value(deployment, source, failed, NOW))["metadata"]["models"] == [b_ref]
    assert logged(log_record([log_entry(deployment, source, failed, NOW)]))["models"] == [b_ref]
    invalid = Failure("not JSON", None)
    assert json.loads(error_value(deployment, source, invalid, NOW))["metadata"]["models"] == []
    # Without split steps, every record names every model as before.
    plain = make_deployment()
    assert logged(log_record([log_entry(plain, source, invalid, NOW)]))["models"] == plain.models
