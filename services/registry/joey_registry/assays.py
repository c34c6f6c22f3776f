"""Assays in the registry: checking definitions, storing them, and interactive runs over the log.

A definition is checked completely (pipeline, iopath against the pipeline's signature, window,
summarizer, baseline) before anything is stored. The baseline is summarised once, at creation:
the stored assay keeps its bins and counts, so later windows are always binned the same way.
Scoring itself is :mod:`joey_core.assays.runs`, shared with the live assayer.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from joey_core import db, topics
from joey_core.assays import Scores, Status, Summary
from joey_core.assays.panes import DEFINITION_ERRORS, failure_text, hold_for_change
from joey_core.assays.runs import (
    MICROS_SQL,
    MICROSECOND,
    AssayDefinition,
    BaselineRows,
    IoPath,
    RunWindows,
    WindowResult,
    count_values,
    log_times,
    log_values,
    row_values,
    summary_from_json,
    time_after,
    time_of,
    value_sql,
    window_results,
)
from joey_core.models import TensorSpec
from joey_core.topics import MAX_NAME_LENGTH
from joey_registry.access import Access, Action, Caller
from joey_registry.domain import Pipeline, ResolvedStep, ShadowStep
from joey_registry.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from joey_registry.store import Store, WorkspaceRef

log = logging.getLogger(__name__)

MAX_PANES_PER_WINDOW = 1440
"""Live windows are counted in panes (see AssayDefinition.pane) and merged when scored: a bound
on the panes of one window bounds that merge (a day every minute is 1,440)."""

MAX_INTERACTIVE_PANE_MERGES = 100_000
"""An interactive run is bounded by the panes its windows merge: 100,000 tumbling windows, or 69
windows of a day every minute."""

MAX_WINDOW = timedelta(days=3650)

MAX_IOPATH_INDEX = 2**31 - 1
"""Postgres's jsonb index is an int4: a larger one cannot be looked up at all."""
MAX_IOPATH_FIELD = 256
"""Characters of an iopath's field name: far above any tensor's, bounded so a definition stays small."""
MAX_BINS = 1000
"""Bins of a summarizer: every window's counts, stored per pane and merged per window, grow with them."""
MAX_BASELINE_VALUES = 1_000_000
"""Values a baseline is summarised from, given as data or read from the log (8 MB of float64)."""


@dataclass(frozen=True)
class UnreadableDefinition:
    """What is known of a stored assay whose definition cannot be read (written around the
    registry's checks, or by another version): it is listed, failed, instead of failing the list."""

    workspace: str
    name: str
    pipeline: str


@dataclass(frozen=True)
class StoredAssay:
    definition: AssayDefinition | UnreadableDefinition
    active: bool
    created_at: datetime
    failure: str = ""
    """Why the assay stopped (migration 0013); empty while it works."""
    failed_at: datetime | None = None


def _stored(ws: WorkspaceRef, row: dict[str, Any]) -> StoredAssay:
    """The assay of an ``assays`` row; one whose definition cannot be read is failed, saying why
    (the loggers and the assayer mark it so too), and the others are listed all the same."""
    failure = row["failure"] or ""
    definition: AssayDefinition | UnreadableDefinition
    try:
        definition = AssayDefinition.from_json(ws.name, row["name"], row["definition"])
    except DEFINITION_ERRORS as exc:
        definition = UnreadableDefinition(ws.name, row["name"], row["pipeline"])
        failure = failure or f"its definition cannot be read: {failure_text(exc)}"
    return StoredAssay(definition, row["active"], row["created_at"], failure, row["failed_at"])


