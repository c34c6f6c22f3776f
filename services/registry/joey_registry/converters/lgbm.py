"""LightGBM boosters saved with ``save_model`` (text), converted with onnxmltools."""

from __future__ import annotations

from pathlib import Path

import lightgbm
import numpy as np
import onnx
import onnxmltools
from onnxmltools.convert.common.data_types import FloatTensorType

from joey_core.models import TensorSpec
from joey_registry.converters import Converter, Loaded, batch_dynamic, float_input
from joey_registry.converters.xgb import TARGET_OPSET

_CLASSIFIERS = ("binary", "multiclass")


class LightGBMConverter(Converter):
    framework = "lightgbm"

    def load(self, path: Path, declared: tuple[TensorSpec, ...]) -> Loaded:
        try:
            booster = lightgbm.Booster(model_file=str(path))
        except lightgbm.basic.LightGBMError as exc:
            reason = str(exc).strip().splitlines()[0][:300]
            raise self.refuse(f"the file is not a booster saved with save_model (text): {reason}") from None
        objective = _objective(booster)
        if not (
            objective in _CLASSIFIERS or objective.startswith("regression") or objective in ("huber", "fair")
        ):
            raise self.refuse(
                f"objective {objective!r} is not supported; supported: binary, multiclass, regression"
            )
        features = booster.num_feature()
        description = f"a LightGBM booster ({objective}, {booster.num_trees()} trees, {features} features)"
        return Loaded(booster, description, float_input(features, declared, self))

    def to_onnx(self, loaded: Loaded) -> onnx.ModelProto:
        spec = loaded.inputs[0]
        try:
            converted = onnxmltools.convert_lightgbm(
                loaded.model,
                initial_types=[(spec.name, FloatTensorType([None, spec.shape[1]]))],
                zipmap=False,
                target_opset=TARGET_OPSET,
            )
        except (RuntimeError, NotImplementedError, ValueError, TypeError, KeyError) as exc:
            raise self.refuse(
                f"onnxmltools cannot convert this booster: {str(exc).splitlines()[0]}"
            ) from None
        return batch_dynamic(converted)

    def predict(self, loaded: Loaded, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        predicted = loaded.model.predict(inputs[loaded.inputs[0].name])
        objective = _objective(loaded.model)
        if objective == "binary":
            probabilities = np.column_stack([1 - predicted, predicted])
        elif objective == "multiclass":
            probabilities = predicted
        else:
            return {"variable": predicted}
        return {"label": probabilities.argmax(axis=1), "probabilities": probabilities}


def _objective(booster: lightgbm.Booster) -> str:
    # "binary sigmoid:1", "multiclass num_class:3": the name, then its parameters.
    return str(booster.dump_model(num_iteration=1).get("objective", "")).split(" ", 1)[0]


CONVERTER = LightGBMConverter
