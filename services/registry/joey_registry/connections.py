"""Data connections in the registry: stored per workspace with their secrets sealed, shared with other
workspaces, and tested on demand (docs/workloads.md, "Connections").

Who may do what (access.py's rules, per workspace):

- members of a workspace list its connections (its own and those shared with it, redacted) and read
  one's details in full; collaborators and owners also create, delete (its own) and test them;
- sharing a connection with another workspace hands its secrets to that workspace's members, so it
  takes an owner of the connection's workspace who may write in the other one;
- either side's owners may remove a share.

A workspace sees each name once: a connection cannot be created or shared under a name the workspace
already sees.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import DictRow
from psycopg.types.json import Jsonb

from joey_core import topics
from joey_core.connections import (
    InvalidDetails,
    Report,
    Sealer,
    SecretKeyError,
    TestPolicy,
    connection_type,
    secret_paths,
    secret_values,
)
from joey_registry.access import Access, Action, Caller
from joey_registry.connection_tests import ConnectionTests
from joey_registry.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from joey_registry.settings import RegistrySettings, secret_keys
from joey_registry.store import Store, WorkspaceRef

log = logging.getLogger(__name__)

MAX_DETAILS_BYTES = 64 * 1024


@dataclass(frozen=True)
class StoredConnection:
    workspace: str
    """The workspace it belongs to."""
    name: str
    type: str
    details: dict[str, Any]
    """Redacted, unless read with :meth:`Connections.get`."""
    created_by: str
    created_at: datetime
    shared_with: tuple[str, ...] = ()
    """The workspaces it is added to: shown to its own workspace's members only."""


_SELECT = (
    "SELECT c.id, w.name AS workspace, c.name, c.type, c.details, c.secrets, c.created_by, c.created_at, "
    "ARRAY(SELECT sw.name FROM connection_shares s JOIN workspaces sw ON sw.id = s.workspace_id "
    "WHERE s.connection_id = c.id ORDER BY sw.name) AS shared_with "
    "FROM connections c JOIN workspaces w ON w.id = c.workspace_id "
)
# What workspace %(ws)s sees: its own connections and those shared with it.
_SEEN = (
    "(c.workspace_id = %(ws)s OR EXISTS (SELECT 1 FROM connection_shares s "
    "WHERE s.connection_id = c.id AND s.workspace_id = %(ws)s))"
)


def _stored(row: DictRow, ws: WorkspaceRef, details: dict[str, Any] | None = None) -> StoredConnection:
    own = row["workspace"] == ws.name
    return StoredConnection(
        row["workspace"],
        row["name"],
        row["type"],
        details if details is not None else row["details"],
        row["created_by"],
        row["created_at"],
        tuple(row["shared_with"]) if own else (),
    )


