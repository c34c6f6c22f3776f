"""Running a native model's conversion in its child (:mod:`joey_registry.convert_process`), in two
parts: :meth:`Conversions.start` waits until the child has loaded the file (a file that is not what its
framework says is refused there, before anything is stored), :meth:`Conversion.finish` until it has
converted and verified it, which the registry waits for in the background."""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from joey_core.models import TensorSpec
from joey_registry import convert_process
from joey_registry.errors import InvalidArgument, ResourceExhausted, Unavailable
from joey_registry.model_check import CHECK_ENVIRONMENT

log = logging.getLogger(__name__)

_STDERR_LINES = 40  # the end of what the libraries printed, kept for the log of a conversion that crashed


class ConversionFailed(Exception):
    """The model loaded but did not convert, or its ONNX form disagreed with it; the message says why."""

    def __init__(self, reason: str, log_lines: list[str]) -> None:
        super().__init__(reason)
        self.log_lines = log_lines


@dataclass
class Conversion:
    """One conversion whose child has loaded the model and goes on converting it."""

    description: str
    notes: list[str]
    workdir: Path
    deadline: float
    child: subprocess.Popen[bytes]
    replies: queue.Queue[dict[str, Any] | None]
    stderr: deque[str]
    owner: Conversions
    _done: bool = field(default=False)

    def finish(self) -> tuple[Path, list[str]]:
        """The ONNX file written and the conversion log; ConversionFailed otherwise."""
        try:
            reply = self.owner.reply(self, self.deadline)
            if "converted" in reply:
                return self.workdir / convert_process.OUTPUT_NAME, list(reply["converted"])
            raise ConversionFailed(reply["failed"], list(reply.get("log", [])))
        finally:
            self._end()

    def abandon(self) -> None:
        """End the child and remove its work directory (the upload failed after the model loaded)."""
        self._end()
        self.remove()

    def remove(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)

    def _end(self) -> None:
        if self.child.poll() is None:
            self.child.kill()
        self.child.wait()
        if not self._done:
            self._done = True
            self.owner.release()


class Conversions:
    """Spawned, not forked (the registry is threaded), one child per upload, at most ``concurrency``
    at once: a conversion holds its child until it is verified, after the upload returned."""

    def __init__(self, memory_mb: int, cpu_s: int, timeout_s: float, concurrency: int, max_output_bytes: int):
        self.memory_mb = memory_mb
        self.cpu_s = cpu_s
        self.timeout_s = timeout_s
        self.max_output_bytes = max_output_bytes
        self._slots = threading.BoundedSemaphore(concurrency)
        self.concurrency = concurrency

    def release(self) -> None:
        self._slots.release()

    def start(
        self,
        framework: str,
        path: Path,
        declared: tuple[TensorSpec, ...],
        sample: Mapping[str, Any] | None,
        staging: Path,
    ) -> Conversion:
        """A conversion whose child has loaded ``path``; InvalidArgument when it is no such model."""
        if not self._slots.acquire(blocking=False):
            raise ResourceExhausted(
                f"the registry is converting {self.concurrency} models already "
                "(JOEY_CONVERSION_CONCURRENCY); retry when one has finished"
            )
        workdir = Path(tempfile.mkdtemp(dir=staging, suffix=".convert"))
        request = {
            "framework": framework,
            "path": str(path.resolve()),
            "workdir": str(workdir.resolve()),
            "inputs": [s.to_json() for s in declared],
            "sample": dict(sample) if sample else None,
            "memory_mb": self.memory_mb,
            "cpu_s": self.cpu_s,
            "max_output_bytes": self.max_output_bytes,
        }
        try:
            child = subprocess.Popen(
                [sys.executable, "-s", "-P", "-m", convert_process.__name__],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=CHECK_ENVIRONMENT
                | {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p), "HOME": str(workdir)},
                cwd=workdir,
            )
        except BaseException:
            self.release()
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        assert child.stdin is not None and child.stdout is not None and child.stderr is not None
        replies: queue.Queue[dict[str, Any] | None] = queue.Queue()
        stderr: deque[str] = deque(maxlen=_STDERR_LINES)
        threading.Thread(target=_read_replies, args=(child.stdout, replies), daemon=True).start()
        threading.Thread(target=_read_stderr, args=(child.stderr, stderr), daemon=True).start()
        child.stdin.write(json.dumps(request).encode())
        child.stdin.close()
        conversion = Conversion(
            "", [], workdir, time.monotonic() + self.timeout_s, child, replies, stderr, self
        )
        try:
            reply = self.reply(conversion, conversion.deadline)
        except BaseException:
            conversion.abandon()
            raise
        if "refused" in reply:
            conversion.abandon()
            raise InvalidArgument(f"{reply['refused']}; nothing was stored")
        conversion.description, conversion.notes = reply["loaded"], list(reply.get("notes", []))
        return conversion

    def reply(self, conversion: Conversion, deadline: float) -> dict[str, Any]:
        """The child's next reply; the limit it hit (InvalidArgument, ConversionFailed after the model
        loaded) when it ended without one."""
        loaded = bool(conversion.description)
        try:
            reply = conversion.replies.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            conversion.child.kill()
            reason = f"converting the model took longer than {self.timeout_s:g} s (JOEY_CONVERSION_TIMEOUT_S)"
            if loaded:
                raise ConversionFailed(reason, []) from None
            raise Unavailable(f"{reason} before it even loaded: the registry is busy; retry") from None
        if reply is not None:
            return reply
        code = conversion.child.wait()
        reason = self._limit_hit(code, conversion.stderr)
        if loaded:
            raise ConversionFailed(reason, list(conversion.stderr))
        raise InvalidArgument(f"{reason}; nothing was stored")

    def _limit_hit(self, code: int, stderr: deque[str]) -> str:
        if code == convert_process.EXIT_MEMORY:
            return (
                f"converting the model needed more than {self.memory_mb} MiB of memory "
                "(JOEY_CONVERSION_MEMORY_MB)"
            )
        if code == -signal.SIGXCPU:
            return f"converting the model used more than {self.cpu_s} s of CPU (JOEY_CONVERSION_CPU_S)"
        if code == -signal.SIGXFSZ:
            return f"the converted model is larger than {self.max_output_bytes} bytes (JOEY_MAX_UPLOAD_BYTES)"
        log.error("the conversion child exited with %d: %s", code, "\n".join(stderr))
        if code > 0:
            return f"the conversion failed (exit status {code}): {stderr[-1] if stderr else 'no output'}"
        return f"the conversion crashed its process (signal {-code}): the file is not a model it can load"


def _read_replies(stream: Any, replies: queue.Queue[dict[str, Any] | None]) -> None:
    for line in stream:
        try:
            replies.put(json.loads(line))
        except ValueError:
            break  # not the child's reply: it wrote to the channel itself
    replies.put(None)


def _read_stderr(stream: Any, kept: deque[str]) -> None:
    for line in stream:
        kept.append(line.decode(errors="replace").rstrip())
