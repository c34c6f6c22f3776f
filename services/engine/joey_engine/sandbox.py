"""The process a python step's user code runs in, apart from its replica.

Started by :class:`joey_engine.runtime.PythonRuntime` as ``python -P /dev/fd/N``, N an open
descriptor of this file (a script, so that an interpreter with only numpy can run it, and its user
need not reach the engine's install): it runs the user's file, read from a descriptor the runtime
opened (its sandbox user may not read the artifact cache), then answers one
request at a time over a pair of pipes. A request is a batch of input arrays; the reply is the step's
outputs, checked against the declared signature, or the user's error. Whatever the user code does to
this process (``os._exit``, a segfault, an endless loop) costs only this process; the runtime notices
and starts another. The sandbox exits when its replica goes away: on EOF of the request pipe, or when
it is orphaned while user code runs.

Arrays travel as ``.npy`` blobs read with ``allow_pickle=False``: a reply cannot make the replica
unpickle anything.
"""

from __future__ import annotations

import ctypes
import io
import json
import linecache
import os
import resource
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

ENTRY_POINT = "process_data"
READY = b"R"
OUTPUTS = b"O"
ERROR = b"E"
_PARENT_POLL_S = 0.2
PR_SET_DUMPABLE = 4
_PR_CAPBSET_DROP = 24
_PR_SET_NO_NEW_PRIVS = 38
_CAPABILITY_VERSION_3 = 0x20080522


def encode_arrays(arrays: dict[str, np.ndarray]) -> bytes:
    out = io.BytesIO()
    header = json.dumps(list(arrays)).encode()
    out.write(len(header).to_bytes(4, "big"))
    out.write(header)
    for array in arrays.values():
        np.lib.format.write_array(out, np.ascontiguousarray(array), allow_pickle=False)
    return out.getvalue()


def decode_arrays(data: bytes) -> dict[str, np.ndarray]:
    source = io.BytesIO(data)
    size = int.from_bytes(source.read(4), "big")
    names = json.loads(source.read(size))
    return {name: np.lib.format.read_array(source, allow_pickle=False) for name in names}


class ContractError(Exception):
    """The user's return value does not match the declared outputs."""


def _shape_text(shape: Sequence[int]) -> str:
    return "[" + ", ".join("?" if d < 0 else str(d) for d in shape) + "]"


def conform(result: Any, outputs: Sequence[tuple[str, str, Sequence[int]]], n: int) -> dict[str, np.ndarray]:
    """The declared outputs of ``result`` as arrays of their declared dtypes, one row per record."""
    if not isinstance(result, dict):
        raise ContractError(
            f"{ENTRY_POINT} returned {type(result).__name__}, expected a dict of arrays by output name"
        )
    arrays = {}
    for name, dtype, shape in outputs:
        if name not in result:
            declared = ", ".join(repr(o[0]) for o in outputs)
            raise ContractError(
                f"{ENTRY_POINT} returned no output {name!r}; the declared outputs are {declared}"
            )
        try:
            array = np.asarray(result[name])
        except ValueError:
            raise ContractError(f"output {name!r} is not a rectangular array") from None
        target = np.dtype(dtype)  # numpy's names: the runtime declares strings as str
        if target.kind == "U":
            if array.dtype.kind not in "USO":
                raise ContractError(f"output {name!r} has dtype {array.dtype}, declared {dtype}")
        elif array.dtype.kind != "O" and not np.can_cast(array.dtype, target, casting="same_kind"):
            raise ContractError(
                f"output {name!r} has dtype {array.dtype}, which does not convert to the declared {dtype}"
            )
        try:
            array = array.astype(target)
        except (TypeError, ValueError) as exc:
            raise ContractError(f"output {name!r} does not convert to the declared {dtype}: {exc}") from None
        if array.ndim == 0 or array.shape[0] != n:
            raise ContractError(
                f"output {name!r} has shape {list(array.shape)}, expected a first dimension of {n} "
                "(one row per record)"
            )
        if array.ndim != len(shape) or any(
            want >= 0 and want != got for want, got in zip(shape[1:], array.shape[1:], strict=True)
        ):
            raise ContractError(
                f"output {name!r} has shape {_shape_text(array.shape)}, declared {_shape_text(shape)}"
            )
        arrays[name] = array
    return arrays


def describe(exc: BaseException, path: str) -> str:
    """``ValueError: bad value (line 7, in process_data: raise ValueError(...))``: the last line of the
    user's file the error went through, so the user can find it."""
    text = f"{type(exc).__name__}: {exc}"
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == path]
    if frames:
        frame = frames[-1]
        text += f" (line {frame.lineno}, in {frame.name}: {(frame.line or '').strip()})"
    return text


