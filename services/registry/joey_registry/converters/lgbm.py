"""LightGBM boosters saved with ``save_model`` (text), converted with onnxmltools."""

from __future__ import annotations

from pathlib import Path

import lightgbm
import numpy as np
import onnx
import onnxmltools

from joey_core.models import TensorSpec
from joey_registry.converters import Converter, Loaded, boosters, float_input

_KINDS: dict[str, boosters.Kind] = {"binary": "binary", "multiclass": "multiclass"}


class LightGBMConverter(Converter):
    framework = "lightgbm"

    def load(self, path: Path, declared: tuple[TensorSpec, ...]) -> Loaded:
        try:
            booster = lightgbm.Booster(model_file=str(path))
        except lightgbm.basic.LightGBMError as exc:
            raise self.refuse(
                f"the file is not a booster saved with save_model (text): {boosters.first_line(exc)}"
            ) from None
        objective = _objective(booster)
        if not (objective in _KINDS or objective.startswith("regression") or objective in ("huber", "fair")):
            raise self.refuse(
                f"objective {objective!r} is not supported; supported: binary, multiclass, regression"
            )
        features = booster.num_feature()
        description = f"a LightGBM booster ({objective}, {booster.num_trees()} trees, {features} features)"
        return Loaded(booster, description, float_input(features, declared, self))

    def to_onnx(self, loaded: Loaded) -> onnx.ModelProto:
        return boosters.to_onnx(self, onnxmltools.convert_lightgbm, loaded, zipmap=False)

    def predict(self, loaded: Loaded, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        predicted = loaded.model.predict(inputs[loaded.inputs[0].name])
        return boosters.outputs(predicted, _KINDS.get(_objective(loaded.model), "regression"))


def _objective(booster: lightgbm.Booster) -> str:
    # "binary sigmoid:1", "multiclass num_class:3": the name, then its parameters.
    return str(booster.dump_model(num_iteration=1).get("objective", "")).split(" ", 1)[0]


CONVERTER = LightGBMConverter