class AssayStore:
    """The SQL of the assays and assay_results tables, over the registry's connection pool."""

    def __init__(self, store: Store) -> None:
        self._pool = store.pool

    def insert(self, ws: WorkspaceRef, definition: AssayDefinition) -> StoredAssay | None:
        """The stored assay, or None when the name is taken in the workspace; NotFound when its
        pipeline was deleted meanwhile."""
        with self._pool.connection() as conn:
            # Held until commit: a deletion of the pipeline (which refuses while assays watch it)
            # either went first, and the assay is refused, or waits and then sees it.
            pipeline = conn.execute(
                "SELECT id FROM pipelines WHERE workspace_id = %s AND name = %s FOR SHARE",
                (ws.id, definition.pipeline),
            ).fetchone()
            if pipeline is None:
                raise NotFound(f"pipeline {definition.pipeline!r} not found in workspace {ws.name!r}")
            # Log rows stored so far are the assayer's to count, every later one the loggers'.
            stored = hold_for_change(conn)
            row = conn.execute(
                "INSERT INTO assays (workspace_id, name, pipeline, definition, backfill_until) "
                "VALUES (%s, %s, %s, %s, %s) "
                "ON CONFLICT (workspace_id, name) DO NOTHING RETURNING active, created_at",
                (ws.id, definition.name, definition.pipeline, Jsonb(definition.to_json()), stored),
            ).fetchone()
        return StoredAssay(definition, row["active"], row["created_at"]) if row else None

    def find(self, ws: WorkspaceRef, pipeline: str, name: str = "") -> list[StoredAssay]:
        with self._pool.connection() as conn:
            rows = conn.execute(
                "SELECT name, pipeline, definition, active, created_at, failure, failed_at FROM assays "
                "WHERE workspace_id = %s "
                "AND (%s = '' OR pipeline = %s) AND (%s = '' OR name = %s) ORDER BY name",
                (ws.id, pipeline, pipeline, name, name),
            ).fetchall()
        return [_stored(ws, r) for r in rows]

    def set_active(self, ws: WorkspaceRef, name: str, active: bool) -> bool:
        with self._pool.connection() as conn:
            cursor = conn.execute(
                "UPDATE assays SET active = %s WHERE workspace_id = %s AND name = %s", (active, ws.id, name)
            )
            return cursor.rowcount == 1

    def delete(self, ws: WorkspaceRef, name: str) -> bool:
        with self._pool.connection() as conn:
            # First wait for a backfill of the assay (it locks the row this way), without holding
            # up the loggers; then for the loggers that may be adding to its windows.
            conn.execute(
                "SELECT id FROM assays WHERE workspace_id = %s AND name = %s FOR NO KEY UPDATE", (ws.id, name)
            )
            hold_for_change(conn)
            cursor = conn.execute("DELETE FROM assays WHERE workspace_id = %s AND name = %s", (ws.id, name))
            return cursor.rowcount == 1

    def results(
        self, ws: WorkspaceRef, definition: AssayDefinition, start: datetime | None, end: datetime | None
    ) -> list[WindowResult]:
        with self._pool.connection() as conn:
            rows = conn.execute(
                "SELECT r.window_start, r.window_end, r.score, r.scores, r.bin_index, r.status, r.summaries "
                "FROM assay_results r "
                "JOIN assays a ON a.id = r.assay_id WHERE a.workspace_id = %s AND a.name = %s "
                # The assayer stores a window without any value (NoData, so the next window follows
                # it) with no window summary, and one of fewer values than min_count (NoData too)
                # with its summary: only the latter is a result, as in interactive runs.
                "AND jsonb_typeof(r.summaries->'window') = 'object' "
                "AND (%s::timestamptz IS NULL OR r.window_start >= %s) "
                "AND (%s::timestamptz IS NULL OR r.window_start < %s) ORDER BY r.window_start",
                (ws.id, definition.name, start, start, end, end),
            ).fetchall()
        return [stored_result(definition, r) for r in rows]

    def compile_values(self, definition: AssayDefinition) -> None:
        """Plan the SQL that gives the assay's values, as the loggers and the assayer run it; the
        database's error, if any, propagates. Planning resolves every operator, reading no row."""
        with self._pool.connection() as conn:
            conn.execute(
                sql.SQL("SELECT {}, {} FROM inference_logs WHERE false").format(
                    MICROS_SQL, value_sql(definition)
                )
            )

    def values(
        self,
        definition: AssayDefinition,
        start: datetime | None,
        end: datetime | None,
        limit: int | None = None,
    ) -> Any:
        with self._pool.connection() as conn:
            return log_values(conn, definition, start, end, limit)

    def row_values(self, definition: AssayDefinition, rows: BaselineRows) -> tuple[Any, Any]:
        with self._pool.connection() as conn:
            return row_values(conn, definition, rows)

    def time_after(self, definition: AssayDefinition, rows: BaselineRows) -> int | None:
        with self._pool.connection() as conn:
            return time_after(conn, definition, rows)

    def count_values(self, definition: AssayDefinition) -> int:
        with self._pool.connection() as conn:
            return count_values(conn, definition)

    def log_times(self, workspace: str, pipeline: str) -> tuple[datetime | None, datetime | None]:
        with self._pool.connection() as conn:
            return log_times(conn, workspace, pipeline)

    def window_results(self, definition: AssayDefinition, windows: RunWindows) -> list[WindowResult]:
        with self._pool.connection() as conn:
            return window_results(conn, definition, windows.until, open_window=windows.open)


