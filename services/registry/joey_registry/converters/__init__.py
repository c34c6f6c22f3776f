"""Converting native models (scikit-learn, XGBoost, LightGBM, PyTorch) to ONNX, one module per framework.

Only the conversion child (:mod:`joey_registry.convert_process`) imports a framework's module, and so the
framework: the registry itself knows the names in :data:`CONVERTERS` and nothing else of them. Each
converter loads the file the way its framework saves it, refusing (InvalidArgument) a file that is not
such a model, converts with the framework's maintained ONNX converter, and predicts natively, so that
:mod:`joey_registry.converters.verify` can compare both on the same inputs.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import onnx

from joey_core.models import TensorSpec
from joey_registry.errors import InvalidArgument

# Framework name -> the module defining its converter (imported in the conversion child only).
CONVERTERS: dict[str, str] = {
    "sklearn": "joey_registry.converters.scikit",
    "xgboost": "joey_registry.converters.xgb",
    "lightgbm": "joey_registry.converters.lgbm",
    "pytorch": "joey_registry.converters.torch_models",
}

DEFAULT_INPUT = "input"
"""The one float tensor a model's inputs default to, sized from the model, when no schema is given."""


@dataclass(frozen=True)
class Loaded:
    """A native model loaded from its file: what it is (for the conversion log) and the inputs its ONNX
    form takes."""

    model: Any
    description: str
    inputs: tuple[TensorSpec, ...]


class Converter(ABC):
    framework: ClassVar[str]

    @abstractmethod
    def load(self, path: Path, declared: tuple[TensorSpec, ...]) -> Loaded:
        """The model in ``path``; InvalidArgument (via :meth:`refuse`) when it is not one of this
        framework's. ``declared`` is the input schema given with the upload (empty when none was)."""

    @abstractmethod
    def to_onnx(self, loaded: Loaded) -> onnx.ModelProto:
        """The model converted, its inputs named as ``loaded.inputs``; classifiers output ``label`` and
        ``probabilities``, other models ``variable``."""

    @abstractmethod
    def predict(self, loaded: Loaded, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The native library's outputs for ``inputs``, named as the ONNX outputs are."""

    def refuse(self, what: str) -> InvalidArgument:
        return InvalidArgument(f"framework {self.framework!r}: {what}")


def converter_for(framework: str) -> Converter:
    """The converter of ``framework`` (a key of CONVERTERS), importing its module and framework."""
    module = importlib.import_module(CONVERTERS[framework])
    found: type[Converter] = module.CONVERTER
    return found()


def float_input(
    features: int, declared: tuple[TensorSpec, ...], converter: Converter
) -> tuple[TensorSpec, ...]:
    """The default input, one float tensor ``input`` of ``features`` columns; a declared schema must be
    that one tensor (named as the user likes)."""
    if not declared:
        return (TensorSpec(DEFAULT_INPUT, "float32", (-1, features)),)
    if len(declared) != 1 or declared[0].dtype not in ("float32", "float64"):
        raise converter.refuse(
            f"the model takes one float tensor of {features} features; give an input schema of one "
            "float32 field (or none, for the default 'input')"
        )
    spec = declared[0]
    if tuple(spec.shape) not in ((-1, features), (-1, -1)):
        raise converter.refuse(
            f"input {spec.name!r} is declared with shape {list(spec.shape)}, but the model takes "
            f"{features} features: [-1, {features}]"
        )
    return (TensorSpec(spec.name, "float32", (-1, features)),)


def batch_dynamic(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every graph input's and output's first dimension made the dynamic batch: some converters fix it
    at 1, which would refuse any other batch size."""
    for value in (*model.graph.input, *model.graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims:
            dims[0].Clear()
            dims[0].dim_param = "N"
    return model
