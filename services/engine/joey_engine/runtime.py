"""Model runtimes: how a model artifact is loaded and run. New frameworks register here by name."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pwd
import signal
import subprocess
import sys
import threading
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np
import onnxruntime as ort

from joey_core.models import TensorSpec
from joey_engine import sandbox
from joey_engine.deployment import Step
from joey_engine.settings import EngineSettings

log = logging.getLogger(__name__)


class RuntimeAborted(RuntimeError):
    """The runtime gave up on a whole call (its process crashed or hung): every record of the call
    fails with this reason. Running them again one by one could cost as much again for each.

    ``crashed``: the process died at once rather than hanging, so running parts of the call again is
    cheap, and finds the records that crash it."""

    def __init__(self, message: str, crashed: bool = False) -> None:
        super().__init__(message)
        self.crashed = crashed


@dataclass(frozen=True)
class _Lost:
    """Why a sandbox call has no reply; ``crashed`` when its process died rather than timed out."""

    reason: str
    crashed: bool = False


class ModelRuntime(ABC):
    """One loaded model. ``predict`` may be called from several threads at once."""

    @abstractmethod
    def load(self, path: Path, step: Step | None = None) -> None:
        """Load the artifact at ``path``; raise if it is not a valid model for this runtime. ``step`` is
        the registered model: runtimes whose artifact carries no signature take it from there."""

    @property
    @abstractmethod
    def inputs(self) -> tuple[TensorSpec, ...]:
        """Input signature; dtype is a numpy dtype name (``str`` for strings), -1 marks a dynamic dim."""

    @property
    @abstractmethod
    def outputs(self) -> tuple[TensorSpec, ...]: ...

    @abstractmethod
    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the model on a batch; every array's first dimension is the batch."""

    def close(self) -> None:
        """Release what ``load`` holds beyond memory (processes); nothing by default."""
        return None

    def start_loading(self, path: Path, step: Step | None = None) -> None:
        """The first half of ``load``: runtimes that wait for something (a process to start) begin it
        here and wait in ``finish_loading``, so that a replica's runtimes load side by side."""
        self.load(path, step)

    def finish_loading(self) -> None:
        """Wait until what ``start_loading`` began is ready; raise if it cannot be."""
        return None


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


def _onnx_tensor(arg: ort.NodeArg) -> TensorSpec:
    if arg.type not in _ONNX_DTYPES:
        raise ValueError(f"ONNX tensor {arg.name!r} has unsupported type {arg.type}")
    # Symbolic ("N", "batch") and unknown (None) dimensions are dynamic.
    shape = tuple(dim if isinstance(dim, int) and dim >= 0 else -1 for dim in arg.shape)
    return TensorSpec(arg.name, _ONNX_DTYPES[arg.type], shape)


@register_runtime("onnx")
class OnnxRuntime(ModelRuntime):
    def __init__(self, settings: EngineSettings) -> None:
        self._options = ort.SessionOptions()
        self._options.intra_op_num_threads = settings.intra_op_threads
        # Replicas already run in parallel processes; a second level of parallelism only contends.
        self._options.inter_op_num_threads = 1
        self._session: ort.InferenceSession | None = None
        self._inputs: tuple[TensorSpec, ...] = ()
        self._outputs: tuple[TensorSpec, ...] = ()

    def load(self, path: Path, step: Step | None = None) -> None:
        session = ort.InferenceSession(str(path), self._options, providers=["CPUExecutionProvider"])
        self._inputs = tuple(_onnx_tensor(arg) for arg in session.get_inputs())
        self._outputs = tuple(_onnx_tensor(arg) for arg in session.get_outputs())
        self._session = session

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return self._inputs

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return self._outputs

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._session is None:
            raise RuntimeError("model not loaded")
        names = [t.name for t in self._outputs]
        return dict(zip(names, self._session.run(names, inputs), strict=True))


