"""XGBoost boosters saved with ``save_model`` (.json or .ubj), converted with onnxmltools."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxmltools
import xgboost

from joey_core.models import TensorSpec
from joey_registry.converters import Converter, Loaded, boosters, float_input

_KINDS: dict[str, boosters.Kind] = {"binary:logistic": "binary", "multi:softprob": "multiclass"}


class XGBoostConverter(Converter):
    framework = "xgboost"

    def load(self, path: Path, declared: tuple[TensorSpec, ...]) -> Loaded:
        try:
            booster = xgboost.Booster(model_file=str(path))
        except xgboost.core.XGBoostError as exc:
            raise self.refuse(
                f"the file is not a model saved with save_model (.json or .ubj): {boosters.first_line(exc)}"
            ) from None
        objective = _objective(booster)
        if not (objective in _KINDS or objective.startswith("reg:")):
            raise self.refuse(
                f"objective {objective!r} is not supported; supported: {', '.join(_KINDS)} and reg:*"
            )
        features = booster.num_features()
        description = (
            f"an XGBoost booster ({objective}, {booster.num_boosted_rounds()} rounds, {features} features)"
        )
        return Loaded(booster, description, float_input(features, declared, self))

    def to_onnx(self, loaded: Loaded) -> onnx.ModelProto:
        return boosters.to_onnx(self, onnxmltools.convert_xgboost, loaded)

    def predict(self, loaded: Loaded, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        booster: xgboost.Booster = loaded.model
        predicted = booster.predict(xgboost.DMatrix(inputs[loaded.inputs[0].name]))
        return boosters.outputs(predicted, _KINDS.get(_objective(booster), "regression"))


def _objective(booster: xgboost.Booster) -> str:
    return str(json.loads(booster.save_config())["learner"]["objective"]["name"])


CONVERTER = XGBoostConverter
