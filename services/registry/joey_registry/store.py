"""Postgres access of the registry: every SQL statement lives here, results come back as domain types.

Version numbers are allocated under a row lock on the parent (model or pipeline), so
concurrent uploads or pipeline updates get 1, 2, 3... without gaps or duplicates.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import DictRow, dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool

from joey_core import db, topics
from joey_core.models import (
    CONVERTING,
    ERROR,
    READY,
    ArtifactFile,
    ModelConfig,
    ModelVersion,
    TensorSpec,
    specs_from_json,
)
from joey_registry.domain import (
    Autoscale,
    DeletedModel,
    DeletedPipeline,
    Deployment,
    DeploymentSpec,
    Lineage,
    LogCursor,
    LogEntry,
    LogQuery,
    LogValidity,
    Model,
    ModelRef,
    ModelSearch,
    ModelVersionUse,
    Pipeline,
    PipelineSearch,
    PipelineVersion,
    ResolvedStep,
    Resources,
    Step,
    Workspace,
    models_of,
    step_from_json,
)
from joey_registry.errors import FailedPrecondition, NotFound

Connection = psycopg.Connection[DictRow]


@dataclass(frozen=True)
class WorkspaceRef:
    id: int
    name: str


@dataclass(frozen=True)
class WorkspaceContents:
    """The names of what a workspace holds, each sorted."""

    models: tuple[str, ...]
    pipelines: tuple[str, ...]
    assays: tuple[str, ...]
    connections: tuple[str, ...] = ()
    bridges: tuple[str, ...] = ()
    tasks: tuple[str, ...] = ()
    orchestrations: tuple[str, ...] = ()


WORKSPACE_TABLES = ("models", "pipelines", "assays", "connections", "bridges", "tasks", "orchestrations")
"""The tables of what a workspace holds, each a field of WorkspaceContents."""


@dataclass(frozen=True)
class LogSlice:
    """One page of log rows; ``following`` is where the next page starts (None on the last)."""

    entries: tuple[LogEntry, ...]
    total: int | None
    following: LogCursor | None


_VERSION_FIELDS = """
    m.name, v.version, v.sha256, v.size_bytes, v.framework, v.inputs, v.outputs, v.created_at, v.config,
    v.description, v.source, v.metadata, v.status, v.conversion_log, v.source_sha256, v.source_size_bytes,
    (SELECT count(*) FROM model_artifacts a WHERE a.model_version_id = v.id) AS artifact_count,
    (SELECT coalesce(sum(a.size_bytes), 0) FROM model_artifacts a WHERE a.model_version_id = v.id)
        AS artifact_bytes
"""
_MODEL_VERSION_COLUMNS = f"{_VERSION_FIELDS} FROM model_versions v JOIN models m ON m.id = v.model_id"

# What a tag targets: its table, the table of its tags, and their link.
_TAGGED = {
    "model": ("models", "model_tags", "model_id"),
    "pipeline": ("pipelines", "pipeline_tags", "pipeline_id"),
}

_DEPLOYMENT_COLUMNS = """
    p.name AS pipeline, pv.version AS pipeline_version, pv.steps, d.replicas, d.active,
    d.deployment_id, d.updated_at, d.autoscale, d.resources, w.name AS workspace
    FROM deployments d
    JOIN pipelines p ON p.id = d.pipeline_id
    JOIN workspaces w ON w.id = p.workspace_id
    JOIN pipeline_versions pv ON pv.id = d.pipeline_version_id
