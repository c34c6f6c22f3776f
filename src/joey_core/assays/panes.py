"""Counts of live assays by pane, kept in Postgres as the log rows are stored.

A window is a union of panes (see ``AssayDefinition.pane``), so a row is counted in one pane
however much windows overlap. Each inference is counted exactly once: a logger adds the log rows
it has just inserted (a replayed or duplicated log record inserts nothing) to their panes, in the same
transaction as the insert. Rows stored before an assay existed are counted once by the
assayer's :func:`backfill`. The boundary between the two is exact because loggers hold
:data:`LOCK` shared for their whole transaction while creating or deleting an assay holds it
exclusively: no log row is being stored while an assay appears, so ``backfill_until`` (the
largest row id then) splits the rows into counted-by-backfill and counted-by-loggers.

Counts live in ``assay_panes`` (one row per assay and pane start, a
:class:`~joey_core.assays.streaming.WindowCounts` as bytes): memory and storage grow with the bins
and the open panes, never with rows. The assayer deletes the panes no later window needs when
it stores a window's result.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
import psycopg
from psycopg import sql
from psycopg.rows import tuple_row

from joey_core import db
from joey_core.assays.runs import MICROS_SQL, AssayDefinition, timed_value_chunks, value_sql
from joey_core.assays.streaming import WindowCounts

log = logging.getLogger(__name__)

LOCK = 0x4A6F6579_41737379  # "JoeyAssy": pg advisory lock between storing log rows and changing assays
_STORED_BEFORE = sql.SQL("id <= %(until)s AND time >= %(since)s")

PaneKey = tuple[int, datetime]
"""(assay id, pane start)."""


def hold_for_logging(conn: psycopg.Connection[Any]) -> None:
    """Taken by a logger's transaction before it stores rows: assays cannot appear or vanish meanwhile."""
    conn.execute("SELECT pg_advisory_xact_lock_shared(%s)", (LOCK,))


def hold_for_change(conn: psycopg.Connection[Any]) -> int:
    """Taken by the transaction that creates or deletes an assay; waits for the loggers' open
    transactions to end. Returns the largest log row id, every one of them committed."""
    conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK,))
    ((stored,),) = _rows(conn, "SELECT coalesce(max(id), 0) FROM inference_logs", ())
    return int(stored)


class _Contended(Exception):
    """Another logger inserted one of the panes meanwhile."""


def add_counts(conn: psycopg.Connection[Any], updates: dict[PaneKey, WindowCounts]) -> None:
    """Add ``updates`` to the stored counts, within the caller's transaction.

    Stored panes are locked in key order, merged and written back (two statements when every
    pane exists, the common case); missing ones are inserted in key order. If another logger
    inserted one of them meanwhile, this round is rolled back to its savepoint, releasing the
    locks it took, and run again: a transaction never waits for a pane while holding a later
    one's lock, so loggers cannot deadlock. Each round reads anew (READ COMMITTED), so the pane
    the other logger inserted is found and merged into.
    """
    while updates:
        try:
            with conn.transaction():
                _add_once(conn, updates)
            return
        except _Contended:
            continue


