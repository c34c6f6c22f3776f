"""XGBoost boosters saved with ``save_model`` (.json or .ubj), converted with onnxmltools."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxmltools
import xgboost
from onnxmltools.convert.common.data_types import FloatTensorType

from joey_core.models import TensorSpec
from joey_registry.converters import Converter, Loaded, batch_dynamic, float_input

# onnxmltools' highest opset for tree ensembles.
TARGET_OPSET = 15
_CLASSIFIERS = ("binary:logistic", "multi:softprob")


class XGBoostConverter(Converter):
    framework = "xgboost"

    def load(self, path: Path, declared: tuple[TensorSpec, ...]) -> Loaded:
        try:
            booster = xgboost.Booster(model_file=str(path))
        except xgboost.core.XGBoostError as exc:
            reason = str(exc).strip().splitlines()[0][:300]
            raise self.refuse(
                f"the file is not a model saved with save_model (.json or .ubj): {reason}"
            ) from None
        objective = json.loads(booster.save_config())["learner"]["objective"]["name"]
        if not (objective in _CLASSIFIERS or objective.startswith("reg:")):
            raise self.refuse(
                f"objective {objective!r} is not supported; supported: {', '.join(_CLASSIFIERS)} and reg:*"
            )
        features = booster.num_features()
        description = (
            f"an XGBoost booster ({objective}, {booster.num_boosted_rounds()} rounds, {features} features)"
        )
        return Loaded(booster, description, float_input(features, declared, self))

    def to_onnx(self, loaded: Loaded) -> onnx.ModelProto:
        spec = loaded.inputs[0]
        try:
            converted = onnxmltools.convert_xgboost(
                loaded.model,
                initial_types=[(spec.name, FloatTensorType([None, spec.shape[1]]))],
                target_opset=TARGET_OPSET,
            )
        except (RuntimeError, NotImplementedError, ValueError, TypeError, KeyError) as exc:
            raise self.refuse(
                f"onnxmltools cannot convert this booster: {str(exc).splitlines()[0]}"
            ) from None
        return batch_dynamic(converted)

    def predict(self, loaded: Loaded, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        booster: xgboost.Booster = loaded.model
        predicted = booster.predict(xgboost.DMatrix(inputs[loaded.inputs[0].name]))
        objective = json.loads(booster.save_config())["learner"]["objective"]["name"]
        if objective == "binary:logistic":
            probabilities = np.column_stack([1 - predicted, predicted])
        elif objective == "multi:softprob":
            probabilities = predicted
        else:
            return {"variable": predicted}
        return {"label": probabilities.argmax(axis=1), "probabilities": probabilities}


CONVERTER = XGBoostConverter