"""


def _model_version(workspace: str, row: DictRow) -> ModelVersion:
    return ModelVersion(
        workspace=workspace,
        name=row["name"],
        version=row["version"],
        sha256=row["sha256"],
        size_bytes=row["size_bytes"],
        framework=row["framework"],
        inputs=specs_from_json(row["inputs"]),
        outputs=specs_from_json(row["outputs"]),
        created_at=row["created_at"],
        config=ModelConfig.from_json(row["config"]),
        description=row["description"],
        source=row["source"],
        metadata=row["metadata"],
        artifact_count=int(row["artifact_count"]),
        artifact_bytes=int(row["artifact_bytes"]),
        status=row["status"],
        conversion_log=row["conversion_log"],
        source_sha256=row["source_sha256"] or "",
        source_size_bytes=row["source_size_bytes"] or 0,
    )


def _steps(data: list[dict[str, Any]]) -> tuple[Step, ...]:
    return tuple(step_from_json(step) for step in data)


def _pipeline_version(workspace: str, pipeline: str, row: DictRow) -> PipelineVersion:
    return PipelineVersion(workspace, pipeline, row["version"], _steps(row["steps"]), row["created_at"])


def _deployment(row: DictRow) -> Deployment:
    return Deployment(
        workspace=row["workspace"],
        pipeline=row["pipeline"],
        pipeline_version=row["pipeline_version"],
        replicas=row["replicas"],
        active=row["active"],
        deployment_id=row["deployment_id"],
        topics=topics.pipeline_topics(row["workspace"], row["pipeline"]),
        updated_at=row["updated_at"],
        autoscale=Autoscale.from_json(row["autoscale"]) if row["autoscale"] else None,
        resources=Resources.from_json(row["resources"]) if row["resources"] else None,
    )


def _json_text(value: str | None) -> str:
    return value or ""


def _log_entry(row: DictRow) -> LogEntry:
    return LogEntry(
        request_id=row["request_id"],
        time=row["time"],
        pipeline_version=row["pipeline_version"],
        ok=row["ok"],
        error=row["error"] or "",
        inputs_json=_json_text(row["inputs"]),
        outputs_json=_json_text(row["outputs"]),
        shadow_json=_json_text(row["shadow"]),
        check_failures=tuple(str(f) for f in row["check_failures"]),
        models=tuple(ModelRef(m["name"], int(m["version"]), m["sha256"]) for m in row["models"]),
        elapsed_ns=tuple(int(n) for n in row["elapsed_ns"]),
        input_partition=row["input_partition"],
        input_offset=row["input_offset"],
        raw_input=bytes(row["raw_input"] or b""),
    )


def _specs_json(specs: tuple[TensorSpec, ...]) -> Jsonb:
    return Jsonb([s.to_json() for s in specs])


class NameLock:
    """A transaction holding the deployment lock of a pipeline's name (see ``Store.lock_name``),
    whether or not a pipeline of that name exists."""

    def __init__(self, conn: Connection, workspace: str, name: str) -> None:
        self._conn = conn
        self._workspace_name = workspace
        self.name = name

    def has_intent(self) -> bool:
        row = self._conn.execute(
            "SELECT 1 FROM deployment_intents WHERE workspace = %s AND pipeline = %s",
            (self._workspace_name, self.name),
        ).fetchone()
        return row is not None

    def clear_intent(self) -> None:
        """Forget the pipeline's intent (see ``Store.record_intent``) when this transaction commits:
        the change it announced is then recorded, and was acknowledged on joey.deployments."""
        self._conn.execute(
            "DELETE FROM deployment_intents WHERE workspace = %s AND pipeline = %s",
            (self._workspace_name, self.name),
        )


class PipelineLock(NameLock):
    """A transaction holding the deployment lock of one pipeline and its row lock: deploys and
    undeploys of the same pipeline run one at a time, so the order on joey.deployments matches the
    database."""

    def __init__(self, conn: Connection, workspace: WorkspaceRef, name: str, pipeline_id: int) -> None:
        super().__init__(conn, workspace.name, name)
        self.workspace = workspace
        self._pipeline_id = pipeline_id

    def version(self, version: int) -> PipelineVersion | None:
        """A version of the pipeline; 0 = the latest."""
        row = self._conn.execute(
            "SELECT version, steps, created_at FROM pipeline_versions WHERE pipeline_id = %s "
            "AND (version = %s OR %s = 0) ORDER BY version DESC LIMIT 1",
            (self._pipeline_id, version, version),
        ).fetchone()
        return _pipeline_version(self.workspace.name, self.name, row) if row else None

    def deployment(self) -> Deployment | None:
        row = self._conn.execute(
            f"SELECT {_DEPLOYMENT_COLUMNS} WHERE d.pipeline_id = %s", (self._pipeline_id,)
        ).fetchone()
        return _deployment(row) if row else None

    def save_deployment(self, deployment: Deployment) -> None:
        """Record the current state; a deployment id seen for the first time also goes to the history."""
        params = {
            "pipeline_id": self._pipeline_id,
            "version": deployment.pipeline_version,
            "replicas": deployment.replicas,
            "active": deployment.active,
            "deployment_id": deployment.deployment_id,
            "updated_at": deployment.updated_at,
            "autoscale": Jsonb(deployment.autoscale.to_json()) if deployment.autoscale else None,
            "resources": Jsonb(deployment.resources.to_json()) if deployment.resources else None,
        }
        self._conn.execute(
            """
            INSERT INTO deployments (pipeline_id, pipeline_version_id, replicas, active, deployment_id,
                                     updated_at, autoscale, resources)
            SELECT %(pipeline_id)s, id, %(replicas)s, %(active)s, %(deployment_id)s, %(updated_at)s,
                   %(autoscale)s, %(resources)s
              FROM pipeline_versions WHERE pipeline_id = %(pipeline_id)s AND version = %(version)s
            ON CONFLICT (pipeline_id) DO UPDATE SET
                pipeline_version_id = EXCLUDED.pipeline_version_id, replicas = EXCLUDED.replicas,
                active = EXCLUDED.active, deployment_id = EXCLUDED.deployment_id,
                updated_at = EXCLUDED.updated_at, autoscale = EXCLUDED.autoscale,
                resources = EXCLUDED.resources
            """,
            params,
        )
        if deployment.active:
            self._conn.execute(
                """
                INSERT INTO deployment_history (pipeline_id, pipeline_version_id, deployment_id, deployed_at)
                SELECT %(pipeline_id)s, id, %(deployment_id)s, %(updated_at)s
                  FROM pipeline_versions WHERE pipeline_id = %(pipeline_id)s AND version = %(version)s
                ON CONFLICT (deployment_id) DO NOTHING
                """,
                params,
            )

    def previous_version(self, current: Deployment) -> int | None:
        """The pipeline version deployed most recently before ``current`` that differs from it."""
        row = self._conn.execute(
            """
            SELECT pv.version FROM deployment_history h
              JOIN pipeline_versions pv ON pv.id = h.pipeline_version_id
             WHERE h.pipeline_id = %(pipeline_id)s AND pv.version <> %(version)s
               AND h.id < COALESCE(
                   (SELECT id FROM deployment_history WHERE deployment_id = %(deployment_id)s),
                   9223372036854775807)
             ORDER BY h.id DESC LIMIT 1
            """,
            {
                "pipeline_id": self._pipeline_id,
                "version": current.pipeline_version,
                "deployment_id": current.deployment_id,
            },
        ).fetchone()
        return int(row["version"]) if row else None

    def missing_models(self, steps: tuple[Step, ...]) -> list[ResolvedStep]:
        """The model versions ``steps`` use that were deleted (or re-uploaded under the same number)."""
        used = [m for step in steps for m in models_of(step)]
        rows = self._conn.execute(
            "SELECT m.name, v.version, v.sha256 FROM model_versions v JOIN models m ON m.id = v.model_id "
            "WHERE m.workspace_id = %s AND m.name = ANY(%s) FOR SHARE OF v",
            (self.workspace.id, sorted({m.model for m in used})),
        ).fetchall()
        stored = {(r["name"], r["version"], r["sha256"]) for r in rows}
        return [m for m in used if (m.model, m.version, m.sha256) not in stored]

    def assay_names(self) -> list[str]:
        rows = self._conn.execute(
            "SELECT name FROM assays WHERE workspace_id = %s AND pipeline = %s ORDER BY name",
            (self.workspace.id, self.name),
        ).fetchall()
        return [r["name"] for r in rows]

    def bridge_names(self) -> list[str]:
        rows = self._conn.execute(
            # A source following the pipeline uses it too.
            "SELECT name FROM bridges WHERE workspace_id = %s AND %s IN (pipeline, from_pipeline) "
            "ORDER BY name",
            (self.workspace.id, self.name),
        ).fetchall()
        return [r["name"] for r in rows]

    def delete(self) -> DeletedPipeline:
        """The pipeline, its versions, deployment and history, and its inference logs: a later pipeline
        of the same name starts again at version 1 and must not inherit them. Its deployments are
        recorded in ``deleted_deployments``, so log records of theirs the logger has yet to write are
        dropped; the logs lock (see ``db.lock_pipeline_logs``) makes this see every row written before."""
        db.lock_pipeline_logs(self._conn, self.workspace.name, self.name, shared=False)
        self._conn.execute(
            "INSERT INTO deleted_deployments (deployment_id) "
            "SELECT deployment_id FROM deployment_history WHERE pipeline_id = %(id)s "
            "UNION SELECT deployment_id FROM deployments WHERE pipeline_id = %(id)s "
            "ON CONFLICT DO NOTHING",
            {"id": self._pipeline_id},
        )
        # Rows may also come from deployments older than the history (before migration 0005).
        row = self._conn.execute(
            """
            WITH gone AS (
                DELETE FROM inference_logs WHERE workspace = %s AND pipeline = %s RETURNING deployment_id
            ), marked AS (
                INSERT INTO deleted_deployments (deployment_id) SELECT DISTINCT deployment_id FROM gone
                ON CONFLICT DO NOTHING
            )
            SELECT count(*) AS n FROM gone
            """,
            (self.workspace.name, self.name),
        ).fetchone()
        logs = int(row["n"]) if row else 0
        for table in ("deployment_history", "deployments"):
            self._conn.execute(
                sql.SQL("DELETE FROM {} WHERE pipeline_id = %s").format(sql.Identifier(table)),
                (self._pipeline_id,),
            )
        versions = self._conn.execute(
            "DELETE FROM pipeline_versions WHERE pipeline_id = %s", (self._pipeline_id,)
        ).rowcount
        self._conn.execute("DELETE FROM pipelines WHERE id = %s", (self._pipeline_id,))
        return DeletedPipeline(versions, logs)


ChooseVersions = Callable[[tuple[int, ...], list[ModelVersionUse]], tuple[int, ...]]


class Store:
    def __init__(self, database_url: str, max_size: int = 8) -> None:
        self._url = database_url
        self.pool: ConnectionPool[Connection] = ConnectionPool(
            database_url,
            min_size=1,
            max_size=max_size,
            kwargs={"row_factory": dict_row},
            open=False,
        )

    def open(self, timeout: float = 30.0) -> None:
        self.pool.open(wait=True, timeout=timeout)

    def close(self) -> None:
        self.pool.close()

    @contextmanager
    def _conn(self) -> Iterator[Connection]:
        # The pool commits when the block ends normally and rolls back when it raises.
        with self.pool.connection() as conn:
            yield conn

    # --- workspaces ---

    def workspace(self, name: str) -> WorkspaceRef | None:
        with self._conn() as conn:
            row = conn.execute("SELECT id, name FROM workspaces WHERE name = %s", (name,)).fetchone()
        return WorkspaceRef(row["id"], row["name"]) if row else None

    def delete_workspace(self, ws: WorkspaceRef, check: Callable[[WorkspaceContents], None]) -> None:
        """Delete the workspace unless ``check`` (given what it holds) raises. Its row is locked first, so
        nothing can be created in it meanwhile (inserting a row that references it waits for the lock)."""
        with self._conn() as conn:
            conn.execute("SELECT id FROM workspaces WHERE id = %s FOR UPDATE", (ws.id,))
            named = {
                table: tuple(
                    r["name"]
                    for r in conn.execute(
                        sql.SQL("SELECT DISTINCT name FROM {} WHERE workspace_id = %s ORDER BY name").format(
                            sql.Identifier(table)
                        ),
                        (ws.id,),
                    ).fetchall()
                )
                for table in WORKSPACE_TABLES
            }
            check(WorkspaceContents(**named))
            conn.execute("DELETE FROM workspaces WHERE id = %s", (ws.id,))

    def workspace_role(self, name: str, username: str) -> tuple[WorkspaceRef, str | None] | None:
        """The workspace and the user's role in it (None: no member), or None if it does not exist."""
        with self._conn() as conn:
            row = conn.execute(
                "SELECT w.id, w.name, m.role FROM workspaces w LEFT JOIN workspace_members m "
                "ON m.workspace_id = w.id AND m.username = %s WHERE w.name = %s",
                (username, name),
            ).fetchone()
        return (WorkspaceRef(row["id"], row["name"]), row["role"]) if row else None

    def create_workspace(self, name: str, owner: str) -> Workspace | None:
        """The new workspace, owned by ``owner``, or None if the name is taken."""
        with self._conn() as conn:
            row = conn.execute(
                "INSERT INTO workspaces (name) VALUES (%s) ON CONFLICT (name) DO NOTHING "
                "RETURNING id, name, created_at",
                (name,),
            ).fetchone()
            if row is None:
                return None
            conn.execute(
                "INSERT INTO workspace_members (workspace_id, username, role) VALUES (%s, %s, 'owner')",
                (row["id"], owner),
            )
        return Workspace(row["name"], row["created_at"], "owner")

    def list_workspaces(self, username: str, every: bool) -> list[Workspace]:
        """The user's workspaces with their role in each; with ``every``, the others too (no role)."""
        with self._conn() as conn:
            rows = conn.execute(
                "SELECT w.name, w.created_at, m.role FROM workspaces w LEFT JOIN workspace_members m "
                "ON m.workspace_id = w.id AND m.username = %s WHERE %s OR m.role IS NOT NULL ORDER BY w.name",
                (username, every),
            ).fetchall()
        return [Workspace(r["name"], r["created_at"], r["role"] or "") for r in rows]

    # --- models ---

    def add_model_version(
        self,
        ws: WorkspaceRef,
        name: str,
        sha256: str,
        size_bytes: int,
        framework: str,
        inputs: tuple[TensorSpec, ...],
        outputs: tuple[TensorSpec, ...],
        before_commit: Callable[[], None],
        lineage: Lineage = Lineage(),
        files: tuple[ArtifactFile, ...] = (),
        source: tuple[str, int] | None = None,
    ) -> ModelVersion:
        """Insert the next version of ``name`` (creating the model) with its lineage and the rows of its
        extra ``files``; ``before_commit`` runs inside the transaction, so if it raises no row is written.
        With ``source`` (the sha256 and size of a native model's file, ``sha256`` then being '') the
        version is recorded as converting."""
        with self._conn() as conn:
            model_id = _lock_named(conn, "models", ws, name)
            # Numbered from the model's highest version ever, so a deleted version's number never returns
            # (and from its versions too, should last_version lag behind them).
            row = conn.execute(
                """
                WITH next AS (
                    UPDATE models SET last_version = 1 + greatest(
                        last_version,
                        (SELECT coalesce(max(version), 0) FROM model_versions WHERE model_id = %(model_id)s)
                    )
                    WHERE id = %(model_id)s
                    RETURNING last_version
                )
                INSERT INTO model_versions (model_id, version, sha256, size_bytes, framework, inputs, outputs,
                                            description, source, metadata, status, source_sha256,
                                            source_size_bytes)
                SELECT %(model_id)s, last_version, %(sha256)s, %(size)s, %(framework)s,
                       %(inputs)s, %(outputs)s, %(description)s, %(source)s, %(metadata)s, %(status)s,
                       %(source_sha256)s, %(source_size)s
                  FROM next
                RETURNING id, version, created_at
                """,
                {
                    "model_id": model_id,
                    "sha256": sha256,
                    "size": size_bytes,
                    "framework": framework,
                    "inputs": _specs_json(inputs),
                    "outputs": _specs_json(outputs),
                    "description": lineage.description,
                    "source": lineage.source,
                    "metadata": Jsonb(dict(lineage.metadata)),
                    "status": CONVERTING if source else READY,
                    "source_sha256": source[0] if source else None,
                    "source_size": source[1] if source else None,
                },
            ).fetchone()
            assert row is not None
            if files:
                with conn.cursor() as cursor:
                    cursor.executemany(
                        "INSERT INTO model_artifacts (model_version_id, name, sha256, size_bytes) "
                        "VALUES (%s, %s, %s, %s)",
                        [(row["id"], f.name, f.sha256, f.size_bytes) for f in files],
                    )
            # In one order, so that two uploads sharing files never wait for each other's locks.
            stored = (source[0] if source else sha256, *(f.sha256 for f in files))
            for key in sorted({_artifact_lock_key(sha) for sha in stored}):
                conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", (_ARTIFACT_LOCKS, key))
            before_commit()
        return ModelVersion(
            ws.name,
            name,
            row["version"],
            sha256,
            size_bytes,
            framework,
            inputs,
            outputs,
            row["created_at"],
            description=lineage.description,
            source=lineage.source,
            metadata=lineage.metadata,
            artifact_count=len(files),
            artifact_bytes=sum(f.size_bytes for f in files),
            status=CONVERTING if source else READY,
            source_sha256=source[0] if source else "",
            source_size_bytes=source[1] if source else 0,
        )

    def finish_conversion(
        self,
        ws: WorkspaceRef,
        name: str,
        version: int,
        outcome: tuple[str, int, tuple[TensorSpec, ...], tuple[TensorSpec, ...]] | None,
        conversion_log: str,
        before_commit: Callable[[], None],
    ) -> bool:
        """Record a conversion's end: ``outcome`` (the ONNX's sha256 and size, its signature) makes the
        version ready, None makes it an error. False when the version is gone (deleted meanwhile):
        nothing is written and ``before_commit`` does not run."""
        with self._conn() as conn:
            if outcome is not None:
                lock_artifact(conn, outcome[0])
            sha256, size, inputs, outputs = outcome or ("", 0, (), ())
            row = conn.execute(
                "UPDATE model_versions v SET status = %s, conversion_log = %s, sha256 = %s, size_bytes = %s, "
                "inputs = %s, outputs = %s FROM models m WHERE m.id = v.model_id AND m.workspace_id = %s "
                "AND m.name = %s AND v.version = %s AND v.status = %s RETURNING v.version",
                (
                    READY if outcome else ERROR,
                    conversion_log,
                    sha256,
                    size,
                    _specs_json(inputs),
                    _specs_json(outputs),
                    ws.id,
                    name,
                    version,
                    CONVERTING,
                ),
            ).fetchone()
            if row is None:
                return False
            before_commit()
        return True

    def fail_stale_conversions(self, older_than_s: float) -> int:
        """Conversions started longer ago than any can take: their registry stopped before finishing."""
        with self._conn() as conn:
            return conn.execute(
                "UPDATE model_versions SET status = %s, conversion_log = conversion_log || %s "
                "WHERE status = %s AND created_at < now() - make_interval(secs => %s)",
                (
                    ERROR,
                    "the registry stopped during the conversion; upload the model again",
                    CONVERTING,
                    older_than_s,
                ),
            ).rowcount

    def list_models(self, ws: WorkspaceRef) -> list[Model]:
        return self._models(ws, None)

    def get_model(self, ws: WorkspaceRef, name: str) -> Model | None:
        models = self._models(ws, name)
        return models[0] if models else None

    def search_models(self, ws: WorkspaceRef, search: ModelSearch) -> list[Model]:
        """The models with a version matching ``search``, each with only its matching versions."""
        return self._models(ws, None, search)

    def _models(self, ws: WorkspaceRef, name: str | None, search: ModelSearch | None = None) -> list[Model]:
        params: dict[str, Any] = {"ws": ws.id, "name": name}
        where = ["m.workspace_id = %(ws)s", "(%(name)s::text IS NULL OR m.name = %(name)s)"]
        # A model whose versions were deleted one by one is still listed (its numbering goes on); a
        # search lists versions.
        join = "LEFT JOIN"
        if search is not None:
            join = "JOIN"
            params |= {
                "term": search.search_term,
                "tag": search.tag,
                "framework": search.framework,
                "after": search.uploaded_after,
            }
            where += [
                # strpos, not LIKE: a term's % or _ are no wildcards.
                "(%(term)s::text IS NULL OR strpos(lower(m.name), lower(%(term)s)) > 0 "
                "OR strpos(lower(v.description), lower(%(term)s)) > 0)",
                "(%(tag)s::text IS NULL OR EXISTS "
                "(SELECT 1 FROM model_tags t WHERE t.model_id = m.id AND t.tag = %(tag)s))",
                "(%(framework)s::text IS NULL OR v.framework = %(framework)s)",
                "(%(after)s::timestamptz IS NULL OR v.created_at > %(after)s)",
            ]
        with self._conn() as conn:
            rows = conn.execute(
                f"SELECT {_VERSION_FIELDS} FROM models m {join} model_versions v ON v.model_id = m.id "
                f"WHERE {' AND '.join(where)} ORDER BY m.name, v.version",
                params,
            ).fetchall()
            tags = _tags_by_name(conn, "model", ws, name)
        grouped: dict[str, list[ModelVersion]] = {}
        for row in rows:
            versions = grouped.setdefault(row["name"], [])
            if row["version"] is not None:
                versions.append(_model_version(ws.name, row))
        return [
            Model(ws.name, model, tuple(versions), tags.get(model, ())) for model, versions in grouped.items()
        ]

    def model_artifacts(
        self, ws: WorkspaceRef, name: str, version: int
    ) -> tuple[int, tuple[ArtifactFile, ...]] | None:
        """The version number (0 asks for the latest) and its files by name; None without that version."""
        with self._conn() as conn:
            found = conn.execute(
                "SELECT v.id, v.version FROM model_versions v JOIN models m ON m.id = v.model_id "
                "WHERE m.workspace_id = %s AND m.name = %s AND (v.version = %s OR %s = 0) "
                "ORDER BY v.version DESC LIMIT 1",
                (ws.id, name, version, version),
            ).fetchone()
            if found is None:
                return None
            rows = conn.execute(
                "SELECT name, size_bytes, sha256 FROM model_artifacts WHERE model_version_id = %s "
                "ORDER BY name",
                (found["id"],),
            ).fetchall()
        return found["version"], tuple(ArtifactFile(r["name"], r["size_bytes"], r["sha256"]) for r in rows)

    def set_tag(
        self, ws: WorkspaceRef, kind: str, name: str, tag: str, add: bool, max_tags: int
    ) -> tuple[str, ...] | None:
        """Add or remove ``tag`` of the model or pipeline (``kind``) ``name``; its tags after, or None
        when there is no such thing. A tag beyond ``max_tags`` is refused."""
        table, tags_table, link = (sql.Identifier(n) for n in _TAGGED[kind])
        with self._conn() as conn:
            # Its row locked: concurrent adds count the tags one after the other.
            row = conn.execute(
                sql.SQL("SELECT id FROM {} WHERE workspace_id = %s AND name = %s FOR UPDATE").format(table),
                (ws.id, name),
            ).fetchone()
            if row is None:
                return None
            current = _tags_of(conn, tags_table, link, row["id"])
            if add and tag not in current:
                if len(current) >= max_tags:
                    raise FailedPrecondition(
                        f"{kind} {name!r} has {len(current)} tags, the most it may have; remove one first"
                    )
                conn.execute(
                    sql.SQL("INSERT INTO {} ({}, tag) VALUES (%s, %s)").format(tags_table, link),
                    (row["id"], tag),
                )
            elif not add and tag in current:
                conn.execute(
                    sql.SQL("DELETE FROM {} WHERE {} = %s AND tag = %s").format(tags_table, link),
                    (row["id"], tag),
                )
            return _tags_of(conn, tags_table, link, row["id"])

    def get_model_version(self, ws: WorkspaceRef, name: str, version: int) -> ModelVersion | None:
        """A version of a model; 0 = the latest."""
        with self._conn() as conn:
            row = conn.execute(
                f"SELECT {_MODEL_VERSION_COLUMNS} WHERE m.workspace_id = %s AND m.name = %s "
                "AND (v.version = %s OR %s = 0) ORDER BY v.version DESC LIMIT 1",
                (ws.id, name, version, version),
            ).fetchone()
        return _model_version(ws.name, row) if row else None

    def configure_model_version(
        self, ws: WorkspaceRef, name: str, version: int, config: ModelConfig
    ) -> ModelVersion | None:
        """Set a version's config (0 = the latest); None when there is no such version."""
        with self._conn() as conn:
            row = conn.execute(
                "UPDATE model_versions SET config = %s WHERE id = (SELECT v.id FROM model_versions v "
                "JOIN models m ON m.id = v.model_id WHERE m.workspace_id = %s AND m.name = %s "
                "AND (v.version = %s OR %s = 0) ORDER BY v.version DESC LIMIT 1) RETURNING version",
                (Jsonb(config.to_json()), ws.id, name, version, version),
            ).fetchone()
        return self.get_model_version(ws, name, row["version"]) if row else None

    def model_uses(self, ws: WorkspaceRef, name: str) -> list[ModelVersionUse]:
        with self._conn() as conn:
            return _model_uses(conn, ws, name)

    def delete_model(
        self, ws: WorkspaceRef, name: str, choose: ChooseVersions, delete_model: bool
    ) -> tuple[DeletedModel, list[str]] | None:
        """Delete the versions ``choose(existing versions, their uses)`` returns (it raises to refuse,
        leaving everything as it was), and the model itself when ``delete_model``. Returns what was
        deleted and the sha256s of the deleted versions, for ``remove_artifacts`` once this has
        committed; None when there is no such model."""
        with self._conn() as conn:
            row = conn.execute(
                "SELECT id FROM models WHERE workspace_id = %s AND name = %s FOR UPDATE", (ws.id, name)
            ).fetchone()
            if row is None:
                return None
            model_id = row["id"]
            # Locked before reading their uses: a deploy reads the versions it runs FOR SHARE
            # (``PipelineLock.missing_models``), so either it waits and finds them gone, or this waits
            # and, reading the uses after its commit, sees the deployment.
            existing = tuple(
                r["version"]
                for r in conn.execute(
                    "SELECT version FROM model_versions WHERE model_id = %s ORDER BY version FOR UPDATE",
                    (model_id,),
                ).fetchall()
            )
            chosen = choose(existing, _model_uses(conn, ws, name))
            files = conn.execute(
                "SELECT DISTINCT a.sha256 FROM model_artifacts a "
                "JOIN model_versions v ON v.id = a.model_version_id "
                "WHERE v.model_id = %s AND v.version = ANY(%s)",
                (model_id, list(chosen)),
            ).fetchall()
            deleted = conn.execute(
                "DELETE FROM model_versions WHERE model_id = %s AND version = ANY(%s) "
                "RETURNING version, sha256, source_sha256",
                (model_id, list(chosen)),
            ).fetchall()
            if delete_model:
                conn.execute("DELETE FROM models WHERE id = %s", (model_id,))
        versions = tuple(sorted(r["version"] for r in deleted))
        sha256s = {r[column] for r in deleted for column in ("sha256", "source_sha256")} | {
            r["sha256"] for r in files
        }
        return DeletedModel(versions, delete_model), sorted(sha256s - {None, ""})

    def remove_artifacts(self, sha256s: list[str], remove: Callable[[str], None]) -> int:
        """Call ``remove`` for each of ``sha256s`` that no model version of any workspace uses, as its
        model or one of its files, and no orchestration as its zip, under the artifact's lock (see
        ``lock_artifact``); returns how many were removed."""
        removed = 0
        for sha256 in sha256s:
            with self._conn() as conn:
                lock_artifact(conn, sha256)
                used = conn.execute(
                    "SELECT 1 FROM model_versions WHERE sha256 = %(sha)s OR source_sha256 = %(sha)s "
                    "UNION ALL SELECT 1 FROM model_artifacts WHERE sha256 = %(sha)s "
                    "UNION ALL SELECT 1 FROM orchestrations WHERE sha256 = %(sha)s LIMIT 1",
                    {"sha": sha256},
                ).fetchone()
                if used is None:
                    remove(sha256)
                    removed += 1
        return removed

    def has_artifact(self, ws: WorkspaceRef, sha256: str, files: bool = False) -> bool:
        """Whether a model version of ``ws`` has ``sha256`` as its model or, with ``files``, as one
        of its extra files or the native file its model was converted from (engines run only the ONNX)."""
        extra = (
            "UNION ALL SELECT 1 FROM model_artifacts a JOIN model_versions v ON v.id = a.model_version_id "
            "JOIN models m ON m.id = v.model_id WHERE m.workspace_id = %(ws)s AND a.sha256 = %(sha)s "
            if files
            else ""
        )
        with self._conn() as conn:
            row = conn.execute(
                "SELECT 1 FROM model_versions v JOIN models m ON m.id = v.model_id "
                "WHERE m.workspace_id = %(ws)s "
                "AND (v.sha256 = %(sha)s OR (%(files)s AND v.source_sha256 = %(sha)s)) "
                f"{extra}LIMIT 1",
                {"ws": ws.id, "sha": sha256, "files": files},
            ).fetchone()
        return row is not None

    # --- pipelines ---

    def add_pipeline_version(
        self, ws: WorkspaceRef, name: str, steps: tuple[Step, ...]
    ) -> tuple[PipelineVersion, bool]:
        """The next version of the pipeline (created=True), or its latest version if that
        already has exactly these steps (created=False)."""
        with self._conn() as conn:
            pipeline_id = _lock_named(conn, "pipelines", ws, name)
            latest = conn.execute(
                "SELECT version, steps, created_at FROM pipeline_versions WHERE pipeline_id = %s "
                "ORDER BY version DESC LIMIT 1",
                (pipeline_id,),
            ).fetchone()
            if latest is not None and _steps(latest["steps"]) == steps:
                return _pipeline_version(ws.name, name, latest), False
            row = conn.execute(
                "INSERT INTO pipeline_versions (pipeline_id, version, steps) VALUES (%s, %s, %s) "
                "RETURNING version, steps, created_at",
                (
                    pipeline_id,
                    (latest["version"] if latest else 0) + 1,
                    Jsonb([s.to_json() for s in steps]),
                ),
            ).fetchone()
            assert row is not None
        return _pipeline_version(ws.name, name, row), True

    def list_pipelines(self, ws: WorkspaceRef, search: PipelineSearch | None = None) -> list[Pipeline]:
        return self._pipelines(ws, None, search or PipelineSearch())

    def get_pipeline(self, ws: WorkspaceRef, name: str) -> Pipeline | None:
        pipelines = self._pipelines(ws, name, PipelineSearch())
        return pipelines[0] if pipelines else None

    def _pipelines(self, ws: WorkspaceRef, name: str | None, search: PipelineSearch) -> list[Pipeline]:
        params = {"ws": ws.id, "name": name, "term": search.search_term, "tag": search.tag}
        where = (
            "p.workspace_id = %(ws)s AND (%(name)s::text IS NULL OR p.name = %(name)s) "
            "AND (%(term)s::text IS NULL OR strpos(lower(p.name), lower(%(term)s)) > 0) "
            "AND (%(tag)s::text IS NULL OR EXISTS "
            "(SELECT 1 FROM pipeline_tags t WHERE t.pipeline_id = p.id AND t.tag = %(tag)s))"
        )
        with self._conn() as conn:
            rows = conn.execute(
                "SELECT p.name, pv.version, pv.steps, pv.created_at FROM pipeline_versions pv "
                f"JOIN pipelines p ON p.id = pv.pipeline_id WHERE {where} ORDER BY p.name, pv.version",
                params,
            ).fetchall()
            deployments = conn.execute(f"SELECT {_DEPLOYMENT_COLUMNS} WHERE {where}", params).fetchall()
            tags = _tags_by_name(conn, "pipeline", ws, name)
        by_pipeline = {row["pipeline"]: _deployment(row) for row in deployments}
        grouped: dict[str, list[PipelineVersion]] = {}
        for row in rows:
            grouped.setdefault(row["name"], []).append(_pipeline_version(ws.name, row["name"], row))
        return [
            Pipeline(
                ws.name, pipeline, tuple(versions), by_pipeline.get(pipeline), tags=tags.get(pipeline, ())
            )
            for pipeline, versions in grouped.items()
        ]

    def pipeline_exists(self, ws: WorkspaceRef, name: str) -> bool:
        with self._conn() as conn:
            row = conn.execute(
                "SELECT 1 FROM pipelines WHERE workspace_id = %s AND name = %s", (ws.id, name)
            ).fetchone()
        return row is not None

    def deployment(self, ws: WorkspaceRef, name: str) -> Deployment | None:
        with self._conn() as conn:
            row = conn.execute(
                f"SELECT {_DEPLOYMENT_COLUMNS} WHERE p.workspace_id = %s AND p.name = %s", (ws.id, name)
            ).fetchone()
        return _deployment(row) if row else None

    @contextmanager
    def lock_pipeline(self, ws: WorkspaceRef, name: str) -> Iterator[PipelineLock | None]:
        """A transaction holding the pipeline's deployment lock and row lock (None if the pipeline does
        not exist); committed when the block ends, rolled back if it raises."""
        with self._conn() as conn:
            _lock_deployment(conn, ws.name, name)
            row = conn.execute(
                "SELECT id FROM pipelines WHERE workspace_id = %s AND name = %s FOR UPDATE", (ws.id, name)
            ).fetchone()
            yield PipelineLock(conn, ws, name, row["id"]) if row else None

    @contextmanager
    def lock_name(self, workspace: str, name: str) -> Iterator[NameLock]:
        """Like ``lock_pipeline``, by names: the reconciler's view, since joey.deployments is keyed by
        names and the pipeline (or its workspace) may be gone. A plain ``NameLock`` when no such
        pipeline exists; a pipeline created meanwhile cannot be deployed until this commits."""
        with self._conn() as conn:
            _lock_deployment(conn, workspace, name)
            row = conn.execute(
                "SELECT p.id, w.id AS workspace_id FROM pipelines p "
                "JOIN workspaces w ON w.id = p.workspace_id "
                "WHERE w.name = %s AND p.name = %s FOR UPDATE OF p",
                (workspace, name),
            ).fetchone()
            if row is None:
                yield NameLock(conn, workspace, name)
            else:
                yield PipelineLock(conn, WorkspaceRef(row["workspace_id"], workspace), name, row["id"])

    def active_deployments(self) -> list[DeploymentSpec]:
        """Every active deployment of every workspace, with its resolved steps."""
        with self._conn() as conn:
            rows = conn.execute(
                f"SELECT {_DEPLOYMENT_COLUMNS} WHERE d.active ORDER BY w.name, p.name"
            ).fetchall()
        return [DeploymentSpec(_deployment(row), _steps(row["steps"])) for row in rows]

    def record_intent(self, workspace: str, pipeline: str, deployment_id: str | None) -> None:
        """Commit, on a connection of its own (the caller's transaction holds the pipeline's lock and
        commits only after the publish), that a change of the pipeline's deployment is about to be
        published: until ``PipelineLock.clear_intent`` commits, Kafka may disagree with Postgres.
        Not from the pool: callers each hold a pooled connection already, and as many of them as the
        pool has would wait for one another's second connection forever."""
        with psycopg.connect(self._url, autocommit=True, connect_timeout=10) as conn:
            conn.execute(
                "INSERT INTO deployment_intents (workspace, pipeline, deployment_id) VALUES (%s, %s, %s) "
                "ON CONFLICT (workspace, pipeline) DO UPDATE SET deployment_id = EXCLUDED.deployment_id, "
                "recorded_at = now()",
                (workspace, pipeline, deployment_id),
            )

    def intents(self) -> list[tuple[str, str]]:
        """The (workspace, pipeline) of every change recorded as about to be published and not
        known to have been both acknowledged and recorded."""
        with self._conn() as conn:
            rows = conn.execute(
                "SELECT workspace, pipeline FROM deployment_intents ORDER BY workspace, pipeline"
            ).fetchall()
        return [(r["workspace"], r["pipeline"]) for r in rows]

    def deployed_pipelines(self) -> list[tuple[str, str]]:
        """The (workspace, pipeline) of every pipeline ever deployed (active or not)."""
        with self._conn() as conn:
            rows = conn.execute(
                "SELECT w.name AS workspace, p.name AS pipeline FROM deployments d "
                "JOIN pipelines p ON p.id = d.pipeline_id JOIN workspaces w ON w.id = p.workspace_id "
                "ORDER BY w.name, p.name"
            ).fetchall()
        return [(r["workspace"], r["pipeline"]) for r in rows]

    # --- inference logs ---

    def query_logs(self, query: LogQuery, limit: int, after: LogCursor | None, count: bool) -> LogSlice:
        """Up to ``limit`` rows following ``after`` in (time, id) order: a keyset, so a page costs
        the same however deep it is; the count of every matching row only when ``count``."""
        where = ["workspace = %(workspace)s", "pipeline = %(pipeline)s"]
        if query.start is not None:
            where.append("time >= %(start)s")
        if query.end is not None:
            where.append("time < %(end)s")
        if query.validity is not LogValidity.ALL:
            where.append("ok = %(ok)s")
        if query.anomalies_only:
            where.append("jsonb_array_length(check_failures) > 0")
        direction, beyond, reach = ("ASC", ">", ">=") if query.chronological else ("DESC", "<", "<=")
        condition = " AND ".join(where)
        page_condition = condition
        if after is not None:
            # The plain time bound lets the (workspace, pipeline, time) index start at the cursor;
            # the row comparison then skips the rows of that instant already returned.
            page_condition += (
                f" AND time {reach} %(after_time)s AND (time, id) {beyond} (%(after_time)s, %(after_id)s)"
            )
        params = {
            "workspace": query.workspace,
            "pipeline": query.pipeline,
            "start": query.start,
            "end": query.end,
            "ok": query.validity is LogValidity.OK,
            "after_time": after.time if after else None,
            "after_id": after.id if after else None,
            # One row more than the page tells whether another page follows.
            "limit": limit + 1,
        }
        with self._conn() as conn:
            total = None
            if count:
                counted = conn.execute(
                    f"SELECT count(*) AS n FROM inference_logs WHERE {condition}", params
                ).fetchone()
                total = int(counted["n"]) if counted else 0
            rows = conn.execute(
                "SELECT id, request_id, time, pipeline_version, ok, error, inputs::text AS inputs, "
                "outputs::text AS outputs, shadow_outputs::text AS shadow, check_failures, models, "
                "elapsed_ns, input_partition, input_offset, raw_input "
                f"FROM inference_logs WHERE {page_condition} "
                f"ORDER BY time {direction}, id {direction} LIMIT %(limit)s",
                params,
            ).fetchall()
        page = rows[:limit]
        following = LogCursor(page[-1]["time"], page[-1]["id"]) if len(rows) > limit else None
        return LogSlice(tuple(_log_entry(r) for r in page), total, following)


