"""The conversion core without the stack: how a conversion's outputs are compared with the native
library's, and an ExportedProgram converted in its confined child (the end-to-end tests take
TorchScript: tests/joey/client/test_native_models.py)."""

from __future__ import annotations

import re
import secrets
from pathlib import Path

import numpy as np
import onnxruntime as ort
import psycopg
import pytest

from joey_core.models import TensorSpec
from joey_registry.app import RegistryServer
from joey_registry.conversion import Conversions
from joey_registry.converters import verify
from joey_registry.errors import InvalidArgument


def test_outputs_within_the_tolerance_pass_and_say_how_close_they_came() -> None:
    native = {"variable": np.array([100.0, -2.0, 0.0])}
    converted = {"variable": np.array([[100.09], [-2.0005], [0.0009]], dtype=np.float32)}
    assert verify.compare(native, converted, "generated inputs").startswith(
        "verified on generated inputs: variable: at most 0.09"
    )


def test_a_value_beyond_the_tolerance_is_refused_naming_output_row_and_difference() -> None:
    native = {"variable": np.array([1.0, 2.0, 3.0])}
    with pytest.raises(InvalidArgument) as refused:
        verify.compare(native, {"variable": np.array([1.0, 2.5, 3.0])}, "the sample input")
    assert str(refused.value) == (
        "the converted model disagrees with the native one on output 'variable' by 0.5 on the sample input "
        "(1 of 3 values; row 1: 2.5 instead of 2; tolerance 0.001 + 0.001 x |value|)"
    )


@pytest.mark.parametrize(
    ("native", "converted", "reason"),
    [
        # A NaN in both places hid the other rows: argmax of a difference holding NaN picks the NaN.
        ([np.nan, 1.0, 2.0], [np.nan, 5.0, -7.0], "by 9 on x (2 of 3 values; row 2: -7 instead of 2"),
        ([np.inf, 1.0], [-np.inf, 1.0], "by inf on x (1 of 2 values; row 0: -inf instead of inf"),
        ([np.nan, 1.0], [0.0, 1.0], "by nan on x (1 of 2 values; row 0: 0 instead of nan"),
        ([1.0, 2.0], [np.inf, 2.0], "by inf on x (1 of 2 values; row 0: inf instead of 1"),
    ],
)
def test_values_that_are_not_finite_agree_only_with_the_same_value(
    native: list[float], converted: list[float], reason: str
) -> None:
    with pytest.raises(InvalidArgument, match=re.escape(reason)):
        verify.compare({"v": np.array(native)}, {"v": np.array(converted)}, "x")
    same = np.array([np.nan, np.inf, -np.inf, 1.0])
    assert (
        verify.compare({"v": same}, {"v": same + [0, 0, 0, 5e-4]}, "x")
        == "verified on x: v: at most 0.0005 apart"
    )


def test_labels_must_match_except_where_the_native_model_is_torn() -> None:
    probabilities = np.array([[0.9, 0.1], [0.5004, 0.4996], [0.2, 0.8]])
    native = {"label": np.array([0, 0, 1]), "probabilities": probabilities}
    # Row 1 is a tie within the tolerance: either label is right.
    assert "label: equal" in verify.compare(
        native, {"label": np.array([0, 1, 1]), "probabilities": probabilities}, "generated inputs"
    )
    with pytest.raises(InvalidArgument, match="on output 'label': 1 of 3 values differ .* \\(row 2: \\[0\\]"):
        verify.compare(native, {"label": np.array([0, 0, 0]), "probabilities": probabilities}, "x")
    with pytest.raises(InvalidArgument, match="has no output 'probabilities'"):
        verify.compare(native, {"label": np.array([0, 0, 1])}, "x")


def test_a_sample_that_does_not_fit_the_model_is_refused() -> None:
    specs = (TensorSpec("input", "float32", (-1, 4)),)
    assert verify.sample(specs, {"input": [1, 2, 3, 4]})["input"].shape == (1, 4)
    with pytest.raises(InvalidArgument, match="sample input 'input' has shape \\[2, 3\\]"):
        verify.sample(specs, {"input": [[1, 2, 3], [4, 5, 6]]})
    with pytest.raises(
        InvalidArgument, match="the sample input has \\['x'\\], but the model takes \\['input'\\]"
    ):
        verify.sample(specs, {"x": [1, 2, 3, 4]})


def test_an_exported_program_converts_with_a_dynamic_batch(tmp_path: Path) -> None:
    import torch

    class Scale(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 2.0 + 1.0

    batch = torch.export.Dim("batch")
    program = torch.export.export(Scale(), (torch.zeros(2, 3),), dynamic_shapes=({0: batch},))
    torch.export.save(program, tmp_path / "scale.pt2")
    conversions = Conversions(
        memory_mb=6144, cpu_s=120, timeout_s=300, concurrency=1, max_output_bytes=1 << 24
    )
    specs = (TensorSpec("x", "float32", (-1, 3)),)
    conversion = conversions.start("pytorch", tmp_path / "scale.pt2", specs, {"x": [[1, 2, 3]]}, tmp_path)
    assert conversion.description == "an ExportedProgram taking x"
    onnx_path, log = conversion.finish()
    assert log[-1].startswith("verified on the sample input: output: at most 0 apart")
    session = ort.InferenceSession(str(onnx_path))
    (out,) = session.run(None, {"x": np.ones((5, 3), dtype=np.float32)})
    assert out.tolist() == [[3.0] * 3] * 5
    conversion.remove()


def test_a_conversion_no_registry_finishes_becomes_an_error_once_older_than_any_can_take(
    registry_server: RegistryServer, database_url: str
) -> None:
    registry = registry_server.registry
    name = f"orphan-{secrets.token_hex(4)}"
    registry.store.create_workspace(name, "admin")
    ws = registry.store.workspace(name)
    assert ws is not None
    source = ("ab" * 32, 10)
    fresh = registry.store.add_model_version(ws, name, "", 0, "sklearn", (), (), lambda: None, source=source)
    old = registry.store.add_model_version(ws, name, "", 0, "sklearn", (), (), lambda: None, source=source)
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "UPDATE model_versions v SET created_at = now() - interval '1 day' FROM models m "
            "WHERE m.id = v.model_id AND m.name = %s AND v.version = %s",
            (name, old.version),
        )
    # The session stack's registry, on the same database, may expire it first in its reconciler round.
    assert registry.expire_conversions() in (0, 1)
    stopped = registry.store.get_model_version(ws, name, old.version)
    assert stopped is not None and stopped.status == "error"
    assert stopped.conversion_log == "the registry stopped during the conversion; upload the model again"
    # A conversion younger than the limits may still be running in another registry: left alone.
    running = registry.store.get_model_version(ws, name, fresh.version)
    assert running is not None and running.status == "converting"
