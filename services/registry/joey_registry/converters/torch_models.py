"""PyTorch models saved as TorchScript (``torch.jit.save``) or as an ExportedProgram
(``torch.export.save``), converted with torch.onnx: TorchScript by its TorchScript exporter, an
ExportedProgram by the dynamo exporter (onnxscript). Both need the input schema: a saved module does
not say what it takes."""

from __future__ import annotations

import tempfile
import zipfile
from pathlib import Path

import numpy as np
import onnx
import torch

from joey_core.models import TensorSpec
from joey_registry.converters import Converter, Loaded

_EXAMPLE_BATCH = 2
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "int64": torch.int64, "int32": torch.int32}


class PyTorchConverter(Converter):
    framework = "pytorch"

    def load(self, path: Path, declared: tuple[TensorSpec, ...]) -> Loaded:
        torch.set_num_threads(1)
        if not zipfile.is_zipfile(path):
            raise self.refuse(
                "the file is not a TorchScript or ExportedProgram archive (a zip file); save the model "
                "with torch.jit.save(torch.jit.script(model), path) or "
                "torch.export.save(torch.export.export(...), path)"
            )
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
        if any(n.endswith("serialized_exported_program.json") or "/models/" in n for n in names):
            try:
                model: object = torch.export.load(str(path))
            except Exception as exc:  # torch raises many kinds for a damaged archive
                raise self.refuse(f"the ExportedProgram does not load: {_first_line(exc)}") from None
            kind = "an ExportedProgram"
        else:
            try:
                model = torch.jit.load(str(path), map_location="cpu")
            except Exception as exc:
                hint = (
                    " (torch.save of a whole module is not supported: it is a pickle)"
                    if any(n.endswith("data.pkl") for n in names)
                    else ""
                )
                raise self.refuse(f"the file is not a TorchScript module{hint}: {_first_line(exc)}") from None
            kind = "a TorchScript module"
        inputs = self._inputs(declared)
        return Loaded(model, f"{kind} taking {', '.join(s.name for s in inputs)}", inputs)

    def _inputs(self, declared: tuple[TensorSpec, ...]) -> tuple[TensorSpec, ...]:
        if not declared:
            raise self.refuse(
                "a PyTorch model needs its input schema (names, dtypes, shapes), e.g. "
                "pa.schema([pa.field('input', pa.list_(pa.float32(), 4))])"
            )
        for spec in declared:
            if spec.dtype not in _DTYPES:
                raise self.refuse(
                    f"input {spec.name!r} has dtype {spec.dtype!r}; supported: {', '.join(_DTYPES)}"
                )
            if any(d < 1 for d in spec.shape[1:]):
                raise self.refuse(
                    f"input {spec.name!r} has shape {list(spec.shape)}: beyond the batch, sizes must be fixed"
                )
        return declared

    def to_onnx(self, loaded: Loaded) -> onnx.ModelProto:
        names = [s.name for s in loaded.inputs]
        example = tuple(self._tensors(loaded, _example(loaded.inputs)).values())
        outputs = _output_names(self._run(loaded, example))
        try:
            if isinstance(loaded.model, torch.export.ExportedProgram):
                program = torch.onnx.export(
                    loaded.model, example, input_names=names, output_names=outputs, dynamo=True
                )
                assert program is not None
                converted = program.model_proto
            else:
                # In TMPDIR, the child's work directory: the one place it may write.
                with tempfile.NamedTemporaryFile(suffix=".onnx") as exported:
                    torch.onnx.export(
                        loaded.model,
                        example,
                        exported.name,
                        input_names=names,
                        output_names=outputs,
                        dynamic_axes={name: {0: "N"} for name in (*names, *outputs)},
                        dynamo=False,
                    )
                    converted = onnx.load(exported.name)
        except Exception as exc:
            raise self.refuse(f"torch.onnx cannot export this model: {_first_line(exc)}") from None
        for value in converted.graph.input:
            first = value.type.tensor_type.shape.dim[0]
            if first.HasField("dim_value"):
                raise self.refuse(
                    f"the model fixes the batch dimension of {value.name!r} at {first.dim_value}: export it "
                    "with a dynamic batch, torch.export.export(model, args, dynamic_shapes=({0: "
                    "torch.export.Dim('batch')},))"
                )
        return converted

    def predict(self, loaded: Loaded, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        produced = self._run(loaded, tuple(self._tensors(loaded, inputs).values()))
        return {name: t.detach().numpy() for name, t in zip(_output_names(produced), produced, strict=True)}

    def _tensors(self, loaded: Loaded, inputs: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        return {s.name: torch.from_numpy(np.ascontiguousarray(inputs[s.name])) for s in loaded.inputs}

    def _run(self, loaded: Loaded, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        module = (
            loaded.model.module() if isinstance(loaded.model, torch.export.ExportedProgram) else loaded.model
        )
        with torch.no_grad():
            produced = module(*args)
        if isinstance(produced, torch.Tensor):
            return (produced,)
        if isinstance(produced, tuple | list) and all(isinstance(t, torch.Tensor) for t in produced):
            return tuple(produced)
        raise self.refuse(
            f"the model returns a {type(produced).__name__}; supported: a tensor or a tuple of tensors"
        )


def _example(specs: tuple[TensorSpec, ...]) -> dict[str, np.ndarray]:
    return {s.name: np.zeros((_EXAMPLE_BATCH, *s.shape[1:]), dtype=s.dtype) for s in specs}


def _output_names(produced: tuple[torch.Tensor, ...]) -> list[str]:
    return ["output"] if len(produced) == 1 else [f"output_{i}" for i in range(len(produced))]


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


CONVERTER = PyTorchConverter
