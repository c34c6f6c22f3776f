from __future__ import annotations

import re
import secrets

import grpc
import pytest
from google.protobuf import json_format

from joey_core import topics
from joey_core.expressions import ExpressionError, compile_expression
from joey_core.v1 import registry_pb2 as pb
from joey_registry.app import RegistryServer
from joey_registry.settings import RegistrySettings
from tests.registry.helpers import Stub, identity_model, read_deployments, rpc_error, step, upload


def refused_workspace(stub: Stub, models: dict[str, bytes]) -> str:
    """A workspace with ``models``, shared by the cases of one parametrized test of refused pipelines: each
    is refused and creates nothing, so each finds the workspace without pipelines, as a fresh one (and the
    uploads, most of a case's time, are made once)."""
    name = f"ws-{secrets.token_hex(4)}"
    stub.CreateWorkspace(pb.CreateWorkspaceRequest(name=name))
    for model_name, data in models.items():
        upload(stub, name, model_name, data)
    return name


@pytest.fixture(scope="module")
def mapping_workspace(stub: Stub, iris_bytes: bytes) -> str:
    return refused_workspace(
        stub,
        {
            "iris": iris_bytes,
            "b": identity_model("x", "float32", "y", width=3),
            "wide": identity_model("x", "float32", "y", width=4),
            "names": identity_model("label", "string", "name"),
        },
    )


@pytest.fixture(scope="module")
def shadow_workspace(stub: Stub, iris_bytes: bytes) -> str:
    return refused_workspace(
        stub,
        {
            "iris": iris_bytes,
            "iris-b": iris_bytes,
            "probs": identity_model("probabilities", "float32", "copy", width=3),
            "names": identity_model("label", "string", "name"),
        },
    )


def create(stub: Stub, workspace: str, name: str, *steps: pb.PipelineStep) -> pb.PipelineVersion:
    return stub.CreatePipeline(pb.CreatePipelineRequest(workspace=workspace, name=name, steps=list(steps)))


def test_pipeline_versions_bump_only_on_change(stub: Stub, workspace: str, iris_bytes: bytes) -> None:
    upload(stub, workspace, "iris", iris_bytes)

    first = create(stub, workspace, "p", step("iris"))
    assert first.version == 1
    resolved = first.steps[0]
    assert (resolved.model, resolved.version, resolved.framework) == ("iris", 1, "onnx")
    assert resolved.sha256 and [i.name for i in resolved.inputs] == ["features"]
    assert [o.name for o in resolved.outputs] == ["label", "probabilities"]

    assert create(stub, workspace, "p", step("iris", 1)).version == 1  # same resolved steps
    upload(stub, workspace, "iris", iris_bytes)
    assert create(stub, workspace, "p", step("iris")).version == 2  # latest is now iris v2
    assert create(stub, workspace, "p", step("iris", 2)).version == 2
    assert create(stub, workspace, "p", step("iris", 1)).version == 3

    pipeline = stub.GetPipeline(pb.GetPipelineRequest(workspace=workspace, name="p"))
    assert [(v.version, v.steps[0].version) for v in pipeline.versions] == [(1, 1), (2, 2), (3, 1)]
    assert not pipeline.HasField("deployment")
    listed = stub.ListPipelines(pb.ListPipelinesRequest(workspace=workspace)).pipelines
    assert [(p.name, len(p.versions)) for p in listed] == [("p", 3)]


def test_chained_steps_are_accepted(stub: Stub, workspace: str, iris_bytes: bytes) -> None:
    upload(stub, workspace, "iris", iris_bytes)
    upload(stub, workspace, "probs", identity_model("probabilities", "float32", "copy", width=3))
    version = create(stub, workspace, "chain", step("iris"), step("probs"))
    assert [s.model for s in version.steps] == ["iris", "probs"]


def test_chaining_missing_input_names_both_steps(stub: Stub, workspace: str, iris_bytes: bytes) -> None:
    upload(stub, workspace, "iris", iris_bytes)
    error = rpc_error(lambda: create(stub, workspace, "chain", step("iris"), step("iris")))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == (
        "step 2 (iris v1) needs input 'features' (float32), but step 1 (iris v1) produces only "
        "'label' (int64), 'probabilities' (float32)"
    )
    assert stub.ListPipelines(pb.ListPipelinesRequest(workspace=workspace)).pipelines == []


