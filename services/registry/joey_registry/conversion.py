"""Running a native model's conversion in its child (:mod:`joey_registry.convert_process`), in two
parts: :meth:`Conversions.start` waits until the child has loaded the file (a file that is not what its
framework says is refused there, before anything is stored), :meth:`Conversion.finish` until it has
converted and verified it, which the registry waits for in the background."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import queue
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationError,
)

from joey_core.models import TensorSpec
from joey_registry import convert_process
from joey_registry.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from joey_registry.model_check import CHECK_ENVIRONMENT

log = logging.getLogger(__name__)

_STDERR_LINES = 40  # the end of what the libraries printed, kept for the log of a conversion that crashed
_STDERR_TAIL_BYTES = 64 << 10  # and no more of it than this: a file's code may print gigabytes
_STDERR_LINE_CHARS = 1000  # of each line: the last one goes into an error message
_MAX_REPLY_BYTES = 1 << 20  # a reply is a description, notes or a log of a few lines
_MAX_LINES = 100  # of a reply's notes or log: a few in a real conversion
_REPLIES = 2  # loaded (or refused), then converted (or failed): nothing after is read
_CHUNK = 64 << 10
_GROUP_EXIT_S = 30.0  # SIGKILLed processes leave at once; only one stuck in the kernel takes longer


class _Reply(BaseModel):
    # Strict: the child ran the file's code, which may write to the reply channel itself. A reply is
    # exactly one of these shapes, of these types, or the conversion is refused.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def one_line(text: str) -> str:
    """``text`` with its control characters escaped (a newline as ``\\n``): the child's text goes into
    the registry's log and error messages, where it must not start lines of its own."""
    return _CONTROL.sub(lambda found: repr(found.group())[1:-1], text)


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# A reply's text, bounded: a refusal becomes a gRPC status message, which a client refuses (as
# RESOURCE_EXHAUSTED) beyond its 16 KiB of metadata.
_Text = Annotated[str, StringConstraints(max_length=convert_process.MAX_TEXT), AfterValidator(one_line)]
_Lines = Annotated[list[_Text], Field(max_length=_MAX_LINES)]


class Loaded(_Reply):
    loaded: _Text
    notes: _Lines


class Refused(_Reply):
    refused: _Text


class Unconfined(_Reply):
    unconfined: _Text


class Converted(_Reply):
    converted: _Lines


class Failed(_Reply):
    failed: _Text
    log: _Lines


_FIRST: TypeAdapter[Loaded | Refused | Unconfined] = TypeAdapter(Loaded | Refused | Unconfined)
_SECOND: TypeAdapter[Converted | Failed] = TypeAdapter(Converted | Failed)
_R = TypeVar("_R")

CHILD_CLAIM = (
    "(the lines above are the conversion child's own report: it ran the file's code, so the "
    "verification figures are the file's claim; the registry itself checked the ONNX file: it loads in "
    "onnxruntime, its types and shapes infer, no tensor is larger than JOEY_UPLOAD_CHECK_MEMORY_MB "
    "allows, and its inputs and outputs are the signature stored)"
)
"""The line the registry adds to the log of a conversion whose ONNX form passed its own check."""


class ConversionFailed(Exception):
    """The model loaded but did not convert, or its ONNX form disagreed with it; the message says why."""

    def __init__(self, reason: str, log_lines: list[str]) -> None:
        super().__init__(reason)
        self.log_lines = log_lines


