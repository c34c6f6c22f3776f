"""Where decoded log records end up: the LogSink plugin point and its Postgres implementation.

A sink writes a whole batch or nothing, and writing a record it already holds is a no-op,
so the service may replay any batch after a crash or a rebalance without doubling rows.
"""

from __future__ import annotations

import logging
import operator
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from joey_core import db
from joey_core.assays.panes import Counting, LiveCounter, failure_text
from joey_logger import metrics
from joey_logger.settings import LoggerSettings

log = logging.getLogger(__name__)

IDENTITY = ("workspace", "pipeline", "request_id", "input_partition", "input_offset")
"""The fields naming the input record a log record is about; one row per identity."""


class SinkUnavailable(Exception):
    """The store cannot be reached now; the same batch should be retried later."""


class BatchRejected(Exception):
    """The store refused the data of the batch: at least one record can never be written."""


@dataclass(frozen=True)
class WriteResult:
    written: int
    """Rows added."""
    duplicates: int
    """Records skipped because the store (or an earlier record of the batch) already held them."""


class LogSink(ABC):
    """Stores decoded ``joey.v1.InferenceLog`` records (dicts from ``joey_core.records.decode_log``)."""

    @classmethod
    @abstractmethod
    def from_settings(cls, settings: LoggerSettings) -> LogSink: ...

    @abstractmethod
    def open(self) -> None:
        """Prepare the store; raise SinkUnavailable if it cannot be reached yet."""

    @abstractmethod
    def write(self, records: Sequence[dict[str, Any]]) -> WriteResult:
        """Write the batch idempotently in one transaction.

        Raises:
            SinkUnavailable: nothing was written; retry the same batch later.
            BatchRejected: nothing was written; some record is invalid for the store.
        """

    @abstractmethod
    def close(self) -> None:
        """Release connections; the sink may be opened again."""


SINKS: dict[str, type[LogSink]] = {}


def register_sink(name: str) -> Callable[[type[LogSink]], type[LogSink]]:
    def register(cls: type[LogSink]) -> type[LogSink]:
        SINKS[name] = cls
        return cls

    return register


def create_sink(settings: LoggerSettings) -> LogSink:
    try:
        sink_class = SINKS[settings.sink]
    except KeyError:
        known = ", ".join(sorted(SINKS))
        raise ValueError(f"unknown log sink {settings.sink!r}; registered sinks: {known}") from None
    return sink_class.from_settings(settings)


