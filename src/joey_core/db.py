"""Postgres bootstrap shared by the services that own tables: create the database, migrate.

Migrations are the numbered ``migrations/*.sql`` files, applied in order once each, under
an advisory lock so services starting together do not race.
"""

from __future__ import annotations

import logging
from importlib import resources
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

log = logging.getLogger(__name__)

_MIGRATION_LOCK = 0x4A4F4559  # "JOEY"
_PIPELINE_LOGS_LOCK = 0x4A4C  # "JL": advisory lock class of a pipeline's inference logs


def ensure_database(url: str) -> None:
    """Create the database named in ``url`` if it does not exist."""
    params = conninfo_to_dict(url)
    name = params.get("dbname") or "postgres"
    admin_url = make_conninfo(url, dbname="postgres")
    with psycopg.connect(admin_url, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if not exists:
            try:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(str(name))))
                log.info("created database %s", name)
            except psycopg.errors.DuplicateDatabase:
                pass


def _migrations() -> list[tuple[int, str, str]]:
    found = []
    for entry in resources.files("joey_core.migrations").iterdir():
        if entry.name.endswith(".sql"):
            number = int(entry.name.split("_", 1)[0])
            found.append((number, entry.name, entry.read_text()))
    return sorted(found)


def migrate(url: str, up_to: int | None = None) -> list[str]:
    """Apply pending migrations (numbered ``up_to`` at most, if given); return the names applied."""
    applied: list[str] = []
    with psycopg.connect(url) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (_MIGRATION_LOCK,))
        try:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations "
                "(version int PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            conn.commit()
            done = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
            for number, name, text in _migrations():
                if number in done or (up_to is not None and number > up_to):
                    continue
                with conn.transaction():
                    conn.execute(text.encode())
                    conn.execute(
                        "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)", (number, name)
                    )
                applied.append(name)
                log.info("applied migration %s", name)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (_MIGRATION_LOCK,))
            conn.commit()
    return applied


def prepare(url: str) -> None:
    ensure_database(url)
    migrate(url)


def lock_pipeline_logs(conn: psycopg.Connection[Any], workspace: str, pipeline: str, shared: bool) -> None:
    """Held until commit: shared by a logger writing the pipeline's rows, exclusive by the registry
    deleting the pipeline. So the deletion sees every row a logger wrote before it, and a logger
    writing after it sees its ``deleted_deployments`` and drops those rows."""
    function = "pg_advisory_xact_lock_shared" if shared else "pg_advisory_xact_lock"
    conn.execute(
        sql.SQL("SELECT {}(%s, hashtext(%s))").format(sql.Identifier(function)),
        (_PIPELINE_LOGS_LOCK, f"{workspace}/{pipeline}"),
    )


# SQLSTATE classes of a database that cannot serve now, whatever it is asked: connection exceptions,
# transaction rollbacks (serialization failures, deadlocks: they pass when tried again), insufficient
# resources (disk full, out of memory, too many connections), operator intervention (shutdown, a
# cancelled statement) and system errors. Everything else (bad data, a key or row too large, an
# error in a query) is a refusal of what was asked, and asking again gives the same answer.
_UNAVAILABLE_CLASSES = frozenset({"08", "40", "53", "57", "58"})
_UNAVAILABLE_STATES = frozenset({"55P03"})  # lock_not_available: a lock timeout


def is_unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` means the database cannot serve now (retry the same work later), as opposed
    to a refusal of the work itself (which no retry changes)."""
    if isinstance(exc, psycopg.InterfaceError):
        return True  # the connection is closed or broken
    if not isinstance(exc, psycopg.Error):
        return False
    state = exc.sqlstate
    if state is None:
        # No answer from the server: a lost connection, or a pool timeout (an OperationalError too).
        # A DataError without one is the client refusing a value (a NUL in text), not an outage.
        return isinstance(exc, psycopg.OperationalError)
    return state[:2] in _UNAVAILABLE_CLASSES or state in _UNAVAILABLE_STATES
