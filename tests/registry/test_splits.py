"""Random and key split steps: resolved, validated (interchangeable arms) and stored by the registry."""

from __future__ import annotations

import secrets

import pytest
from google.protobuf import json_format

from joey_core import topics
from joey_core.v1 import registry_pb2 as pb
from joey_registry.settings import RegistrySettings
from tests.registry.helpers import Stub, identity_model, read_deployments, rpc_error, step, upload


def create(stub: Stub, workspace: str, name: str, *steps: pb.PipelineStep) -> pb.PipelineVersion:
    return stub.CreatePipeline(pb.CreatePipelineRequest(workspace=workspace, name=name, steps=list(steps)))


def model(name: str, version: int = 0, **inputs: str) -> pb.ModelStep:
    return pb.ModelStep(model=name, version=version, input_mapping=inputs)


def random_split(*arms: tuple[float, pb.ModelStep], hash_key: str = "") -> pb.PipelineStep:
    weighted = [pb.WeightedModel(weight=w, model=m) for w, m in arms]
    return pb.PipelineStep(random_split=pb.RandomSplitStep(arms=weighted, hash_key=hash_key))


def key_split(default: pb.ModelStep, meta_key: str, **routes: pb.ModelStep) -> pb.PipelineStep:
    split = pb.KeySplitStep(default_model=default, meta_key=meta_key, routes=routes)
    return pb.PipelineStep(key_split=split)


def upload_models(stub: Stub, workspace: str, iris_bytes: bytes) -> None:
    upload(stub, workspace, "iris", iris_bytes)
    upload(stub, workspace, "iris-b", iris_bytes)
    upload(stub, workspace, "iris-b", iris_bytes)
    upload(stub, workspace, "iris-c", iris_bytes)
    # Reads the same field as iris but produces other outputs.
    upload(stub, workspace, "copy", identity_model("features", "float32", "copy", width=4))
    upload(stub, workspace, "probs", identity_model("probabilities", "float32", "copy", width=3))
    # Reads `features` as int64.
    upload(stub, workspace, "ints", identity_model("features", "int64", "label"))


@pytest.fixture
def models(stub: Stub, workspace: str, iris_bytes: bytes) -> None:
    upload_models(stub, workspace, iris_bytes)


@pytest.fixture(scope="module")
def refused_workspace(stub: Stub, iris_bytes: bytes) -> str:
    """The models in a workspace of their own, shared by the refused splits: each is refused and creates
    nothing, so each sees the workspace as empty of pipelines as a fresh one (and the uploads, most of a
    test's time, are made once)."""
    name = f"ws-{secrets.token_hex(4)}"
    stub.CreateWorkspace(pb.CreateWorkspaceRequest(name=name))
    upload_models(stub, name, iris_bytes)
    return name


@pytest.mark.usefixtures("models")
def test_random_split_is_resolved_stored_and_versions_bump_only_on_change(stub: Stub, workspace: str) -> None:
    petals = {"features": "petals"}
    split = random_split((2, model("iris", **petals)), (1, model("iris-b", 1, **petals)), hash_key="user")
    version = create(stub, workspace, "p", split, step("probs"))
    first = version.steps[0]
    assert (first.model, list(first.weights), first.hash_key, first.meta_key) == ("", [2.0, 1.0], "user", "")
    assert [(a.model, a.version, dict(a.input_mapping)) for a in first.arms] == [
        ("iris", 1, petals),
        ("iris-b", 1, petals),
    ]
    assert all([o.name for o in a.outputs] == ["label", "probabilities"] for a in first.arms)
    stored = stub.GetPipeline(pb.GetPipelineRequest(workspace=workspace, name="p")).versions
    assert list(stored) == [version]
    assert create(stub, workspace, "p", split, step("probs")).version == 1
    # Weights, the hash key and each arm's version are part of the pipeline.
    other_weights = random_split(
        (1, model("iris", **petals)), (1, model("iris-b", 1, **petals)), hash_key="user"
    )
    assert create(stub, workspace, "p", other_weights, step("probs")).version == 2
    assert create(stub, workspace, "p", random_split((1, model("iris")), (1, model("iris-b")))).version == 3
    assert (
        create(stub, workspace, "p", random_split((1, model("iris")), (1, model("iris-b", 1)))).version == 4
    )


