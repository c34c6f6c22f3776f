"""Orchestrations in the registry: versions of a zip of Python code (main.py, an optional
requirements.txt, any files), stored by sha256 in the artifact store beside models, packaged and run by
orchestrator processes (docs/workloads.md, "Orchestrations and tasks").

The registry never extracts nor runs an orchestration: it checks the zip's central directory (names,
links, sizes, main.py) and stores it. Members list, read and download versions; collaborators and
owners upload and delete. Orchestrators download with the service token.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime

from psycopg.rows import DictRow

from joey_core import orchestrations as core
from joey_core import topics
from joey_registry.access import Access, Action, Caller
from joey_registry.artifacts import ArtifactStore, spooled
from joey_registry.errors import FailedPrecondition, InvalidArgument, NotFound
from joey_registry.settings import RegistrySettings
from joey_registry.store import Store, WorkspaceRef, lock_artifact

log = logging.getLogger(__name__)

DOWNLOAD_CHUNK_BYTES = 1024 * 1024
_LOCKS = 0x6F726368
"""First key of the advisory locks numbering a name's versions: 'orch'."""


@dataclass(frozen=True)
class StoredOrchestration:
    workspace: str
    name: str
    version: int
    sha256: str
    size_bytes: int
    files: int
    status: str
    packaging_log: str
    packaged_by: str
    packaged_at: datetime | None
    created_by: str
    created_at: datetime


_SELECT = (
    "SELECT w.name AS workspace, o.name, o.version, o.sha256, o.size_bytes, o.files, o.status, "
    "o.packaging_log, o.packaged_by, o.packaged_at, o.created_by, o.created_at "
    "FROM orchestrations o JOIN workspaces w ON w.id = o.workspace_id "
)


def _stored(row: DictRow) -> StoredOrchestration:
    return StoredOrchestration(**row)


def valid_name(kind: str, name: str) -> str:
    try:
        return topics.validate_name(kind, name)
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from None


class Orchestrations:
    def __init__(
        self, settings: RegistrySettings, store: Store, access: Access, artifacts: ArtifactStore
    ) -> None:
        self._settings = settings
        self._pool = store.pool
        self._store = store
        self.access = access
        self._artifacts = artifacts
        self._limits = core.ZipLimits(
            settings.max_orchestration_files, settings.max_orchestration_unpacked_bytes
        )

    def upload(
        self, caller: Caller, workspace: str, name: str, chunks: Iterable[bytes]
    ) -> StoredOrchestration:
        """Spool and check the zip, then store it and its new version together (or neither)."""
        ws = self.access.authorize(caller, workspace, Action.WRITE)
        name = valid_name("orchestration", name)
        user = self.access.user(caller)
        limit = self._settings.max_orchestration_bytes
        with spooled(chunks, self._artifacts.staging_dir(), limit, "JOEY_MAX_ORCHESTRATION_BYTES") as (
            path,
            sha256,
            size,
        ):
            try:
                summary = core.check_zip(path, self._limits)
            except core.BadZip as exc:
                raise InvalidArgument(
                    f"bad orchestration zip for {name!r}: {exc}; nothing was stored"
                ) from None
            stored_new = False
            try:
                with self._pool.connection() as conn, conn.transaction():
                    conn.execute(
                        "SELECT pg_advisory_xact_lock(%s::int4, hashtext(%s))", (_LOCKS, f"{ws.id}/{name}")
                    )
                    lock_artifact(conn, sha256)
                    row = conn.execute(
                        "INSERT INTO orchestrations (workspace_id, name, version, sha256, size_bytes, files, "
                        "created_by) SELECT %(ws)s, %(name)s, COALESCE(MAX(version), 0) + 1, %(sha)s, "
                        "%(size)s, %(files)s, %(user)s FROM orchestrations "
                        "WHERE workspace_id = %(ws)s AND name = %(name)s RETURNING version",
                        {
                            "ws": ws.id,
                            "name": name,
                            "sha": sha256,
                            "size": size,
                            "files": summary.files,
                            "user": user.username,
                        },
                    ).fetchone()
                    assert row is not None
                    stored_new = self._artifacts.put(sha256, path)
            except BaseException:
                if stored_new:
                    self._store.remove_artifacts([sha256], self._artifacts.delete)
                raise
        log.info(
            "stored orchestration %s/%s version %d (%s, %d bytes)",
            ws.name,
            name,
            row["version"],
            sha256,
            size,
        )
        return self._get(ws, name, row["version"])

    def list_all(self, caller: Caller, workspace: str) -> list[StoredOrchestration]:
        """The latest version of each orchestration."""
        ws = self.access.authorize(caller, workspace, Action.READ)
        with self._pool.connection() as conn:
            rows = conn.execute(
                _SELECT
                + "WHERE o.workspace_id = %s AND o.version = (SELECT MAX(version) FROM orchestrations "
                "x WHERE x.workspace_id = o.workspace_id AND x.name = o.name) ORDER BY o.name",
                (ws.id,),
            ).fetchall()
        return [_stored(r) for r in rows]

    def get(self, caller: Caller, workspace: str, name: str, version: int) -> StoredOrchestration:
        ws = self.access.authorize(caller, workspace, Action.READ)
        return self._get(ws, name, version)

    def _get(self, ws: WorkspaceRef, name: str, version: int) -> StoredOrchestration:
        if version < 0:
            raise InvalidArgument(f"version must be a positive number or 0 for the latest, got {version}")
        with self._pool.connection() as conn:
            row = conn.execute(
                _SELECT + "WHERE o.workspace_id = %s AND o.name = %s AND (%s = 0 OR o.version = %s) "
                "ORDER BY o.version DESC LIMIT 1",
                (ws.id, name, version, version),
            ).fetchone()
        if row is None:
            which = f" version {version}" if version else ""
            raise NotFound(f"orchestration {name!r}{which} not found in workspace {ws.name!r}")
        return _stored(row)

    def zip_chunks(self, caller: Caller, workspace: str, name: str, version: int) -> Iterator[bytes]:
        """A version's zip: for members, and for orchestrators (the service token)."""
        action = Action.RUN_TASK if caller.is_service else Action.READ
        found = self._get(self.access.authorize(caller, workspace, action), name, version)
        return self._artifacts.read_chunks(found.sha256, DOWNLOAD_CHUNK_BYTES)

    def delete(self, caller: Caller, workspace: str, name: str) -> int:
        """Delete every version; refused while a task of the workspace uses it. How many versions."""
        ws = self.access.authorize(caller, workspace, Action.WRITE)
        with self._pool.connection() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s::int4, hashtext(%s))", (_LOCKS, f"{ws.id}/{name}"))
            users = conn.execute(
                "SELECT name FROM tasks WHERE workspace_id = %s AND orchestration = %s ORDER BY name",
                (ws.id, name),
            ).fetchall()
            if users:
                tasks = ", ".join(repr(r["name"]) for r in users)
                raise FailedPrecondition(
                    f"orchestration {name!r} is used by tasks {tasks}: delete them first "
                    f"(`joey task delete {users[0]['name']}`)"
                )
            rows = conn.execute(
                "DELETE FROM orchestrations WHERE workspace_id = %s AND name = %s RETURNING sha256",
                (ws.id, name),
            ).fetchall()
        if not rows:
            raise NotFound(f"orchestration {name!r} not found in workspace {ws.name!r}")
        self._store.remove_artifacts(sorted({r["sha256"] for r in rows}), self._artifacts.delete)
        log.info("deleted orchestration %s/%s (%d versions)", ws.name, name, len(rows))
        return len(rows)