def test_chaining_incompatible_dtype(stub: Stub, workspace: str, iris_bytes: bytes) -> None:
    upload(stub, workspace, "iris", iris_bytes)
    upload(stub, workspace, "names", identity_model("label", "string", "name"))
    error = rpc_error(lambda: create(stub, workspace, "chain", step("iris"), step("names")))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == (
        "step 2 (names v1) needs input 'label' (string), but step 1 (iris v1) produces 'label' as int64"
    )


def test_unknown_step_model_or_version(stub: Stub, workspace: str, iris_bytes: bytes) -> None:
    upload(stub, workspace, "iris", iris_bytes)
    error = rpc_error(lambda: create(stub, workspace, "p", step("iris"), step("ghost")))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert error.details() == f"step 2: model 'ghost' not found in workspace '{workspace}'"
    error = rpc_error(lambda: create(stub, workspace, "p", step("iris", 5)))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert "step 1: model 'iris' has no version 5" in error.details()


@pytest.mark.parametrize(
    ("name", "steps", "expected"),
    [
        ("p", [], "needs at least one step"),
        ("Bad_Name", [step("iris")], "invalid pipeline name"),
        ("p", [pb.PipelineStep()], "step 1 is empty: set its model, validations, shadow, random_split or"),
        ("p", [step("iris", -1)], "version must be a positive number"),
    ],
)
def test_invalid_pipeline_requests(
    stub: Stub, workspace: str, iris_bytes: bytes, name: str, steps: list[pb.PipelineStep], expected: str
) -> None:
    upload(stub, workspace, "iris", iris_bytes)
    error = rpc_error(lambda: create(stub, workspace, name, *steps))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert expected in error.details()


def test_get_unknown_pipeline(stub: Stub, workspace: str) -> None:
    error = rpc_error(lambda: stub.GetPipeline(pb.GetPipelineRequest(workspace=workspace, name="ghost")))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert "'ghost'" in error.details()


def checks(**named: str) -> pb.PipelineStep:
    return pb.PipelineStep(validations=pb.ValidationsStep(checks=named))


TOO_SURE = "out.probabilities[0] > 0.99"
BAD_LEN = "len(in.features) != 4"


def test_validations_step_is_stored_and_versions_bump_only_on_change(
    stub: Stub, workspace: str, iris_bytes: bytes
) -> None:
    upload(stub, workspace, "iris", iris_bytes)
    first = create(stub, workspace, "p", step("iris"), checks(too_sure=TOO_SURE, bad_len=BAD_LEN))
    assert first.version == 1
    model_step, validations = first.steps
    assert model_step.model == "iris" and not model_step.checks
    assert (validations.model, validations.sha256, list(validations.outputs)) == ("", "", [])
    assert dict(validations.checks) == {"too_sure": TOO_SURE, "bad_len": BAD_LEN}

    # The same checks, in another order: maps carry no order, so nothing changed.
    assert create(stub, workspace, "p", step("iris"), checks(bad_len=BAD_LEN, too_sure=TOO_SURE)).version == 1
    assert (
        create(stub, workspace, "p", step("iris"), checks(too_sure="out.probabilities[0] > 0.9")).version == 2
    )
    assert create(stub, workspace, "p", step("iris")).version == 3
    assert create(stub, workspace, "p", step("iris")).version == 3
    assert create(stub, workspace, "p", step("iris"), checks(too_sure=TOO_SURE, bad_len=BAD_LEN)).version == 4

    stored = stub.GetPipeline(pb.GetPipelineRequest(workspace=workspace, name="p")).versions
    assert [[dict(s.checks) for s in v.steps if s.checks] for v in stored] == [
        [{"too_sure": TOO_SURE, "bad_len": BAD_LEN}],
        [{"too_sure": "out.probabilities[0] > 0.9"}],
        [],
        [{"too_sure": TOO_SURE, "bad_len": BAD_LEN}],
    ]


