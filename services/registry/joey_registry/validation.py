"""Validate an uploaded artifact and read its signature: ONNX models by loading them in onnxruntime,
python steps by parsing the source (the registry never runs user code). The validators run in a child
process with limits (:mod:`joey_registry.model_check`), never in the registry."""

from __future__ import annotations

import ast
import bz2
import codecs
import json
import lzma
import math
import re
import resource
import struct
import zipfile
import zlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import onnx
import onnx.inliner
import onnx.shape_inference
import onnxruntime as ort

from joey_core.models import TensorSpec
from joey_registry.converters import CONVERTERS
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
    def __init__(self, max_tensor_bytes: int) -> None:
        self.max_tensor_bytes = max_tensor_bytes

    def inspect(self, path: Path, declared: Signature) -> Signature:
        if declared.inputs or declared.outputs:
            raise InvalidArgument(
                "an ONNX model carries its own signature: upload it without input and output schemas"
            )
        try:
            model: onnx.ModelProto | None = onnx.load(str(path), load_external_data=False)
        except Exception:  # not ONNX: onnxruntime's refusal below says why
            model = None
        if model is not None:
            # The tensors the file declares, before onnxruntime expands them (a sparse initializer).
            self._check_tensor_sizes(model)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        # No constant folding while checking: a tiny file can fold into gigabytes. The sizes it would
        # fold into are checked from the shapes instead (_check_tensor_sizes).
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.log_severity_level = 3  # errors only: the reason is in the exception
        try:
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:
            if _out_of_memory(exc):
                raise MemoryError from None
            # onnxruntime says "Protobuf parsing failed" of anything that is not ONNX: say what it is instead.
            reason = what_file_is(path) or _ort_reason(exc)
            raise InvalidArgument(f"the uploaded file is not a loadable ONNX model: {reason}") from None
        signature = Signature(
            inputs=tuple(_tensor_spec("input", arg) for arg in session.get_inputs()),
            outputs=tuple(_tensor_spec("output", arg) for arg in session.get_outputs()),
        )
        del session
        if model is not None:
            self._check_tensor_sizes(_inferred(model))
        return signature

    def _check_tensor_sizes(self, model: onnx.ModelProto) -> None:
        """Refuse a tensor whose shape is known and too large: the engine would fold or compute it."""
        for name, element, dims in _graph_tensors(model.graph):
            try:
                itemsize = onnx.helper.tensor_dtype_to_np_dtype(element).itemsize
            except KeyError:
                continue  # an undefined or string type: no size to tell
            size = math.prod(dims) * itemsize
            if size > self.max_tensor_bytes:
                raise InvalidArgument(
                    f"tensor {name!r} of the model has shape {dims} ({size / 2**30:.1f} GiB), more than "
                    f"the {self.max_tensor_bytes >> 20} MiB a model check may use "
                    "(JOEY_UPLOAD_CHECK_MEMORY_MB): engines could not hold it"
                )


