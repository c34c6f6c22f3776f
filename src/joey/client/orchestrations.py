"""Orchestrations and tasks: Python code the platform runs for you, once, on a schedule or continuously::

orch = client.upload_orchestration("nightly-batch", "jobs/nightly/")   # main.py, requirements.txt, ...
orch.status()                                   # packaging -> ready | error, with the packaging log
task = orch.run_once("backfill", json_args={"limit": 100}, timeout=600)
task = orch.run_scheduled("nightly", schedule="0 2 * * *", json_args={}, timeout=3600)   # cron, UTC
task = orch.run_continuously("listener", json_args={})                 # restarted when it exits
task.status(); task.wait(); task.kill(); task.last_runs()[0].logs()
client.list_orchestrations(); client.list_tasks()

Inside main.py, ``joey.Client()`` is the task owner's, in the task's workspace, and
:func:`task_args` returns the task's ``json_args``.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import zipfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from joey.client.calls import JoeyError, RegistryCaller
from joey.client.catalog import Listing, optional_time
from joey_core import orchestrations as core
from joey_core.v1 import registry_pb2 as pb

UPLOAD_CHUNK_BYTES = 1 << 20
_POLL_S = 0.5
_SKIPPED_DIRS = frozenset({"__pycache__", ".git", ".venv", ".mypy_cache", ".pytest_cache"})


def task_args() -> dict[str, Any]:
    """The ``json_args`` of the task this code runs in; ``{}`` outside a task (set ``JOEY_TASK_ARGS`` to
    a JSON object to try main.py by hand)."""
    args: dict[str, Any] = json.loads(os.environ.get(core.ARGS_VARIABLE) or "{}")
    return args


@contextmanager
def zipped(path: Path) -> Iterator[IO[bytes]]:
    """A zip file as it is, or a directory's files zipped into a temporary file (names relative to it;
    caches and version-control data left out; links refused, as the registry would)."""
    if path.is_file():
        with path.open("rb") as given:
            yield given
        return
    if not path.is_dir():
        raise FileNotFoundError(f"no orchestration at {path}: give a directory or a .zip file")
    with tempfile.TemporaryFile() as spool:
        with zipfile.ZipFile(spool, "w", zipfile.ZIP_DEFLATED) as archive:
            for root, dirs, files in os.walk(path):
                dirs[:] = sorted(d for d in dirs if d not in _SKIPPED_DIRS and not d.endswith(".egg-info"))
                for name in sorted(files):
                    file = Path(root) / name
                    if file.is_symlink():
                        raise ValueError(f"{file} is a symbolic link: an orchestration holds files only")
                    archive.write(file, file.relative_to(path).as_posix())
        spool.seek(0)
        yield spool


@dataclass(frozen=True)
class PackagingStatus:
    """Where a version's environment stands; ``str()`` is its status."""

    status: str
    """packaging (an orchestrator builds it), ready, or error (``log`` says why)."""
    log: str
    version: int

    def __str__(self) -> str:
        return self.status


