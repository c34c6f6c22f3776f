"""The orchestrator's Postgres (Joey's own database): orchestrations to package, schedules to fire,
runs to claim, renew, finish or take back from a dead orchestrator, and the lines runs print.

Every orchestrator runs the same statements; locks decide who does what. A version is packaged under
an advisory lock of its id (held by the session while the environment builds: an orchestrator that dies
lets it go). A pending run is claimed by one (FOR UPDATE SKIP LOCKED) and leased: the claimer
renews the lease while the run runs, and any orchestrator fails a run whose lease ran out. A schedule's
instant is one row (unique on task, instant, attempt): whoever inserts it first fires it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import DictRow, dict_row
from psycopg_pool import ConnectionPool

from joey_core import orchestrations as core

log = logging.getLogger(__name__)

Connection = psycopg.Connection[DictRow]


@dataclass(frozen=True)
class PackagingJob:
    id: int
    workspace: str
    name: str
    version: int
    sha256: str


@dataclass(frozen=True)
class ClaimedRun:
    id: int
    task_id: int
    attempt: int
    workspace: str
    task: str
    kind: str
    orchestration: str
    orchestration_version: int | None
    json_args: Any
    timeout_s: float | None


@dataclass(frozen=True)
class Version:
    version: int
    sha256: str
    status: str
    packaging_log: str


@dataclass(frozen=True)
class Backoff:
    """Delays before a run's follow-up: a retry of a failed run, the next run of a continuous task."""

    retry_s: float
    retry_max_s: float
    continuous_s: float
    continuous_max_s: float

    def retry(self, attempt: int) -> float:
        return float(min(self.retry_max_s, self.retry_s * 2 ** (attempt - 1)))

    def continuous(self, failures_in_a_row: int) -> float:
        return float(min(self.continuous_max_s, self.continuous_s * 2**failures_in_a_row))


_RETRIED = (core.FAILURE, core.TIMED_OUT)
PACKAGING_LOCKS = 0x4A4F  # "JO": the first key of the advisory locks of versions being packaged
_CLAIM = """
WITH candidate AS (
    SELECT r.id FROM task_runs r JOIN tasks t ON t.id = r.task_id
    WHERE r.status = 'pending' AND r.not_before <= now() AND NOT t.killed
      AND NOT EXISTS (SELECT 1 FROM task_runs x WHERE x.task_id = r.task_id AND x.status = 'running')
      -- The version it will run is known: the pinned one, or the latest, is no longer packaging.
      AND (SELECT o.status FROM orchestrations o WHERE o.workspace_id = t.workspace_id
           AND o.name = t.orchestration
           AND (t.orchestration_version IS NULL OR o.version = t.orchestration_version)
           ORDER BY o.version DESC LIMIT 1) <> 'packaging'
    ORDER BY r.not_before, r.id LIMIT 1 FOR UPDATE OF r SKIP LOCKED
)
UPDATE task_runs r SET status = 'running', orchestrator = %(me)s, started_at = now(),
    lease_until = now() + make_interval(secs => %(lease)s)
FROM candidate c, tasks t, workspaces w
WHERE r.id = c.id AND t.id = r.task_id AND w.id = t.workspace_id
RETURNING r.id, r.task_id, r.attempt, w.name AS workspace, t.name AS task, t.kind, t.orchestration,
    t.orchestration_version, t.json_args, t.timeout_s
"""