def _add_once(conn: psycopg.Connection[Any], updates: dict[PaneKey, WindowCounts]) -> None:
    keys = sorted(updates)
    stored = _rows(
        conn,
        "SELECT assay_id, pane_start, counts FROM assay_panes "
        "WHERE (assay_id, pane_start) IN (SELECT * FROM unnest(%s::bigint[], %s::timestamptz[])) "
        "ORDER BY assay_id, pane_start FOR UPDATE",
        ([k[0] for k in keys], [k[1] for k in keys]),
    )
    if stored:
        merged = []
        for assay_id, start, data in stored:
            counts = WindowCounts.from_bytes(data)
            counts.merge(updates[(assay_id, start)])
            merged.append((assay_id, start, counts.to_bytes()))
        conn.execute(
            "UPDATE assay_panes p SET counts = u.counts FROM unnest(%s::bigint[], %s::timestamptz[], "
            "%s::bytea[]) AS u(assay_id, pane_start, counts) "
            "WHERE p.assay_id = u.assay_id AND p.pane_start = u.pane_start",
            tuple(list(column) for column in zip(*merged, strict=True)),
        )
    found = {(assay_id, start) for assay_id, start, _ in stored}
    missing = [k for k in keys if k not in found]
    if not missing:
        return
    inserted = _rows(
        conn,
        "INSERT INTO assay_panes (assay_id, pane_start, counts) "
        "SELECT * FROM unnest(%s::bigint[], %s::timestamptz[], %s::bytea[]) ORDER BY 1, 2 "
        "ON CONFLICT (assay_id, pane_start) DO NOTHING RETURNING assay_id, pane_start",
        ([k[0] for k in missing], [k[1] for k in missing], [updates[k].to_bytes() for k in missing]),
    )
    if len(inserted) < len(missing):
        raise _Contended


def _rows(
    conn: psycopg.Connection[Any], query: str | sql.Composed, params: tuple[Any, ...]
) -> list[tuple[Any, ...]]:
    # Tuples whatever the connection's row factory (the loggers' and the assayer's differ).
    with conn.cursor(row_factory=tuple_row) as cursor:
        return cursor.execute(query, params).fetchall()


DEFINITION_ERRORS = (ValueError, ArithmeticError, LookupError, TypeError)
"""What reading (``AssayDefinition.from_json``) or counting a bad definition raises in Python;
anything else (MemoryError, a RuntimeError) is no fault of the assay's and must not fail it for good."""


def assays_fault(exc: BaseException, conn: psycopg.Connection[Any]) -> bool:
    """Whether ``exc``, raised computing or counting an assay's values, is the assay's own doing (so
    it fails), not the database's or the platform's (so the work is tried again later)."""
    return isinstance(exc, DEFINITION_ERRORS) or db.is_query_error(exc, conn)


# Raised by the INSERT itself (a key or row the table refuses): the assays' part cannot cause these,
# so the insert is not run a second time without them only to be refused again.
_INSERT_REFUSALS = frozenset({"23", "54"})


MAX_FAILURE_LENGTH = 1000
"""Characters of an error kept as an assay's failure: enough to say what broke, bounded whatever the error."""


def failure_text(exc: BaseException) -> str:
    """What a stored failure, a dead letter's reason or a log line says about ``exc``, bounded."""
    state = getattr(exc, "sqlstate", None)
    text = f"{type(exc).__name__}{f' {state}' if state else ''}: {exc}"
    return text if len(text) <= MAX_FAILURE_LENGTH else text[: MAX_FAILURE_LENGTH - 3] + "..."


def mark_failed(conn: psycopg.Connection[Any], assay_id: int, reason: str) -> bool:
    """Mark the assay failed with ``reason``, within the caller's transaction; False when it was
    already failed, deleted, or its row is locked. Never waits for the row: a deletion holds it
    while it waits for the loggers' transactions, so waiting could deadlock. A skipped mark is made
    by the next batch, which fails the same way."""
    marked = _rows(
        conn,
        "UPDATE assays SET failure = %s, failed_at = now() WHERE id = (SELECT id FROM assays "
        "WHERE id = %s AND failure IS NULL FOR NO KEY UPDATE SKIP LOCKED) RETURNING id",
        (reason, assay_id),
    )
    return bool(marked)