@pytest.mark.usefixtures("models")
def test_key_split_routes_values_to_shared_arms(stub: Stub, workspace: str) -> None:
    split = key_split(
        model("iris"), "tier", gold=model("iris-b"), silver=model("iris-c"), bronze=model("iris-b")
    )
    version = create(stub, workspace, "p", split)
    (first,) = version.steps
    assert [(a.model, a.version) for a in first.arms] == [("iris", 1), ("iris-b", 2), ("iris-c", 1)]
    assert (first.meta_key, dict(first.routes)) == (
        "tier",
        {"bronze": "iris-b", "gold": "iris-b", "silver": "iris-c"},
    )
    assert list(first.weights) == []
    assert create(stub, workspace, "p", split).version == 1
    moved = key_split(
        model("iris"), "tier", gold=model("iris-c"), silver=model("iris-c"), bronze=model("iris-b")
    )
    assert create(stub, workspace, "p", moved).version == 2


@pytest.mark.usefixtures("models")
def test_validations_and_steps_after_a_split_read_its_outputs(stub: Stub, workspace: str) -> None:
    checks = pb.PipelineStep(validations=pb.ValidationsStep(checks={"sure": "out.probabilities[0] > 0.9"}))
    split = random_split((1, model("iris")), (1, model("iris-b")))
    version = create(stub, workspace, "p", split, checks, step("probs"))
    assert [len(s.arms) for s in version.steps] == [2, 0, 0]
    error = rpc_error(lambda: create(stub, workspace, "q", split, step("iris")))
    assert error.details() == (
        "step 2 (iris v1) needs input 'features' (float32), but step 1 (split of 'iris', 'iris-b') "
        "produces only 'label' (int64), 'probabilities' (float32)"
    )