class OrchestratorStore:
    def __init__(self, url: str, instance: str, lease_s: float, backoff: Backoff) -> None:
        self._url = url
        self._instance = instance
        self._lease_s = lease_s
        self._backoff = backoff
        self._pool: ConnectionPool[Connection] = ConnectionPool(
            url, min_size=1, max_size=8, open=False, kwargs={"row_factory": dict_row}
        )

    def open(self) -> None:
        self._pool.open(wait=True, timeout=30)

    def close(self) -> None:
        self._pool.close()

    # --- packaging ---

    @contextmanager
    def packaging(self) -> Iterator[tuple[PackagingJob, Connection] | None]:
        """The oldest version still packaging that no other orchestrator is packaging, locked until the
        block ends (on its own connection: a build may take minutes); None when there is none."""
        with self._pool.connection() as pooled:
            waiting = pooled.execute(
                "SELECT EXISTS (SELECT 1 FROM orchestrations WHERE status = 'packaging')"
            )
            if not waiting.fetchone()["exists"]:  # type: ignore[index]
                yield None
                return
        # An advisory lock of the session, not a row lock: a row lock gives the transaction an id for
        # the whole build, and an open transaction with an id holds back every Postgres source of the
        # server (it hands over only rows older than every transaction still running).
        with psycopg.connect(self._url, row_factory=dict_row, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT o.id, w.name AS workspace, o.name, o.version, o.sha256 FROM orchestrations o "
                "JOIN workspaces w ON w.id = o.workspace_id WHERE o.status = 'packaging' ORDER BY o.id"
            ).fetchall()
            for row in rows:
                locked = conn.execute(
                    "SELECT pg_try_advisory_lock(%s::int4, %s::int4) AS locked",
                    (PACKAGING_LOCKS, row["id"] % 2**31),
                ).fetchone()
                if not locked or not locked["locked"]:
                    continue
                # Packaged by another between the listing and the lock: its status says so now.
                still = conn.execute(
                    "SELECT status = 'packaging' AS waiting FROM orchestrations WHERE id = %s", (row["id"],)
                ).fetchone()
                if still and still["waiting"]:
                    yield PackagingJob(**row), conn
                    return
                conn.execute(
                    "SELECT pg_advisory_unlock(%s::int4, %s::int4)", (PACKAGING_LOCKS, row["id"] % 2**31)
                )
            yield None

    def packaged(self, conn: Connection, job: PackagingJob, status: str, packaging_log: str) -> None:
        conn.execute(
            "UPDATE orchestrations SET status = %s, packaging_log = %s, packaged_by = %s, "
            "packaged_at = now() WHERE id = %s",
            (status, packaging_log, self._instance, job.id),
        )

    def version(self, run: ClaimedRun) -> Version | None:
        """The version a run runs: the pinned one, else the latest ready one; recorded in the run (its
        token acts for the version's uploader at most: joey_registry.tasks)."""
        with self._pool.connection() as conn:
            row = conn.execute(
                "SELECT o.version, o.sha256, o.status, o.packaging_log FROM orchestrations o "
                "JOIN tasks t ON t.workspace_id = o.workspace_id AND t.orchestration = o.name "
                "WHERE t.id = %s AND (t.orchestration_version = o.version OR "
                "(t.orchestration_version IS NULL AND o.status = 'ready')) ORDER BY o.version DESC LIMIT 1",
                (run.task_id,),
            ).fetchone()
            if row is not None:
                conn.execute(
                    "UPDATE task_runs SET orchestration_version = %s WHERE id = %s", (row["version"], run.id)
                )
        return Version(**row) if row else None

    # --- schedules ---

    def fire_schedules(self, catch_up: bool, grace_s: float) -> int:
        """Insert the run of each schedule's latest instant not fired yet; how many this call fired. An
        instant is skipped while the task has a run waiting (runs of one task never overlap) and, without
        ``catch_up``, once it is more than ``grace_s`` old (the orchestrators were down)."""
        fired = 0
        with self._pool.connection() as conn:
            now: datetime = conn.execute("SELECT now() AS now").fetchone()["now"]  # type: ignore[index]
            tasks = conn.execute(
                "SELECT t.id, t.schedule, t.created_at, "
                "(SELECT max(instant) FROM task_runs r WHERE r.task_id = t.id) AS last, "
                "EXISTS (SELECT 1 FROM task_runs r WHERE r.task_id = t.id AND r.status = 'pending') "
                "AS queued "
                "FROM tasks t WHERE t.kind = 'scheduled' AND NOT t.killed"
            ).fetchall()
        for task in tasks:
            instant = core.latest_instant(task["schedule"], now)
            if instant < task["created_at"] or (task["last"] is not None and instant <= task["last"]):
                continue
            if task["queued"] or (not catch_up and (now - instant).total_seconds() > grace_s):
                continue
            with self._pool.connection() as conn:
                inserted = conn.execute(
                    "INSERT INTO task_runs (task_id, instant) SELECT id, %s FROM tasks "
                    "WHERE id = %s AND NOT killed ON CONFLICT DO NOTHING RETURNING id",
                    (instant, task["id"]),
                ).fetchone()
            if inserted:
                fired += 1
                log.info("task %d fired for %s (run %d)", task["id"], instant.isoformat(), inserted["id"])
        return fired

    # --- runs ---

    def claim(self) -> ClaimedRun | None:
        try:
            with self._pool.connection() as conn:
                row = conn.execute(_CLAIM, {"me": self._instance, "lease": self._lease_s}).fetchone()
        except psycopg.errors.UniqueViolation:
            # Another orchestrator claimed a run of the same task meanwhile (task_runs_one_running).
            return None
        return ClaimedRun(**row) if row else None

    def renew(self, run_id: int) -> bool | None:
        """Renew the run's lease: whether its task was killed, or None when the run is no longer ours
        (its lease ran out and another orchestrator failed it)."""
        with self._pool.connection() as conn:
            row = conn.execute(
                "UPDATE task_runs r SET lease_until = now() + make_interval(secs => %s) FROM tasks t "
                "WHERE r.id = %s AND r.status = 'running' AND r.orchestrator = %s AND t.id = r.task_id "
                "RETURNING t.killed",
                (self._lease_s, run_id, self._instance),
            ).fetchone()
        return None if row is None else bool(row["killed"])

    def append_logs(self, run_id: int, first_seq: int, lines: Sequence[tuple[str, datetime, str]]) -> None:
        with self._pool.connection() as conn, conn.cursor() as cursor:
            cursor.executemany(
                "INSERT INTO task_run_logs (run_id, seq, stream, time, line) VALUES (%s, %s, %s, %s, %s) "
                "ON CONFLICT DO NOTHING",
                [(run_id, first_seq + i, stream, at, line) for i, (stream, at, line) in enumerate(lines)],
            )
            cursor.execute(
                "UPDATE task_runs SET log_lines = %s WHERE id = %s", (first_seq + len(lines) - 1, run_id)
            )

    def finish(self, run_id: int, status: str, exit_code: int | None, reason: str) -> bool:
        """Record the run's end and queue what follows it; False when it was no longer ours."""
        with self._pool.connection() as conn, conn.transaction():
            row = conn.execute(
                "UPDATE task_runs SET status = %s, exit_code = %s, reason = %s, ended_at = now(), "
                "lease_until = NULL WHERE id = %s AND status = 'running' AND orchestrator = %s "
                "RETURNING task_id, attempt, instant",
                (status, exit_code, reason, run_id, self._instance),
            ).fetchone()
            if row is None:
                return False
            self._follow_up(conn, row, status)
        return True

    def reap(self) -> list[int]:
        """Fail the runs whose orchestrator stopped renewing their lease (it died, or lost the database),
        and queue what follows each; their ids."""
        reaped = []
        with self._pool.connection() as conn, conn.transaction():
            rows = conn.execute(
                "SELECT id, task_id, attempt, instant, orchestrator FROM task_runs "
                "WHERE status = 'running' AND lease_until < now() FOR UPDATE SKIP LOCKED"
            ).fetchall()
            for row in rows:
                reason = (
                    f"orchestrator {row['orchestrator']} stopped renewing the run's lease "
                    f"({self._lease_s:g} s): it died or lost the database"
                )
                conn.execute(
                    "UPDATE task_runs SET status = 'failure', reason = %s, ended_at = now(), "
                    "lease_until = NULL WHERE id = %s",
                    (reason, row["id"]),
                )
                self._follow_up(conn, row, core.FAILURE)
                reaped.append(row["id"])
                log.warning("run %d failed: %s", row["id"], reason)
        return reaped

    def prune(self, keep: int) -> int:
        """Delete the ended runs (their lines and tokens with them) of one task past its latest ``keep``
        runs, under the task's row lock (another orchestrator prunes another task meanwhile); how many
        runs, 0 when no task has any to delete."""
        with self._pool.connection() as conn, conn.transaction():
            task = conn.execute(
                "SELECT t.id, c.cutoff FROM tasks t CROSS JOIN LATERAL (SELECT r.id AS cutoff "
                "FROM task_runs r WHERE r.task_id = t.id ORDER BY r.id DESC OFFSET %s LIMIT 1) c "
                "WHERE EXISTS (SELECT 1 FROM task_runs r WHERE r.task_id = t.id AND r.id < c.cutoff "
                "AND r.status NOT IN ('pending', 'running')) "
                "ORDER BY t.id LIMIT 1 FOR UPDATE OF t SKIP LOCKED",
                (keep - 1,),
            ).fetchone()
            if task is None:
                return 0
            deleted = conn.execute(
                "DELETE FROM task_runs WHERE task_id = %s AND id < %s "
                "AND status NOT IN ('pending', 'running')",
                (task["id"], task["cutoff"]),
            ).rowcount
        log.info("deleted %d old runs of task %d", deleted, task["id"])
        return deleted

    def _follow_up(self, conn: Connection, run: DictRow, status: str) -> None:
        task = conn.execute(
            "SELECT kind, retries, killed FROM tasks WHERE id = %s FOR UPDATE", (run["task_id"],)
        ).fetchone()
        if task is None or task["killed"]:
            return
        if task["kind"] == "continuous":
            recent = conn.execute(
                "SELECT status FROM task_runs WHERE task_id = %s AND status <> 'pending' "
                "ORDER BY id DESC LIMIT 10",
                (run["task_id"],),
            ).fetchall()
            failures = next((i for i, r in enumerate(recent) if r["status"] == core.SUCCESS), len(recent))
            delay = self._backoff.continuous(failures)
            conn.execute(
                "INSERT INTO task_runs (task_id, not_before) VALUES (%s, now() + make_interval(secs => %s))",
                (run["task_id"], delay),
            )
        elif status in _RETRIED and run["attempt"] <= task["retries"]:
            delay = self._backoff.retry(run["attempt"])
            conn.execute(
                "INSERT INTO task_runs (task_id, attempt, instant, not_before) "
                "VALUES (%s, %s, %s, now() + make_interval(secs => %s)) ON CONFLICT DO NOTHING",
                (run["task_id"], run["attempt"] + 1, run["instant"], delay),
            )
