"""Bridges in the registry: sources and sinks between a workspace's connections and its pipelines,
stored in Postgres and published on joey.bridges for the connector-bridge processes
(docs/workloads.md, "Bridges").

Access is the pipelines': members list bridges and read their status; collaborators and owners create,
pause, resume and delete them. The connection's secrets reach only the connector-bridges, through
GetBridgeConnection with the service token.

A change is published while its row is still locked in an open transaction and committed only once the
broker acknowledged it: a failed publish is UNAVAILABLE and changes nothing. At start the registry
republishes every bridge (``republish``), as it does deployments, for a broker that lost its data.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime

import psycopg
from psycopg.rows import DictRow

from joey_core import bridges as spec
from joey_core import topics
from joey_core.connections import InvalidDetails
from joey_registry.access import Access, Action, Caller
from joey_registry.connections import Connections, StoredConnection
from joey_registry.errors import AlreadyExists, InvalidArgument, NotFound
from joey_registry.publisher import DeploymentPublisher
from joey_registry.store import Store, WorkspaceRef

log = logging.getLogger(__name__)

STALE_S = 30
"""A running bridge reports every second or so: silent this long, no connector-bridge runs it."""


@dataclass(frozen=True)
class BridgeState:
    """What the connector-bridge running a bridge last reported."""

    state: str
    rows_moved: int = 0
    lag: int = -1
    last_error: str = ""
    instance: str = ""
    updated_at: datetime | None = None


@dataclass(frozen=True)
class StoredBridge:
    id: int
    workspace: str
    name: str
    kind: str
    pipeline: str
    connection: str
    what: str
    paused: bool
    created_by: str
    created_at: datetime
    status: BridgeState
    from_pipeline: str = ""

    def spec(self) -> spec.BridgeSpec:
        return spec.BridgeSpec(
            self.id,
            self.workspace,
            self.name,
            self.kind,
            self.pipeline,
            self.connection,
            self.what,
            self.paused,
            self.from_pipeline,
        )


_SELECT = (
    "SELECT b.id, w.name AS workspace, b.name, b.kind, b.pipeline, b.connection, b.what, b.paused, "
    "b.from_pipeline, "
    "b.created_by, b.created_at, s.state, s.rows_moved, s.lag, s.last_error, s.instance, s.updated_at, "
    f"s.updated_at < now() - interval '{STALE_S} seconds' AS stale "
    "FROM bridges b JOIN workspaces w ON w.id = b.workspace_id "
    "LEFT JOIN bridge_status s ON s.bridge_id = b.id "
)


def _stored(row: DictRow) -> StoredBridge:
    state = spec.PAUSED if row["paused"] else row["state"] or spec.WAITING
    error = row["last_error"] or ""
    if row["stale"] and state != spec.PAUSED:
        state, error = spec.WAITING, f"no connector-bridge has reported on it for over {STALE_S}s"
    status = BridgeState(
        state,
        row["rows_moved"] or 0,
        row["lag"] if row["lag"] is not None else -1,
        error,
        row["instance"] or "",
        row["updated_at"],
    )
    fields = {
        k: row[k]
        for k in ("id", "workspace", "name", "kind", "pipeline", "connection", "what", "from_pipeline")
    }
    return StoredBridge(
        **fields,
        paused=row["paused"],
        created_by=row["created_by"],
        created_at=row["created_at"],
        status=status,
    )


class BridgeStore:
    """The SQL of the bridges table (bridge_status and bridge_positions are the connector-bridges')."""

    def __init__(self, store: Store) -> None:
        self._pool = store.pool

    @contextmanager
    def changing(self) -> Iterator[psycopg.Connection[DictRow]]:
        """One transaction: what it changes commits only if the block (its publish included) returns."""
        with self._pool.connection() as conn, conn.transaction():
            yield conn

    def find(
        self,
        ws: WorkspaceRef,
        name: str = "",
        conn: psycopg.Connection[DictRow] | None = None,
        lock: bool = False,
    ) -> list[DictRow]:
        query = (
            _SELECT + "WHERE b.workspace_id = %(ws)s AND (%(name)s = '' OR b.name = %(name)s) ORDER BY b.name"
        )
        if lock:
            query += " FOR UPDATE OF b"
        if conn is not None:
            return conn.execute(query, {"ws": ws.id, "name": name}).fetchall()
        with self._pool.connection() as own:
            return own.execute(query, {"ws": ws.id, "name": name}).fetchall()

    def every(self) -> list[DictRow]:
        with self._pool.connection() as conn:
            return conn.execute(_SELECT + "ORDER BY b.id").fetchall()


class Bridges:
    """Bridge operations; each authorizes the caller first."""

    def __init__(
        self, store: Store, access: Access, connections: Connections, publisher: DeploymentPublisher
    ) -> None:
        self._store = store
        self.sql = BridgeStore(store)
        self.access = access
        self.connections = connections
        self.publisher = publisher

    def _publish(self, bridge: StoredBridge) -> None:
        self.publisher.send(
            topics.BRIDGES,
            spec.bridge_key(bridge.workspace, bridge.name),
            json.dumps(asdict(bridge.spec())).encode(),
        )

    def _check_chain(
        self, ws: WorkspaceRef, kind: str, pipeline: str, connection: str, from_pipeline: str
    ) -> None:
        if kind != spec.SOURCE:
            raise InvalidArgument("only a source can follow a pipeline: a sink writes to a connection")
        if connection:
            raise InvalidArgument("a source reads a connection or another pipeline's outputs, not both")
        if from_pipeline == pipeline:
            raise InvalidArgument(f"a source cannot feed pipeline {pipeline!r} its own outputs")
        if not self._store.pipeline_exists(ws, from_pipeline):
            raise NotFound(f"pipeline {from_pipeline!r} not found in workspace {ws.name!r}")

    def _check(
        self, ws: WorkspaceRef, kind: str, pipeline: str, connection: str, what: str, from_pipeline: str
    ) -> str:
        if kind not in spec.KINDS:
            raise InvalidArgument(f"invalid bridge kind {kind!r}: use {' or '.join(spec.KINDS)}")
        what = what or spec.DEFAULT_WHAT[kind]
        if what not in spec.WHAT[kind]:
            raise InvalidArgument(f"a {kind} cannot take {what!r}: use {' or '.join(spec.WHAT[kind])}")
        if not pipeline:
            raise InvalidArgument(f"a {kind} needs a pipeline")
        if not self._store.pipeline_exists(ws, pipeline):
            raise NotFound(f"pipeline {pipeline!r} not found in workspace {ws.name!r}")
        if from_pipeline:
            self._check_chain(ws, kind, pipeline, connection, from_pipeline)
            return what
        if not connection:
            raise InvalidArgument(f"a {kind} needs a connection")
        found = self.connections.sql.find(ws, connection)
        if not found:
            raise NotFound(f"connection {connection!r} not found in workspace {ws.name!r}")
        kind_of = found[0]["type"]
        if kind_of not in spec.SUPPORTED[kind]:
            raise InvalidArgument(
                f"connection {connection!r} is a {kind_of} connection: a {kind} takes "
                f"{', '.join(spec.SUPPORTED[kind])} connections so far"
            )
        try:
            spec.check_details(kind, kind_of, found[0]["details"])
        except InvalidDetails as exc:
            raise InvalidArgument(f"connection {connection!r} cannot serve as a {kind}: {exc}") from None
        return what

    def create(
        self,
        caller: Caller,
        workspace: str,
        name: str,
        kind: str,
        pipeline: str,
        connection: str,
        what: str,
        from_pipeline: str = "",
    ) -> StoredBridge:
        ws = self.access.authorize(caller, workspace, Action.WRITE)
        try:
            topics.validate_name(kind if kind in spec.KINDS else "bridge", name)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        what = self._check(ws, kind, pipeline, connection, what, from_pipeline)
        user = self.access.user(caller)
        with self.sql.changing() as conn:
            if connection and not self.connections.sql.hold(conn, ws, connection):
                raise NotFound(f"connection {connection!r} not found in workspace {ws.name!r}")
            inserted = conn.execute(
                "INSERT INTO bridges (workspace_id, name, kind, pipeline, connection, what, created_by, "
                "from_pipeline) VALUES (%s, %s, %s, %s, %s, %s, %s, %s) "
                "ON CONFLICT (workspace_id, name) DO NOTHING RETURNING id",
                (ws.id, name, kind, pipeline, connection, what, user.username, from_pipeline),
            ).fetchone()
            if inserted is None:
                raise AlreadyExists(f"bridge {name!r} already exists in workspace {ws.name!r}")
            bridge = _stored(self.sql.find(ws, name, conn)[0])
            self._publish(bridge)
        log.info(
            "created %s %s/%s: pipeline %s, %s",
            kind,
            ws.name,
            name,
            pipeline,
            f"from pipeline {from_pipeline}" if from_pipeline else f"connection {connection}",
        )
        return bridge

    def list_all(self, caller: Caller, workspace: str) -> list[StoredBridge]:
        ws = self.access.authorize(caller, workspace, Action.READ)
        return [_stored(r) for r in self.sql.find(ws)]

    def _get(self, ws: WorkspaceRef, name: str) -> StoredBridge:
        found = self.sql.find(ws, name) if name else []
        if not found:
            raise NotFound(f"bridge {name!r} not found in workspace {ws.name!r}")
        return _stored(found[0])

    def status(self, caller: Caller, workspace: str, name: str) -> StoredBridge:
        return self._get(self.access.authorize(caller, workspace, Action.READ), name)

    def set_paused(self, caller: Caller, workspace: str, name: str, paused: bool) -> StoredBridge:
        ws = self.access.authorize(caller, workspace, Action.WRITE)
        with self.sql.changing() as conn:
            found = self.sql.find(ws, name, conn, lock=True) if name else []
            if not found:
                raise NotFound(f"bridge {name!r} not found in workspace {ws.name!r}")
            conn.execute("UPDATE bridges SET paused = %s WHERE id = %s", (paused, found[0]["id"]))
            bridge = _stored(self.sql.find(ws, name, conn)[0])
            self._publish(bridge)
        log.info("%s bridge %s/%s", "paused" if paused else "resumed", ws.name, name)
        return bridge

    def delete(self, caller: Caller, workspace: str, name: str) -> None:
        ws = self.access.authorize(caller, workspace, Action.WRITE)
        with self.sql.changing() as conn:
            found = self.sql.find(ws, name, conn, lock=True) if name else []
            if not found:
                raise NotFound(f"bridge {name!r} not found in workspace {ws.name!r}")
            conn.execute("DELETE FROM bridges WHERE id = %s", (found[0]["id"],))
            self.publisher.send(topics.BRIDGES, spec.bridge_key(ws.name, name), None)
        log.info("deleted bridge %s/%s", ws.name, name)

    def connection(self, caller: Caller, workspace: str, name: str) -> StoredConnection:
        """The bridge's connection in full, for the connector-bridge running it (the service token)."""
        ws = self.access.authorize(caller, workspace, Action.RUN_BRIDGE)
        bridge = self._get(ws, name)
        return self.connections.full(ws, bridge.connection)

    def republish(self) -> int:
        """Every bridge published again: the broker may have restarted empty. Deleted bridges need no
        tombstone there: a broker that lost its data lost their records too."""
        rows = self.sql.every()
        for row in rows:
            self._publish(_stored(row))
        return len(rows)