@dataclass(frozen=True)
class LogLine:
    seq: int
    stream: str
    """stdout, stderr, or joey (what the orchestrator noted: start, timeout, kill)."""
    time: datetime | None
    text: str

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True)
class TaskRun:
    """One run of a task: ``str()`` is its status."""

    client: RegistryCaller = field(repr=False, compare=False)
    task: str
    id: int
    attempt: int
    status: str
    instant: datetime | None
    """The schedule's instant it ran for (scheduled tasks)."""
    start: datetime | None
    end: datetime | None
    exit_code: int | None
    """main.py's exit status; negative: the signal that ended it."""
    reason: str
    orchestrator: str
    orchestration_version: int

    @classmethod
    def from_proto(cls, client: RegistryCaller, task: str, r: pb.TaskRun) -> TaskRun:
        return cls(
            client,
            task,
            r.id,
            r.attempt,
            r.status,
            optional_time(r.instant),
            optional_time(r.started_at),
            optional_time(r.ended_at),
            r.exit_code if r.HasField("exit_code") else None,
            r.reason,
            r.orchestrator,
            r.orchestration_version,
        )

    def __str__(self) -> str:
        return self.status

    def row(self) -> dict[str, Any]:
        return {
            "run": self.id,
            "attempt": self.attempt,
            "status": self.status,
            "start": self.start,
            "end": self.end,
            "exit_code": "-" if self.exit_code is None else self.exit_code,
            "reason": self.reason or "-",
        }

    def logs(self, after_seq: int = 0) -> list[LogLine]:
        """The run's lines of output (stdout and stderr, in order), after line ``after_seq``; while it
        runs, those printed so far."""
        return self._logs(after_seq)[0]

    def _logs(self, after_seq: int) -> tuple[list[LogLine], bool]:
        lines: list[LogLine] = []
        while True:
            request = pb.TaskRunLogsRequest(
                workspace=self.client.workspace, task=self.task, run_id=self.id, after_seq=after_seq
            )
            page = self.client.call("GetTaskRunLogs", request)
            lines += [LogLine(x.seq, x.stream, optional_time(x.time), x.line) for x in page.lines]
            if page.finished or not page.lines:
                return lines, bool(page.finished)
            after_seq = page.lines[-1].seq

    def follow(self, poll_s: float = _POLL_S) -> Iterator[LogLine]:
        """The run's lines as they are printed, until it ends."""
        after = 0
        while True:
            lines, finished = self._logs(after)
            yield from lines
            if lines:
                after = lines[-1].seq
            if finished:
                return
            time.sleep(poll_s)