def _tags_of(
    conn: Connection, tags_table: sql.Identifier, link: sql.Identifier, target_id: int
) -> tuple[str, ...]:
    rows = conn.execute(
        sql.SQL("SELECT tag FROM {} WHERE {} = %s ORDER BY tag").format(tags_table, link), (target_id,)
    ).fetchall()
    return tuple(r["tag"] for r in rows)


def _tags_by_name(
    conn: Connection, kind: str, ws: WorkspaceRef, name: str | None
) -> dict[str, tuple[str, ...]]:
    """The tags of every model or pipeline (``kind``) of ``ws`` (only ``name`` if given), by name."""
    table, tags_table, link = (sql.Identifier(n) for n in _TAGGED[kind])
    rows = conn.execute(
        sql.SQL(
            "SELECT x.name, t.tag FROM {} t JOIN {} x ON x.id = t.{} "
            "WHERE x.workspace_id = %s AND (%s::text IS NULL OR x.name = %s) ORDER BY x.name, t.tag"
        ).format(tags_table, table, link),
        (ws.id, name, name),
    ).fetchall()
    found: dict[str, tuple[str, ...]] = {}
    for row in rows:
        found[row["name"]] = (*found.get(row["name"], ()), row["tag"])
    return found


def _model_uses(conn: Connection, ws: WorkspaceRef, name: str) -> list[ModelVersionUse]:
    rows = conn.execute(
        """
        SELECT p.name, pv.version, pv.steps,
               coalesce(d.active AND d.pipeline_version_id = pv.id, false) AS deployed
          FROM pipeline_versions pv
          JOIN pipelines p ON p.id = pv.pipeline_id
          LEFT JOIN deployments d ON d.pipeline_id = p.id
         WHERE p.workspace_id = %s AND jsonb_path_exists(pv.steps, '$.**.model ? (@ == $name)', %s)
         ORDER BY p.name, pv.version
        """,
        (ws.id, Jsonb({"name": name})),
    ).fetchall()
    uses = {
        ModelVersionUse(m.version, row["name"], row["version"], row["deployed"])
        for row in rows
        for step in _steps(row["steps"])
        for m in models_of(step)
        if m.model == name
    }
    return sorted(uses, key=lambda u: (u.model_version, u.pipeline, u.pipeline_version))


