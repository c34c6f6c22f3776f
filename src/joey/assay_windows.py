"""Per-window counts of live assays, kept in Postgres as the log rows are stored.

Each inference is counted exactly once: a logger adds the log rows it has just inserted (a
replayed or duplicated log record inserts nothing) to their assays' windows, in the same
transaction as the insert. Rows stored before an assay existed are counted once by the
assayer's :func:`backfill`. The boundary between the two is exact because loggers hold
:data:`LOCK` shared for their whole transaction while creating or deleting an assay holds it
exclusively: no log row is being stored while an assay appears, so ``backfill_until`` (the
largest row id then) splits the rows into counted-by-backfill and counted-by-loggers.

Counts live in ``assay_windows`` (one row per assay and window start, a
:class:`~joey.assays.streaming.WindowCounts` as jsonb): memory and storage grow with the bins
and the open windows, never with rows. The assayer deletes a window's counts when it stores
its result.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import numpy.typing as npt
import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from joey.assay_runs import FETCH_ROWS, AssayDefinition, query_params, values_query
from joey.assays.streaming import WindowCounts

log = logging.getLogger(__name__)

LOCK = 0x4A6F6579_41737379  # "JoeyAssy": pg advisory lock between storing log rows and changing assays
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)

WindowKey = tuple[int, datetime]
"""(assay id, window start)."""


def hold_for_logging(conn: psycopg.Connection[Any]) -> None:
    """Taken by a logger's transaction before it stores rows: assays cannot appear or vanish meanwhile."""
    conn.execute("SELECT pg_advisory_xact_lock_shared(%s)", (LOCK,))


def hold_for_change(conn: psycopg.Connection[Any]) -> int:
    """Taken by the transaction that creates or deletes an assay; waits for the loggers' open
    transactions to end. Returns the largest log row id, every one of them committed."""
    conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK,))
    row = conn.execute("SELECT coalesce(max(id), 0) FROM inference_logs").fetchone()
    assert row is not None
    return int(row[0] if isinstance(row, tuple) else next(iter(row.values())))