@pytest.mark.parametrize(
    ("steps", "code", "message"),
    [
        (
            [random_split((1, model("iris")))],
            "INVALID_ARGUMENT",
            "step 1: a random split needs at least 2 arms, got 1",
        ),
        (
            [random_split((1, model("iris")), (0, model("iris-b")))],
            "INVALID_ARGUMENT",
            "step 1: arm 'iris-b' has weight 0.0; weights must be positive numbers",
        ),
        (
            [random_split((-1, model("iris")), (1, model("iris-b")))],
            "INVALID_ARGUMENT",
            "step 1: arm 'iris' has weight -1.0",
        ),
        (
            [random_split((1, model("iris")), (float("nan"), model("iris-b")))],
            "INVALID_ARGUMENT",
            "step 1: arm 'iris-b' has weight nan",
        ),
        (
            [random_split((1, model("iris-b", 1)), (1, model("iris-b", 2)))],
            "INVALID_ARGUMENT",
            "step 1: model 'iris-b' is in two arms; results are keyed by model name",
        ),
        (
            [random_split((1, model("iris")), (1, model("iris-b")), hash_key="bad key!")],
            "INVALID_ARGUMENT",
            "step 1: hash key 'bad key!' is not a valid record field name",
        ),
        (
            [pb.PipelineStep(random_split=pb.RandomSplitStep(arms=[pb.WeightedModel(weight=1)]))],
            "INVALID_ARGUMENT",
            "step 1: every arm of a random split needs a model",
        ),
        (
            [random_split((1, model("iris")), (1, model("ghost")))],
            "NOT_FOUND",
            "step 1: arm model 'ghost' not found in workspace",
        ),
        (
            [random_split((1, model("iris")), (1, model("copy")))],
            "INVALID_ARGUMENT",
            "step 1: split arms 'iris' and 'copy' produce different outputs ('label' (int64), "
            "'probabilities' (float32) vs 'copy' (float32)); every arm must produce the same outputs",
        ),
        (
            [random_split((1, model("iris")), (1, model("iris-b", features="petals")))],
            "INVALID_ARGUMENT",
            "step 1: split arms 'iris' and 'iris-b' read different record fields "
            "(['features'] vs ['petals'])",
        ),
        (
            [random_split((1, model("iris")), (1, model("ints")))],
            "INVALID_ARGUMENT",
            "step 1: split arms 'iris' and 'ints' read record field 'features' differently: "
            "as float32 [?, 4] vs int64 [?]",
        ),
        (
            [step("iris"), random_split((1, model("probs")), (1, model("iris-b")))],
            "INVALID_ARGUMENT",
            "step 2 (split arm iris-b v2) needs input 'features' (float32), "
            "but step 1 (iris v1) produces only",
        ),
        (
            [key_split(model("iris"), "tier")],
            "INVALID_ARGUMENT",
            "step 1: a key split needs at least one route (value -> model) besides its default",
        ),
        (
            [key_split(model("iris"), "", gold=model("iris-b"))],
            "INVALID_ARGUMENT",
            "step 1: a key split needs a meta key (a record field)",
        ),
        (
            [key_split(model("iris"), "a b", gold=model("iris-b"))],
            "INVALID_ARGUMENT",
            "step 1: meta key 'a b' is not a valid record field name",
        ),
        (
            [pb.PipelineStep(key_split=pb.KeySplitStep(meta_key="tier", routes={"gold": model("iris")}))],
            "INVALID_ARGUMENT",
            "step 1: a key split needs a default model",
        ),
        (
            [key_split(model("iris"), "tier", gold=model("ghost"))],
            "NOT_FOUND",
            "step 1: route 'gold' model 'ghost' not found in workspace",
        ),
        (
            [key_split(model("iris"), "tier", gold=model("iris-b", 1), silver=model("iris-b", 2))],
            "INVALID_ARGUMENT",
            "step 1: model 'iris-b' is routed to as v2 for value 'silver' but is also v1",
        ),
        (
            [key_split(model("iris"), "tier", gold=model("copy"))],
            "INVALID_ARGUMENT",
            "step 1: split arms 'iris' and 'copy' produce different outputs",
        ),
    ],
)
def test_invalid_split_steps(
    stub: Stub, refused_workspace: str, steps: list[pb.PipelineStep], code: str, message: str
) -> None:
    error = rpc_error(lambda: create(stub, refused_workspace, "p", *steps))
    assert error.code().name == code, error.details()
    assert error.details().startswith(message), error.details()
    assert stub.ListPipelines(pb.ListPipelinesRequest(workspace=refused_workspace)).pipelines == []


@pytest.mark.usefixtures("models")
def test_deployed_spec_carries_split_arms(
    stub: Stub, workspace: str, registry_settings: RegistrySettings
) -> None:
    split = key_split(model("iris"), "tier", gold=model("iris-b", features="petals"))
    with pytest.raises(Exception, match="read different record fields"):
        create(stub, workspace, "p", split)
    created = create(stub, workspace, "p", key_split(model("iris"), "tier", gold=model("iris-b")))
    deployment = stub.Deploy(pb.DeployRequest(workspace=workspace, pipeline="p"), timeout=30)
    key = topics.deployment_key(workspace, "p")
    (message,) = read_deployments(registry_settings, lambda found: len(found) >= 1, key)
    spec = json_format.Parse(message.value(), pb.DeploymentSpec())
    assert spec.deployment_id == deployment.deployment_id
    (resolved,) = spec.steps
    assert resolved == created.steps[0]
    assert [(a.model, a.version, bool(a.sha256)) for a in resolved.arms] == [
        ("iris", 1, True),
        ("iris-b", 2, True),
    ]
    assert (resolved.meta_key, dict(resolved.routes)) == ("tier", {"gold": "iris-b"})
    stub.Undeploy(pb.UndeployRequest(workspace=workspace, pipeline="p"))
