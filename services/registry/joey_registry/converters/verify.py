"""Checking a conversion: the native model and its ONNX form run on the same inputs (generated, and the
upload's sample) and must agree within :data:`ATOL` + :data:`RTOL` × |native| on every value; a
classifier's labels must be equal, except on a row where its two likeliest classes are within the
tolerance of each other (a tie either side may break)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnxruntime as ort

from joey_core.models import TensorSpec
from joey_registry.errors import InvalidArgument

ATOL = 1e-3
RTOL = 1e-3
GENERATED_ROWS = 256
# Generated values at several scales: a model fitted on raw features (hundreds) and one fitted on
# standardised ones both see inputs on either side of their thresholds.
_SCALES = (1.0, 10.0, 100.0, 1000.0)


def generated(specs: tuple[TensorSpec, ...], seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    inputs = {}
    for spec in specs:
        shape = (GENERATED_ROWS, *(d if d > 0 else 1 for d in spec.shape[1:]))
        if spec.dtype.startswith("float"):
            scale = np.repeat(_SCALES, -(-GENERATED_ROWS // len(_SCALES)))[:GENERATED_ROWS]
            values = rng.standard_normal(shape) * scale.reshape((-1,) + (1,) * (len(shape) - 1))
        else:
            values = rng.integers(0, 10, shape)
        inputs[spec.name] = values.astype(spec.dtype)
    return inputs


def sample(specs: tuple[TensorSpec, ...], given: Mapping[str, object]) -> dict[str, np.ndarray]:
    """The upload's sample input as arrays of the model's dtypes; InvalidArgument when it does not fit."""
    names = {s.name for s in specs}
    if set(given) != names:
        raise InvalidArgument(f"the sample input has {sorted(given)}, but the model takes {sorted(names)}")
    arrays = {}
    for spec in specs:
        try:
            array = np.asarray(given[spec.name], dtype=spec.dtype)
        except (TypeError, ValueError) as exc:
            raise InvalidArgument(f"sample input {spec.name!r} is not {spec.dtype}: {exc}") from None
        if array.ndim == len(spec.shape) - 1:
            array = array[np.newaxis]
        if array.ndim != len(spec.shape) or any(
            d > 0 and d != n for d, n in zip(spec.shape[1:], array.shape[1:], strict=True)
        ):
            raise InvalidArgument(
                f"sample input {spec.name!r} has shape {list(array.shape)}; the model takes "
                f"{list(spec.shape)}"
            )
        arrays[spec.name] = array
    return arrays


def run_onnx(model: bytes, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, inputs), strict=True))


def compare(native: dict[str, np.ndarray], converted: dict[str, np.ndarray], what: str) -> str:
    """A line for the conversion log saying how close the outputs came; InvalidArgument when they
    disagree beyond the tolerance, naming the output, the row and by how much."""
    missing = sorted(set(native) - set(converted))
    if missing:
        raise InvalidArgument(
            f"the converted model has no output {missing[0]!r} (it has {sorted(converted)})"
        )
    closest = []
    for name, expected in native.items():
        got = np.asarray(converted[name])
        expected = np.asarray(expected)
        if got.size != expected.size:
            raise InvalidArgument(
                f"output {name!r} on {what}: the converted model gives shape {list(got.shape)}, the native "
                f"one {list(expected.shape)}"
            )
        got, expected = got.reshape(expected.shape), expected
        if name == "label" or expected.dtype.kind not in "fc":
            wrong = got.astype(expected.dtype) != expected
            if "probabilities" in native:
                wrong &= ~_tied(np.asarray(native["probabilities"]))
            if wrong.any():
                row = int(np.flatnonzero(wrong.reshape(len(expected), -1).any(axis=1))[0])
                raise InvalidArgument(
                    f"the converted model disagrees with the native one on output {name!r}: "
                    f"{int(wrong.sum())} of {expected.size} values differ on {what} (row {row}: "
                    f"{got.reshape(len(expected), -1)[row].tolist()} instead of "
                    f"{expected.reshape(len(expected), -1)[row].tolist()})"
                )
            closest.append(f"{name}: equal")
            continue
        native_values, converted_values = expected.astype(np.float64), got.astype(np.float64)
        # NaN agrees only with NaN, an infinity only with the same infinity (a plain difference passes both).
        wrong = ~np.isclose(converted_values, native_values, rtol=RTOL, atol=ATOL, equal_nan=True)
        with np.errstate(invalid="ignore"):
            difference = np.abs(converted_values - native_values)
        if wrong.any():
            # The worst value that differs: by how much, or first of those not even finite.
            gaps = np.where(wrong & np.isfinite(difference), difference, -1.0)
            worst = int(np.argmax(gaps)) if gaps.max() >= 0 else int(np.flatnonzero(wrong)[0])
            row = worst // max(1, expected.size // max(1, len(expected)))
            raise InvalidArgument(
                f"the converted model disagrees with the native one on output {name!r} by "
                f"{difference.flat[worst]:.3g} on {what} ({int(wrong.sum())} of {expected.size} values; "
                f"row {row}: {got.flat[worst]:.6g} instead of {expected.flat[worst]:.6g}; "
                f"tolerance {ATOL:g} + {RTOL:g} x |value|)"
            )
        finite = difference[np.isfinite(difference)]
        closest.append(f"{name}: at most {float(finite.max()) if finite.size else 0.0:.3g} apart")
    return f"verified on {what}: " + "; ".join(closest)


def _tied(probabilities: np.ndarray) -> np.ndarray:
    if probabilities.ndim != 2 or probabilities.shape[1] < 2:
        return np.zeros(len(probabilities), dtype=bool)
    top = np.sort(probabilities, axis=1)
    return (top[:, -1] - top[:, -2]) <= 2 * ATOL
