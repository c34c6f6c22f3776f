"""Python steps in the registry: the source is parsed, never run; the declared signature is checked and
stored, so pipelines chain python steps and ONNX models with the usual create-time checks."""

from __future__ import annotations

from pathlib import Path

import grpc
import psycopg
import pytest

from joey_core.v1 import registry_pb2 as pb
from joey_registry.app import RegistryServer
from tests.registry.helpers import Stub, rpc_error, step, upload

PREP = b"""
import numpy as np

def process_data(inputs):
    return {"features": np.stack([inputs["a"], inputs["b"], inputs["c"], inputs["d"]], axis=1)}
"""

PREP_INPUTS = [pb.TensorSpec(name=n, dtype="float64", shape=[-1]) for n in "abcd"]
PREP_OUTPUTS = [pb.TensorSpec(name="features", dtype="float32", shape=[-1, 4])]
POST_INPUTS = [
    pb.TensorSpec(name="label", dtype="int64", shape=[-1]),
    pb.TensorSpec(name="probabilities", dtype="float32", shape=[-1, 3]),
]
POST_OUTPUTS = [pb.TensorSpec(name="species", dtype="string", shape=[-1])]


def upload_python(
    stub: Stub,
    workspace: str,
    name: str,
    source: bytes,
    inputs: list[pb.TensorSpec] | None = None,
    outputs: list[pb.TensorSpec] | None = None,
    framework: str = "python",
) -> pb.ModelVersion:
    header = pb.UploadModelHeader(
        workspace=workspace,
        name=name,
        framework=framework,
        inputs=PREP_INPUTS if inputs is None else inputs,
        outputs=PREP_OUTPUTS if outputs is None else outputs,
    )
    requests = [pb.UploadModelRequest(header=header), pb.UploadModelRequest(chunk=source)]
    return stub.UploadModel(iter(requests), timeout=30)


def specs(items: object) -> list[tuple[str, str, list[int]]]:
    return [(s.name, s.dtype, list(s.shape)) for s in items]  # type: ignore[attr-defined]


def test_python_step_is_stored_with_its_declared_signature(
    stub: Stub, workspace: str, tmp_path: Path
) -> None:
    marker = tmp_path / "ran"
    # Module-level code that would leave a trace if the registry ran it.
    source = PREP + f"open({str(marker)!r}, 'w').close()\n".encode()
    version = upload_python(stub, workspace, "prep", source)
    assert (version.version, version.framework) == (1, "python")
    assert specs(version.inputs) == [(n, "float64", [-1]) for n in "abcd"]
    assert specs(version.outputs) == [("features", "float32", [-1, 4])]
    assert not marker.exists(), "the registry must never execute user code"
    stored = stub.GetModelVersion(pb.GetModelVersionRequest(workspace=workspace, name="prep", version=1))
    assert specs(stored.outputs) == specs(version.outputs)


BAD = {
    "syntax-error": (
        b"def process_data(inputs):\n    return {\n",
        {},
        "python step has a syntax error at line 2: '{' was never closed",
    ),
    "no-process-data": (
        b"def process(inputs):\n    return inputs\n",
        {},
        "python step defines no top-level function process_data(inputs)",
    ),
    "nested-process-data": (
        b"class Step:\n    def process_data(self, inputs):\n        return inputs\n",
        {},
        "python step defines no top-level function process_data(inputs)",
    ),
    "two-parameters": (
        b"def process_data(inputs, extra):\n    return inputs\n",
        {},
        "process_data (line 1) must take exactly one positional parameter, the dict of input arrays; "
        "it takes (inputs, extra)",
    ),
    # Small files whose parse recurses (the AST builder, ast.unparse) or overflows the parser's stack.
    **{
        f"nested-{kind}": (
            b"def process_data(inputs):\n    return inputs\n" + source,
            {},
            "the python step is nested too deeply to check",
        )
        for kind, source in (
            ("attributes", b"x = a" + b".b" * 200_000 + b"\n"),
            ("sums", b"x = " + b"1+" * 200_000 + b"1\n"),
            ("unary-minus", b"x = " + b"-" * 200_000 + b"1\n"),
            ("default", b"def process_data(inputs, extra=" + b"1+" * 2_000 + b"1):\n    pass\n"),
        )
    },
    "not-utf8": (b"def process_data(x):\n    return '\xff'\n", {}, "a python step must be UTF-8 text"),
    "no-input-schema": (PREP, {"inputs": []}, "a python step needs its inputs declared"),
    "no-output-schema": (PREP, {"outputs": []}, "a python step needs its outputs declared"),
    "bad-dtype": (
        PREP,
        {"outputs": [pb.TensorSpec(name="features", dtype="float", shape=[-1, 4])]},
        "output 'features' has dtype 'float'; supported: bool, float16, float32",
    ),
    "no-batch-dimension": (
        PREP,
        {"outputs": [pb.TensorSpec(name="features", dtype="float32", shape=[4])]},
        "output 'features' has shape [4]; a python step's shapes start with the batch dimension, -1",
    ),
    "duplicate-input": (
        PREP,
        {"inputs": [pb.TensorSpec(name="a", dtype="float64", shape=[-1])] * 2},
        "input 'a' is declared twice",
    ),
    "onnx-with-schema": (
        b"not read: the declared schema is refused first",
        {"framework": "onnx"},
        "an ONNX model carries its own signature",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_python_upload_is_rejected_and_stores_nothing(
    stub: Stub, workspace: str, registry_server: RegistryServer, db: psycopg.Connection, case: str
) -> None:
    source, overrides, expected = BAD[case]
    before = sorted(p for p in registry_server.settings.artifact_dir.rglob("*") if p.is_file())
    error = rpc_error(lambda: upload_python(stub, workspace, "bad", source, **overrides))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert expected in error.details()
    rows = db.execute(
        "SELECT count(*) FROM models m JOIN workspaces w ON w.id = m.workspace_id WHERE w.name = %s",
        (workspace,),
    ).fetchone()
    assert rows == (0,)
    assert sorted(p for p in registry_server.settings.artifact_dir.rglob("*") if p.is_file()) == before


def create(stub: Stub, workspace: str, *models: str) -> pb.PipelineVersion:
    request = pb.CreatePipelineRequest(workspace=workspace, name="py", steps=[step(m) for m in models])
    return stub.CreatePipeline(request)


def test_python_steps_chain_around_an_onnx_model(stub: Stub, workspace: str, iris_bytes: bytes) -> None:
    upload(stub, workspace, "iris", iris_bytes)
    upload_python(stub, workspace, "prep", PREP)
    post = b"def process_data(inputs):\n    return {'species': inputs['label'].astype(str)}\n"
    upload_python(stub, workspace, "post", post, POST_INPUTS, POST_OUTPUTS)

    created = create(stub, workspace, "prep", "iris", "post")
    assert [(s.model, s.framework) for s in created.steps] == [
        ("prep", "python"),
        ("iris", "onnx"),
        ("post", "python"),
    ]

    # A python step that does not produce what the next step needs is refused like any model.
    as_text = [pb.TensorSpec(name="features", dtype="string", shape=[-1, 4])]
    upload_python(stub, workspace, "prep-text", PREP, outputs=as_text)
    error = rpc_error(lambda: create(stub, workspace, "prep-text", "iris"))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "step 2 (iris v1) needs input 'features' (float32)" in error.details()