class ConnectionStore:
    """The SQL of the connections and connection_shares tables."""

    def __init__(self, store: Store) -> None:
        self._pool = store.pool

    @contextmanager
    def _names_of(self, ws: WorkspaceRef) -> Iterator[psycopg.Connection[DictRow]]:
        """A transaction holding the names ``ws`` sees still: creates and shares into it wait."""
        with self._pool.connection() as conn:
            conn.execute("SELECT id FROM workspaces WHERE id = %s FOR NO KEY UPDATE", (ws.id,))
            yield conn

    def _seen(self, conn: psycopg.Connection[DictRow], ws: WorkspaceRef, name: str) -> DictRow | None:
        return conn.execute(
            _SELECT + f"WHERE {_SEEN} AND c.name = %(name)s", {"ws": ws.id, "name": name}
        ).fetchone()

    def insert(
        self, ws: WorkspaceRef, name: str, kind: str, public: dict[str, Any], sealed: bytes | None, by: str
    ) -> bool:
        with self._names_of(ws) as conn:
            if self._seen(conn, ws, name) is not None:
                return False
            conn.execute(
                "INSERT INTO connections (workspace_id, name, type, details, secrets, created_by) "
                "VALUES (%s, %s, %s, %s, %s, %s)",
                (ws.id, name, kind, Jsonb(public), sealed, by),
            )
        return True

    def find(self, ws: WorkspaceRef, name: str = "") -> list[DictRow]:
        with self._pool.connection() as conn:
            return conn.execute(
                _SELECT + f"WHERE {_SEEN} AND (%(name)s = '' OR c.name = %(name)s) ORDER BY c.name",
                {"ws": ws.id, "name": name},
            ).fetchall()

    def delete(self, ws: WorkspaceRef, name: str) -> list[str] | None:
        """Delete ``ws``'s connection ``name``: None when it has none, else the bridges (``workspace/name``)
        using it, which refuse the delete (nothing deleted) unless there are none."""
        with self._pool.connection() as conn:
            # Locked first: a bridge being created on it (which holds it FOR KEY SHARE) commits before
            # the bridges are looked for, and none can be created until this transaction ends.
            row = conn.execute(
                "SELECT id FROM connections WHERE workspace_id = %s AND name = %s FOR UPDATE", (ws.id, name)
            ).fetchone()
            if row is None:
                return None
            users = self.bridges_of(conn, row["id"])
            if not users:
                conn.execute("DELETE FROM connections WHERE id = %s", (row["id"],))
            return users

    @staticmethod
    def bridges_of(
        conn: psycopg.Connection[DictRow], connection_id: int, only: int | None = None
    ) -> list[str]:
        """The bridges using connection ``connection_id``: in its workspace, and in those it is shared
        with (only workspace ``only``, when given)."""
        rows = conn.execute(
            "SELECT w.name || '/' || b.name AS bridge FROM bridges b "
            "JOIN workspaces w ON w.id = b.workspace_id "
            "JOIN connections c ON c.name = b.connection AND c.id = %(id)s "
            "WHERE (b.workspace_id = c.workspace_id OR b.workspace_id IN "
            "(SELECT s.workspace_id FROM connection_shares s WHERE s.connection_id = c.id)) "
            "AND (%(only)s::bigint IS NULL OR b.workspace_id = %(only)s) ORDER BY 1",
            {"id": connection_id, "only": only},
        ).fetchall()
        return [r["bridge"] for r in rows]

    def hold(self, conn: psycopg.Connection[DictRow], ws: WorkspaceRef, name: str) -> bool:
        """Lock connection ``name`` as ``ws`` sees it against deletion until ``conn``'s transaction
        ends (a bridge is being created on it); False when ``ws`` sees none."""
        row = conn.execute(
            "SELECT c.id FROM connections c WHERE " + _SEEN + " AND c.name = %(name)s FOR KEY SHARE OF c",
            {"ws": ws.id, "name": name},
        ).fetchone()
        return row is not None

    def share(self, owner: WorkspaceRef, name: str, target: WorkspaceRef, by: str) -> str:
        """'added', 'missing' (no such connection in ``owner``), or 'taken' (``target`` sees the name)."""
        with self._names_of(target) as conn:
            # Held until commit: a deletion of the connection waits, rather than leave a share of nothing.
            row = conn.execute(
                "SELECT id FROM connections WHERE workspace_id = %s AND name = %s FOR KEY SHARE",
                (owner.id, name),
            ).fetchone()
            if row is None:
                return "missing"
            if self._seen(conn, target, name) is not None:
                return "taken"
            conn.execute(
                "INSERT INTO connection_shares (connection_id, workspace_id, added_by) VALUES (%s, %s, %s)",
                (row["id"], target.id, by),
            )
        return "added"

    def unshare(self, target: WorkspaceRef, name: str) -> list[str] | None:
        """Remove the share of ``name`` with ``target``: None when there is none, else the bridges of
        ``target`` using it, which refuse the removal unless there are none."""
        with self._pool.connection() as conn:
            row = conn.execute(
                "SELECT c.id FROM connections c JOIN connection_shares s ON s.connection_id = c.id "
                "WHERE s.workspace_id = %s AND c.name = %s FOR UPDATE OF c",
                (target.id, name),
            ).fetchone()
            if row is None:
                return None
            users = self.bridges_of(conn, row["id"], only=target.id)
            if users:
                return users
            conn.execute(
                "DELETE FROM connection_shares s USING connections c WHERE s.connection_id = c.id "
                "AND s.workspace_id = %s AND c.name = %s",
                (target.id, name),
            )
            return []

    def reseal(self, reseal: Any) -> int:
        """Every sealed row sealed again by ``reseal`` (the first key's turn); the number of rows."""
        with self._pool.connection() as conn:
            rows = conn.execute(
                "SELECT id, secrets FROM connections WHERE secrets IS NOT NULL FOR UPDATE"
            ).fetchall()
            for row in rows:
                conn.execute(
                    "UPDATE connections SET secrets = %s WHERE id = %s", (reseal(row["secrets"]), row["id"])
                )
        return len(rows)