def stored_result(definition: AssayDefinition, row: dict[str, Any]) -> WindowResult:
    scores = Scores(
        metric=definition.summarizer.metric,
        score=row["score"],
        scores=tuple(row["scores"]),
        bin_index=row["bin_index"],
        status=Status(row["status"]),
    )
    summaries = row["summaries"]
    return WindowResult(
        row["window_start"],
        row["window_end"],
        scores,
        summary_from_json(summaries["baseline"]),
        summary_from_json(summaries["window"]),
    )


def _record_fields(kind: str, pipeline: Pipeline) -> dict[str, TensorSpec] | None:
    """Fields of a record's inputs (or outputs) with their specs, from the deployed (else latest)
    version; None when the pipeline's steps do not tell."""
    version = pipeline.versions[-1]
    if pipeline.deployment is not None:
        version = next(
            (v for v in pipeline.versions if v.version == pipeline.deployment.pipeline_version), version
        )
    models = [s.champion if isinstance(s, ShadowStep) else s for s in version.steps]
    steps = [s for s in models if isinstance(s, ResolvedStep)]
    if not steps:
        return None
    if kind == "input":
        first = steps[0]
        return {first.source(spec.name): spec for spec in first.inputs}
    return {spec.name: spec for spec in steps[-1].outputs}


def _model_names(pipeline: Pipeline) -> set[str]:
    names: set[str] = set()
    for version in pipeline.versions:
        for step in version.steps:
            if isinstance(step, ResolvedStep):
                names.add(step.model)
            elif isinstance(step, ShadowStep):
                names.update(m.model for m in (step.champion, *step.challengers))
    return names


def check_iopath(iopath: IoPath, pipeline: Pipeline) -> None:
    fields = _record_fields(iopath.kind, pipeline)
    if fields is None:
        return
    spec = fields.get(iopath.field)
    if spec is None:
        raise InvalidArgument(
            f"pipeline {pipeline.name!r} has no {iopath.kind} field {iopath.field!r}; "
            f"its {iopath.kind}s are {', '.join(sorted(fields)) or 'none'}"
        )
    # The first dimension of a model's tensor is the batch; a record holds one row of it.
    per_record = spec.shape[1:]
    if len(per_record) > 1:
        return
    if not per_record:
        if iopath.index is not None:
            raise InvalidArgument(
                f"{iopath.kind} {iopath.field!r} is a scalar per record; drop the index {iopath.index}"
            )
        return
    width = per_record[0]
    if iopath.index is None:
        raise InvalidArgument(
            f"{iopath.kind} {iopath.field!r} is a vector per record; give an index, e.g. "
            f"'{iopath.kind} {iopath.field} 0'"
        )
    if width > 0 and iopath.index >= width:
        raise InvalidArgument(
            f"index {iopath.index} is out of range for {iopath.kind} {iopath.field!r} "
            f"of {width} values (indices 0..{width - 1})"
        )