class OutputTail:
    """The last bytes a child wrote to a stream, however much it wrote."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._data = bytearray()
        self._cut = False
        self._lock = threading.Lock()

    def add(self, chunk: bytes) -> None:
        with self._lock:
            self._data += chunk
            if len(self._data) > self.limit:
                del self._data[: len(self._data) - self.limit]
                self._cut = True

    def lines(self) -> list[str]:
        with self._lock:
            text, cut = bytes(self._data).decode(errors="replace"), self._cut
        lines = [one_line(line.rstrip()[:_STDERR_LINE_CHARS]) for line in text.splitlines()][-_STDERR_LINES:]
        return [f"(output cut to its last {self.limit} bytes)", *lines] if cut else lines


@dataclass
class Conversion:
    """One conversion whose child has loaded the model and goes on converting it."""

    description: str
    notes: list[str]
    workdir: Path
    staging: Path
    max_output_bytes: int
    deadline: float
    child: subprocess.Popen[bytes]
    replies: queue.Queue[bytes | None]
    stderr: OutputTail
    owner: Conversions
    output: Path | None = None
    _done: bool = field(default=False)

    def finish(self) -> tuple[Path, list[str]]:
        """A copy, the registry's own, of the ONNX file written, and the conversion log;
        ConversionFailed otherwise."""
        try:
            reply = self.owner.reply(self, self.deadline, _SECOND)
        finally:
            ended = self._end()
        if isinstance(reply, Failed):
            raise ConversionFailed(reply.failed, reply.log)
        if not ended:
            raise ConversionFailed(f"processes of the conversion outlived it by {_GROUP_EXIT_S:g} s", [])
        return self._copy_output(), reply.converted

    def abandon(self) -> None:
        """End the child and remove its work directory (the upload failed after the model loaded)."""
        self._end()
        self.remove()

    def remove(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)
        if self.output is not None:
            self.output.unlink(missing_ok=True)  # gone already once the store took it

    def _end(self) -> bool:
        """Kill the child and whatever it started (all in its process group: seccomp keeps them there),
        True once none is left."""
        try:
            return _kill_group(self.child)
        finally:
            if not self._done:
                self._done = True
                self.owner.release()

    def _copy_output(self) -> Path:
        # What the child left may be a link to any file the registry can read, a FIFO or a directory:
        # opened without following a link, without blocking, then taken only as a regular file of its
        # own. The descriptor is the registry's to close whatever it is (os.fdopen of a directory's
        # fails without closing it).
        try:
            fd = os.open(
                self.workdir / convert_process.OUTPUT_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
            )
        except OSError as exc:
            # ELOOP: a symbolic link.
            reason = f"the conversion left no ONNX file of its own: {exc.strerror}"
            raise ConversionFailed(reason, []) from None
        try:
            found = os.fstat(fd)
            if not stat.S_ISREG(found.st_mode) or found.st_nlink != 1:
                raise ConversionFailed(
                    "the conversion's output is not a regular file of its own (a link, a directory?)", []
                )
            with os.fdopen(fd, "rb", closefd=False) as source:
                return self._copy(source)
        finally:
            os.close(fd)

    def _copy(self, source: io.BufferedReader) -> Path:
        out, name = tempfile.mkstemp(dir=self.staging, suffix=".onnx")
        self.output = Path(name)
        with os.fdopen(out, "wb") as target:
            size = 0
            while chunk := source.read(_CHUNK):
                size += len(chunk)
                if size > self.max_output_bytes:
                    raise ConversionFailed(
                        f"the converted model is larger than {self.max_output_bytes} bytes "
                        "(JOEY_MAX_UPLOAD_BYTES)",
                        [],
                    )
                target.write(chunk)
        return self.output


@dataclass
class Conversions:
    """Spawned, not forked (the registry is threaded), one child per upload, at most ``concurrency``
    at once: a conversion holds its child until it is verified, after the upload returned."""

    memory_mb: int
    cpu_s: int
    timeout_s: float
    concurrency: int
    max_output_bytes: int
    require_sandbox: bool = True
    max_file_bytes: int = 2 << 30
    max_processes: int = 512
    _slots: threading.BoundedSemaphore = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._slots = threading.BoundedSemaphore(self.concurrency)

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
            "max_file_bytes": self.max_file_bytes,
            "max_processes": self.max_processes,
            "require_sandbox": self.require_sandbox,
        }
        try:
            child = subprocess.Popen(
                [sys.executable, "-s", "-P", "-m", convert_process.__name__],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=CHECK_ENVIRONMENT
                | {"PYTHONPATH": os.pathsep.join(convert_process.import_paths()), "HOME": str(workdir)},
                cwd=workdir,
                # A group of its own, which the registry kills whole when the conversion ends.
                start_new_session=True,
            )
        except BaseException:
            self.release()
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        assert child.stdin is not None and child.stdout is not None and child.stderr is not None
        replies: queue.Queue[bytes | None] = queue.Queue()
        stderr = OutputTail(_STDERR_TAIL_BYTES)
        threading.Thread(target=_read_replies, args=(child.stdout, replies), daemon=True).start()
        threading.Thread(target=_read_stderr, args=(child.stderr, stderr), daemon=True).start()
        child.stdin.write(json.dumps(request).encode())
        child.stdin.close()
        conversion = Conversion(
            "",
            [],
            workdir,
            staging,
            self.max_output_bytes,
            time.monotonic() + self.timeout_s,
            child,
            replies,
            stderr,
            self,
        )
        try:
            reply = self.reply(conversion, conversion.deadline, _FIRST)
        except BaseException:
            conversion.abandon()
            raise
        if isinstance(reply, Unconfined):
            conversion.abandon()
            raise FailedPrecondition(
                f"the conversion sandbox could not be set up: {reply.unconfined}; nothing was stored "
                "(JOEY_CONVERSION_REQUIRE_SANDBOX=false converts unconfined)"
            )
        if isinstance(reply, Refused):
            conversion.abandon()
            raise InvalidArgument(f"{reply.refused}; nothing was stored")
        conversion.description, conversion.notes = reply.loaded, reply.notes
        return conversion

    def reply(self, conversion: Conversion, deadline: float, shape: TypeAdapter[_R]) -> _R:
        """The child's next reply, of ``shape``; the limit it hit (InvalidArgument, ConversionFailed
        after the model loaded) when it ended without one, or a reply of any other shape."""
        loaded = bool(conversion.description)
        try:
            line = conversion.replies.get(timeout=max(0.0, deadline - time.monotonic()))
            if line is not None and len(line) <= _MAX_REPLY_BYTES:
                try:
                    return shape.validate_json(line)
                except ValidationError as exc:
                    reason = f"the conversion's reply is malformed: {_first_error(exc)}"
            else:
                reason = f"the conversion's reply is longer than {_MAX_REPLY_BYTES} bytes"
            if line is not None:
                _kill_group(conversion.child)
            code = conversion.child.wait(timeout=max(0.0, deadline - time.monotonic()))
        except (queue.Empty, subprocess.TimeoutExpired):
            _kill_group(conversion.child)
            timeout = f"{self.timeout_s:g} s (JOEY_CONVERSION_TIMEOUT_S)"
            if loaded:
                raise ConversionFailed(f"converting the model took longer than {timeout}", []) from None
            # The file's own code may hang as it loads: the file's fault, not a reason to retry.
            reason = f"the file took longer than {timeout} to load; nothing was stored"
            raise InvalidArgument(reason) from None
        if line is None:
            reason = self._limit_hit(code, conversion.stderr.lines())
        if loaded:
            raise ConversionFailed(reason, conversion.stderr.lines())
        raise InvalidArgument(f"{reason}; nothing was stored")

    def _limit_hit(self, code: int, stderr: list[str]) -> str:
        if code == convert_process.EXIT_MEMORY:
            return (
                f"converting the model needed more than {self.memory_mb} MiB of memory "
                "(JOEY_CONVERSION_MEMORY_MB)"
            )
        if code == -signal.SIGXCPU:
            return f"converting the model used more than {self.cpu_s} s of CPU (JOEY_CONVERSION_CPU_S)"
        if code == -signal.SIGXFSZ:
            return convert_process.file_too_large(self.max_file_bytes)
        log.error("the conversion child exited with %d; the end of its stderr: %s", code, " | ".join(stderr))
        if code > 0:
            return f"the conversion failed (exit status {code}): {stderr[-1] if stderr else 'no output'}"
        return f"the conversion crashed its process (signal {-code}): the file is not a model it can load"


def _kill_group(child: subprocess.Popen[bytes]) -> bool:
    """SIGKILL the child's process group until no member is left; False if one outlived the wait."""
    group = child.pid  # its own session's, so its group's id (start_new_session)
    until = time.monotonic() + _GROUP_EXIT_S
    while time.monotonic() < until:
        with contextlib.suppress(ProcessLookupError):  # none left
            os.killpg(group, signal.SIGKILL)
        if child.poll() is not None and not _members(group):
            return True
        time.sleep(0.01)
    return False


