"""Validate an uploaded artifact by loading it in its runtime, and read its signature."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from joey_registry.domain import TensorSpec
from joey_registry.errors import InvalidArgument

DEFAULT_FRAMEWORK = "onnx"


@dataclass(frozen=True)
class Signature:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


class RuntimeValidator(ABC):
    """Loads an artifact the way engines will, so a model that cannot run is refused at upload."""

    @abstractmethod
    def inspect(self, path: Path) -> Signature:
        """Return the model's signature; raise InvalidArgument naming what is wrong."""


# ONNX tensor element types (as onnxruntime spells them) -> numpy dtype names.
_ONNX_DTYPES = {
    "float": "float32",
    "double": "float64",
    "float16": "float16",
    "int8": "int8",
    "int16": "int16",
    "int32": "int32",
    "int64": "int64",
    "uint8": "uint8",
    "uint16": "uint16",
    "uint32": "uint32",
    "uint64": "uint64",
    "bool": "bool",
    "string": "string",
}


class OnnxValidator(RuntimeValidator):
    def inspect(self, path: Path) -> Signature:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        try:
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise InvalidArgument(
                f"the uploaded file is not a loadable ONNX model: {_ort_reason(exc)}"
            ) from None
        return Signature(
            inputs=tuple(_tensor_spec("input", arg) for arg in session.get_inputs()),
            outputs=tuple(_tensor_spec("output", arg) for arg in session.get_outputs()),
        )


def _ort_reason(exc: Exception) -> str:
    # onnxruntime prefixes the reason with its error code and the (temporary, meaningless) file path.
    text = str(exc)
    return text.split(" failed:", 1)[1].strip() if " failed:" in text else text


def _tensor_spec(kind: str, arg: Any) -> TensorSpec:
    type_name: str = arg.type
    element = type_name.removeprefix("tensor(").removesuffix(")")
    dtype = _ONNX_DTYPES.get(element) if type_name.startswith("tensor(") else None
    if dtype is None:
        hint = " (export scikit-learn classifiers with zipmap=False)" if type_name.startswith("seq(") else ""
        raise InvalidArgument(
            f"{kind} {arg.name!r} has type {type_name}; only tensors of "
            f"{', '.join(sorted(_ONNX_DTYPES.values()))} are supported{hint}"
        )
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (arg.shape or ()))
    return TensorSpec(name=arg.name, dtype=dtype, shape=shape)


VALIDATORS: dict[str, RuntimeValidator] = {DEFAULT_FRAMEWORK: OnnxValidator()}


def validator_for(framework: str) -> tuple[str, RuntimeValidator]:
    """The normalised framework name and its validator; empty means the default framework."""
    name = framework.strip().lower() or DEFAULT_FRAMEWORK
    try:
        return name, VALIDATORS[name]
    except KeyError:
        raise InvalidArgument(
            f"unsupported framework {framework!r}; supported: {', '.join(sorted(VALIDATORS))}"
        ) from None


def dtypes_compatible(produced: str, expected: str) -> bool:
    """Whether a tensor of dtype ``produced`` can feed an input of dtype ``expected`` without
    changing kind of value (int -> float is fine, float -> int or anything <-> string is not)."""
    if produced == expected:
        return True
    if "string" in (produced, expected):
        return False
    return bool(np.can_cast(np.dtype(produced), np.dtype(expected), casting="same_kind"))
