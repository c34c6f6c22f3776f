"""What the XGBoost and LightGBM converters share: both read a booster saved with ``save_model``, convert
it with onnxmltools from the one float input, and predict a binary classifier's positive-class
probability, a multiclass one's rows of probabilities or a regressor's values."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import onnx
from onnxmltools.convert.common.data_types import FloatTensorType

from joey_registry.converters import Converter, Loaded, batch_dynamic

# onnxmltools' highest opset for tree ensembles.
TARGET_OPSET = 15

Kind = Literal["binary", "multiclass", "regression"]


def first_line(exc: Exception) -> str:
    """The library's reason for refusing a file, in a line short enough for an error message."""
    return str(exc).strip().splitlines()[0][:300]


def to_onnx(
    converter: Converter, convert: Callable[..., onnx.ModelProto], loaded: Loaded, **options: Any
) -> onnx.ModelProto:
    """``loaded`` converted with onnxmltools' ``convert`` (convert_xgboost, convert_lightgbm), its input
    named as declared and its batch dynamic; a refusal naming onnxmltools' reason otherwise."""
    spec = loaded.inputs[0]
    try:
        converted = convert(
            loaded.model,
            initial_types=[(spec.name, FloatTensorType([None, spec.shape[1]]))],
            target_opset=TARGET_OPSET,
            **options,
        )
    except (RuntimeError, NotImplementedError, ValueError, TypeError, KeyError) as exc:
        raise converter.refuse(
            f"onnxmltools cannot convert this booster: {str(exc).splitlines()[0]}"
        ) from None
    return batch_dynamic(converted)


def outputs(predicted: np.ndarray, kind: Kind) -> dict[str, np.ndarray]:
    """The booster's ``predict`` as the ONNX form outputs it: ``label`` and ``probabilities`` of a
    classifier, ``variable`` of a regressor."""
    if kind == "regression":
        return {"variable": predicted}
    probabilities = np.column_stack([1 - predicted, predicted]) if kind == "binary" else predicted
    return {"label": probabilities.argmax(axis=1), "probabilities": probabilities}
