"""scikit-learn estimators and pipelines (joblib or pickle files), converted with skl2onnx."""

from __future__ import annotations

import pickle
from pathlib import Path

import joblib
import numpy as np
import onnx
import skl2onnx
from skl2onnx.common.data_types import FloatTensorType
from sklearn.base import BaseEstimator, is_classifier
from sklearn.exceptions import NotFittedError
from sklearn.pipeline import Pipeline
from sklearn.utils.validation import check_is_fitted

from joey_core.models import TensorSpec
from joey_registry.converters import Converter, Loaded, batch_dynamic, float_input


class SklearnConverter(Converter):
    framework = "sklearn"

    def load(self, path: Path, declared: tuple[TensorSpec, ...]) -> Loaded:
        try:
            model = joblib.load(path)
        except (pickle.UnpicklingError, EOFError, ValueError, KeyError, IndexError) as exc:
            raise self.refuse(f"the file is not a joblib or pickle file: {exc}") from None
        except (AttributeError, ModuleNotFoundError, ImportError) as exc:
            # A pickle of a class this registry cannot import: another library, or another version.
            raise self.refuse(f"the pickle needs what is not installed here: {exc}") from None
        if not isinstance(model, BaseEstimator):
            raise self.refuse(
                f"the file holds a {type(model).__module__}.{type(model).__qualname__}, not a scikit-learn "
                "estimator or Pipeline"
            )
        try:
            check_is_fitted(model)
        except NotFittedError:
            raise self.refuse(f"the {type(model).__name__} in the file is not fitted") from None
        features = getattr(model, "n_features_in_", None)
        if not isinstance(features, int):
            raise self.refuse(f"the {type(model).__name__} does not say how many features it takes")
        if not (hasattr(model, "predict") or hasattr(model, "transform")):
            raise self.refuse(f"the {type(model).__name__} neither predicts nor transforms")
        steps = ", ".join(type(s).__name__ for _, s in model.steps) if isinstance(model, Pipeline) else ""
        kind = f"Pipeline ({steps})" if steps else type(model).__name__
        return Loaded(
            model, f"a scikit-learn {kind} of {features} features", float_input(features, declared, self)
        )

    def to_onnx(self, loaded: Loaded) -> onnx.ModelProto:
        model = loaded.model
        spec = loaded.inputs[0]
        final = _final(model)
        options = {id(final): {"zipmap": False}} if is_classifier(final) else None
        try:
            converted = skl2onnx.to_onnx(
                model, initial_types=[(spec.name, FloatTensorType([None, spec.shape[1]]))], options=options
            )
        except (RuntimeError, NotImplementedError, ValueError, TypeError) as exc:
            # skl2onnx names the estimator it has no converter for ("Unable to find a shape calculator").
            raise self.refuse(f"skl2onnx cannot convert this model: {str(exc).splitlines()[0]}") from None
        assert isinstance(converted, onnx.ModelProto)
        return batch_dynamic(converted)

    def predict(self, loaded: Loaded, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        model = loaded.model
        x = inputs[loaded.inputs[0].name]
        if is_classifier(_final(model)) and hasattr(model, "predict_proba"):
            return {"label": model.predict(x), "probabilities": model.predict_proba(x)}
        if hasattr(model, "predict"):
            return {"variable": model.predict(x)}
        return {"variable": model.transform(x)}


def _final(model: BaseEstimator) -> BaseEstimator:
    while isinstance(model, Pipeline):
        model = model.steps[-1][1]
    return model


CONVERTER = SklearnConverter