def test_validations_on_inputs_may_come_first(stub: Stub, workspace: str, iris_bytes: bytes) -> None:
    upload(stub, workspace, "iris", iris_bytes)
    version = create(stub, workspace, "p", checks(bad_len=BAD_LEN, odd='in.note == "odd"'), step("iris"))
    assert [bool(s.checks) for s in version.steps] == [True, False]


def test_chaining_skips_validations_steps(stub: Stub, workspace: str, iris_bytes: bytes) -> None:
    upload(stub, workspace, "iris", iris_bytes)
    upload(stub, workspace, "probs", identity_model("probabilities", "float32", "copy", width=3))
    version = create(
        stub,
        workspace,
        "chain",
        step("iris"),
        checks(a=TOO_SURE),
        step("probs"),
        checks(b="out.copy[0] > 0.5"),
    )
    assert [s.model for s in version.steps] == ["iris", "", "probs", ""]
    # The validations step of step 4 reads the outputs of step 3, not of step 1.
    error = rpc_error(
        lambda: create(
            stub, workspace, "chain", step("iris"), checks(a=TOO_SURE), step("probs"), checks(b=TOO_SURE)
        )
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (
        error.details()
        == "step 4: check 'b' reads out.probabilities, but step 3 (probs v1) produces only 'copy' (float32)"
    )
    error = rpc_error(
        lambda: create(stub, workspace, "chain", step("iris"), checks(a=TOO_SURE), step("iris"))
    )
    assert error.details().startswith(
        "step 3 (iris v1) needs input 'features' (float32), but step 1 (iris v1) produces only"
    )


def test_bad_expression_names_check_and_position(stub: Stub, workspace: str, iris_bytes: bytes) -> None:
    upload(stub, workspace, "iris", iris_bytes)
    text = "out.label > > 1"
    with pytest.raises(ExpressionError) as compiled:
        compile_expression(text)
    error = rpc_error(lambda: create(stub, workspace, "p", step("iris"), checks(ok=BAD_LEN, broken=text)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == f"step 2: check 'broken': {compiled.value}"
    # The second ">" is at column 13 (12 counting from 0).
    assert re.search(r"\b1[23]\b", error.details()), error.details()
    assert stub.ListPipelines(pb.ListPipelinesRequest(workspace=workspace)).pipelines == []


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        (
            [step("iris"), checks(x="out.score > 0.5 and out.label == 1")],
            "step 2: check 'x' reads out.score, but step 1 (iris v1) produces only "
            "'label' (int64), 'probabilities' (float32)",
        ),
        (
            [checks(x=TOO_SURE), step("iris")],
            "step 1: check 'x' reads out.probabilities, but no model step comes before it",
        ),
        ([step("iris"), checks()], "step 2: a validations step needs at least one check"),
        ([checks(x=BAD_LEN)], "a pipeline needs at least one model step"),
        ([step("iris"), checks(**{"1st": BAD_LEN})], "step 2: invalid check name '1st'"),
        ([step("iris"), checks(**{"has-dash": BAD_LEN})], "step 2: invalid check name 'has-dash'"),
        ([step("iris"), checks(**{"x" * 64: BAD_LEN})], "at most 63 characters"),
        ([step("iris"), checks(count=BAD_LEN)], "step 2: check name 'count' is reserved"),
        (
            [step("iris"), checks(x=BAD_LEN), checks(x=TOO_SURE)],
            "step 3: check 'x' is already defined in step 2",
        ),
    ],
)
def test_invalid_validations(
    stub: Stub, workspace: str, iris_bytes: bytes, steps: list[pb.PipelineStep], expected: str
) -> None:
    upload(stub, workspace, "iris", iris_bytes)
    error = rpc_error(lambda: create(stub, workspace, "p", *steps))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert expected in error.details()
    assert stub.ListPipelines(pb.ListPipelinesRequest(workspace=workspace)).pipelines == []


def test_deployed_and_republished_specs_carry_checks(
    stub: Stub, workspace: str, iris_bytes: bytes, registry_settings: RegistrySettings
) -> None:
    upload(stub, workspace, "iris", iris_bytes)
    create(stub, workspace, "p", step("iris"), checks(too_sure=TOO_SURE, bad_len=BAD_LEN))
    deployment = stub.Deploy(pb.DeployRequest(workspace=workspace, pipeline="p"), timeout=30)
    restarted = RegistryServer(registry_settings)
    restarted.start()
    restarted.stop()
    key = topics.deployment_key(workspace, "p")
    messages = read_deployments(registry_settings, lambda found: len(found) >= 2, key)
    for message in messages:
        spec = json_format.Parse(message.value(), pb.DeploymentSpec())
        assert spec.deployment_id == deployment.deployment_id
        assert [s.model for s in spec.steps] == ["iris", ""]
        assert dict(spec.steps[1].checks) == {"too_sure": TOO_SURE, "bad_len": BAD_LEN}
    stub.Undeploy(pb.UndeployRequest(workspace=workspace, pipeline="p"))


def mapped(model: str, version: int = 0, **inputs: str) -> pb.PipelineStep:
    return pb.PipelineStep(model=pb.ModelStep(model=model, version=version, input_mapping=inputs))


def test_mapped_steps_are_stored_and_versions_bump_only_on_change(
    stub: Stub, workspace: str, iris_bytes: bytes
) -> None:
    upload(stub, workspace, "iris", iris_bytes)
    upload(stub, workspace, "b", identity_model("x", "float32", "y", width=3))
    first = create(stub, workspace, "p", mapped("iris", features="petals"), mapped("b", x="probabilities"))
    assert first.version == 1
    assert [dict(s.input_mapping) for s in first.steps] == [{"features": "petals"}, {"x": "probabilities"}]

    # An identity entry feeds the input by its own name, which is what no entry does.
    assert (
        create(
            stub, workspace, "p", mapped("iris", features="petals"), mapped("b", x="probabilities")
        ).version
        == 1
    )
    assert create(stub, workspace, "p", step("iris"), mapped("b", x="probabilities")).version == 2
    assert (
        create(
            stub, workspace, "p", mapped("iris", features="features"), mapped("b", x="probabilities")
        ).version
        == 2
    )
    assert (
        create(
            stub, workspace, "p", mapped("iris", features="sepals"), mapped("b", x="probabilities")
        ).version
        == 3
    )
    assert (
        create(
            stub, workspace, "p", mapped("iris", features="petals"), mapped("b", x="probabilities")
        ).version
        == 4
    )

    stored = stub.GetPipeline(pb.GetPipelineRequest(workspace=workspace, name="p")).versions
    assert [[dict(s.input_mapping) for s in v.steps] for v in stored] == [
        [{"features": "petals"}, {"x": "probabilities"}],
        [{}, {"x": "probabilities"}],
        [{"features": "sepals"}, {"x": "probabilities"}],
        [{"features": "petals"}, {"x": "probabilities"}],
    ]


def test_identity_mapping_is_the_unmapped_pipeline(stub: Stub, workspace: str, iris_bytes: bytes) -> None:
    upload(stub, workspace, "iris", iris_bytes)
    upload(stub, workspace, "probs", identity_model("probabilities", "float32", "copy", width=3))
    plain = create(stub, workspace, "p", step("iris"), step("probs"))
    same = create(
        stub,
        workspace,
        "p",
        mapped("iris", features="features"),
        mapped("probs", probabilities="probabilities"),
    )
    assert same.version == plain.version == 1
    assert [dict(s.input_mapping) for s in same.steps] == [{}, {}]


def test_mapping_reads_the_model_step_before_validations(
    stub: Stub, workspace: str, iris_bytes: bytes
) -> None:
    upload(stub, workspace, "iris", iris_bytes)
    upload(stub, workspace, "b", identity_model("x", "float32", "y", width=3))
    version = create(
        stub,
        workspace,
        "p",
        checks(odd='in.note == "odd"'),
        mapped("iris", features="sepal.petal-width_2"),
        checks(a=TOO_SURE),
        mapped("b", x="probabilities"),
    )
    assert [dict(s.input_mapping) for s in version.steps] == [
        {},
        {"features": "sepal.petal-width_2"},
        {},
        {"x": "probabilities"},
    ]


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        (
            [step("iris"), mapped("b", y="probabilities")],
            "step 2 (b v1): model 'b' has no input 'y'; its inputs are: 'x' (float32)",
        ),
        (
            [mapped("iris", x="petals")],
            "step 1 (iris v1): model 'iris' has no input 'x'; its inputs are: 'features' (float32)",
        ),
        (
            # Keys are checked even when they map an input to its own name.
            [step("iris"), mapped("b", x="probabilities", y="y")],
            "step 2 (b v1): model 'b' has no input 'y'",
        ),
        (
            [step("iris"), mapped("b", x="score")],
            "step 2 (b v1) needs input 'x' (float32) from 'score', but step 1 (iris v1) produces only "
            "'label' (int64), 'probabilities' (float32)",
        ),
        (
            [step("iris"), checks(a=TOO_SURE), mapped("b", x="")],
            "step 3 (b v1) needs input 'x' (float32) from '', but step 1 (iris v1) produces only",
        ),
        (
            [step("iris"), mapped("names", label="probabilities")],
            "step 2 (names v1) needs input 'label' (string) from 'probabilities', "
            "but step 1 (iris v1) produces 'probabilities' as float32",
        ),
        (
            [step("iris"), mapped("wide", x="probabilities")],
            "step 2 (wide v1) needs input 'x' (float32) from 'probabilities', but step 1 (iris v1) "
            "produces 'probabilities' with shape [?, 3], which does not fit the input's shape [?, 4]",
        ),
        (
            # int64 feeds float32, but a [N] tensor does not feed a [N, 3] input.
            [step("iris"), mapped("b", x="label")],
            "step 2 (b v1) needs input 'x' (float32) from 'label', but step 1 (iris v1) "
            "produces 'label' with shape [?], which does not fit the input's shape [?, 3]",
        ),
        (
            [mapped("iris", features="1st")],
            "step 1 (iris v1): input 'features' is mapped from record field '1st', "
            "which is not a valid field name",
        ),
        (
            [checks(odd='in.note == "odd"'), mapped("iris", features="in features")],
            "step 2 (iris v1): input 'features' is mapped from record field 'in features'",
        ),
    ],
)
def test_invalid_mappings(
    stub: Stub, mapping_workspace: str, steps: list[pb.PipelineStep], expected: str
) -> None:
    workspace = mapping_workspace
    error = rpc_error(lambda: create(stub, workspace, "p", *steps))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith(expected), error.details()
    assert stub.ListPipelines(pb.ListPipelinesRequest(workspace=workspace)).pipelines == []