def _inferred(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with the shapes of its values inferred, subgraphs and model-local functions included."""
    try:
        # Functions are inlined so that inference sees (and types) the nodes in them.
        return onnx.shape_inference.infer_shapes(onnx.inliner.inline_local_functions(model), data_prop=True)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError) as exc:
        raise InvalidArgument(f"the model's types and shapes do not check out: {exc}") from None


_Tensor = tuple[str, int, list[int]]


def _graph_tensors(graph: onnx.GraphProto) -> Iterator[_Tensor]:
    """Every tensor of ``graph`` and its subgraphs (If, Loop, Scan bodies) whose shape is known: initializers
    (sparse ones by their dense shape, which onnxruntime expands them to), constants and inferred values."""
    for tensor in graph.initializer:
        yield tensor.name, tensor.data_type, list(tensor.dims)
    for sparse in graph.sparse_initializer:
        yield sparse.values.name, sparse.values.data_type, list(sparse.dims)
    for value in (*graph.input, *graph.value_info, *graph.output):
        kind = value.type.tensor_type
        if kind.HasField("shape") and all(d.HasField("dim_value") for d in kind.shape.dim):
            yield value.name, kind.elem_type, [d.dim_value for d in kind.shape.dim]
    for node in graph.node:
        for attribute in node.attribute:
            for tensor in (*([attribute.t] if attribute.HasField("t") else ()), *attribute.tensors):
                yield tensor.name or node.name, tensor.data_type, list(tensor.dims)
            for sparse in (
                *([attribute.sparse_tensor] if attribute.HasField("sparse_tensor") else ()),
                *attribute.sparse_tensors,
            ):
                yield sparse.values.name or node.name, sparse.values.data_type, list(sparse.dims)
            for subgraph in (*([attribute.g] if attribute.HasField("g") else ()), *attribute.graphs):
                yield from _graph_tensors(subgraph)


def _out_of_memory(exc: Exception) -> bool:
    text = str(exc).lower()
    return "bad_alloc" in text or "bad allocation" in text or "failed to allocate" in text


def _ort_reason(exc: Exception) -> str:
    # onnxruntime prefixes the reason with its error code and the (temporary, meaningless) file path.
    text = str(exc)
    reason = text.split(" failed:", 1)[1].strip() if " failed:" in text else text
    # Paths in the reason (the staging directory, onnxruntime's sources) tell the caller of the server.
    return _ABSOLUTE_PATH.sub(r"\1", reason)


_ABSOLUTE_PATH = re.compile(r"(?:/[\w.+-]+)+/([\w.+-]+)")


_SNIFF_BYTES = 1 << 16
_INNER_BYTES = 16
# Beyond these, a file is described by its head alone: sniffing must stay cheap for any upload.
_MAX_JSON_BYTES = 32 << 20
_MAX_ZIP_ENTRIES = 10_000
_MAX_ZIP_DIRECTORY_BYTES = 16 << 20
_MAX_ONNX_FIELDS = 1_000
_PICKLE_ADVICE = (
    "Joey runs ONNX models: convert a scikit-learn model with skl2onnx, e.g. "
    "`skl2onnx.to_onnx(model, X[:1].astype(numpy.float32))`, and upload the .onnx file, or upload this "
    "file with framework 'sklearn' and the registry converts it"
)
_TF_ADVICE = (
    "Joey runs ONNX models: convert it with tf2onnx (`python -m tf2onnx.convert`) and upload the .onnx file"
)
# The first bytes of compressed streams joblib.dump(compress=...) writes, with a decompressor for each.
_COMPRESSED: tuple[tuple[bytes, str, Any], ...] = (
    (b"\x1f\x8b", "gzip", lambda: zlib.decompressobj(wbits=31)),
    (b"BZh", "bz2", bz2.BZ2Decompressor),
    (b"\xfd7zXZ\x00", "xz", lzma.LZMADecompressor),
    (b"]\x00\x00", "lzma", lzma.LZMADecompressor),
    *((bytes([0x78, second]), "zlib", zlib.decompressobj) for second in (0x01, 0x5E, 0x9C, 0xDA)),
)


def what_file_is(path: Path) -> str | None:
    """What a file that is not a loadable ONNX model looks like, and what to do with it; None when unknown."""
    size = path.stat().st_size
    with path.open("rb") as file:
        head = file.read(_SNIFF_BYTES)
    if head.startswith(b"\x80") and len(head) > 1 and 2 <= head[1] <= 5:
        return (
            f"this looks like a Python pickle (protocol {head[1]}), as joblib.dump and pickle.dump write "
            f"(a scikit-learn model?). {_PICKLE_ADVICE}"
        )
    for magic, kind, decompressor in _COMPRESSED:
        if head.startswith(magic):
            return _compressed(head, kind, decompressor())
    if head.startswith(b"PK\x03\x04"):
        return _zip(path, size)
    if head.startswith(b"\x89HDF\r\n\x1a\n"):
        return f"this looks like an HDF5 file (a Keras .h5 model?). {_TF_ADVICE}"
    if head.lstrip().startswith(b"{"):
        return _json(path, head, size)
    if head.startswith(b"tree\nversion="):
        return (
            "this looks like a LightGBM text model. Joey runs ONNX models: convert it with onnxmltools "
            "(`onnxmltools.convert_lightgbm`) and upload the .onnx file, or upload this file with framework "
            "'lightgbm' and the registry converts it"
        )
    if b"def process_data" in head and _is_text(head) and not head.startswith(b"\x08"):
        return (
            "this looks like a python step (it defines process_data): upload it with framework 'python' "
            "and its input and output schemas"
        )
    return _cut_short_onnx(path, size)


def _is_text(head: bytes) -> bool:
    # An ONNX file (which starts with its ir_version's tag, 0x08) can hold source text in a doc_string; a
    # python step is UTF-8 throughout. ``final=False``: the sniffed head may end inside a character.
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError:
        return False
    return True


def _compressed(head: bytes, kind: str, decompressor: Any) -> str:
    try:
        # Only the first bytes tell a pickle: a small file can expand to gigabytes.
        inner = decompressor.decompress(head, _INNER_BYTES)
    except (OSError, EOFError, ValueError, zlib.error, lzma.LZMAError):
        inner = b""
    if inner.startswith(b"\x80"):
        return (
            f"this looks like a pickle compressed with {kind}, as joblib.dump(compress=...) writes "
            f"(a scikit-learn model?). {_PICKLE_ADVICE}"
        )
    return f"this looks like a file compressed with {kind}: decompress it and upload the .onnx model itself"


def _zip_entries(path: Path, size: int) -> tuple[int, int] | None:
    """The entry count and central directory size an archive's end record gives; None when it has none."""
    # The end record is the last 22 bytes, or followed by a comment of at most 64 KiB.
    with path.open("rb") as file:
        file.seek(max(0, size - (22 + 0xFFFF)))
        tail = file.read()
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or len(tail) < at + 22:
        return None
    entries, directory = struct.unpack_from("<HI", tail, at + 10)
    return entries, directory


def _zip(path: Path, size: int) -> str:
    end = _zip_entries(path, size)
    if end is None:
        return "this looks like a damaged or incomplete zip archive: upload the .onnx model itself"
    entries, directory = end
    # 0xFFFF and 0xFFFFFFFF mean the counts are in a zip64 record: far too many to list anyway.
    if entries > _MAX_ZIP_ENTRIES or directory > _MAX_ZIP_DIRECTORY_BYTES:
        return "this is a zip archive of many files: upload the .onnx model itself"
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except zipfile.BadZipFile:
        return "this looks like a damaged or incomplete zip archive: upload the .onnx model itself"
    leaves = {name.rsplit("/", 1)[-1] for name in names}
    if "data.pkl" in leaves:
        return (
            "this looks like a PyTorch model (a zip archive with data.pkl). Joey runs ONNX models: export it "
            "with `torch.onnx.export(model, example_input, 'model.onnx')` and upload the .onnx file, or "
            "upload a TorchScript or ExportedProgram file with framework 'pytorch' and its input schema"
        )
    if "saved_model.pb" in leaves:
        return f"this looks like a zipped TensorFlow SavedModel. {_TF_ADVICE}"
    if {"config.json", "model.weights.h5"} <= leaves:
        return f"this looks like a Keras .keras model. {_TF_ADVICE}"
    onnx = [name for name in names if name.endswith(".onnx")]
    if onnx:
        return f"this is a zip archive holding {', '.join(onnx[:3])}: extract the .onnx file and upload it"
    listed = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
    return f"this is a zip archive ({len(names)} files: {listed}): upload the .onnx model itself"


_XGBOOST_JSON = (
    'this looks like an XGBoost model saved as JSON (it has xgboost\'s "learner" key). Joey runs '
    "ONNX models: convert it with onnxmltools, e.g. `onnxmltools.convert_xgboost(booster, "
    "initial_types=[('features', FloatTensorType([None, n_features]))])`, and upload the .onnx file, or "
    "upload this file with framework 'xgboost' and the registry converts it"
)


def _json(path: Path, head: bytes, size: int) -> str:
    if size > _MAX_JSON_BYTES:
        if b'"learner"' in head:
            return _XGBOOST_JSON
        return f"this looks like JSON text ({size} bytes), not a model; Joey runs ONNX models (.onnx files)"
    try:
        document = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return f"this looks like JSON text ({size} bytes) but does not parse as JSON; Joey runs ONNX models"
    if isinstance(document, dict) and "learner" in document:
        return _XGBOOST_JSON
    keys = ", ".join(repr(k) for k in list(document)[:5]) if isinstance(document, dict) else ""
    return f"this is a JSON document (keys {keys}), not a model; Joey runs ONNX models (.onnx files)"


# ModelProto's fields (onnx.proto) and their wire types: 0 for varints, 2 for length-delimited.
_MODEL_FIELDS = {1: 0, 2: 2, 3: 2, 4: 2, 5: 0, 6: 2, 7: 2, 8: 2, 14: 2, 20: 2, 25: 2, 26: 2}
_IR_VERSIONS = range(1, 21)
_GRAPH = 7


def _cut_short_onnx(path: Path, size: int) -> str | None:
    """An ONNX file (a protobuf ModelProto, which starts with its ir_version, field 1) whose fields run past
    its end, or that ends before its graph (field 7). Only the top-level fields are walked, seeking past
    their contents; None when the file stops looking like ONNX or has more fields than a model has."""
    fields: set[int] = set()
    with path.open("rb") as file:
        try:
            for _ in range(_MAX_ONNX_FIELDS):
                start = file.tell()
                if start == size:
                    break
                tag = _varint(file)
                number, wire_type = tag >> 3, tag & 7
                if _MODEL_FIELDS.get(number) != wire_type or (start == 0) != (number == 1):
                    return None
                value = _varint(file)
                if start == 0 and value not in _IR_VERSIONS:
                    return None
                if wire_type == 2:
                    end = file.tell() + value
                    if end > size:
                        return (
                            f"this looks like an ONNX model cut short: field {number} at byte {start} needs "
                            f"{end} bytes but the file has {size}; upload the complete file (was a "
                            "download or copy interrupted?)"
                        )
                    file.seek(end)
                fields.add(number)
            else:
                return None
        except EOFError:
            return f"this looks like an ONNX model cut short at byte {size}: upload the complete file"
        except ValueError:  # a varint longer than protobuf's
            return None
    if _GRAPH not in fields:
        return (
            f"this looks like the start of an ONNX model without its graph ({size} bytes): upload the "
            "complete file (was a download or copy interrupted?)"
        )
    return None


def _varint(file: BinaryIO) -> int:
    """The protobuf varint at the file's position."""
    value = 0
    for shift in range(0, 70, 7):
        byte = file.read(1)
        if not byte:
            raise EOFError
        value |= (byte[0] & 0x7F) << shift
        if not byte[0] & 0x80:
            return value
    raise ValueError("varint longer than 10 bytes")


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
        tree = _parse(source)
        try:
            _check_entry_point(tree)
        except RecursionError:  # ast.unparse of a deeply nested default, naming the wrong parameters
            raise InvalidArgument(_TOO_DEEP) from None
        for kind, specs in (("input", declared.inputs), ("output", declared.outputs)):
            _check_declared(kind, specs)
        return declared


_TOO_DEEP = (
    "the python step is nested too deeply to check (an expression thousands of operators or attributes "
    "deep); split it into smaller expressions"
)


def _parse(source: str) -> ast.Module:
    try:
        return ast.parse(source, filename="step.py")
    except SyntaxError as exc:
        raise InvalidArgument(f"python step has a syntax error at line {exc.lineno}: {exc.msg}") from None
    except RecursionError:  # `a.b.b.b...`, `1+1+...`: deeper than the AST builder recurses
        raise InvalidArgument(_TOO_DEEP) from None
    except MemoryError:
        # CPython's parser also says MemoryError when its stack overflows (`- - - ... 1`, a few thousand
        # deep), having used next to no memory; a tree too large for the limit has used nearly all of it.
        if _memory_nearly_used():
            raise
        raise InvalidArgument(_TOO_DEEP) from None


def _memory_nearly_used() -> bool:
    """Whether this process's peak address space came within half of its limit (RLIMIT_AS)."""
    limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    if limit == resource.RLIM_INFINITY:
        return False
    status = Path("/proc/self/status").read_text()
    peak_kb = int(status.split("VmPeak:", 1)[1].split()[0])
    return peak_kb * 1024 > limit // 2


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


VALIDATORS: dict[str, Callable[[int], RuntimeValidator]] = {
    DEFAULT_FRAMEWORK: OnnxValidator,
    "python": lambda _: PythonValidator(),
}


def framework_name(framework: str) -> str:
    """The normalised framework name; empty means the default framework."""
    name = framework.strip().lower() or DEFAULT_FRAMEWORK
    if name not in VALIDATORS and name not in CONVERTERS:
        raise InvalidArgument(
            f"unsupported framework {framework!r}; supported: {', '.join(sorted([*VALIDATORS, *CONVERTERS]))}"
        )
    return name


def validator_for(framework: str, memory_bytes: int) -> RuntimeValidator:
    """The validator of ``framework`` (a name framework_name gave), for a process of ``memory_bytes``."""
    return VALIDATORS[framework](memory_bytes)


def dtypes_compatible(produced: str, expected: str) -> bool:
    """Whether a tensor of dtype ``produced`` can feed an input of dtype ``expected`` without
    changing kind of value (int -> float is fine, float -> int or anything <-> string is not)."""
    if produced == expected:
        return True
    if "string" in (produced, expected):
        return False
    return bool(np.can_cast(np.dtype(produced), np.dtype(expected), casting="same_kind"))
