from __future__ import annotations

import grpc
import pytest

from joey.v1 import registry_pb2 as pb
from tests.registry.helpers import Stub, identity_model, rpc_error, step, upload


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
        ("p", [pb.PipelineStep()], "step 1 is empty"),
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