def test_deployed_spec_carries_input_mappings(
    stub: Stub, workspace: str, iris_bytes: bytes, registry_settings: RegistrySettings
) -> None:
    upload(stub, workspace, "iris", iris_bytes)
    upload(stub, workspace, "b", identity_model("x", "float32", "y", width=3))
    create(stub, workspace, "p", mapped("iris", features="petals"), mapped("b", x="probabilities"))
    deployment = stub.Deploy(pb.DeployRequest(workspace=workspace, pipeline="p"), timeout=30)
    key = topics.deployment_key(workspace, "p")
    (message,) = read_deployments(registry_settings, lambda found: len(found) >= 1, key)
    spec = json_format.Parse(message.value(), pb.DeploymentSpec())
    assert spec.deployment_id == deployment.deployment_id
    assert [(s.model, dict(s.input_mapping)) for s in spec.steps] == [
        ("iris", {"features": "petals"}),
        ("b", {"x": "probabilities"}),
    ]
    stub.Undeploy(pb.UndeployRequest(workspace=workspace, pipeline="p"))


def shadow(champion: pb.ModelStep, *challengers: pb.ModelStep) -> pb.PipelineStep:
    return pb.PipelineStep(shadow=pb.ShadowStep(champion=champion, challengers=list(challengers)))