@dataclass(frozen=True)
class Task:
    """A task of the workspace; ``str()`` is its name."""

    client: RegistryCaller = field(repr=False, compare=False)
    workspace: str
    name: str
    orchestration: str
    orchestration_version: int
    """0: each run takes the latest ready version."""
    kind: str
    schedule: str
    json_args: dict[str, Any]
    timeout_s: float | None
    retries: int
    owner: str
    created_at: datetime | None
    last_status: str = field(compare=False, default="pending")
    """As of the call that returned this object; :meth:`status` asks again."""
    next_run: datetime | None = field(compare=False, default=None)

    @classmethod
    def from_proto(cls, client: RegistryCaller, t: pb.Task) -> Task:
        return cls(
            client,
            t.workspace,
            t.name,
            t.orchestration,
            t.orchestration_version,
            t.kind,
            t.schedule,
            json.loads(t.json_args or "{}"),
            t.timeout_s if t.HasField("timeout_s") else None,
            t.retries,
            t.owner,
            optional_time(t.created_at),
            t.status,
            optional_time(t.next_run),
        )

    def __str__(self) -> str:
        return self.name

    def row(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "orchestration": self.orchestration
            + (f" v{self.orchestration_version}" if self.orchestration_version else ""),
            "schedule": self.schedule or "-",
            "status": self.last_status,
            "next_run": self.next_run,
            "owner": self.owner,
        }

    def _request(self) -> pb.TaskRequest:
        return pb.TaskRequest(workspace=self.workspace, name=self.name)

    def status(self) -> str:
        """pending, running, success, failure, killed or timed_out: its latest run's (pending before
        the first; killed once killed and no run is left running)."""
        return str(self.client.call("GetTask", self._request()).status)

    def kill(self) -> Task:
        """No more runs: a pending one is dropped, a running one's process group gets SIGTERM, then
        SIGKILL after the orchestrator's grace period."""
        return Task.from_proto(self.client, self.client.call("KillTask", self._request()))

    def delete(self) -> None:
        """Delete the task with its runs and their logs; refused while it may still run (kill it first)."""
        self.client.call("DeleteTask", self._request())

    def last_runs(self, limit: int = 20) -> Listing[TaskRun]:
        """Its latest runs, newest first (a table; ``.to_frame()`` for a DataFrame)."""
        request = pb.TaskRunsRequest(workspace=self.workspace, name=self.name, limit=limit)
        runs = self.client.call("ListTaskRuns", request).runs
        return Listing(TaskRun.from_proto(self.client, self.name, r) for r in runs)

    def wait(self, timeout_s: float = 3600.0, on_poll: Callable[[str], None] | None = None) -> str:
        """Its status once no run is pending or running: for a task run once, its outcome, retries
        included (a retry is pending as soon as its attempt failed). JoeyError DEADLINE_EXCEEDED past
        ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            status = self.status()
            if on_poll:
                on_poll(status)
            if status in core.ENDED:
                return status
            if time.monotonic() > deadline:
                raise JoeyError(
                    "DEADLINE_EXCEEDED", f"task {self.name!r} is still {status} after {timeout_s:g} s"
                )
            time.sleep(_POLL_S)


@dataclass(frozen=True)
class Orchestration:
    """One version of an orchestration; ``str()`` is its name."""

    client: RegistryCaller = field(repr=False, compare=False)
    workspace: str
    name: str
    version: int
    sha256: str
    size_bytes: int
    files: int
    last_status: str = field(compare=False, default="packaging")
    packaging_log: str = field(compare=False, default="", repr=False)
    created_by: str = ""
    created_at: datetime | None = None

    @classmethod
    def from_proto(cls, client: RegistryCaller, o: pb.Orchestration) -> Orchestration:
        return cls(
            client,
            o.workspace,
            o.name,
            o.version,
            o.sha256,
            o.size_bytes,
            o.files,
            o.status,
            o.packaging_log,
            o.created_by,
            optional_time(o.created_at),
        )

    def __str__(self) -> str:
        return self.name

    def row(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "status": self.last_status,
            "files": self.files,
            "size_bytes": self.size_bytes,
            "created_at": self.created_at,
            "created_by": self.created_by,
        }

    def status(self) -> PackagingStatus:
        request = pb.OrchestrationRequest(workspace=self.workspace, name=self.name, version=self.version)
        found = self.client.call("GetOrchestration", request)
        return PackagingStatus(found.status, found.packaging_log, found.version)

    def wait_ready(
        self, timeout_s: float = 900.0, on_poll: Callable[[PackagingStatus], None] | None = None
    ) -> Orchestration:
        """This version once packaged; JoeyError FAILED_PRECONDITION with the log if it could not be."""
        deadline = time.monotonic() + timeout_s
        while (status := self.status()).status == core.PACKAGING:
            if on_poll:
                on_poll(status)
            if time.monotonic() > deadline:
                raise JoeyError(
                    "DEADLINE_EXCEEDED",
                    f"orchestration {self.name!r} version {self.version} is still packaging after "
                    f"{timeout_s:g} s: is an orchestrator running (`joey serve orchestrator`)?",
                )
            time.sleep(_POLL_S)
        if status.status == core.ERROR:
            last = status.log.strip().splitlines()[-1] if status.log.strip() else "no log"
            raise JoeyError(
                "FAILED_PRECONDITION",
                f"orchestration {self.name!r} version {self.version} could not be packaged: {last}\n"
                f"packaging log:\n{status.log}",
            )
        return self

    def _task(
        self,
        name: str,
        kind: str,
        json_args: Mapping[str, Any] | None,
        timeout: float | None,
        retries: int,
        schedule: str = "",
        pin: bool = False,
    ) -> Task:
        request = pb.TaskCreateRequest(
            workspace=self.workspace,
            name=name,
            orchestration=self.name,
            orchestration_version=self.version if pin else 0,
            kind=kind,
            schedule=schedule,
            json_args=json.dumps(dict(json_args or {})),
            retries=retries,
        )
        if timeout is not None:
            request.timeout_s = timeout
        return Task.from_proto(self.client, self.client.call("CreateTask", request))

    def run_once(
        self,
        name: str,
        json_args: Mapping[str, Any] | None = None,
        timeout: float | None = None,
        retries: int = 0,
        pin: bool = False,
    ) -> Task:
        """Run main.py once, as you, with ``json_args`` (:func:`joey.task_args`), killed after ``timeout``
        seconds (none by default); a failed or timed-out run is tried again up to ``retries`` times. It
        runs the orchestration's latest ready version (waiting while the latest is packaging), or with
        ``pin`` this version. A run acts as the lesser of you and the uploader of the version it runs:
        a collaborator's newer version runs with the collaborator's rights, never yours."""
        return self._task(name, "once", json_args, timeout, retries, pin=pin)

    def run_scheduled(
        self,
        name: str,
        schedule: str,
        json_args: Mapping[str, Any] | None = None,
        timeout: float | None = None,
        retries: int = 0,
        pin: bool = False,
    ) -> Task:
        """Run main.py at every instant of ``schedule``, a cron expression in UTC (``0 2 * * *``: at
        02:00; a sixth field is seconds). Runs never overlap: an instant that comes while the previous
        run still runs waits for it."""
        return self._task(name, "scheduled", json_args, timeout, retries, schedule, pin)

    def run_continuously(
        self,
        name: str,
        json_args: Mapping[str, Any] | None = None,
        timeout: float | None = None,
        pin: bool = False,
    ) -> Task:
        """Run main.py again whenever it exits (after a second, doubling for each failure in a row),
        until :meth:`Task.kill`."""
        return self._task(name, "continuous", json_args, timeout, 0, pin=pin)

    def delete(self) -> int:
        """Delete every version of the orchestration; refused while a task uses it. How many versions."""
        request = pb.OrchestrationRequest(workspace=self.workspace, name=self.name)
        return int(self.client.call("DeleteOrchestration", request).versions)


class OrchestrationClientMixin(ABC):
    """The orchestration and task verbs of :class:`joey.Client`, which provides ``workspace`` and ``call``."""

    workspace: str

    @abstractmethod
    def call(self, name: str, request: Any, timeout: float = 60.0) -> Any: ...

    def upload_orchestration(
        self, name: str, path: str | Path, wait: bool = True, timeout_s: float = 900.0
    ) -> Orchestration:
        """Upload a directory (zipped here) or a .zip as a new version of orchestration ``name``: a
        ``main.py`` at its top, an optional ``requirements.txt`` (installed on top of Joey's own packages
        by the orchestrator, which keeps the log), any other files. With ``wait`` (the default) this
        returns once the version is ready, or raises JoeyError with the packaging log."""
        header = pb.OrchestrationUploadHeader(workspace=self.workspace, name=name)
        with zipped(Path(path)) as data:

            def parts() -> Iterator[pb.OrchestrationUploadRequest]:
                yield pb.OrchestrationUploadRequest(header=header)
                while block := data.read(UPLOAD_CHUNK_BYTES):
                    yield pb.OrchestrationUploadRequest(chunk=block)

            uploaded = self.call("UploadOrchestration", parts(), timeout=900)
        found = Orchestration.from_proto(self, uploaded)  # type: ignore[arg-type]
        return found.wait_ready(timeout_s) if wait else found

    def get_orchestration(self, name: str, version: int | None = None) -> Orchestration:
        request = pb.OrchestrationRequest(workspace=self.workspace, name=str(name), version=version or 0)
        return Orchestration.from_proto(self, self.call("GetOrchestration", request))  # type: ignore[arg-type]

    def list_orchestrations(self) -> Listing[Orchestration]:
        """The latest version of each orchestration of the workspace, with its packaging status."""
        response = self.call("ListOrchestrations", pb.OrchestrationListRequest(workspace=self.workspace))
        return Listing(Orchestration.from_proto(self, o) for o in response.orchestrations)  # type: ignore[arg-type]

    def get_task(self, name: str) -> Task:
        request = pb.TaskRequest(workspace=self.workspace, name=str(name))
        return Task.from_proto(self, self.call("GetTask", request))  # type: ignore[arg-type]

    def list_tasks(self) -> Listing[Task]:
        """Every task of the workspace with its status (its latest run's) and next scheduled run."""
        response = self.call("ListTasks", pb.TaskListRequest(workspace=self.workspace))
        return Listing(Task.from_proto(self, t) for t in response.tasks)  # type: ignore[arg-type]
