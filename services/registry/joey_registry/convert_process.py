"""The child process a native model (a pickle, a booster, a TorchScript archive) is loaded, converted to
ONNX and verified in, apart from the registry (:mod:`joey_registry.conversion` starts it).

Loading an untrusted file runs its code, so before it reads the file this process confines itself
(:mod:`joey_registry.sandbox`): a network namespace of its own, Landlock rules letting it read only
Python's and its libraries' directories and the uploaded file and write only in its work directory, a
seccomp filter (no socket of any family, no leaving the process group the registry kills once the
conversion ends), rlimits on memory, CPU and the size of what it writes, and the minimal environment it
was started with (no secret, no database URL). Its stdout is the registry's reply channel; anything the
libraries print goes to stderr, which the registry keeps the end of for its log.

Request (stdin, JSON): ``{"framework", "path", "workdir", "inputs", "sample", "memory_mb", "cpu_s",
"max_file_bytes", "max_processes", "require_sandbox"}``. Replies, one JSON line each: first
``{"loaded": description, "notes": [...]}`` or ``{"refused": reason}``, or ``{"unconfined": what was
unavailable}`` before the file is opened when a confinement could not be set up and
``require_sandbox`` holds; after ``loaded``, ``{"converted": log lines}`` (the ONNX written to
``workdir/model.onnx``) or ``{"failed": reason, "log": lines}``. Running out of memory exits with
:data:`EXIT_MEMORY`; the CPU limit ends the process with SIGXCPU.
"""

from __future__ import annotations

import errno
import json
import math
import os
import resource
import site
import sys
from pathlib import Path
from typing import Any, TextIO

import joey_core
import joey_registry
from joey_core.models import specs_from_json
from joey_registry import sandbox
from joey_registry.errors import InvalidArgument

EXIT_MEMORY = 3
OUTPUT_NAME = "model.onnx"
MAX_TEXT = 8000  # characters of a reply's text: a refusal becomes a gRPC status, whose trailer is small
_MB = 1 << 20
# What a Python process and the frameworks read besides sys.path: shared libraries, CPU and memory
# facts, random bytes. Not /etc as a whole (a root registry's /etc/shadow), not the home directory
# (credentials), of /dev only the devices every process may use (not /dev/shm, where other processes'
# shared memory is, nor disks), and of /proc only this process's own directory: /proc/<registry
# pid>/environ holds the registry's secrets.
_SYSTEM_READABLE = (
    "/usr",
    "/lib",
    "/lib64",
    "/sys",
    "/dev/zero",
    "/dev/random",
    "/dev/urandom",
    "/etc/ld.so.cache",
    "/etc/localtime",
    "/proc/cpuinfo",
    "/proc/meminfo",
    "/proc/stat",
)


def import_paths() -> list[str]:
    """The entries of this process's sys.path that a conversion child imports from, and so may read:
    Python's own, beneath sys.prefix and sys.base_prefix (the standard library, the environment's
    site-packages), and other site-packages directories. Not the others: a directory added to
    PYTHONPATH, or the one the registry started in, may hold anything (a checkout's secrets, say)."""
    roots = [Path(p).resolve() for p in (sys.prefix, sys.base_prefix, *site.getsitepackages())]
    roots.append(Path(site.getusersitepackages()).resolve())
    return [p for p in sys.path if p and any(Path(p).resolve().is_relative_to(root) for root in roots)]


def confine(request: dict[str, Any]) -> list[str]:
    """Everything but the rlimits, which come after the imports the conversion needs (see ``main``)."""
    workdir = Path(request["workdir"])
    # Under load the registry's calls go first, and under memory pressure the kernel kills this first
    # (raising one's own OOM score needs no privilege; /proc is read-only once confined).
    os.nice(10)
    with open("/proc/self/oom_score_adj", "w") as score:
        score.write("1000")
    # The packages' own directories too (not the checkout around them): an editable install finds them
    # through a hook, not sys.path.
    packages = [Path(module.__file__).parent for module in (joey_core, joey_registry) if module.__file__]
    readable = [Path(p) for p in (*import_paths(), sys.prefix, sys.base_prefix, *_SYSTEM_READABLE)] + packages
    readable.append(Path(f"/proc/{os.getpid()}"))
    # The namespaces first, then the capabilities they came with, then the filter (which refuses making
    # namespaces, and whose library is found by running ldconfig, which Landlock would not allow).
    notes = [sandbox.isolate_network(), sandbox.drop_capabilities(), sandbox.filter_syscalls()]
    try:
        # /dev/null writable too: libraries send output there, subprocess opens it read-write.
        writable = [workdir, Path(os.devnull)]
        notes.append(sandbox.restrict_filesystem([*readable, Path(request["path"])], writable))
    except OSError as exc:
        notes.append(f"filesystem not confined: {exc} (Landlock)")
    os.environ["TMPDIR"] = str(workdir)  # torch.export and friends write scratch files
    return [note for note in notes if note]