def model(name: str, version: int = 0, **inputs: str) -> pb.ModelStep:
    return pb.ModelStep(model=name, version=version, input_mapping=inputs)


def test_shadow_step_resolves_latest_versions_and_chains_from_the_champion(
    stub: Stub, workspace: str, iris_bytes: bytes
) -> None:
    upload(stub, workspace, "iris", iris_bytes)
    upload(stub, workspace, "iris-b", iris_bytes)
    upload(stub, workspace, "iris-b", iris_bytes)
    upload(stub, workspace, "iris-c", iris_bytes)
    upload(stub, workspace, "probs", identity_model("probabilities", "float32", "copy", width=3))
    version = create(
        stub,
        workspace,
        "p",
        shadow(model("iris"), model("iris-b"), model("iris-c", features="petals")),
        step("probs"),
    )
    first = version.steps[0]
    assert (first.model, first.version, [o.name for o in first.outputs]) == (
        "iris",
        1,
        ["label", "probabilities"],
    )
    assert [(c.model, c.version, dict(c.input_mapping)) for c in first.challengers] == [
        ("iris-b", 2, {}),
        ("iris-c", 1, {"features": "petals"}),
    ]
    assert all(
        c.sha256 == first.sha256 and [i.name for i in c.inputs] == ["features"] for c in first.challengers
    )
    assert (version.steps[1].model, list(version.steps[1].challengers)) == ("probs", [])
    # Read back as stored.
    stored = stub.GetPipeline(pb.GetPipelineRequest(workspace=workspace, name="p")).versions
    assert list(stored) == [version]


