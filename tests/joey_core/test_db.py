from __future__ import annotations

import psycopg

from joey_core import db


def test_migrations_apply_once(database_url: str) -> None:
    assert db.migrate(database_url) == []  # the session fixture already applied them
    with psycopg.connect(database_url) as conn:
        applied = conn.execute("SELECT name FROM schema_migrations ORDER BY version").fetchall()
        workspaces = conn.execute("SELECT name FROM workspaces").fetchall()
    assert applied and applied[0][0] == "0001_init.sql"
    assert ("default",) in workspaces
