"""Validate an uploaded artifact and read its signature: ONNX models by loading them in onnxruntime,
python steps by parsing the source (the registry never runs user code)."""

from __future__ import annotations

import ast
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from joey_core.models import TensorSpec
from joey_registry.errors import InvalidArgument

DEFAULT_FRAMEWORK = "onnx"


@dataclass(frozen=True)
class Signature:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


class RuntimeValidator(ABC):
    """Checks an artifact the way engines will take it, so a model that cannot run is refused at upload."""

    @abstractmethod
    def inspect(self, path: Path, declared: Signature) -> Signature:
        """Return the model's signature; raise InvalidArgument naming what is wrong. ``declared`` is the
        signature given with the upload (empty when none was)."""


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
    def inspect(self, path: Path, declared: Signature) -> Signature:
        if declared.inputs or declared.outputs:
            raise InvalidArgument(
                "an ONNX model carries its own signature: upload it without input and output schemas"
            )
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


PYTHON_ENTRY_POINT = "process_data"


class PythonValidator(RuntimeValidator):
    """A python step: source defining ``process_data(inputs)``, with a declared signature."""

    def inspect(self, path: Path, declared: Signature) -> Signature:
        try:
            source = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidArgument(
                f"a python step must be UTF-8 text: {exc.reason} at byte {exc.start}"
            ) from None
        try:
            tree = ast.parse(source, filename="step.py")
        except SyntaxError as exc:
            raise InvalidArgument(f"python step has a syntax error at line {exc.lineno}: {exc.msg}") from None
        _check_entry_point(tree)
        for kind, specs in (("input", declared.inputs), ("output", declared.outputs)):
            _check_declared(kind, specs)
        return declared


def _check_entry_point(tree: ast.Module) -> None:
    found = [
        node
        for node in tree.body
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == PYTHON_ENTRY_POINT
    ]
    if not found:
        raise InvalidArgument(
            f"python step defines no top-level function {PYTHON_ENTRY_POINT}(inputs); it must take a dict "
            "of numpy arrays and return one"
        )
    node = found[-1]  # the last definition is the one the module ends up with
    if isinstance(node, ast.AsyncFunctionDef):
        raise InvalidArgument(
            f"{PYTHON_ENTRY_POINT} (line {node.lineno}) must be a plain function, not async"
        )
    args = node.args
    positional = [*args.posonlyargs, *args.args]
    required_kw = [a.arg for a, d in zip(args.kwonlyargs, args.kw_defaults, strict=True) if d is None]
    if len(positional) != 1 or args.vararg is not None or required_kw:
        raise InvalidArgument(
            f"{PYTHON_ENTRY_POINT} (line {node.lineno}) must take exactly one positional parameter, the dict "
            f"of input arrays; it takes ({ast.unparse(args)})"
        )


def _check_declared(kind: str, specs: tuple[TensorSpec, ...]) -> None:
    if not specs:
        raise InvalidArgument(
            f"a python step needs its {kind}s declared (an {kind} schema): the registry does not run "
            "user code to find them"
        )
    seen: set[str] = set()
    dtypes = sorted(_ONNX_DTYPES.values())
    for spec in specs:
        if not spec.name:
            raise InvalidArgument(f"a declared {kind} has no name")
        if spec.name in seen:
            raise InvalidArgument(f"{kind} {spec.name!r} is declared twice")
        seen.add(spec.name)
        if spec.dtype not in _ONNX_DTYPES.values():
            raise InvalidArgument(
                f"{kind} {spec.name!r} has dtype {spec.dtype!r}; supported: {', '.join(dtypes)}"
            )
        if not spec.shape or spec.shape[0] != -1:
            raise InvalidArgument(
                f"{kind} {spec.name!r} has shape {list(spec.shape)}; a python step's shapes start with the "
                "batch dimension, -1 (e.g. [-1] for a scalar per record, [-1, 4] for a vector of 4)"
            )
        if any(d == 0 or d < -1 for d in spec.shape[1:]):
            raise InvalidArgument(
                f"{kind} {spec.name!r} has shape {list(spec.shape)}; dimensions are positive sizes or -1"
            )


VALIDATORS: dict[str, RuntimeValidator] = {DEFAULT_FRAMEWORK: OnnxValidator(), "python": PythonValidator()}


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
