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


# A refusal is an allow-list: SQLSTATE classes caused by the data itself (22 data exception: a value
# out of range, an invalid byte sequence; 23 integrity violation; 54 program limit: an index row or a
# value too large), where the same rows are refused again and other rows pass. Anything else (a
# read-only or failing-over server, a revoked privilege, a schema that does not match during a rolling
# upgrade, an internal error, a lost connection, a bug of ours) is the platform failing, not the data:
# calling that a refusal would throw every record away for as long as it lasts.
_REFUSAL_CLASSES = frozenset({"22", "23", "54"})
# Class 42 is a query the server refuses as written (an undefined operator, a cast that cannot be
# made): the query's fault when it comes from a definition, except these, which are the platform's.
_NOT_THE_QUERYS_FAULT = frozenset({"42501", "42P01", "42703", "42P10"})  # privilege, missing table/column


def is_refusal(exc: BaseException, conn: psycopg.Connection[Any] | None = None) -> bool:
    """Whether the database refused the data it was given (another batch would pass, the same one
    never); False for everything else, which is an outage to wait out. An error after which
    ``conn`` is broken is always an outage."""
    if conn is not None and conn.broken:
        return False
    if isinstance(exc, psycopg.Error):
        if exc.sqlstate is None:
            return isinstance(exc, psycopg.DataError)  # refused by the client (a NUL in text)
        return exc.sqlstate[:2] in _REFUSAL_CLASSES
    return isinstance(exc, UnicodeEncodeError)


def is_query_error(exc: BaseException, conn: psycopg.Connection[Any] | None = None) -> bool:
    """Whether the database refused a query as written or the data it computed (:func:`is_refusal`
    or SQLSTATE class 42 but for the platform's own): what a bad assay definition causes."""
    if is_refusal(exc, conn):
        return True
    if not isinstance(exc, psycopg.Error) or exc.sqlstate is None or (conn is not None and conn.broken):
        return False
    return exc.sqlstate[:2] == "42" and exc.sqlstate not in _NOT_THE_QUERYS_FAULT


def is_unavailable(exc: BaseException) -> bool:
    """Whether a database error is the database's (wait and retry the same work), not a refusal of
    the query or its data (:func:`is_query_error`, which no retry changes)."""
    return isinstance(exc, psycopg.Error) and not is_query_error(exc)