@dataclass(frozen=True)
class _Launch:
    """How sandboxes start: their interpreter and, with a sandbox user, who they run as."""

    python: str
    uid: int | None = None
    gid: int | None = None
    groups: tuple[int, ...] | None = None

    @classmethod
    def of(cls, settings: EngineSettings) -> _Launch:
        python = str(settings.sandbox_python or sys.executable)
        if settings.sandbox_user is None:
            return cls(python)
        user = pwd.getpwnam(settings.sandbox_user)
        # As initgroups would: the user's supplementary groups, then its gid, then its uid.
        groups = tuple(os.getgrouplist(user.pw_name, user.pw_gid))
        return cls(python, user.pw_uid, user.pw_gid, groups)


class _Sandbox:
    """One running sandbox process and its pipes (see :mod:`joey_engine.sandbox`)."""

    def __init__(self, path: Path, outputs: tuple[TensorSpec, ...], limits: str, launch: _Launch) -> None:
        declared = json.dumps([{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in outputs])
        source = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        # The sandbox's own script goes by descriptor too: a sandbox user need not reach the install (a
        # checkout in a private directory, say) any more than the artifact cache.
        script = os.open(sandbox.__file__, os.O_RDONLY | os.O_CLOEXEC)
        requests_read, requests_write = os.pipe()
        replies_read, replies_write = os.pipe()
        try:
            self.process = subprocess.Popen(
                [launch.python, "-P", f"/dev/fd/{script}"]
                + [str(requests_read), str(replies_write), str(source), str(path), declared, limits],
                pass_fds=(requests_read, replies_write, source, script),
                stdin=subprocess.DEVNULL,
                env=_sandbox_environment(),
                # A group of its own, so that a timeout ends whatever the user code started too.
                start_new_session=True,
                # Switched in the child before it execs: before any capability is dropped or user code runs.
                user=launch.uid,
                group=launch.gid,
                extra_groups=launch.groups,
            )
        except BaseException:
            os.close(requests_write)
            os.close(replies_read)
            raise
        finally:
            os.close(requests_read)
            os.close(replies_write)
            os.close(source)
            os.close(script)
        self.requests = Connection(requests_write, readable=False)
        self.replies = Connection(replies_read, writable=False)
        # Also stops it when the replica exits without closing its runtimes.
        self._finalizer = weakref.finalize(self, _stop, self.process, self.requests, self.replies)

    def exchange(self, request: bytes | None, timeout: float) -> bytes | _Lost:
        """The reply to ``request`` (None: the ready message), or why there is none; on a timeout or
        crash the process is gone afterwards."""
        try:
            if request is not None:
                self.requests.send_bytes(request)
            if not self.replies.poll(timeout):
                _kill_group(self.process)
                self.stop()
                return _Lost(f"timed out after {timeout:g} s; its process was killed")
            return self.replies.recv_bytes()
        except (EOFError, OSError):
            try:
                code = self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.stop()
                return _Lost("lost its process's pipe; the process was killed")
            self.stop()
            return _Lost(f"process {_exit_text(code)}", crashed=True)

    def stop(self) -> None:
        self._finalizer()


_PASSED_ENVIRONMENT = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ")


def _sandbox_environment() -> dict[str, str]:
    """User code sees none of the engine's settings or credentials: only these few variables, and one
    thread per math library (parallelism comes from replicas, and threads count against RLIMIT_NPROC)."""
    env = {key: os.environ[key] for key in _PASSED_ENVIRONMENT if key in os.environ}
    threads = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
    return env | dict.fromkeys(threads, "1") | {"HOME": "/nonexistent"}


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    # The sandbox leads its own session: its group is its pid, and holds what user code forked.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)


def _stop(process: subprocess.Popen[bytes], *pipes: Connection) -> None:
    for pipe in pipes:
        pipe.close()  # EOF on the request pipe asks an idle sandbox to exit
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=1)
    _kill_group(process)  # and whatever user code left running
    process.wait()


