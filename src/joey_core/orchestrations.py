"""Orchestrations and tasks as the registry and the orchestrators share them: what a zip may hold
(checked by the registry on upload, again by an orchestrator as it extracts), cron schedules, the
states of a run, and the environment a run gets (docs/workloads.md, "Orchestrations and tasks").

Schedules are parsed by croniter, in UTC: five fields, or six with seconds last (``* * * * * */10``).
"""

from __future__ import annotations

import stat
import zipfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from croniter import croniter

from joey_core.models import artifact_name_problem

MAIN = "main.py"
REQUIREMENTS = "requirements.txt"

# Orchestration versions: packaging until an orchestrator built (or failed to build) their environment.
PACKAGING, READY, ERROR = "packaging", "ready", "error"
# Runs, and a task's status (its latest run's; pending before the first).
PENDING, RUNNING, SUCCESS, FAILURE, KILLED, TIMED_OUT = (
    "pending",
    "running",
    "success",
    "failure",
    "killed",
    "timed_out",
)
ENDED = (SUCCESS, FAILURE, KILLED, TIMED_OUT)
KINDS = ("once", "scheduled", "continuous")

# What a run finds in its environment (and joey.task_args() reads).
ARGS_VARIABLE = "JOEY_TASK_ARGS"
TASK_VARIABLE = "JOEY_TASK"
RUN_VARIABLE = "JOEY_TASK_RUN"

_CHUNK = 1 << 20


class BadZip(ValueError):
    """The zip is not an orchestration: its message says why."""


@dataclass(frozen=True)
class ZipLimits:
    max_files: int
    max_unpacked_bytes: int


@dataclass(frozen=True)
class ZipSummary:
    files: int
    unpacked_bytes: int
    root: str
    """The directory every entry lies under when the zip holds one folder ("" when main.py is at its
    top): `zip -r job.zip job/` uploads like the files of job/."""


def check_zip(path: Path, limits: ZipLimits) -> ZipSummary:
    """The zip's summary, or BadZip: not a zip, too many entries or bytes, an entry whose name leaves
    the directory it is extracted to, a link or any other special file, two entries of one name, or no
    main.py. Reads the central directory only."""
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise BadZip(f"not a zip file: {exc}") from None
    if len(entries) > limits.max_files:
        raise BadZip(f"it holds {len(entries)} entries, more than the limit of {limits.max_files}")
    names: set[str] = set()
    files_named: set[str] = set()
    files = 0
    total = 0
    for info in entries:
        name = info.filename.rstrip("/") if info.is_dir() else info.filename
        problem = artifact_name_problem(name)
        if problem:
            raise BadZip(f"entry {info.filename[:200]!r} cannot be extracted safely: {problem}")
        # Unix zips carry the file's type with its mode: a link is as its target's path, extracted.
        kind_bits = stat.S_IFMT(info.external_attr >> 16) if info.create_system == 3 else 0
        if kind_bits not in (0, stat.S_IFREG, stat.S_IFDIR):
            kind = "a symbolic link" if kind_bits == stat.S_IFLNK else "not a regular file"
            raise BadZip(f"entry {name!r} is {kind}: an orchestration holds files and directories only")
        if name in names:
            raise BadZip(f"entry {name!r} appears twice")
        names.add(name)
        if info.is_dir():
            continue
        files_named.add(name)
        files += 1
        total += info.file_size
        if total > limits.max_unpacked_bytes:
            raise BadZip(f"its files hold more than the limit of {limits.max_unpacked_bytes} bytes")
    for name in sorted(files_named):
        parent = name.rpartition("/")[0]
        while parent:
            if parent in files_named:
                raise BadZip(f"entry {parent!r} is a file and a directory (of {name!r})")
            parent = parent.rpartition("/")[0]
    root = _root(names)
    if root is None:
        raise BadZip(f"no {MAIN} at the top of the zip (or of the one folder it holds)")
    return ZipSummary(files, total, root)


def _root(names: set[str]) -> str | None:
    if MAIN in names:
        return ""
    tops = {name.split("/", 1)[0] for name in names}
    if len(tops) == 1:
        (top,) = tops
        if f"{top}/{MAIN}" in names:
            return f"{top}/"
    return None


def extract(path: Path, target: Path, limits: ZipLimits) -> ZipSummary:
    """Extract an orchestration zip into ``target`` (a new directory), checked again and with the limits
    enforced on the bytes themselves: an entry's declared size may lie."""
    summary = check_zip(path, limits)
    target.mkdir(parents=True)
    # Names were checked: none leaves the target, none is a file and a directory, none is a link.
    written = 0
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            name = info.filename.removeprefix(summary.root)
            if not name or info.is_dir():
                if name:
                    (target / name).mkdir(parents=True, exist_ok=True)
                continue
            destination = target / name
            destination.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(info) as source, destination.open("xb") as out:
                while block := source.read(_CHUNK):
                    written += len(block)
                    if written > limits.max_unpacked_bytes:
                        raise BadZip(
                            f"its files hold more than the limit of {limits.max_unpacked_bytes} bytes"
                        )
                    out.write(block)
            mode = info.external_attr >> 16
            if mode & stat.S_IXUSR:
                destination.chmod(0o755)
    return summary


def check_schedule(schedule: str) -> str:
    """The schedule, if croniter takes it; ValueError naming the problem otherwise."""
    schedule = " ".join(schedule.split())
    if not schedule:
        raise ValueError("a scheduled task needs a schedule: a cron expression such as '0 2 * * *'")
    if len(schedule.split()) not in (5, 6):
        raise ValueError(
            f"invalid schedule {schedule!r}: a cron expression of 5 fields (minute hour day month weekday), "
            "or 6 with seconds last"
        )
    if not croniter.is_valid(schedule):
        raise ValueError(f"invalid schedule {schedule!r}: not a cron expression croniter understands")
    return schedule


def latest_instant(schedule: str, now: datetime) -> datetime:
    """The schedule's latest instant at or before ``now`` (timezone-aware, UTC)."""
    # croniter's get_prev is strictly before its start: start a hair after now so `now` itself counts.
    start = now.timestamp() + 1e-6
    return datetime.fromtimestamp(croniter(schedule, start).get_prev(float), tz=now.tzinfo)


def next_instant(schedule: str, now: datetime) -> datetime:
    """The schedule's first instant after ``now``."""
    return datetime.fromtimestamp(croniter(schedule, now.timestamp()).get_next(float), tz=now.tzinfo)
