"""Tasks in the registry: an orchestration run once, on a cron schedule or continuously, as the user
who created it, in its workspace only (docs/workloads.md, "Orchestrations and tasks").

A run acts as the lesser of its task's owner and the uploader of the version it runs: a task left on
the latest version runs whatever a collaborator uploads next, which must not act with the owner's
rights (nor the owner's task with the rights of an admin who uploaded its code).

The registry writes a task and, for one run once or continuously, its first run; orchestrators fire
schedules, claim runs, and write their outcome and their lines of output in the same tables. A run's
token comes from here (IssueTaskToken, the service token only): scoped to the task's workspace, valid
while its run runs.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from psycopg.rows import DictRow

from joey_core import orchestrations as core
from joey_registry.access import Access, Action, Caller
from joey_registry.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from joey_registry.identity import Identity
from joey_registry.orchestrations import valid_name
from joey_registry.settings import RegistrySettings
from joey_registry.store import Store, WorkspaceRef

log = logging.getLogger(__name__)

MAX_ARGS_BYTES = 64 * 1024
MAX_RETRIES = 100
DEFAULT_RUNS = 20
MAX_RUNS = 10_000
DEFAULT_LOG_LINES = 1000
MAX_LOG_LINES = 10_000
TOKEN_MARGIN_S = 60
# What a user may do in a workspace, in order: a run's token acts as the lower of two users.
_RANKS = {"collaborator": 1, "owner": 2}
_ADMIN_RANK = 3


@dataclass(frozen=True)
class StoredRun:
    id: int
    attempt: int
    status: str
    instant: datetime | None
    started_at: datetime | None
    ended_at: datetime | None
    exit_code: int | None
    reason: str
    orchestrator: str
    orchestration_version: int | None
    created_at: datetime


@dataclass(frozen=True)
class StoredTask:
    workspace: str
    name: str
    orchestration: str
    orchestration_version: int | None
    kind: str
    schedule: str
    json_args: str
    timeout_s: float | None
    retries: int
    owner: str
    created_at: datetime
    status: str
    last_run: StoredRun | None
    next_run: datetime | None


@dataclass(frozen=True)
class LogLine:
    seq: int
    stream: str
    time: datetime
    line: str


_RUN_COLUMNS = (
    "id, attempt, status, instant, started_at, ended_at, exit_code, reason, orchestrator, "
    "orchestration_version, created_at"
)
_SELECT = (
    "SELECT t.id AS task_id, w.name AS workspace, t.name, t.orchestration, t.orchestration_version, t.kind, "
    "t.schedule, t.json_args, t.timeout_s, t.retries, t.owner, t.killed, t.created_at, "
    + ", ".join(f"r.{c} AS run_{c}" for c in _RUN_COLUMNS.split(", "))
    + " FROM tasks t JOIN workspaces w ON w.id = t.workspace_id LEFT JOIN LATERAL "
    f"(SELECT {_RUN_COLUMNS} FROM task_runs WHERE task_id = t.id ORDER BY id DESC LIMIT 1) r ON true "
)


def _run(row: DictRow, prefix: str = "") -> StoredRun:
    return StoredRun(**{c: row[prefix + c] for c in _RUN_COLUMNS.split(", ")})


def _task(row: DictRow) -> StoredTask:
    run = _run(row, "run_") if row["run_id"] is not None else None
    status = run.status if run else core.PENDING
    # A killed schedule or continuous task is killed once nothing runs; a task run once keeps its
    # run's outcome (its pending run, if any, was killed with it).
    if row["killed"] and row["kind"] != "once" and status != core.RUNNING:
        status = core.KILLED
    live_schedule = row["kind"] == "scheduled" and not row["killed"]
    return StoredTask(
        workspace=row["workspace"],
        name=row["name"],
        orchestration=row["orchestration"],
        orchestration_version=row["orchestration_version"],
        kind=row["kind"],
        schedule=row["schedule"],
        json_args=json.dumps(row["json_args"]),
        timeout_s=row["timeout_s"],
        retries=row["retries"],
        owner=row["owner"],
        created_at=row["created_at"],
        status=status,
        last_run=run,
        next_run=core.next_instant(row["schedule"], datetime.now(UTC)) if live_schedule else None,
    )


@dataclass(frozen=True)
class TaskDefinition:
    name: str
    orchestration: str
    orchestration_version: int
    kind: str
    schedule: str
    json_args: str
    timeout_s: float | None
    retries: int


class Tasks:
    def __init__(self, settings: RegistrySettings, store: Store, access: Access, identity: Identity) -> None:
        self._settings = settings
        self._pool = store.pool
        self._store = store
        self.access = access
        self._identity = identity

    def _check(self, definition: TaskDefinition) -> tuple[str, dict[str, object]]:
        if definition.kind not in core.KINDS:
            raise InvalidArgument(f"invalid task kind {definition.kind!r}: one of {', '.join(core.KINDS)}")
        schedule = ""
        if definition.kind == "scheduled":
            try:
                schedule = core.check_schedule(definition.schedule)
            except ValueError as exc:
                raise InvalidArgument(str(exc)) from None
        elif definition.schedule:
            raise InvalidArgument(f"a schedule is for scheduled tasks, not a task run {definition.kind}")
        if len(definition.json_args.encode()) > MAX_ARGS_BYTES:
            raise InvalidArgument(f"json_args is larger than {MAX_ARGS_BYTES} bytes")
        try:
            args = json.loads(definition.json_args or "{}")
        except ValueError as exc:
            raise InvalidArgument(f"json_args is not JSON: {exc}") from None
        if not isinstance(args, dict):
            raise InvalidArgument(f"json_args must be a JSON object, got {type(args).__name__}")
        if definition.timeout_s is not None and not definition.timeout_s > 0:
            raise InvalidArgument(f"timeout_s must be above 0 seconds, got {definition.timeout_s}")
        if not 0 <= definition.retries <= MAX_RETRIES:
            raise InvalidArgument(f"retries must be 0 to {MAX_RETRIES}, got {definition.retries}")
        if definition.orchestration_version < 0:
            raise InvalidArgument(
                f"orchestration_version must be 0 (latest) or above, got {definition.orchestration_version}"
            )
        return schedule, args

    def create(self, caller: Caller, workspace: str, definition: TaskDefinition) -> StoredTask:
        ws = self.access.authorize(caller, workspace, Action.WRITE)
        name = valid_name("task", definition.name)
        schedule, args = self._check(definition)
        user = self.access.user(caller)
        pinned = definition.orchestration_version or None
        with self._pool.connection() as conn, conn.transaction():
            found = conn.execute(
                "SELECT 1 FROM orchestrations WHERE workspace_id = %s AND name = %s "
                "AND (%s::int IS NULL OR version = %s::int) LIMIT 1",
                (ws.id, definition.orchestration, pinned, pinned),
            ).fetchone()
            if found is None:
                which = f" version {pinned}" if pinned else ""
                raise NotFound(
                    f"orchestration {definition.orchestration!r}{which} not found in workspace {ws.name!r}"
                )
            row = conn.execute(
                "INSERT INTO tasks (workspace_id, name, orchestration, orchestration_version, kind, "
                "schedule, json_args, timeout_s, retries, owner) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s::jsonb, %s, %s, %s) "
                "ON CONFLICT (workspace_id, name) DO NOTHING RETURNING id",
                (
                    ws.id,
                    name,
                    definition.orchestration,
                    pinned,
                    definition.kind,
                    schedule,
                    json.dumps(args),
                    definition.timeout_s,
                    definition.retries,
                    user.username,
                ),
            ).fetchone()
            if row is None:
                raise AlreadyExists(f"task {name!r} already exists in workspace {ws.name!r}")
            if definition.kind != "scheduled":
                conn.execute("INSERT INTO task_runs (task_id) VALUES (%s)", (row["id"],))
        log.info("created task %s/%s (%s of %s)", ws.name, name, definition.kind, definition.orchestration)
        return self._get(ws, name)

    def _find(self, ws: WorkspaceRef, name: str = "") -> list[DictRow]:
        with self._pool.connection() as conn:
            return conn.execute(
                _SELECT
                + "WHERE t.workspace_id = %(ws)s AND (%(name)s = '' OR t.name = %(name)s) ORDER BY t.name",
                {"ws": ws.id, "name": name},
            ).fetchall()

    def _get(self, ws: WorkspaceRef, name: str) -> StoredTask:
        found = self._find(ws, name) if name else []
        if not found:
            raise NotFound(f"task {name!r} not found in workspace {ws.name!r}")
        return _task(found[0])

    def list_all(self, caller: Caller, workspace: str) -> list[StoredTask]:
        return [_task(r) for r in self._find(self.access.authorize(caller, workspace, Action.READ))]

    def get(self, caller: Caller, workspace: str, name: str) -> StoredTask:
        return self._get(self.access.authorize(caller, workspace, Action.READ), name)

    def kill(self, caller: Caller, workspace: str, name: str) -> StoredTask:
        """No more runs; the pending ones are killed here, the running ones by their orchestrator."""
        ws = self.access.authorize(caller, workspace, Action.WRITE)
        with self._pool.connection() as conn, conn.transaction():
            row = conn.execute(
                "UPDATE tasks SET killed = true WHERE workspace_id = %s AND name = %s RETURNING id",
                (ws.id, name),
            ).fetchone()
            if row is None:
                raise NotFound(f"task {name!r} not found in workspace {ws.name!r}")
            conn.execute(
                "UPDATE task_runs SET status = 'killed', ended_at = now(), "
                "reason = 'killed before it started' WHERE task_id = %s AND status = 'pending'",
                (row["id"],),
            )
        log.info("killed task %s/%s", ws.name, name)
        return self._get(ws, name)

    def delete(self, caller: Caller, workspace: str, name: str) -> None:
        """Delete a task that runs nothing, with its runs and their logs."""
        ws = self.access.authorize(caller, workspace, Action.WRITE)
        with self._pool.connection() as conn, conn.transaction():
            row = conn.execute(
                "SELECT id, kind, killed, EXISTS (SELECT 1 FROM task_runs r WHERE r.task_id = t.id "
                "AND r.status IN ('pending', 'running')) AS live FROM tasks t "
                "WHERE workspace_id = %s AND name = %s FOR UPDATE",
                (ws.id, name),
            ).fetchone()
            if row is None:
                raise NotFound(f"task {name!r} not found in workspace {ws.name!r}")
            # A schedule or a continuous task would run again by itself.
            if row["live"] or (row["kind"] != "once" and not row["killed"]):
                raise FailedPrecondition(
                    f"task {name!r} may still run: kill it first (`joey task kill {name}`)"
                )
            conn.execute("DELETE FROM tasks WHERE id = %s", (row["id"],))
        log.info("deleted task %s/%s", ws.name, name)

    def runs(self, caller: Caller, workspace: str, name: str, limit: int) -> list[StoredRun]:
        ws = self.access.authorize(caller, workspace, Action.READ)
        if not 0 <= limit <= MAX_RUNS:
            raise InvalidArgument(f"limit must be 0 (= {DEFAULT_RUNS}) to {MAX_RUNS}, got {limit}")
        task_id = self._task_id(ws, name)
        with self._pool.connection() as conn:
            rows = conn.execute(
                f"SELECT {_RUN_COLUMNS} FROM task_runs WHERE task_id = %s ORDER BY id DESC LIMIT %s",
                (task_id, limit or DEFAULT_RUNS),
            ).fetchall()
        return [_run(r) for r in rows]

    def _task_id(self, ws: WorkspaceRef, name: str) -> int:
        with self._pool.connection() as conn:
            row = conn.execute(
                "SELECT id FROM tasks WHERE workspace_id = %s AND name = %s", (ws.id, name)
            ).fetchone()
        if row is None:
            raise NotFound(f"task {name!r} not found in workspace {ws.name!r}")
        return int(row["id"])

    def logs(
        self, caller: Caller, workspace: str, task: str, run_id: int, after_seq: int, limit: int
    ) -> tuple[int, list[LogLine], bool]:
        """The run's lines after ``after_seq`` (run 0: the latest), and whether the run has ended and
        these were its last."""
        ws = self.access.authorize(caller, workspace, Action.READ)
        if not 0 <= limit <= MAX_LOG_LINES:
            raise InvalidArgument(f"limit must be 0 (= {DEFAULT_LOG_LINES}) to {MAX_LOG_LINES}, got {limit}")
        limit = limit or DEFAULT_LOG_LINES
        task_id = self._task_id(ws, task)
        with self._pool.connection() as conn:
            run = conn.execute(
                "SELECT id, status FROM task_runs WHERE task_id = %s AND (%s = 0 OR id = %s) "
                "ORDER BY id DESC LIMIT 1",
                (task_id, run_id, run_id),
            ).fetchone()
            if run is None:
                raise NotFound(
                    f"task {task!r} has no run {run_id}" if run_id else f"task {task!r} has not run yet"
                )
            # The status first: an ended run wrote every line before it ended.
            rows = conn.execute(
                "SELECT seq, stream, time, line FROM task_run_logs WHERE run_id = %s AND seq > %s "
                "ORDER BY seq LIMIT %s",
                (run["id"], after_seq, limit),
            ).fetchall()
        lines = [LogLine(**r) for r in rows]
        return run["id"], lines, run["status"] in core.ENDED and len(lines) < limit

    # --- the orchestrators' calls (service token) ---

    def _service(self, caller: Caller) -> None:
        if not caller.is_service:
            raise PermissionDenied("only orchestrators (the service token) issue and revoke task tokens")

    def issue_token(self, caller: Caller, run_id: int) -> tuple[str, datetime, str]:
        """A token for running run ``run_id``, in its task's workspace only: the lesser of its task's
        owner and the uploader of the version it runs (the orchestrator records it before asking)."""
        self._service(caller)
        with self._pool.connection() as conn:
            row = conn.execute(
                "SELECT r.status, r.orchestration_version AS version, t.owner, t.orchestration, t.timeout_s, "
                "w.name AS workspace, o.created_by AS uploader FROM task_runs r "
                "JOIN tasks t ON t.id = r.task_id JOIN workspaces w ON w.id = t.workspace_id "
                "LEFT JOIN orchestrations o ON o.workspace_id = t.workspace_id "
                "AND o.name = t.orchestration AND o.version = r.orchestration_version WHERE r.id = %s",
                (run_id,),
            ).fetchone()
        if row is None or row["status"] != core.RUNNING:
            raise FailedPrecondition(f"run {run_id} is not running")
        if not row["uploader"]:
            raise FailedPrecondition(
                f"run {run_id} has no known uploader of the version it runs "
                f"({row['orchestration']!r} version {row['version']})"
            )
        ws = self.access.authorize(caller, row["workspace"], Action.RUN_TASK)
        acting = self._lesser(ws.name, row["owner"], row["uploader"])
        lifetime = row["timeout_s"] + TOKEN_MARGIN_S if row["timeout_s"] else self._settings.task_token_ttl_s
        expires_at = datetime.now(UTC) + timedelta(seconds=lifetime)
        token = self._identity.issue_task_token(acting, run_id, ws, expires_at)
        log.info("issued the token of run %d of a task of %s (as %s)", run_id, ws.name, acting)
        return token, expires_at, ws.name

    def _lesser(self, workspace: str, owner: str, uploader: str) -> str:
        """Of the task's owner and the version's uploader, who may do less in ``workspace`` (the owner
        when equal); refused when that one may do nothing there any more."""
        rank, _, name = min(
            (self._rank(workspace, name), i, name) for i, name in enumerate((owner, uploader))
        )
        if rank == 0:
            which = "task's owner" if name == owner else "uploader of the version it runs"
            raise FailedPrecondition(
                f"the {which}, {name!r}, is no longer an active member of workspace {workspace!r}"
            )
        return name

    def _rank(self, workspace: str, username: str) -> int:
        user = self._identity.store.user(username)
        if user is None or not user.active:
            return 0
        if user.admin:
            return _ADMIN_RANK
        found = self._store.workspace_role(workspace, username)
        return _RANKS.get(found[1] or "", 0) if found else 0

    def revoke_token(self, caller: Caller, run_id: int) -> None:
        self._service(caller)
        self._identity.store.revoke_run_tokens(run_id)