class LiveCounter:
    """What a logger runs in its write transaction: count the rows it inserts."""

    def __init__(self) -> None:
        # Definitions never change once stored, so each is read once per logger.
        self._definitions: dict[int, AssayDefinition] = {}

    def prepare(self, conn: psycopg.Connection[Any], pipelines: set[tuple[str, str]]) -> Counting:
        """Hold :func:`hold_for_logging` and find the assays of these ``(workspace, pipeline)``:
        every one that has not failed, paused ones too, so a resumed assay lacks nothing. A stored
        definition that cannot be read fails its assay."""
        hold_for_logging(conn)
        ids = [
            row[0]
            for row in _rows(
                conn,
                "SELECT a.id FROM assays a JOIN workspaces w ON w.id = a.workspace_id "
                "WHERE (w.name, a.pipeline) IN (SELECT * FROM unnest(%s::text[], %s::text[])) "
                "AND a.failure IS NULL ORDER BY a.id",
                ([w for w, _ in pipelines], [p for _, p in pipelines]),
            )
        ]
        # Deleted (and failed) assays of these pipelines are forgotten.
        deleted = [
            i for i, d in self._definitions.items() if (d.workspace, d.pipeline) in pipelines and i not in ids
        ]
        for assay_id in deleted:
            del self._definitions[assay_id]
        failed: list[tuple[int, str]] = []
        missing = [i for i in ids if i not in self._definitions]
        if missing:
            for assay_id, workspace, name, data in _rows(
                conn,
                "SELECT a.id, w.name, a.name, a.definition FROM assays a "
                "JOIN workspaces w ON w.id = a.workspace_id WHERE a.id = ANY(%s)",
                (missing,),
            ):
                try:
                    self._definitions[assay_id] = AssayDefinition.from_json(workspace, name, data)
                except DEFINITION_ERRORS as exc:  # whatever is wrong with it, it is this assay's alone
                    if reason := _fail(conn, assay_id, f"{workspace}/{name}", exc):
                        failed.append((assay_id, reason))
        assays = [(i, self._definitions[i]) for i in ids if i in self._definitions]
        return Counting(assays, failed)


def _fail(conn: psycopg.Connection[Any], assay_id: int, name: str, exc: BaseException) -> str | None:
    """The reason, when this call marked the assay failed (None when it was not: see mark_failed)."""
    reason = f"its values cannot be counted: {failure_text(exc)}"
    if not mark_failed(conn, assay_id, reason):
        return None
    log.error("assay %s failed, it is no longer counted or scored: %s", name, reason)
    return reason


