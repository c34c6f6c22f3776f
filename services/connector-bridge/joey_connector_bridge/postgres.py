"""Postgres as a sink (a table of results, created if absent, upserted by request id) and as a source
(every row of a table in key order, existing and new)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from joey_connector_bridge.connectors import (
    Bridge,
    ResultRow,
    Sink,
    Source,
    SourceRecord,
    Unavailable,
    json_value,
    register_sink,
    register_source,
)
from joey_core.connections.base import first_line

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5


def _table(details: Mapping[str, Any]) -> sql.Identifier:
    return sql.Identifier(*str(details["table"]).split("."))


class _Connected:
    """One connection to the store, opened when needed and dropped after any failure."""

    def __init__(self, details: Mapping[str, Any]) -> None:
        self._url = str(details["url"])
        self._conn: psycopg.Connection[Any] | None = None

    def conn(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(self._url, connect_timeout=CONNECT_TIMEOUT_S)
        return self._conn

    def failed(self, exc: psycopg.Error, doing: str) -> Unavailable:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        # psycopg's messages name host and port, never the password of the URL.
        return Unavailable(f"cannot {doing}: {first_line(exc)}")

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()


@register_sink
class PostgresSink(Sink):
    type = "postgres"

    def __init__(self, details: Mapping[str, Any], bridge: Bridge) -> None:
        super().__init__(details, bridge)
        self._db = _Connected(details)
        self._created = False

    def _create(self, conn: psycopg.Connection[Any]) -> None:
        conn.execute(
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} (request_id text PRIMARY KEY, source_key text, "
                "time timestamptz, outputs jsonb, error text, pipeline_version integer)"
            ).format(_table(self.details))
        )

    def write(self, rows: Sequence[ResultRow]) -> None:
        # One row per request id within the batch too: the last result wins, as it does across batches.
        latest = {row.request_id: row for row in rows}
        query = sql.SQL(
            "INSERT INTO {} (request_id, source_key, time, outputs, error, pipeline_version) "
            "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (request_id) DO UPDATE SET "
            "source_key = EXCLUDED.source_key, time = EXCLUDED.time, outputs = EXCLUDED.outputs, "
            "error = EXCLUDED.error, pipeline_version = EXCLUDED.pipeline_version"
        ).format(_table(self.details))
        try:
            conn = self._db.conn()
            with conn.transaction():
                timeout_ms = round(self.bridge.settings.sink_statement_timeout_s * 1000)
                conn.execute("SELECT set_config('statement_timeout', %s, true)", [str(timeout_ms)])
                if not self._created:
                    self._create(conn)
                with conn.cursor() as cursor:
                    cursor.executemany(
                        query,
                        [
                            (
                                r.request_id,
                                r.source_key,
                                r.time,
                                None if r.outputs is None else Jsonb(r.outputs),
                                r.error,
                                r.pipeline_version,
                            )
                            for r in latest.values()
                        ],
                    )
            self._created = True
        except psycopg.Error as exc:
            raise self._db.failed(exc, f"write to table {self.details['table']!r}") from None

    def close(self) -> None:
        self._db.close()


@register_source
class PostgresSource(Source):
    type = "postgres"

    def __init__(self, details: Mapping[str, Any], bridge: Bridge) -> None:
        super().__init__(details, bridge)
        self._db = _Connected(details)
        self._key = sql.Identifier(str(details["key"]))

    def _after(self, after: Any) -> tuple[sql.Composable, tuple[Any, ...]]:
        if after is None:
            return sql.SQL("TRUE"), ()
        return sql.SQL("{} > %s").format(self._key), (after,)

    def read(self, after: Any, limit: int) -> list[SourceRecord]:
        where, params = self._after(after)
        # Rows in key order, each with whether it is settled: written by a transaction older than every
        # one still running (its xmin before the snapshot's). A writer still in flight may yet commit a
        # key lower than a settled-looking newer row (serial keys of concurrent writers): reading stops at
        # the first row not settled, so nothing is checkpointed past a key that could still appear.
        query = sql.SQL(
            "SELECT t.*, age(t.xmin) > age(h.horizon) FROM {} t, (SELECT (("
            "pg_snapshot_xmin(pg_current_snapshot())::text::bigint %% 4294967296)::text)::xid AS horizon) h "
            "WHERE {} ORDER BY {} LIMIT %s"
        ).format(_table(self.details), where, self._key)
        try:
            conn = self._db.conn()
            with conn.transaction(), conn.cursor() as cursor:
                cursor.execute(query, (*params, limit))
                names = [c.name for c in cursor.description or ()][:-1]
                rows = cursor.fetchall()
        except psycopg.Error as exc:
            raise self._db.failed(exc, f"read table {self.details['table']!r}") from None
        key = str(self.details["key"])
        at = names.index(key)
        found = []
        for *row, settled in rows:
            if not settled:
                break
            # Kept as JSON: a key JSON has no type for (a timestamp) is compared as text Postgres casts.
            position = json_value(row[at])
            found.append(SourceRecord.of(str(position), position, dict(zip(names, row, strict=True))))
        return found

    def lag(self, after: Any) -> int:
        where, params = self._after(after)
        query = sql.SQL("SELECT count(*) FROM {} WHERE {}").format(_table(self.details), where)
        try:
            conn = self._db.conn()
            with conn.transaction():
                row = conn.execute(query, params).fetchone()
        except psycopg.Error as exc:
            raise self._db.failed(exc, f"count the rows of table {self.details['table']!r}") from None
        return int(row[0]) if row else 0

    def close(self) -> None:
        self._db.close()