def _load(source_fd: int, path: str) -> Callable[[dict[str, np.ndarray]], Any]:
    with os.fdopen(source_fd, "rb") as source_file:
        source = source_file.read()
    # Tracebacks then quote the user's lines, which this process may not be able to read from ``path``.
    text = source.decode(errors="replace")
    linecache.cache[path] = (len(text), None, text.splitlines(keepends=True), path)
    module = ModuleType("joey_python_step")
    module.__file__ = path
    sys.modules[module.__name__] = module
    exec(compile(source, path, "exec"), module.__dict__)  # noqa: S102 running it is this process's purpose
    function = getattr(module, ENTRY_POINT, None)
    if not callable(function):
        raise TypeError(f"the step defines no function {ENTRY_POINT}")
    return function  # type: ignore[no-any-return]


def _tasks_of(uid: int) -> int:
    """Processes and threads of ``uid`` now: RLIMIT_NPROC counts them all, not only this sandbox's."""
    count = 0
    for entry in os.scandir("/proc"):
        try:
            if entry.name.isdigit() and entry.stat().st_uid == uid:
                count += len(os.listdir(f"/proc/{entry.name}/task"))
        except OSError:
            pass  # ended meanwhile
    return count


def _drop_capabilities(libc: ctypes.CDLL) -> None:
    """As root, user code would ignore RLIMIT_NPROC and read any process's /proc: it keeps uid 0 but no
    capability, now or after an exec."""
    last = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    for capability in range(last + 1):
        libc.prctl(_PR_CAPBSET_DROP, capability, 0, 0, 0)
    header = (ctypes.c_uint32 * 2)(_CAPABILITY_VERSION_3, 0)
    empty = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable; two words each
    if libc.capset(header, empty) != 0:
        raise OSError(ctypes.get_errno(), "cannot drop the sandbox's capabilities")


def confine(limits: dict[str, int]) -> None:
    """Before any user code runs: limits on memory, CPU, processes and file size, no capabilities, and no
    /proc access to this process for others of its user (its memory holds the records it serves)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    mb = 1 << 20
    for which, value in (
        (resource.RLIMIT_AS, limits["memory_mb"] * mb),
        (resource.RLIMIT_FSIZE, limits["file_mb"] * mb),
        (resource.RLIMIT_CORE, 0),
        (resource.RLIMIT_NPROC, _tasks_of(os.getuid()) + limits["processes"]),
    ):
        resource.setrlimit(which, (value, value))
    # SIGXCPU at the soft limit, SIGKILL a second later at the hard one.
    resource.setrlimit(resource.RLIMIT_CPU, (limits["cpu_s"], limits["cpu_s"] + 1))
    # A write past RLIMIT_FSIZE then fails with an error the user sees, rather than killing the process.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    if os.geteuid() == 0:
        _drop_capabilities(libc)


def _watch_parent(parent: int) -> None:
    """Exit once orphaned: user code that loops forever never reads the request pipe's EOF."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(_PARENT_POLL_S)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _answer(
    function: Callable[[dict[str, np.ndarray]], Any],
    request: bytes,
    path: str,
    outputs: Sequence[tuple[str, str, Sequence[int]]],
) -> bytes:
    inputs = decode_arrays(request)
    n = len(next(iter(inputs.values()))) if inputs else 0
    try:
        result = function(inputs)
    except Exception as exc:
        return ERROR + describe(exc, path).encode()
    try:
        return OUTPUTS + encode_arrays(conform(result, outputs, n))
    except ContractError as exc:
        return ERROR + str(exc).encode()


def main(argv: Sequence[str]) -> None:
    requests_fd, replies_fd, source_fd, path, outputs_json, limits_json = argv
    requests = Connection(int(requests_fd), writable=False)
    replies = Connection(int(replies_fd), readable=False)
    _watch_parent(os.getppid())
    # Ctrl-C reaches the whole process group: the replica decides when its sandbox stops (EOF).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.dont_write_bytecode = True  # never write next to the artifact cache
    outputs = [(o["name"], o["dtype"], tuple(o["shape"])) for o in json.loads(outputs_json)]
    confine(json.loads(limits_json))
    try:
        function = _load(int(source_fd), path)
    except Exception as exc:
        replies.send_bytes(ERROR + f"could not load the step: {describe(exc, path)}".encode())
        return
    replies.send_bytes(READY)
    while True:
        try:
            request = requests.recv_bytes()
        except EOFError:
            return  # the replica closed its end: it is stopping
        replies.send_bytes(_answer(function, request, path, outputs))


if __name__ == "__main__":
    main(sys.argv[1:])