def _exit_text(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


@register_runtime("python")
class PythonRuntime(ModelRuntime):
    """A python step: the user's ``process_data`` run in a sandbox process of its own, restarted when it
    crashes or hangs, so that user code can never take the replica down."""

    def __init__(self, settings: EngineSettings) -> None:
        self._timeout = settings.python_step_timeout_s
        self._limits = json.dumps(
            {
                "memory_mb": settings.sandbox_max_memory_mb,
                "cpu_s": settings.sandbox_max_cpu_s,
                "processes": settings.sandbox_max_processes,
                "file_mb": settings.sandbox_max_file_mb,
            }
        )
        self._start_timeout = settings.python_step_start_timeout_s
        self._launch = _Launch.of(settings)
        self._lock = threading.Lock()  # one batch at a time per sandbox
        self._sandbox: _Sandbox | None = None
        self._starting: _Sandbox | None = None
        """Started by ``start_loading``, not yet ready."""
        self._path = Path()
        self._name = ""
        self._inputs: tuple[TensorSpec, ...] = ()
        self._outputs: tuple[TensorSpec, ...] = ()

    def load(self, path: Path, step: Step | None = None) -> None:
        self.start_loading(path, step)
        self.finish_loading()

    def start_loading(self, path: Path, step: Step | None = None) -> None:
        if step is None or not step.inputs or not step.outputs:
            raise ValueError("a python step needs its declared inputs and outputs")
        self._path, self._name = path, step.model
        self._inputs = tuple(_declared(t) for t in step.inputs)
        self._outputs = tuple(_declared(t) for t in step.outputs)
        with self._lock:
            if self._sandbox is None and self._starting is None:
                self._starting = _Sandbox(self._path, self._outputs, self._limits, self._launch)

    def finish_loading(self) -> None:
        with self._lock:
            self._started()

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return self._inputs

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return self._outputs

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # onnxruntime gives strings as object arrays, which travel only pickled: send them as str.
        request = sandbox.encode_arrays(
            {name: array.astype(str) if array.dtype.kind == "O" else array for name, array in inputs.items()}
        )
        with self._lock:
            reply = self._started().exchange(request, self._timeout)
            if isinstance(reply, _Lost):
                self._sandbox = None  # the next call starts a fresh one
                log.warning("python step %r %s; restarting it", self._name, reply.reason)
                raise RuntimeAborted(f"python step {self._name!r} {reply.reason}", reply.crashed)
        if reply[:1] == sandbox.ERROR:
            raise RuntimeError(reply[1:].decode(errors="replace"))
        outputs = sandbox.decode_arrays(reply[1:])
        for t in self._outputs:
            # The sandbox conforms outputs to the declared ones; a reply that does not is not trusted.
            array, expected = outputs.get(t.name), np.dtype(t.dtype)
            if array is None or (array.dtype != expected and not array.dtype.kind == expected.kind == "U"):
                raise RuntimeAborted(f"python step {self._name!r} sent a reply that breaks the protocol")
        return outputs

    def close(self) -> None:
        with self._lock:
            for sandbox in (self._sandbox, self._starting):
                if sandbox is not None:
                    sandbox.stop()
            self._sandbox = self._starting = None

    def _started(self) -> _Sandbox:
        """The running sandbox, started if there is none (under the lock)."""
        if self._sandbox is not None:
            return self._sandbox
        started = self._starting or _Sandbox(self._path, self._outputs, self._limits, self._launch)
        self._starting = None
        reply = started.exchange(None, self._start_timeout)
        if reply != sandbox.READY:
            started.stop()
            why = reply.reason if isinstance(reply, _Lost) else reply[1:].decode(errors="replace")
            raise RuntimeAborted(f"python step {self._name!r} did not start: {why}")
        self._sandbox = started
        return started


def _declared(tensor: TensorSpec) -> TensorSpec:
    # The registry names strings "string"; the engine's runtimes speak numpy ("str").
    return TensorSpec(tensor.name, "str" if tensor.dtype == "string" else tensor.dtype, tensor.shape)