def _members(group: int) -> list[int]:
    """Live processes of a process group: a zombie (whose parent has not reaped it) writes nothing."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as status:
                fields = status.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue  # it ended meanwhile
        if int(fields[2]) == group and fields[0] not in (b"Z", b"X"):
            found.append(int(entry.name))
    return found


def _first_error(exc: ValidationError) -> str:
    """What was wrong with a reply, in a line: its shape or its first wrong field (never its value, which
    the file's code chose)."""
    errors = exc.errors(include_url=False, include_input=False)
    # Of a union, the member whose key the reply has says what is wrong: the others only miss theirs.
    named = [e for e in errors if e["type"] not in ("missing", "extra_forbidden")]
    error = (named or errors)[0]
    where = ".".join(str(part) for part in error["loc"])
    return f"{where}: {error['msg']}"[:300] if where else error["msg"][:300]


def _read_replies(stream: io.BufferedIOBase, replies: queue.Queue[bytes | None]) -> None:
    for _ in range(_REPLIES):
        line = stream.readline(_MAX_REPLY_BYTES + 1)
        if not line:
            break  # the child ended
        replies.put(line)
        if len(line) > _MAX_REPLY_BYTES:
            break
    replies.put(None)
    while stream.read1(_CHUNK):
        pass  # what else it writes, unread: a child blocked writing would not end


def _read_stderr(stream: io.BufferedIOBase, kept: OutputTail) -> None:
    while chunk := stream.read1(_CHUNK):
        kept.add(chunk)