class Assays:
    """Assay operations; each authorizes the caller in the definition's workspace first."""

    def __init__(self, store: Store, access: Access) -> None:
        self.store = store
        self.sql = AssayStore(store)
        self.access = access

    def create(self, caller: Caller, definition: AssayDefinition) -> StoredAssay:
        ws = self.access.authorize(caller, definition.workspace, Action.WRITE)
        try:
            topics.validate_name("assay", definition.name)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        resolved = self._resolve(ws, definition, live=True)
        self._test_compile(resolved)
        stored = self.sql.insert(ws, resolved)
        if stored is None:
            raise AlreadyExists(f"assay {definition.name!r} already exists in workspace {ws.name!r}")
        log.info(
            "created assay %s/%s on %s %s", ws.name, definition.name, definition.pipeline, definition.iopath
        )
        return stored

    def list_all(self, caller: Caller, workspace: str, pipeline: str) -> list[StoredAssay]:
        ws = self.access.authorize(caller, workspace, Action.READ)
        return self.sql.find(ws, pipeline)

    def get(self, caller: Caller, workspace: str, name: str) -> StoredAssay:
        ws = self.access.authorize(caller, workspace, Action.READ)
        return self._get(ws, name)

    def _get(self, ws: WorkspaceRef, name: str) -> StoredAssay:
        found = self.sql.find(ws, "", name) if name else []
        if not found:
            raise NotFound(f"assay {name!r} not found in workspace {ws.name!r}")
        return found[0]

    def set_active(self, caller: Caller, workspace: str, name: str, active: bool) -> StoredAssay:
        ws = self.access.authorize(caller, workspace, Action.WRITE)
        if active and (failure := self._get(ws, name).failure):
            # Its windows lack what was logged since it failed: resuming would score them as if whole.
            raise FailedPrecondition(
                f"assay {name!r} failed and cannot be resumed ({failure}); delete it and create it anew"
            )
        if not self.sql.set_active(ws, name, active):
            raise NotFound(f"assay {name!r} not found in workspace {ws.name!r}")
        log.info("%s assay %s/%s", "resumed" if active else "paused", ws.name, name)
        return self._get(ws, name)

    def delete(self, caller: Caller, workspace: str, name: str) -> None:
        ws = self.access.authorize(caller, workspace, Action.WRITE)
        if not self.sql.delete(ws, name):
            raise NotFound(f"assay {name!r} not found in workspace {ws.name!r}")
        log.info("deleted assay %s/%s", ws.name, name)

    def preview_baseline(self, caller: Caller, definition: AssayDefinition) -> Summary:
        ws = self.access.authorize(caller, definition.workspace, Action.READ)
        resolved = self._resolve(ws, definition, live=False)
        assert resolved.baseline is not None
        return resolved.baseline

    def run_interactive(
        self, caller: Caller, definition: AssayDefinition, end: datetime | None
    ) -> tuple[list[WindowResult], tuple[datetime, datetime] | None]:
        """The results of the windows closed by ``end`` (None: as far as windows have closed), then
        the window still open, if it has started; with an ``end`` before windows had closed there,
        no open window, and the window that extends past ``end`` (second), not shown.

        A window has closed once its end has passed on the wall clock or in event time (the
        pipeline's latest logged time): the live assayer's rule, which also waits out its allowed
        lateness for late records (docs/assays.md, "The open window").
        """
        ws = self.access.authorize(caller, definition.workspace, Action.READ)
        resolved = self._resolve(ws, definition, live=False)
        if resolved.start is None:
            return [], None  # nothing logged yet
        _, watermark = self.sql.log_times(ws.name, definition.pipeline)
        now = datetime.now(UTC)
        windows = resolved.run_windows(end, max(now, watermark or now))
        # Each window merges its panes: the run's cost is windows times panes per window.
        count = len(windows.closed) + (windows.open is not None)
        merges = count * (resolved.width // resolved.pane)
        if merges > MAX_INTERACTIVE_PANE_MERGES:
            raise InvalidArgument(
                f"{count} windows of {resolved.width // resolved.pane} panes each from "
                f"{resolved.start.isoformat()} to {windows.until.isoformat()}: at most "
                f"{MAX_INTERACTIVE_PANE_MERGES} panes per run; "
                "use a later start, an earlier end or a longer interval"
            )
        return self.sql.window_results(resolved, windows), windows.cut

    def results(
        self, caller: Caller, workspace: str, name: str, start: datetime | None, end: datetime | None
    ) -> tuple[AssayDefinition, list[WindowResult]]:
        """The assay's definition and its stored results whose window starts in ``[start, end)``."""
        ws = self.access.authorize(caller, workspace, Action.READ)
        stored = self._get(ws, name)
        if isinstance(stored.definition, UnreadableDefinition):
            raise FailedPrecondition(f"assay {name!r} has no results: {stored.failure}")
        return stored.definition, self.sql.results(ws, stored.definition, start, end)

    def _test_compile(self, d: AssayDefinition) -> None:
        """Run what a logger runs for the stored assay, on nothing and on its baseline's median at
        its start: a definition that cannot be counted is refused here instead of failing live."""
        assert d.baseline is not None and d.start is not None
        try:
            self.sql.compile_values(d)
        except psycopg.Error as exc:
            if not db.is_query_error(exc):
                raise  # the database failing (an outage, a pool timeout), not the definition
            raise InvalidArgument(f"the values at {d.iopath} cannot be computed: {exc}") from None
        micros = np.array([(d.start - datetime(1970, 1, 1, tzinfo=UTC)) // MICROSECOND], dtype=np.int64)
        median = d.baseline.median if math.isfinite(d.baseline.median) else 0.0
        try:
            d.count(micros, np.array([median], dtype=np.float64), {})
        except (ValueError, OverflowError, ArithmeticError) as exc:
            raise InvalidArgument(f"the assay's windows cannot be counted: {exc}") from None

    @staticmethod
    def _check_bounds(d: AssayDefinition) -> None:
        """InvalidArgument naming the first field beyond what the platform can store or count."""
        index = d.iopath.index
        if index is not None and index > MAX_IOPATH_INDEX:
            raise InvalidArgument(f"iopath index {index} is too large: at most {MAX_IOPATH_INDEX}")
        if len(d.iopath.field) > MAX_IOPATH_FIELD:
            raise InvalidArgument(
                f"iopath field name has {len(d.iopath.field)} characters: at most {MAX_IOPATH_FIELD}"
            )
        if len(d.model) > MAX_NAME_LENGTH:
            raise InvalidArgument(f"model name has {len(d.model)} characters: at most {MAX_NAME_LENGTH}")
        s = d.summarizer
        if s.num_bins > MAX_BINS:
            raise InvalidArgument(f"num_bins must be at most {MAX_BINS}, got {s.num_bins}")
        if s.edges is not None and len(s.edges) > MAX_BINS + 1:
            raise InvalidArgument(f"edges must be at most {MAX_BINS + 1} values, got {len(s.edges)}")
        if d.baseline_data is not None and len(d.baseline_data) > MAX_BASELINE_VALUES:
            raise InvalidArgument(
                f"baseline_data has {len(d.baseline_data)} values: at most {MAX_BASELINE_VALUES}"
            )
        rows = d.baseline_rows
        if rows is not None and rows.stop - rows.start > MAX_BASELINE_VALUES:
            raise InvalidArgument(
                f"baseline_rows selects {rows.stop - rows.start} values: at most {MAX_BASELINE_VALUES}"
            )

    def _resolve(self, ws: WorkspaceRef, d: AssayDefinition, live: bool) -> AssayDefinition:
        """``d`` checked, with its baseline summarised and its start filled in."""
        self._check_bounds(d)
        pipeline = self.store.get_pipeline(ws, d.pipeline)
        if pipeline is None:
            raise InvalidArgument(f"pipeline {d.pipeline!r} not found in workspace {ws.name!r}")
        check_iopath(d.iopath, pipeline)
        if d.model and d.model not in _model_names(pipeline):
            raise InvalidArgument(
                f"model {d.model!r} is not a step of any version of pipeline {d.pipeline!r}; "
                f"its models are {', '.join(sorted(_model_names(pipeline)))}"
            )
        if d.width.total_seconds() <= 0:
            raise InvalidArgument(f"window width must be positive, got {d.width.total_seconds()} s")
        if d.interval is not None and d.interval.total_seconds() <= 0:
            raise InvalidArgument(f"window interval must be positive, got {d.interval.total_seconds()} s")
        if max(d.width, d.step) > MAX_WINDOW:
            raise InvalidArgument(f"window width and interval must be at most {MAX_WINDOW.days} days")
        if d.width // d.pane > MAX_PANES_PER_WINDOW:
            raise InvalidArgument(
                f"a window of {d.width.total_seconds():g} s every {d.step.total_seconds():g} s is made of "
                f"{d.width // d.pane} panes of {d.pane.total_seconds():g} s (their greatest common divisor); "
                f"at most {MAX_PANES_PER_WINDOW}: choose a width and an interval with a larger common divisor"
            )
        for name, threshold in (
            ("alert_threshold", d.alert_threshold),
            ("warning_threshold", d.warning_threshold),
        ):
            if threshold is not None and not math.isfinite(threshold):
                raise InvalidArgument(f"{name} must be a finite number, got {threshold}")
        try:
            d.summarizer.check()
            d.check_min_count()
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        values, start = self._baseline(d)
        try:
            resolved = d.with_baseline(values)
        except ValueError as exc:
            raise InvalidArgument(f"bad baseline or summarizer: {exc}") from None
        start = d.start or start
        if start is None:
            start = datetime.now(UTC) if live else self.sql.log_times(ws.name, d.pipeline)[0]
        # The stored form keeps the baseline summary only; its values are not kept.
        return replace(resolved, start=start, interval=d.step)

    def _after_rows(self, d: AssayDefinition, rows: BaselineRows, last: int) -> datetime:
        """Where the windows after a row baseline whose last row's time is ``last`` start: just
        after it, so no window holds the baseline's own rows; but at it when the row after the
        baseline shares that time (the baseline splits a batch), so no later row is left out
        and the first window holds the baseline's last rows of that batch too."""
        after = self.sql.time_after(d, rows)
        return time_of(last) if after == last else time_of(last) + MICROSECOND

    def _baseline(self, d: AssayDefinition) -> tuple[Any, datetime | None]:
        """The baseline's values, and where its windows start by default: the baseline's end (for
        a row baseline, see :meth:`_after_rows`), None for values given as data."""
        given = [
            name
            for name, present in (
                ("a time range (baseline_start, baseline_end)", d.baseline_start or d.baseline_end),
                ("rows (first, last or a row range)", d.baseline_rows),
                ("data (baseline_data)", d.baseline_data is not None),
            )
            if present
        ]
        if len(given) != 1:
            found = f"got {' and '.join(given)}" if given else "got none"
            raise InvalidArgument(
                f"give the baseline one way: as a time range, as rows of the log or as data; {found}"
            )
        if d.baseline_data is not None:
            values: Any = d.baseline_data
            where, start = "baseline_data", None
        elif d.baseline_rows is not None:
            try:
                d.baseline_rows.check()
            except ValueError as exc:
                raise InvalidArgument(str(exc)) from None
            micros, values = self.sql.row_values(d, d.baseline_rows)
            wanted = d.baseline_rows.stop - d.baseline_rows.start
            if len(values) < wanted:
                raise InvalidArgument(
                    f"the baseline is {d.baseline_rows}, but the logs of pipeline {d.pipeline!r} hold only "
                    f"{self.sql.count_values(d)} values at {d.iopath}: choose fewer rows, or log more first"
                )
            where = f"the logs of pipeline {d.pipeline!r} at {d.iopath} ({d.baseline_rows})"
            start = self._after_rows(d, d.baseline_rows, int(micros[-1]))
        else:
            if d.baseline_start is None or d.baseline_end is None or d.baseline_start >= d.baseline_end:
                raise InvalidArgument("the baseline range needs baseline_start before baseline_end")
            values = self.sql.values(d, d.baseline_start, d.baseline_end, limit=MAX_BASELINE_VALUES)
            if len(values) > MAX_BASELINE_VALUES:
                raise InvalidArgument(
                    f"baseline_start/baseline_end select over {MAX_BASELINE_VALUES} values of pipeline "
                    f"{d.pipeline!r} at {d.iopath}: at most {MAX_BASELINE_VALUES}, choose a shorter range"
                )
            where = (
                f"the logs of pipeline {d.pipeline!r} at {d.iopath} from "
                f"{d.baseline_start.isoformat()} to {d.baseline_end.isoformat()}"
            )
            start = d.baseline_end
        if len(values) == 0:
            raise InvalidArgument(f"the baseline is empty: no values in {where}")
        return values, start
