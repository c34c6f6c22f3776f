"""Model runtimes: how a model artifact is loaded and run. New frameworks register here by name."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort

from joey_engine.deployment import Tensor
from joey_engine.settings import EngineSettings


class ModelRuntime(ABC):
    """One loaded model. ``predict`` may be called from several threads at once."""

    @abstractmethod
    def load(self, path: Path) -> None:
        """Load the artifact at ``path``; raise if it is not a valid model for this runtime."""

    @property
    @abstractmethod
    def inputs(self) -> tuple[Tensor, ...]:
        """Input signature; dtype is a numpy dtype name (``str`` for strings), -1 marks a dynamic dim."""

    @property
    @abstractmethod
    def outputs(self) -> tuple[Tensor, ...]: ...

    @abstractmethod
    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the model on a batch; every array's first dimension is the batch."""


RuntimeFactory = Callable[[EngineSettings], ModelRuntime]
_RUNTIMES: dict[str, RuntimeFactory] = {}


def register_runtime(framework: str) -> Callable[[RuntimeFactory], RuntimeFactory]:
    def add(factory: RuntimeFactory) -> RuntimeFactory:
        _RUNTIMES[framework] = factory
        return factory

    return add


def create_runtime(framework: str, settings: EngineSettings) -> ModelRuntime:
    try:
        factory = _RUNTIMES[framework]
    except KeyError:
        raise ValueError(
            f"unsupported model framework {framework!r}; supported: {sorted(_RUNTIMES)}"
        ) from None
    return factory(settings)


_ONNX_DTYPES = {
    "tensor(float)": "float32",
    "tensor(double)": "float64",
    "tensor(float16)": "float16",
    "tensor(int8)": "int8",
    "tensor(int16)": "int16",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(uint8)": "uint8",
    "tensor(uint16)": "uint16",
    "tensor(uint32)": "uint32",
    "tensor(uint64)": "uint64",
    "tensor(bool)": "bool",
    "tensor(string)": "str",
}


def _onnx_tensor(arg: ort.NodeArg) -> Tensor:
    if arg.type not in _ONNX_DTYPES:
        raise ValueError(f"ONNX tensor {arg.name!r} has unsupported type {arg.type}")
    # Symbolic ("N", "batch") and unknown (None) dimensions are dynamic.
    shape = tuple(dim if isinstance(dim, int) and dim >= 0 else -1 for dim in arg.shape)
    return Tensor(arg.name, _ONNX_DTYPES[arg.type], shape)


@register_runtime("onnx")
class OnnxRuntime(ModelRuntime):
    def __init__(self, settings: EngineSettings) -> None:
        self._options = ort.SessionOptions()
        self._options.intra_op_num_threads = settings.intra_op_threads
        # Replicas already run in parallel processes; a second level of parallelism only contends.
        self._options.inter_op_num_threads = 1
        self._session: ort.InferenceSession | None = None
        self._inputs: tuple[Tensor, ...] = ()
        self._outputs: tuple[Tensor, ...] = ()

    def load(self, path: Path) -> None:
        session = ort.InferenceSession(str(path), self._options, providers=["CPUExecutionProvider"])
        self._inputs = tuple(_onnx_tensor(arg) for arg in session.get_inputs())
        self._outputs = tuple(_onnx_tensor(arg) for arg in session.get_outputs())
        self._session = session

    @property
    def inputs(self) -> tuple[Tensor, ...]:
        return self._inputs

    @property
    def outputs(self) -> tuple[Tensor, ...]:
        return self._outputs

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._session is None:
            raise RuntimeError("model not loaded")
        names = [t.name for t in self._outputs]
        return dict(zip(names, self._session.run(names, inputs), strict=True))
