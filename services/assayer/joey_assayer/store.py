"""Postgres access of the assayer: active assays, their next window, scoring a window from its
counts and storing the result once."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import DictRow, dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool

from joey_core.assays import Status, panes
from joey_core.assays.runs import AssayDefinition, result_of, summary_to_json
from joey_core.assays.streaming import WindowCounts

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LiveAssay:
    id: int
    definition: AssayDefinition
    backfilled: bool
    """False until the log rows stored before the assay existed are counted."""


@dataclass(frozen=True)
class Unpublished:
    id: int
    key: str
    status: str
    payload: bytes


class AssayerStore:
    def __init__(self, database_url: str) -> None:
        self.pool: ConnectionPool[psycopg.Connection[DictRow]] = ConnectionPool(
            database_url, min_size=1, max_size=2, kwargs={"row_factory": dict_row}, open=True
        )

    def close(self) -> None:
        self.pool.close()

    def active_assays(self) -> list[LiveAssay]:
        with self.pool.connection() as conn:
            rows = conn.execute(
                "SELECT a.id, w.name AS workspace, a.name, a.definition, "
                "a.backfill_until IS NULL AS backfilled FROM assays a "
                "JOIN workspaces w ON w.id = a.workspace_id "
                "WHERE a.active AND a.failure IS NULL ORDER BY a.id"
            ).fetchall()
        live = []
        for r in rows:
            try:
                definition = AssayDefinition.from_json(r["workspace"], r["name"], r["definition"])
            except panes.DEFINITION_ERRORS as exc:
                # Its alone: the others are scored all the same, and it is never tried again.
                self.fail(r["id"], f"{r['workspace']}/{r['name']}", exc)
                continue
            live.append(LiveAssay(r["id"], definition, r["backfilled"]))
        return live

    def fail(self, assay_id: int, name: str, exc: BaseException) -> None:
        reason = f"its definition cannot be read: {panes.failure_text(exc)}"
        with self.pool.connection() as conn:
            if panes.mark_failed(conn, assay_id, reason):
                log.error("assay %s failed, it is no longer counted or scored: %s", name, reason)

    def backfill(self, assay: LiveAssay, since: datetime) -> None:
        """Count the log rows stored before the assay existed into its windows from ``since``."""
        with self.pool.connection() as conn:
            panes.backfill(conn, assay.id, assay.definition, since)

    def next_window(self, assay: LiveAssay) -> tuple[datetime, datetime]:
        """The first window after the last stored one (or the assay's first window)."""
        with self.pool.connection() as conn:
            row = conn.execute(
                "SELECT max(window_start) AS last FROM assay_results WHERE assay_id = %s", (assay.id,)
            ).fetchone()
        d = assay.definition
        assert d.start is not None
        last = row["last"] if row else None
        start = d.start if last is None else last + d.step
        return start, start + d.width

    def score_window(self, assay: LiveAssay, start: datetime, end: datetime) -> bool:
        """Score ``[start, end)`` from its counts and store it; False if it was stored already
        (or the assay was deleted meanwhile).

        The unique (assay_id, window_start) key makes this idempotent: after a crash, or with a
        second assayer, the window keeps the one result stored first. The window is counted from
        its panes; panes no later window needs (a late record may have reopened one) go in the
        same transaction. A window without any value is stored as NoData without summaries, so
        the next window follows it, and never published; one with fewer values than the assay's
        min_count is scored, NoData too (``result_of``), and published like any result.
        """
        d = assay.definition
        with self.pool.connection() as conn:
            rows = conn.execute(
                "SELECT pane_start, counts FROM assay_panes "
                "WHERE assay_id = %s AND pane_start >= %s AND pane_start < %s",
                (assay.id, start, end),
            ).fetchall()
            counts = d.window_counts(
                start, {r["pane_start"]: WindowCounts.from_bytes(r["counts"]) for r in rows}
            )
            if counts.count == 0:
                empty = Jsonb({"window": None})
                values: tuple[Any, ...] = (math.nan, Jsonb([]), None, str(Status.NO_DATA), empty, True)
            else:
                result = result_of(d, start, end, counts)
                s = result.scores
                summaries = {
                    "baseline": summary_to_json(result.baseline),
                    "window": summary_to_json(result.window),
                }
                values = (s.score, Jsonb(list(s.scores)), s.bin_index, str(s.status), Jsonb(summaries), False)
            try:
                inserted = conn.execute(
                    "INSERT INTO assay_results (assay_id, window_start, window_end, score, scores, "
                    "bin_index, status, summaries, published) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) "
                    "ON CONFLICT (assay_id, window_start) DO NOTHING RETURNING id",
                    (assay.id, start, end, *values),
                ).fetchone()
            except psycopg.errors.ForeignKeyViolation:
                # Deleted while its window was being scored: there is nothing left to store it for.
                conn.rollback()
                return False
            # Panes before the next window's start are in no window left to score; locked in key
            # order, as loggers lock them, so a late logger and this cannot deadlock.
            conn.execute(
                "DELETE FROM assay_panes WHERE (assay_id, pane_start) IN (SELECT assay_id, pane_start "
                "FROM assay_panes WHERE assay_id = %s AND pane_start < %s ORDER BY pane_start FOR UPDATE)",
                (assay.id, start + d.step),
            )
        return inserted is not None

    def unpublished(self, limit: int = 500) -> list[Unpublished]:
        with self.pool.connection() as conn:
            rows = conn.execute(
                "SELECT r.id, w.name AS workspace, a.name AS assay, a.pipeline, a.definition, "
                "r.window_start, r.window_end, r.score, r.scores, r.bin_index, r.status, r.summaries "
                "FROM assay_results r JOIN assays a ON a.id = r.assay_id "
                "JOIN workspaces w ON w.id = a.workspace_id WHERE NOT r.published ORDER BY r.id LIMIT %s",
                (limit,),
            ).fetchall()
        return [_unpublished(r) for r in rows]

    def mark_published(self, ids: list[int]) -> None:
        with self.pool.connection() as conn:
            conn.execute("UPDATE assay_results SET published = true WHERE id = ANY(%s)", (ids,))


def _unpublished(row: DictRow) -> Unpublished:
    start = row["window_start"].isoformat()
    payload = {
        "workspace": row["workspace"],
        "assay": row["assay"],
        "pipeline": row["pipeline"],
        "iopath": row["definition"]["iopath"],
        "metric": row["definition"]["summarizer"]["metric"],
        "window_start": start,
        "window_end": row["window_end"].isoformat(),
        "score": row["score"],
        "scores": row["scores"],
        "bin_index": row["bin_index"],
        "status": row["status"],
        "alert_threshold": row["definition"]["alert_threshold"],
        "warning_threshold": row["definition"]["warning_threshold"],
        "baseline_summary": row["summaries"]["baseline"],
        "window_summary": row["summaries"]["window"],
    }
    key = f"{row['workspace']}/{row['assay']}/{start}"
    return Unpublished(row["id"], key, row["status"], json.dumps(payload).encode())
