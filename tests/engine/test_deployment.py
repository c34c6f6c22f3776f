"""DeploymentSpec to the engine's view: model steps with artifacts, validations steps without."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from joey.v1 import registry_pb2
from joey_engine.deployment import Step, Validations, from_proto

StepFactory = Callable[..., registry_pb2.ResolvedStep]


def test_validations_steps_keep_their_checks_and_need_no_artifact(
    make_spec: Callable[..., registry_pb2.DeploymentSpec],
    make_step: StepFactory,
    make_validations: StepFactory,
) -> None:
    spec = make_spec(
        "w",
        "p",
        steps=[
            make_step("0" * 64),
            make_validations(wide="in.features[0] > 7", sure="out.probabilities[0] > 0.99"),
            make_step("1" * 64, model="second"),
            make_validations(wide="in.features[1] > 4", low="out.label == 0"),
        ],
    )
    deployment = from_proto(spec)
    kinds = [type(step) for step in deployment.steps]
    assert kinds == [Step, Validations, Step, Validations]
    assert deployment.steps[1] == Validations(
        (("sure", "out.probabilities[0] > 0.99"), ("wide", "in.features[0] > 7"))
    )
    assert [step.sha256 for step in deployment.model_steps] == ["0" * 64, "1" * 64]
    assert [m["name"] for m in deployment.models] == ["iris", "second"]
    # A name checked again later is one check, flagged when either step flags it.
    assert deployment.check_names == ("sure", "wide", "low")


def test_a_deployment_needs_a_model_step(
    make_spec: Callable[..., registry_pb2.DeploymentSpec], make_validations: StepFactory
) -> None:
    with pytest.raises(ValueError, match="deployment of w/p has no model steps"):
        from_proto(make_spec("w", "p", steps=[make_validations(wide="in.features[0] > 7")]))


def test_a_step_is_a_model_or_checks(make_spec: Callable[..., registry_pb2.DeploymentSpec]) -> None:
    step = registry_pb2.ResolvedStep(model="iris", version=1, sha256="0" * 64, checks={"x": "in.a > 1"})
    with pytest.raises(ValueError, match="step of model 'iris' also has checks"):
        from_proto(make_spec("w", "p", steps=[step]))


def test_input_mapping_keeps_only_renamed_inputs(
    make_spec: Callable[..., registry_pb2.DeploymentSpec], make_step: StepFactory
) -> None:
    mapping = {"features": "petals", "same": "same"}
    [step] = from_proto(make_spec("w", "p", input_mapping=mapping)).steps
    assert isinstance(step, Step)
    # An identity entry is the same as none (the registry drops them too).
    assert step.input_mapping == (("features", "petals"),)
    assert step.source("features") == "petals"
    assert step.source("other") == "other"
    [plain] = from_proto(make_spec("w", "p", steps=[make_step("0" * 64)])).steps
    assert isinstance(plain, Step) and plain.input_mapping == ()