def _micros(times: Sequence[datetime]) -> npt.NDArray[np.int64]:
    return np.fromiter(((t - EPOCH) // _MICROSECOND for t in times), dtype=np.int64, count=len(times))


def windows_of(
    definition: AssayDefinition, times: Sequence[datetime]
) -> Iterator[tuple[datetime, npt.NDArray[np.intp]]]:
    """Each window start with the positions of ``times`` in ``[start, start + width)``; a time
    is in several windows when they slide (interval < width), and in none before the start."""
    assert definition.start is not None
    if not times:
        return
    origin = (definition.start - EPOCH) // _MICROSECOND
    width = definition.width // _MICROSECOND
    step = definition.step // _MICROSECOND
    since = _micros(times) - origin
    inside = np.flatnonzero(since >= 0)
    since = since[inside]
    last = since // step
    first = np.maximum((since - width) // step + 1, 0)
    spans = np.maximum(last - first + 1, 0)
    positions = np.repeat(inside, spans)
    offsets = np.arange(int(spans.sum())) - np.repeat(np.cumsum(spans) - spans, spans)
    window = np.repeat(first, spans) + offsets
    order = np.argsort(window, kind="stable")
    window, positions = window[order], positions[order]
    starts = np.flatnonzero(np.diff(window, prepend=-1))
    for begin, end in zip(starts.tolist(), [*starts[1:].tolist(), window.size], strict=True):
        k = int(window[begin])
        yield definition.start + k * definition.step, positions[begin:end]


def count_into(
    updates: dict[WindowKey, WindowCounts],
    assay_id: int,
    definition: AssayDefinition,
    times: Sequence[datetime],
    values: npt.NDArray[np.float64],
) -> None:
    """Add the values, at their times, to the counts of the windows they fall in."""
    bins = definition.baseline.bins if definition.baseline else None
    assert bins is not None
    for start, positions in windows_of(definition, times):
        counts = updates.setdefault((assay_id, start), WindowCounts.empty(bins))
        counts.add(values[positions], bins)


def add_counts(conn: psycopg.Connection[Any], updates: dict[WindowKey, WindowCounts]) -> None:
    """Add ``updates`` to the stored counts, within the caller's transaction.

    Windows are inserted and locked in key order, so concurrent loggers adding to the same
    windows wait for each other instead of deadlocking.
    """
    if not updates:
        return
    keys = sorted(updates)
    ids = [k[0] for k in keys]
    starts = [k[1] for k in keys]
    inserted = conn.execute(
        "INSERT INTO assay_windows (assay_id, window_start, counts) "
        "SELECT * FROM unnest(%s::bigint[], %s::timestamptz[], %s::jsonb[]) ORDER BY 1, 2 "
        "ON CONFLICT (assay_id, window_start) DO NOTHING RETURNING assay_id, window_start",
        (ids, starts, [Jsonb(updates[k].to_json()) for k in keys]),
    ).fetchall()
    done = {(_at(r, 0), _at(r, 1)) for r in inserted}
    rest = [k for k in keys if k not in done]
    if not rest:
        return
    rows = conn.execute(
        "SELECT assay_id, window_start, counts FROM assay_windows "
        "WHERE (assay_id, window_start) IN (SELECT * FROM unnest(%s::bigint[], %s::timestamptz[])) "
        "ORDER BY assay_id, window_start FOR UPDATE",
        ([k[0] for k in rest], [k[1] for k in rest]),
    ).fetchall()
    merged = []
    for row in rows:
        key = (_at(row, 0), _at(row, 1))
        counts = WindowCounts.from_json(_at(row, 2))
        counts.merge(updates[key])
        merged.append((key, counts))
    conn.execute(
        "UPDATE assay_windows w SET counts = u.counts "
        "FROM unnest(%s::bigint[], %s::timestamptz[], %s::jsonb[]) AS u(assay_id, window_start, counts) "
        "WHERE w.assay_id = u.assay_id AND w.window_start = u.window_start",
        ([k[0] for k, _ in merged], [k[1] for k, _ in merged], [Jsonb(c.to_json()) for _, c in merged]),
    )


def _at(row: Any, index: int) -> Any:
    return row[index] if isinstance(row, tuple) else list(row.values())[index]


@dataclass(frozen=True)
class CountedAssay:
    id: int
    definition: AssayDefinition


class LiveCounter:
    """What a logger runs in its write transaction: count the rows it just inserted."""

    def __init__(self) -> None:
        # Definitions never change once stored, so each is read once per logger.
        self._definitions: dict[int, AssayDefinition] = {}

    def count(self, conn: psycopg.Connection[Any], inserted: Sequence[tuple[int, str, str]]) -> int:
        """Count the rows ``(id, workspace, pipeline)`` just inserted; returns the windows touched.

        The caller holds :func:`hold_for_logging` since before the insert.
        """
        if not inserted:
            return 0
        assays = self._assays(conn, {(workspace, pipeline) for _, workspace, pipeline in inserted})
        updates: dict[WindowKey, WindowCounts] = {}
        for assay in assays:
            d = assay.definition
            ids = [
                i for i, workspace, pipeline in inserted if (workspace, pipeline) == (d.workspace, d.pipeline)
            ]
            rows = conn.execute(
                values_query(d, sql.SQL("id = ANY(%(ids)s)"), with_time=True), query_params(d, ids=ids)
            ).fetchall()
            if rows:
                times = [_at(r, 0) for r in rows]
                values = np.fromiter((_at(r, 1) for r in rows), dtype=np.float64, count=len(rows))
                count_into(updates, assay.id, d, times, values)
        add_counts(conn, updates)
        return len(updates)

    def _assays(self, conn: psycopg.Connection[Any], pipelines: set[tuple[str, str]]) -> list[CountedAssay]:
        """Every assay (paused ones too, so a resumed one lacks nothing) of these pipelines."""
        rows = conn.execute(
            "SELECT a.id, w.name, a.pipeline FROM assays a JOIN workspaces w ON w.id = a.workspace_id "
            "WHERE (w.name, a.pipeline) IN (SELECT * FROM unnest(%s::text[], %s::text[]))",
            ([w for w, _ in pipelines], [p for _, p in pipelines]),
        ).fetchall()
        found = [(_at(r, 0), _at(r, 1)) for r in rows]
        missing = [i for i, _ in found if i not in self._definitions]
        if missing:
            for r in conn.execute(
                "SELECT a.id, w.name, a.name, a.definition FROM assays a "
                "JOIN workspaces w ON w.id = a.workspace_id WHERE a.id = ANY(%s)",
                (missing,),
            ).fetchall():
                self._definitions[_at(r, 0)] = AssayDefinition.from_json(_at(r, 1), _at(r, 2), _at(r, 3))
        return [CountedAssay(i, self._definitions[i]) for i, _ in found]


def backfill(
    conn: psycopg.Connection[Any], assay_id: int, definition: AssayDefinition, since: datetime
) -> bool:
    """Count the log rows stored before the assay existed, from ``since``; once per assay.

    Runs in one transaction that locks the assay row, so a second assayer waits and then finds
    nothing to do; a crash counts nothing and the next run starts over. Returns False when the
    assay was deleted or already backfilled.
    """
    with conn.transaction():
        row = conn.execute(
            "SELECT backfill_until FROM assays WHERE id = %s FOR UPDATE", (assay_id,)
        ).fetchone()
        if row is None or _at(row, 0) is None:
            return False
        until = int(_at(row, 0))
        updates: dict[WindowKey, WindowCounts] = {}
        rows = sql.SQL("id <= %(until)s AND time >= %(since)s")
        with conn.cursor(name="assay_backfill") as cursor:
            cursor.itersize = FETCH_ROWS
            cursor.execute(
                values_query(definition, rows, with_time=True),
                query_params(definition, until=until, since=since),
            )
            while chunk := cursor.fetchmany(FETCH_ROWS):
                times = [_at(r, 0) for r in chunk]
                values = np.fromiter((_at(r, 1) for r in chunk), dtype=np.float64, count=len(chunk))
                count_into(updates, assay_id, definition, times, values)
        add_counts(conn, updates)
        conn.execute("UPDATE assays SET backfill_until = NULL WHERE id = %s", (assay_id,))
    log.info(
        "assay %s/%s: counted %d windows of earlier logs", definition.workspace, definition.name, len(updates)
    )
    return True