def test_shadow_versions_bump_only_when_challengers_change(
    stub: Stub, workspace: str, iris_bytes: bytes
) -> None:
    for name in ("iris", "iris-b", "iris-c"):
        upload(stub, workspace, name, iris_bytes)
    assert create(stub, workspace, "p", shadow(model("iris"), model("iris-b"))).version == 1
    assert create(stub, workspace, "p", shadow(model("iris", 1), model("iris-b", 1))).version == 1
    # A plain model step of the champion is another pipeline.
    assert create(stub, workspace, "p", step("iris")).version == 2
    assert create(stub, workspace, "p", shadow(model("iris"), model("iris-b"))).version == 3
    assert create(stub, workspace, "p", shadow(model("iris"), model("iris-b"), model("iris-c"))).version == 4
    assert create(stub, workspace, "p", shadow(model("iris"), model("iris-c"), model("iris-b"))).version == 5
    assert create(stub, workspace, "p", shadow(model("iris"), model("iris-c"), model("iris-b"))).version == 5
    upload(stub, workspace, "iris-b", iris_bytes)
    # The latest challenger is now iris-b v2.
    assert create(stub, workspace, "p", shadow(model("iris"), model("iris-c"), model("iris-b"))).version == 6
    assert (
        create(stub, workspace, "p", shadow(model("iris"), model("iris-c"), model("iris-b", 2))).version == 6
    )
    mapped_b = model("iris-b", features="petals")
    assert create(stub, workspace, "p", shadow(model("iris"), model("iris-c"), mapped_b)).version == 7