def _in_use(name: str, bridges: list[str], done: str) -> str:
    shown = ", ".join(bridges[:10]) + (f" and {len(bridges) - 10} more" if len(bridges) > 10 else "")
    return f"connection {name!r} cannot be {done}: bridges use it ({shown}); delete them first"


def _details_json(raw: Mapping[str, Any]) -> None:
    if len(json.dumps(raw, default=str)) > MAX_DETAILS_BYTES:
        raise InvalidArgument(f"details are over {MAX_DETAILS_BYTES // 1024} KiB")


class Connections:
    """Connection operations; each authorizes the caller first."""

    def __init__(self, settings: RegistrySettings, store: Store, access: Access) -> None:
        self.sql = ConnectionStore(store)
        self.access = access
        keys = secret_keys(settings.secret_key)
        self._sealer = Sealer(keys) if keys else None
        self._rotating = len(keys) > 1
        self.tests = ConnectionTests(
            TestPolicy.of(
                settings.connection_test_hosts.split(","), settings.connection_test_dirs.split(",")
            ),
            settings.connection_test_timeout_s,
            settings.connection_test_concurrency,
        )

    def reseal(self) -> int:
        """With several keys (a rotation), seal every connection's secrets under the first; rows re-sealed."""
        if self._sealer is None or not self._rotating:
            return 0
        return self.sql.reseal(self._sealer.rotate)

    def _sealer_for(self, what: str) -> Sealer:
        if self._sealer is None:
            raise FailedPrecondition(
                f"{what} needs the registry's JOEY_SECRET_KEY, which is not set: ask its admin to set one "
                '(docs/security.md, "Connection secrets")'
            )
        return self._sealer

    def create(
        self, caller: Caller, workspace: str, name: str, kind: str, raw: Mapping[str, Any]
    ) -> StoredConnection:
        ws = self.access.authorize(caller, workspace, Action.WRITE)
        try:
            topics.validate_name("connection", name)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        _details_json(raw)
        try:
            connection = connection_type(kind)
            details = connection.validate(raw)
        except InvalidDetails as exc:
            raise InvalidArgument(
                f"bad {kind} connection details: {exc}" if exc.field != "type" else str(exc)
            ) from None
        if secret_paths(connection, details):
            public, sealed = self._sealer_for("a connection with secrets").seal(connection, details)
        else:
            public, sealed = details, None
        user = self.access.user(caller)
        if not self.sql.insert(ws, name, kind, public, sealed, user.username):
            raise AlreadyExists(f"connection {name!r} already exists in workspace {ws.name!r}")
        log.info("created %s connection %s/%s", kind, ws.name, name)
        return self._get(ws, name)

    def list_all(self, caller: Caller, workspace: str) -> list[StoredConnection]:
        ws = self.access.authorize(caller, workspace, Action.READ)
        return [_stored(r, ws) for r in self.sql.find(ws)]

    def _row(self, ws: WorkspaceRef, name: str) -> DictRow:
        found = self.sql.find(ws, name) if name else []
        if not found:
            raise NotFound(f"connection {name!r} not found in workspace {ws.name!r}")
        return found[0]

    def _get(self, ws: WorkspaceRef, name: str) -> StoredConnection:
        return _stored(self._row(ws, name), ws)

    def _full(self, row: DictRow) -> dict[str, Any]:
        if row["secrets"] is None:
            return dict(row["details"])
        try:
            return self._sealer_for("reading a connection's secrets").unseal(row["details"], row["secrets"])
        except SecretKeyError as exc:
            raise FailedPrecondition(str(exc)) from None

    def get(self, caller: Caller, workspace: str, name: str) -> StoredConnection:
        """The connection with its details in full, secrets included."""
        return self.full(self.access.authorize(caller, workspace, Action.READ), name)

    def full(self, ws: WorkspaceRef, name: str) -> StoredConnection:
        """Connection ``name`` as ``ws`` sees it, in full: for a caller already authorized."""
        row = self._row(ws, name)
        return _stored(row, ws, self._full(row))

    def delete(self, caller: Caller, workspace: str, name: str) -> None:
        ws = self.access.authorize(caller, workspace, Action.WRITE)
        users = self.sql.delete(ws, name)
        if users is None:
            owner = self._get(ws, name).workspace  # NotFound when it is not seen here either
            raise FailedPrecondition(
                f"connection {name!r} belongs to workspace {owner!r}: delete it there, or remove it from "
                f"workspace {ws.name!r} (`ws.remove_connection`)"
            )
        if users:
            raise FailedPrecondition(_in_use(name, users, "deleted"))
        log.info("deleted connection %s/%s", ws.name, name)

    def test(self, caller: Caller, workspace: str, name: str) -> Report:
        ws = self.access.authorize(caller, workspace, Action.WRITE)
        row = self._row(ws, name)
        details = self._full(row)
        connection = connection_type(row["type"])
        report = self.tests.run(row["type"], details, secret_values(connection, details))
        log.info("tested connection %s/%s: %s", row["workspace"], name, "ok" if report.ok else "failed")
        return report

    def share(self, caller: Caller, owner_workspace: str, name: str, workspace: str) -> None:
        """Add ``owner_workspace``'s connection ``name`` to ``workspace``."""
        owner = self.access.authorize(caller, owner_workspace, Action.MANAGE)
        target = self.access.authorize(caller, workspace, Action.WRITE)
        if owner.id == target.id:
            raise InvalidArgument(f"connection {name!r} belongs to workspace {workspace!r} already")
        outcome = self.sql.share(owner, name, target, self.access.user(caller).username)
        if outcome == "missing":
            raise NotFound(f"connection {name!r} not found in workspace {owner.name!r}")
        if outcome == "taken":
            raise AlreadyExists(f"workspace {target.name!r} has a connection named {name!r} already")
        log.info("added connection %s/%s to workspace %s", owner.name, name, target.name)

    def unshare(self, caller: Caller, workspace: str, name: str) -> None:
        """Remove the connection ``name`` shared with ``workspace`` from it."""
        target = self.access.authorize(caller, workspace, Action.READ)
        row = self._row(target, name)
        if row["workspace"] == target.name:
            raise FailedPrecondition(
                f"connection {name!r} belongs to workspace {target.name!r}: delete it instead"
            )
        try:
            self.access.authorize(caller, workspace, Action.MANAGE)
        except PermissionDenied:
            try:
                self.access.authorize(caller, row["workspace"], Action.MANAGE)
            except (PermissionDenied, NotFound):
                raise PermissionDenied(
                    f"only owners of workspace {target.name!r} or of {row['workspace']!r} may remove "
                    f"connection {name!r} from {target.name!r}"
                ) from None
        users = self.sql.unshare(target, name)
        if users:
            raise FailedPrecondition(_in_use(name, users, f"removed from workspace {target.name!r}"))
        log.info("removed connection %s/%s from workspace %s", row["workspace"], name, target.name)
