"""``postgres``: a database by URL, optionally one table (with its key column) or one query."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from pydantic import Field

from joey_core.connections.base import (
    ConnectionType,
    Details,
    InvalidDetails,
    Probe,
    Report,
    first_line,
    register,
)

_IDENTIFIER = r"[A-Za-z_][A-Za-z0-9_$]{0,62}"
# Options that make libpq read files or services of the host it runs on (the registry's, a bridge's),
# not the connection's: refused, so details never reach beyond what they name.
_HOST_FILE_OPTIONS = frozenset(
    {"service", "passfile", "sslcert", "sslkey", "sslcrl", "sslcrldir", "sslrootcert", "gssdelegation"}
)


class PostgresDetails(Details):
    url: str = Field(min_length=1, max_length=4096)
    """postgresql://user:password@host:port/dbname?sslmode=..."""
    table: str | None = Field(default=None, pattern=rf"^{_IDENTIFIER}(\.{_IDENTIFIER})?$")
    """A table, optionally schema-qualified (``public.wine_in``)."""
    key: str | None = Field(default=None, pattern=rf"^{_IDENTIFIER}$")
    """The table's (or query's) key column: the order a source reads in."""
    query: str | None = Field(default=None, min_length=1, max_length=65536)
    """A SELECT, instead of a table."""


@register
class Postgres(ConnectionType):
    name = "postgres"
    details = PostgresDetails
    url_fields = frozenset({"url"})

    def check(self, details: Any) -> None:
        assert isinstance(details, PostgresDetails)
        if not re.match(r"^postgres(ql)?://", details.url):
            raise InvalidDetails("url", "must be a postgresql:// URL")
        try:
            options = conninfo_to_dict(details.url)
        except psycopg.ProgrammingError:
            # libpq's message quotes the part it could not parse: that can be the password.
            raise InvalidDetails(
                "url",
                "not a Postgres URL libpq can parse (is every % in the user or password encoded as %25?)",
            ) from None
        if "password" in options and urlsplit(details.url).password is None:
            raise InvalidDetails("url", "give the password as user:password@host, not as an option")
        refused = sorted(_HOST_FILE_OPTIONS & set(options))
        if refused:
            raise InvalidDetails("url", f"option {refused[0]!r} reads files of the host: not allowed")
        if details.table and details.query:
            raise InvalidDetails("query", "give a table or a query, not both")
        if details.key and not (details.table or details.query):
            raise InvalidDetails("key", "a key column needs a table or a query")

    def probe(self, details: Mapping[str, Any]) -> Probe:
        options = conninfo_to_dict(details["url"])
        hosts = [h for h in str(options.get("hostaddr") or options.get("host") or "").split(",") if h]
        # No host is libpq's local socket: a directory of the host the test runs on.
        return Probe(hosts=tuple(hosts) or ("localhost",))

    def test(self, details: Mapping[str, Any], timeout_s: float) -> Report:
        timeout_ms = int(timeout_s * 1000)
        try:
            with psycopg.connect(
                details["url"],
                connect_timeout=max(1, int(timeout_s)),
                options=f"-c statement_timeout={timeout_ms} -c default_transaction_read_only=on",
                autocommit=True,
            ) as conn:
                version = conn.info.server_version
                if details.get("table"):
                    return _table(conn, details["table"], details.get("key"))
                if details.get("query"):
                    return _query(conn, details["query"], details.get("key"))
                return Report(
                    True, f"connected to PostgreSQL {version // 10000}", {"server_version": version}
                )
        except psycopg.Error as exc:
            return Report(False, f"cannot use the database: {first_line(exc)}")


def _table(conn: psycopg.Connection[Any], table: str, key: str | None) -> Report:
    found = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (table,)).fetchone()
    if not found or not found[0]:
        return Report(False, f"table {table!r} does not exist", {"table": table, "exists": False})
    name = sql.Identifier(*table.split("."))
    cursor = conn.execute(sql.SQL("SELECT * FROM {} LIMIT 0").format(name))
    columns = [c.name for c in cursor.description or ()]
    if key and key not in columns:
        return Report(False, f"table {table!r} has no column {key!r}", {"table": table, "columns": columns})
    row = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(name)).fetchone()
    rows = int(row[0]) if row else 0
    return Report(
        True,
        f"table {table!r} exists: {rows} rows, columns {', '.join(columns)}",
        {"table": table, "exists": True, "rows": rows, "columns": columns},
    )


def _query(conn: psycopg.Connection[Any], query: str, key: str | None) -> Report:
    cursor = conn.execute(sql.SQL("SELECT * FROM ({}) AS q LIMIT 0").format(sql.SQL(query)))  # type: ignore[arg-type]
    columns = [c.name for c in cursor.description or ()]
    if key and key not in columns:
        return Report(False, f"the query has no column {key!r}", {"columns": columns})
    return Report(True, f"the query runs: columns {', '.join(columns)}", {"columns": columns})