@dataclass(frozen=True)
class Counting:
    """The assays a batch of log rows is counted into."""

    assays: list[tuple[int, AssayDefinition]]
    failed: list[tuple[int, str]]
    """Assays this batch marked failed, with the reason (in the caller's transaction)."""

    def insert(self, conn: psycopg.Connection[Any], insert: sql.Composable) -> int:
        """Run ``insert`` (an INSERT without RETURNING) and count the rows it inserts into the
        assays; the number of rows inserted.

        The assays' values come with the insert (:meth:`returning`), so counting costs no second
        look at the table. If that fails, the insert is undone to its savepoint and run alone, and
        each assay is counted in a savepoint of its own: one that cannot be counted is marked
        failed and the rows are stored all the same. An error only the insert causes (a key or row
        the table refuses), or one of the database or the platform, propagates.
        """
        if self.assays:
            try:
                with conn.transaction():
                    inserted = _rows(conn, self.returning(insert), ())
                    self.count(conn, inserted)
                return len(inserted)
            except Exception as exc:
                if (
                    not assays_fault(exc, conn)
                    or (getattr(exc, "sqlstate", None) or "")[:2] in _INSERT_REFUSALS
                ):
                    raise
                log.warning("counting into %d assays failed, counting each alone: %s", len(self.assays), exc)
        ids = [row[0] for row in _rows(conn, sql.SQL("{} RETURNING id").format(insert), ())]
        self._count_each(conn, ids)
        return len(ids)

    def count_stored(self, conn: psycopg.Connection[Any], ids: Sequence[int]) -> None:
        """Count the rows of ``ids``, which this transaction has just inserted, into the assays: what
        :meth:`insert` does for rows stored by another statement (a COPY). An assay that cannot be
        counted is marked failed, as there."""
        if not self.assays or not ids:
            return
        values = [value_sql(d) for _, d in self.assays]
        query = sql.SQL("SELECT {} FROM inference_logs WHERE id = ANY(%s)").format(
            sql.SQL(", ").join([MICROS_SQL, *values])
        )
        try:
            with conn.transaction():
                self.count(conn, _rows(conn, query, (list(ids),)))
            return
        except Exception as exc:
            if not assays_fault(exc, conn):
                raise
            log.warning("counting into %d assays failed, counting each alone: %s", len(self.assays), exc)
        self._count_each(conn, ids)

    def _count_each(self, conn: psycopg.Connection[Any], ids: Sequence[int]) -> None:
        """Count the stored rows of ``ids`` into each assay in a savepoint of its own."""
        for assay_id, definition in self.assays:
            try:
                with conn.transaction():
                    rows = _rows(
                        conn,
                        sql.SQL("SELECT {}, {} FROM inference_logs WHERE id = ANY(%s)").format(
                            MICROS_SQL, value_sql(definition)
                        ),
                        (list(ids),),
                    )
                    Counting([(assay_id, definition)], []).count(conn, rows)
            except Exception as exc:
                if not assays_fault(exc, conn):
                    raise
                name = f"{definition.workspace}/{definition.name}"
                if reason := _fail(conn, assay_id, name, exc):
                    self.failed.append((assay_id, reason))

    def returning(self, insert: sql.Composable) -> sql.Composed:
        """``insert`` returning each inserted row's time and its value for every assay."""
        values = [value_sql(d) for _, d in self.assays]
        return sql.SQL("{} RETURNING {}").format(insert, sql.SQL(", ").join([MICROS_SQL, *values]))

    def count(self, conn: psycopg.Connection[Any], inserted: Sequence[tuple[Any, ...]]) -> None:
        """Add the rows ``returning`` gave back to their panes' counts."""
        if not self.assays or not inserted:
            return
        micros = np.array([row[0] for row in inserted], dtype=np.int64)
        updates: dict[PaneKey, WindowCounts] = {}
        for column, (assay_id, definition) in enumerate(self.assays, start=1):
            raw = np.array([row[column] for row in inserted], dtype=np.float64)  # None -> NaN
            counted = np.flatnonzero(~np.isnan(raw))
            if counted.size == 0:
                continue
            panes: dict[datetime, WindowCounts] = {}
            definition.count(micros[counted], raw[counted], panes)
            updates.update({(assay_id, start): counts for start, counts in panes.items()})
        add_counts(conn, updates)


def backfill(
    conn: psycopg.Connection[Any], assay_id: int, definition: AssayDefinition, since: datetime
) -> bool:
    """Count the log rows stored before the assay existed, from ``since``; once per assay.

    Runs in one transaction that locks the assay row, so a second assayer waits and then finds
    nothing to do; a crash counts nothing and the next run starts over. Returns False when the
    assay was deleted, failed or already backfilled; an assay whose values cannot be counted is
    marked failed. The lock is NO KEY UPDATE: loggers adding counts meanwhile (their foreign keys
    take KEY SHARE on the row) are not held up.
    """
    try:
        with conn.transaction():
            rows = _rows(
                conn,
                "SELECT backfill_until FROM assays WHERE id = %s AND failure IS NULL FOR NO KEY UPDATE",
                (assay_id,),
            )
            if not rows or rows[0][0] is None:
                return False
            panes: dict[datetime, WindowCounts] = {}
            chunks = timed_value_chunks(conn, definition, _STORED_BEFORE, until=rows[0][0], since=since)
            for micros, values in chunks:
                definition.count(micros, values, panes)
            add_counts(conn, {(assay_id, start): counts for start, counts in panes.items()})
            conn.execute("UPDATE assays SET backfill_until = NULL WHERE id = %s", (assay_id,))
    except Exception as exc:
        if not assays_fault(exc, conn):
            raise
        with conn.transaction():
            _fail(conn, assay_id, f"{definition.workspace}/{definition.name}", exc)
        return False
    log.info(
        "assay %s/%s: counted %d panes of earlier logs", definition.workspace, definition.name, len(panes)
    )
    return True