def limit(request: dict[str, Any]) -> None:
    memory = request["memory_mb"] * _MB
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    # RLIMIT_CPU counts the process's whole life: the limit starts from what it used so far.
    used = resource.getrusage(resource.RUSAGE_SELF)
    start = math.ceil(used.ru_utime + used.ru_stime)
    resource.setrlimit(resource.RLIMIT_CPU, (start + request["cpu_s"], start + request["cpu_s"] + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (request["max_file_bytes"],) * 2)
    # Counted per user namespace (Linux 5.14+): this process's own threads and children. The kernel
    # exempts a root registry's child (root's uid on the host), as docs/security.md says.
    resource.setrlimit(resource.RLIMIT_NPROC, (request["max_processes"],) * 2)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def file_too_large(limit: int) -> str:
    return f"a file the conversion wrote is larger than {limit} bytes (JOEY_CONVERSION_MAX_FILE_BYTES)"


def _reply(channel: TextIO, message: dict[str, Any]) -> None:
    channel.write(json.dumps(message) + "\n")
    channel.flush()


def _refusal(framework: str, exc: BaseException) -> str:
    if isinstance(exc, InvalidArgument):
        return str(exc)[:MAX_TEXT]  # a pickle's code may raise the converters' own error
    # The file's own code (a pickle's) or the framework's loader failed in a way no converter expects.
    return f"framework {framework!r}: the file does not load: {type(exc).__name__}: {exc}"[:MAX_TEXT]


def run(request: dict[str, Any], channel: TextIO, notes: list[str]) -> None:
    # Imported here, once confined: the framework's import is the first code of its package to run.
    from joey_registry.converters import converter_for, verify

    framework = request["framework"]
    declared = specs_from_json(request["inputs"])
    converter = converter_for(framework)
    limit(request)
    try:
        loaded = converter.load(Path(request["path"]), declared)
    except MemoryError:
        raise
    except BaseException as exc:  # noqa: BLE001 - a pickle can raise anything, SystemExit included
        _reply(channel, {"refused": _refusal(framework, exc)})
        return
    _reply(channel, {"loaded": loaded.description, "notes": notes})
    log = [f"loaded {loaded.description}", *notes]
    try:
        model = converter.to_onnx(loaded).SerializeToString()
        log.append(f"converted to ONNX ({len(model)} bytes)")
        checks = [("generated inputs", verify.generated(loaded.inputs))]
        if request.get("sample"):
            checks.append(("the sample input", verify.sample(loaded.inputs, request["sample"])))
        for what, inputs in checks:
            log.append(
                verify.compare(converter.predict(loaded, inputs), verify.run_onnx(model, inputs), what)
            )
        (Path(request["workdir"]) / OUTPUT_NAME).write_bytes(model)
    except MemoryError:
        raise
    except InvalidArgument as exc:
        _reply(channel, {"failed": str(exc)[:MAX_TEXT], "log": log})
        return
    except Exception as exc:  # noqa: BLE001 - the converter or the model failing: the upload's error
        # Python ignores SIGXFSZ: a write beyond RLIMIT_FSIZE fails with EFBIG instead.
        too_large = isinstance(exc, OSError) and exc.errno == errno.EFBIG
        reason = file_too_large(request["max_file_bytes"]) if too_large else f"{type(exc).__name__}: {exc}"
        _reply(channel, {"failed": reason[:MAX_TEXT], "log": log})
        return
    _reply(channel, {"converted": log})


def main() -> None:
    request = json.loads(sys.stdin.buffer.read())
    # Libraries print progress to stdout (torch.onnx does): the replies get a descriptor of their own.
    channel = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    try:
        notes = confine(request)
        if notes and request["require_sandbox"]:
            # Fail closed: the file is never opened by a process less confined than documented.
            _reply(channel, {"unconfined": "; ".join(notes)})
            return
        run(request, channel, notes)
    except MemoryError:
        os._exit(EXIT_MEMORY)


if __name__ == "__main__":
    main()
