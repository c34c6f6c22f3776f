"""Running an upload's validator in a child process (:mod:`joey_registry.check_process`) with memory,
CPU and wall-clock limits, so that no upload can exhaust, stall or crash the registry."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from joey_core.models import specs_from_json
from joey_registry import check_process
from joey_registry.errors import InvalidArgument, Unavailable
from joey_registry.validation import Signature

log = logging.getLogger(__name__)

# What the checking process sees of the environment: no JOEY_* secret, no database URL, no token.
CHECK_ENVIRONMENT = {
    "PATH": os.defpath,
    "LC_ALL": "C.UTF-8",
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
}
_STDERR_LOGGED = 4000


class ModelCheck:
    """Spawned, not forked: the registry is threaded, and the child must not inherit its memory.

    Each upload is checked by a process of its own, used once. The next one is started as soon as one is
    taken, so that its interpreter start and imports (most of a small model's check) happen before the
    next upload arrives rather than while it waits."""

    def __init__(self, memory_mb: int, cpu_s: int, timeout_s: float) -> None:
        self.memory_mb = memory_mb
        self.cpu_s = cpu_s
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._ready: subprocess.Popen[bytes] | None = None

    def close(self) -> None:
        """End the process started ahead for the next upload."""
        with self._lock:
            ready, self._ready = self._ready, None
        if ready is not None:
            ready.kill()
            ready.communicate()

    def _take(self) -> subprocess.Popen[bytes]:
        with self._lock:
            ready, self._ready = self._ready, _spawn()
        if ready is not None and ready.poll() is None:
            return ready
        if ready is not None:
            ready.communicate()  # it ended while waiting: reap it, start one for this upload
        return _spawn()

    def inspect(self, framework: str, path: Path, declared: Signature) -> Signature:
        request = {
            "framework": framework,
            "path": str(path.resolve()),  # the child runs in /
            "inputs": [s.to_json() for s in declared.inputs],
            "outputs": [s.to_json() for s in declared.outputs],
            "memory_mb": self.memory_mb,
            "cpu_s": self.cpu_s,
        }
        child = self._take()
        try:
            out, err = child.communicate(json.dumps(request).encode(), timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            used = _cpu_seconds(child.pid)
            child.kill()
            child.communicate()
            if used < self.cpu_s:
                # It waited for the CPU rather than used it (other checks, other services): load, not the
                # model; the CPU limit refuses a model that is itself too slow to check.
                raise Unavailable(
                    f"checking the model took longer than {self.timeout_s:g} s (JOEY_UPLOAD_CHECK_TIMEOUT_S) "
                    f"having used {used:.1f} s of CPU: the registry is busy; retry; nothing was stored"
                ) from None
            raise InvalidArgument(
                f"checking the model took longer than {self.timeout_s:g} s (JOEY_UPLOAD_CHECK_TIMEOUT_S); "
                "nothing was stored"
            ) from None
        finally:
            if child.poll() is None:  # the registry is stopping, or communicate failed
                child.kill()
                child.wait()
        if child.returncode == 0:
            reply = json.loads(out)
            if "refused" in reply:
                raise InvalidArgument(reply["refused"])
            return Signature(specs_from_json(reply["inputs"]), specs_from_json(reply["outputs"]))
        raise InvalidArgument(self._limit_hit(child.returncode, err))

    def _limit_hit(self, code: int, err: bytes) -> str:
        if code == check_process.EXIT_MEMORY:
            return (
                f"checking the model needed more than {self.memory_mb} MiB of memory "
                "(JOEY_UPLOAD_CHECK_MEMORY_MB); nothing was stored"
            )
        # SIGXCPU's default action ends the process at the soft limit; a SIGKILL is the OOM killer's.
        if code == -signal.SIGXCPU:
            return (
                f"checking the model used more than {self.cpu_s} s of CPU (JOEY_UPLOAD_CHECK_CPU_S); "
                "nothing was stored"
            )
        log.error("the model check exited with %d: %s", code, err[-_STDERR_LOGGED:].decode(errors="replace"))
        if code > 0:  # an exception the check did not expect: a bug here, not the caller's to fix
            raise RuntimeError(f"the model check failed with exit status {code}")
        if code == -signal.SIGKILL:
            return (
                "checking the model was killed (out of memory?): the file is not a model engines can load; "
                "nothing was stored"
            )
        return (
            f"checking the model crashed its process (signal {-code}; a loader may have run out of its "
            f"{self.memory_mb} MiB, JOEY_UPLOAD_CHECK_MEMORY_MB): the file is not a model engines can "
            "load; nothing was stored"
        )


def _spawn() -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        # Not -I, which would drop the registry's own path (a checkout run with PYTHONPATH would check
        # uploads with the installed code): its sys.path is given instead. -s -P: no user site, and not
        # the working directory; nothing else of the environment is passed.
        [sys.executable, "-s", "-P", "-m", check_process.__name__],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=CHECK_ENVIRONMENT | {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)},
        cwd="/",
    )


def _cpu_seconds(pid: int) -> float:
    """CPU time (user and system) the running process ``pid`` has used."""
    # /proc/<pid>/stat: the command may hold spaces and parentheses, so split after its closing one.
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