def unique_records(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The first record of every identity, in batch order (a replay can repeat a record in one batch)."""
    first: dict[tuple[Any, ...], dict[str, Any]] = {}
    for record in records:
        first.setdefault(_identity(record), record)
    return list(first.values())


_identity = operator.itemgetter(*IDENTITY)


# Columns in COPY order, and the type each value is dumped as: set once per COPY, so psycopg looks
# up no dumper per value (a quarter of the COPY's client time). inputs/outputs/shadow_outputs
# already are JSON text, which Postgres parses into their jsonb columns; the Avro arrays are dumped
# as JSON.
_COPY_TYPES = {
    "workspace": "text",
    "pipeline": "text",
    "pipeline_version": "int8",
    "deployment_id": "text",
    "request_id": "text",
    "record_key": "bytea",
    "time": "timestamptz",
    "input_topic": "text",
    "input_partition": "int4",
    "input_offset": "int8",
    "ok": "bool",
    "error": "text",
    "inputs": "text",
    "raw_input": "bytea",
    "outputs": "text",
    "shadow_outputs": "text",
    "check_failures": "jsonb",
    "models": "jsonb",
    "elapsed_ns": "jsonb",
}
COLUMNS = tuple(_COPY_TYPES)

_COLUMN_LIST = ", ".join(COLUMNS)
# The table's unique index (migration 0012): joey_request_key is the request id, or a hash of a long one.
_UNIQUE_KEY = ("workspace", "pipeline", "(joey_request_key(request_id))", "input_partition", "input_offset")
_STAGING = "joey_logger_staging"
# Rows vanish at the end of every transaction, so one table per connection serves every batch
# without the catalog churn of creating and dropping a table per batch.
_CREATE_STAGING = (
    f"CREATE TEMPORARY TABLE {_STAGING} ON COMMIT DELETE ROWS AS "
    f"SELECT {_COLUMN_LIST} FROM inference_logs WITH NO DATA"
)
_COPY = f"COPY {_STAGING} ({_COLUMN_LIST}) FROM STDIN"
# Rows of a deleted pipeline's deployments are dropped: a new pipeline of the same name must not get them.
_ANY_DELETED = "SELECT 1 FROM deleted_deployments WHERE deployment_id = ANY(%s) LIMIT 1"
# Straight into the table, with ids taken beforehand when the rows are to be counted (read back by id).
_COPY_LOGS = f"COPY inference_logs ({_COLUMN_LIST}) FROM STDIN"
_COPY_LOGS_WITH_IDS = f"COPY inference_logs (id, {_COLUMN_LIST}) FROM STDIN"
_NEXT_IDS = "SELECT nextval(pg_get_serial_sequence('inference_logs', 'id')) FROM generate_series(1, %s)"
_INSERT = sql.SQL(
    f"INSERT INTO inference_logs ({_COLUMN_LIST}) SELECT {_COLUMN_LIST} FROM {_STAGING} s "
    "WHERE NOT EXISTS (SELECT 1 FROM deleted_deployments d WHERE d.deployment_id = s.deployment_id) "
    f"ON CONFLICT ({', '.join(_UNIQUE_KEY)}) DO NOTHING"
)


row_values: Callable[[dict[str, Any]], tuple[Any, ...]] = operator.itemgetter(*COLUMNS)
"""A decoded log's values in COPY order (of the types :data:`COPY_TYPES` says); an itemgetter, a
fifth of a generator's time per row."""


COPY_TYPES = list(_COPY_TYPES.values())
_COPY_TYPES_WITH_IDS = ["int8", *COPY_TYPES]


@register_sink("postgres")
class PostgresLogSink(LogSink):
    """Writes ``inference_logs``: a COPY straight into it, or, when that cannot do (a replayed row, a
    deleted deployment's), a COPY into a temporary table, then INSERT ... ON CONFLICT DO NOTHING.

    Replays are rare, and the direct COPY writes each row once where the staging path writes it twice
    (the staging path costs its Postgres backend about 1.8x a plain COPY). A replayed batch costs a
    COPY undone to its savepoint (the unique index refuses the first stored row) before the
    staging path skips the stored rows.

    The rows actually inserted are counted into their live assays' windows in the same
    transaction (:mod:`joey_core.assays.panes`), so each inference is counted once; an assay that
    cannot be counted marks itself failed there and never keeps the rows from being stored.
    """

    def __init__(self, database_url: str, connect_timeout_s: int = 5) -> None:
        self._url = database_url
        self._connect_timeout_s = connect_timeout_s
        self._conn: psycopg.Connection[Any] | None = None
        self._assays = LiveCounter()

    @classmethod
    def from_settings(cls, settings: LoggerSettings) -> PostgresLogSink:
        return cls(settings.database_url.get_secret_value())

    def open(self) -> None:
        try:
            db.prepare(self._url)
            self._connection()
        except psycopg.Error as exc:  # a database that cannot be prepared (even read-only) holds it back
            raise SinkUnavailable(f"Postgres unavailable: {exc}") from exc

    def write(self, records: Sequence[dict[str, Any]]) -> WriteResult:
        rows = unique_records(records)
        if not rows:
            return WriteResult(written=0, duplicates=0)
        try:
            conn = self._connection()
        except psycopg.Error as exc:  # whatever stops a connection, it is never the batch's data
            self.close()
            raise SinkUnavailable(f"Postgres unavailable: {exc}") from exc
        try:
            started = time.perf_counter()
            with conn.transaction(), conn.cursor() as cursor:
                pipelines = {(r["workspace"], r["pipeline"]) for r in rows}
                for workspace, pipeline in sorted(pipelines):
                    db.lock_pipeline_logs(conn, workspace, pipeline, shared=True)
                counting = self._assays.prepare(conn, pipelines)
                prepared = time.perf_counter()
                if self._copy_directly(conn, cursor, rows, counting):
                    copied = inserted = time.perf_counter()
                    written = len(rows)
                else:
                    metrics.STAGE_SECONDS.labels("undone").inc(time.perf_counter() - prepared)
                    prepared = time.perf_counter()
                    with cursor.copy(_COPY) as copy:
                        copy.set_types(COPY_TYPES)
                        for record in rows:
                            copy.write_row(row_values(record))
                    copied = time.perf_counter()
                    written = counting.insert(conn, _INSERT)
            inserted = time.perf_counter()
        except Exception as exc:
            # Only the data's fault (a value, a key or row too large) is a refusal, which retrying
            # never changes; anything else (a read-only server, a schema mismatch, a lost connection,
            # a bug) is an outage: dead-lettering would throw away every record for as long as it lasts.
            if db.is_refusal(exc, conn):
                raise BatchRejected(failure_text(exc)) from exc
            self.close()
            raise SinkUnavailable(f"Postgres unavailable: {failure_text(exc)}") from exc
        metrics.STAGE_SECONDS.labels("prepare").inc(prepared - started)
        metrics.STAGE_SECONDS.labels("copy").inc(copied - prepared)
        metrics.STAGE_SECONDS.labels("insert").inc(inserted - copied)
        if counting.failed:
            metrics.ASSAYS_FAILED.inc(len(counting.failed))
        return WriteResult(written=written, duplicates=len(records) - written)

    def _copy_directly(
        self,
        conn: psycopg.Connection[Any],
        cursor: psycopg.Cursor[Any],
        rows: Sequence[dict[str, Any]],
        counting: Counting,
    ) -> bool:
        """COPY the rows straight into ``inference_logs`` and count them (every one was inserted);
        False, with nothing written, when some row is a deleted deployment's or already stored.

        The deleted deployments cannot change meanwhile: the caller holds the pipelines' logs lock."""
        if cursor.execute(_ANY_DELETED, (list({r["deployment_id"] for r in rows}),)).fetchone():
            return False
        ids = [i for (i,) in cursor.execute(_NEXT_IDS, (len(rows),))] if counting.assays else None
        try:
            with conn.transaction(), cursor.copy(_COPY_LOGS if ids is None else _COPY_LOGS_WITH_IDS) as copy:
                if ids is None:
                    copy.set_types(COPY_TYPES)
                    for record in rows:
                        copy.write_row(row_values(record))
                else:
                    copy.set_types(_COPY_TYPES_WITH_IDS)
                    for row_id, record in zip(ids, rows, strict=True):
                        copy.write_row((row_id, *row_values(record)))
        except psycopg.errors.UniqueViolation:
            return False
        if ids is not None:
            counting.count_stored(conn, ids)
        return True

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            conn = psycopg.connect(self._url, connect_timeout=self._connect_timeout_s)
            try:
                conn.execute(_CREATE_STAGING)
                conn.commit()
            except BaseException:
                conn.close()
                raise
            self._conn = conn
        return self._conn