_DEPLOYMENT_LOCKS = 0x4A44  # advisory lock class of deployments ("JD"), keyed by the pipeline's names


def _lock_deployment(conn: Connection, workspace: str, pipeline: str) -> None:
    """Held until commit by every change of a pipeline's deployment and by its reconciling. Keyed by
    names, not the row, so that the reconciler finding a pipeline gone and a pipeline of the same name
    created and deployed meanwhile take turns: its tombstone then never follows the new spec."""
    conn.execute(
        "SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (_DEPLOYMENT_LOCKS, f"{workspace}/{pipeline}")
    )


_ARTIFACT_LOCKS = 0x4A41  # advisory lock class of artifacts ("JA"), keyed by their sha256's first 28 bits


def _artifact_lock_key(sha256: str) -> int:
    return int(sha256[:7], 16)


def lock_artifact(conn: Connection, sha256: str) -> None:
    """Held until commit by an upload recording an artifact and by the removal of an unused one, so a
    removal never deletes the file an upload of the same bytes just found there and did not write."""
    conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", (_ARTIFACT_LOCKS, _artifact_lock_key(sha256)))


def _lock_named(conn: Connection, table: str, ws: WorkspaceRef, name: str) -> int:
    """The id of ``table``'s row named ``name`` in ``ws``, created if missing and locked for this transaction,
    so concurrent creators of its next version queue up instead of racing for the same number."""
    ident = sql.Identifier(table)
    # A second round when the row was deleted (its model deleted) while this waited for its lock.
    for _ in range(2):
        try:
            conn.execute(
                sql.SQL("INSERT INTO {} (workspace_id, name) VALUES (%s, %s) ON CONFLICT DO NOTHING").format(
                    ident
                ),
                (ws.id, name),
            )
        except psycopg.errors.ForeignKeyViolation:
            # The insert waited for a deletion of the workspace (it locks the workspace's row).
            raise NotFound(
                f"workspace {ws.name!r} was deleted; create it again (`joey workspace create {ws.name}`)"
            ) from None
        row = conn.execute(
            sql.SQL("SELECT id FROM {} WHERE workspace_id = %s AND name = %s FOR UPDATE").format(ident),
            (ws.id, name),
        ).fetchone()
        if row is not None:
            return int(row["id"])
    raise AssertionError(f"{table} row {name!r} vanished twice while being locked")