@pytest.mark.parametrize(
    ("steps", "code", "message"),
    [
        ([shadow(model("iris"))], "INVALID_ARGUMENT", "step 1: a shadow step needs at least one challenger"),
        (
            [shadow(model("iris"), model("iris-b"), model("iris-b", 1))],
            "INVALID_ARGUMENT",
            "step 1: challenger 'iris-b' is given twice; challenger outputs are kept by model name, "
            "so each challenger must be a different model",
        ),
        (
            [shadow(model("iris", 1), model("iris-b"), model("iris"))],
            "INVALID_ARGUMENT",
            "step 1: challenger 'iris' is the champion's model; challenger outputs are kept by model "
            "name, so upload the challenger under a name of its own",
        ),
        (
            [pb.PipelineStep(shadow=pb.ShadowStep(challengers=[model("iris-b")]))],
            "INVALID_ARGUMENT",
            "step 1: a shadow step needs a champion model",
        ),
        (
            [step("iris"), shadow(model("probs"), model("ghost"))],
            "NOT_FOUND",
            "step 2: challenger model 'ghost' not found in workspace",
        ),
        (
            [shadow(model("iris", 9), model("iris-b"))],
            "NOT_FOUND",
            "step 1: champion model 'iris' has no version 9",
        ),
        (
            [shadow(model("iris"), model("iris-b", features="bad field!"))],
            "INVALID_ARGUMENT",
            "step 1 (challenger iris-b v1): input 'features' is mapped from record field 'bad field!'",
        ),
        (
            [shadow(model("iris"), model("iris-b", petals="x"))],
            "INVALID_ARGUMENT",
            "step 1 (challenger iris-b v1): model 'iris-b' has no input 'petals'; its inputs are: "
            "'features' (float32)",
        ),
        (
            [step("iris"), shadow(model("probs"), model("iris-b"))],
            "INVALID_ARGUMENT",
            "step 2 (challenger iris-b v1) needs input 'features' (float32), but step 1 (iris v1) "
            "produces only 'label' (int64), 'probabilities' (float32)",
        ),
        (
            [step("iris"), shadow(model("probs"), model("names", label="probabilities"))],
            "INVALID_ARGUMENT",
            "step 2 (challenger names v1) needs input 'label' (string) from 'probabilities', but "
            "step 1 (iris v1) produces 'probabilities' as float32",
        ),
        (
            # What follows a shadow step is fed by the champion only.
            [shadow(model("probs"), model("iris")), step("iris-b")],
            "INVALID_ARGUMENT",
            "step 2 (iris-b v1) needs input 'features' (float32), but step 1 (champion probs v1) "
            "produces only 'copy' (float32)",
        ),
    ],
)
def test_invalid_shadow_steps(
    stub: Stub, shadow_workspace: str, steps: list[pb.PipelineStep], code: str, message: str
) -> None:
    workspace = shadow_workspace
    error = rpc_error(lambda: create(stub, workspace, "p", *steps))
    assert error.code().name == code, error.details()
    assert error.details().startswith(message), error.details()
    assert stub.ListPipelines(pb.ListPipelinesRequest(workspace=workspace)).pipelines == []


def test_validations_after_a_shadow_step_read_the_champion(
    stub: Stub, workspace: str, iris_bytes: bytes
) -> None:
    upload(stub, workspace, "iris", iris_bytes)
    upload(stub, workspace, "probs", identity_model("features", "float32", "copy", width=4))
    checks = pb.PipelineStep(validations=pb.ValidationsStep(checks={"big": "out.copy[0] > 9"}))
    version = create(stub, workspace, "p", shadow(model("probs"), model("iris")), checks)
    assert [s.model for s in version.steps] == ["probs", ""]
    error = rpc_error(lambda: create(stub, workspace, "q", shadow(model("iris"), model("probs")), checks))
    assert error.details() == (
        "step 2: check 'big' reads out.copy, but step 1 (champion iris v1) produces only "
        "'label' (int64), 'probabilities' (float32)"
    )


def test_deployed_spec_carries_challengers(
    stub: Stub, workspace: str, iris_bytes: bytes, registry_settings: RegistrySettings
) -> None:
    upload(stub, workspace, "iris", iris_bytes)
    upload(stub, workspace, "iris-b", iris_bytes)
    upload(stub, workspace, "iris-b", iris_bytes)
    created = create(stub, workspace, "p", shadow(model("iris"), model("iris-b", features="petals")))
    deployment = stub.Deploy(pb.DeployRequest(workspace=workspace, pipeline="p"), timeout=30)
    key = topics.deployment_key(workspace, "p")
    (message,) = read_deployments(registry_settings, lambda found: len(found) >= 1, key)
    spec = json_format.Parse(message.value(), pb.DeploymentSpec())
    assert spec.deployment_id == deployment.deployment_id
    (resolved,) = spec.steps
    assert resolved == created.steps[0]
    assert (resolved.model, resolved.version) == ("iris", 1)
    (challenger,) = resolved.challengers
    assert (challenger.model, challenger.version, dict(challenger.input_mapping)) == (
        "iris-b",
        2,
        {"features": "petals"},
    )
    assert challenger.sha256 and [o.name for o in challenger.outputs] == ["label", "probabilities"]
    stub.Undeploy(pb.UndeployRequest(workspace=workspace, pipeline="p"))
