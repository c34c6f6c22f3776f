"""What the gateway serves a pipeline as: its tensors, read from the deployed pipeline version."""

from __future__ import annotations

from joey_core.v1 import registry_pb2 as pb
from joey_gateway.catalog import TensorInfo, _info


def _model(name: str, mapping: dict[str, str] | None = None) -> pb.ResolvedStep:
    return pb.ResolvedStep(
        model=name,
        version=1,
        inputs=[pb.TensorSpec(name="features", dtype="float32", shape=[-1, 4])],
        outputs=[pb.TensorSpec(name="label", dtype="int64", shape=[-1])],
        input_mapping=mapping or {},
    )


def test_a_pipeline_starting_with_a_split_reads_its_first_arms_inputs() -> None:
    """A split step has no model of its own: without its arms the pipeline would seem to take no inputs, and
    every request would be checked against nothing (or a later step's inputs)."""
    split = pb.ResolvedStep(arms=[_model("a", {"features": "petals"}), _model("b", {"features": "petals"})])
    status = pb.DeploymentStatus(
        deployment=pb.Deployment(workspace="w", pipeline="p", pipeline_version=1), status="Running"
    )
    info = _info(status, pb.PipelineVersion(version=1, steps=[split, pb.ResolvedStep(checks={"c": "1 > 0"})]))
    assert info.inputs == (TensorInfo("petals", "FP32", (-1, 4)),)
    assert info.outputs == (TensorInfo("label", "INT64", (-1,)),)
