"""DeploymentSpec to the engine's view: model steps with artifacts, validations steps without."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from google.protobuf import json_format

from joey_core.v1 import registry_pb2
from joey_engine.deployment import MAX_STEPS, Step, Validations, from_proto, parse

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


def test_shadow_step_loads_its_challengers_after_the_champion(
    make_spec: Callable[..., registry_pb2.DeploymentSpec],
    make_step: StepFactory,
    make_challenger: StepFactory,
) -> None:
    challengers = [
        make_challenger("sum", "3" * 64, 2, features="petals"),
        make_challenger("pooled", "4" * 64),
    ]
    spec = make_spec(
        "w", "p", steps=[make_step("0" * 64, challengers=challengers), make_step("1" * 64, "second")]
    )
    deployment = from_proto(spec)
    first, second = deployment.steps
    assert isinstance(first, Step) and isinstance(second, Step)
    assert [(c.model, c.version, c.sha256) for c in first.challengers] == [
        ("sum", 2, "3" * 64),
        ("pooled", 1, "4" * 64),
    ]
    assert first.challengers[0].input_mapping == (("features", "petals"),)
    assert first.challengers[1].challengers == () and second.challengers == ()
    assert deployment.has_shadow
    # Challengers are loaded with their champion but do not produce the result.
    assert [s.sha256 for s in deployment.artifact_steps] == ["0" * 64, "3" * 64, "4" * 64, "1" * 64]
    assert [m["name"] for m in deployment.models] == ["iris", "second"]
    plain = from_proto(make_spec("w", "p"))
    assert not plain.has_shadow and plain.artifact_steps == plain.model_steps


@pytest.mark.parametrize(
    ("champion", "challengers", "error"),
    [
        ("iris", ["sum", "sum"], r"shadow step models \['iris', 'sum', 'sum'\] are not distinct"),
        ("iris", ["iris"], r"shadow step models \['iris', 'iris'\] are not distinct"),
        ("", ["sum"], "shadow step without a champion model"),
        ("iris", [""], "a challenger of model 'iris' must be a plain model step"),
    ],
)
def test_unusable_shadow_steps_are_rejected(
    make_spec: Callable[..., registry_pb2.DeploymentSpec],
    make_step: StepFactory,
    make_challenger: StepFactory,
    champion: str,
    challengers: list[str],
    error: str,
) -> None:
    step = make_step("0" * 64, champion, challengers=[make_challenger(name) for name in challengers])
    with pytest.raises(ValueError, match=error):
        from_proto(make_spec("w", "p", steps=[step]))


def test_a_challenger_is_a_plain_model_step(
    make_spec: Callable[..., registry_pb2.DeploymentSpec],
    make_step: StepFactory,
    make_challenger: StepFactory,
) -> None:
    checked = registry_pb2.ResolvedStep(model="sum", sha256="3" * 64, checks={"x": "in.a > 1"})
    with pytest.raises(ValueError, match="a challenger of model 'iris' must be a plain model step"):
        from_proto(make_spec("w", "p", steps=[make_step("0" * 64, challengers=[checked])]))
    both = registry_pb2.ResolvedStep(checks={"x": "in.a > 1"}, challengers=[make_challenger("sum")])
    with pytest.raises(ValueError, match="step with challengers also has checks"):
        from_proto(make_spec("w", "p", steps=[both]))


def test_replicas_are_capped_and_topics_are_derived(
    make_spec: Callable[..., registry_pb2.DeploymentSpec],
) -> None:
    spec = make_spec("ws", "pipe", replicas=1_000_000)
    deployment = parse(json_format.MessageToJson(spec).encode(), max_replicas=8)
    assert deployment.replicas == 8
    assert deployment.topics.all() == ("joey.ws.pipe.inputs", "joey.ws.pipe.outputs", "joey.ws.pipe.errors")


def test_model_configs_lower_the_batch_limits_and_mark_single_steps(
    make_spec: Callable[..., registry_pb2.DeploymentSpec],
    make_step: StepFactory,
    make_challenger: StepFactory,
) -> None:
    plain = from_proto(make_spec("w", "p"))
    assert plain.batch_limits(256, 5) == (256, 5)
    assert not plain.model_steps[0].config.single
    champion = make_step("0" * 64, challengers=[make_challenger("sum")])
    champion.config.batch_size_target = 300  # above the engine's: the engine's stands
    champion.config.batch_config = "single"
    champion.challengers[0].config.max_batch_delay_ms = 1  # a challenger's counts: it runs in the batch
    configured = from_proto(make_spec("w", "p", steps=[champion]))
    assert configured.batch_limits(256, 5) == (256, 1)
    assert configured.model_steps[0].config.single
    champion.config.batch_size_target = 8
    assert from_proto(make_spec("w", "p", steps=[champion])).batch_limits(256, 5) == (8, 1)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda s: s.topics.__setattr__("outputs", "joey.x.y.outputs"), "names topics"),
        (lambda s: s.steps[0].__setattr__("sha256", "A" * 64), "invalid artifact sha256"),
        (lambda s: s.steps[0].__setattr__("model", "a/../b"), "invalid model name"),
        (lambda s: s.__setattr__("deployment_id", "x" * 65), "no valid deployment_id"),
        (lambda s: s.steps.extend([s.steps[0]] * MAX_STEPS), f"more than {MAX_STEPS}"),
        (lambda s: s.steps[0].config.__setattr__("batch_config", "many"), "batch_config is 'many'"),
        (lambda s: s.steps[0].config.__setattr__("batch_size_target", 0), "batch_size_target is 0"),
    ],
)
def test_records_out_of_bounds_are_refused(
    make_spec: Callable[..., registry_pb2.DeploymentSpec], change: Callable[[Any], object], reason: str
) -> None:
    spec = make_spec("ws", "pipe")
    change(spec)
    with pytest.raises(ValueError, match=reason):
        parse(json_format.MessageToJson(spec).encode())
