"""Assay definitions, their windows, and scoring a window from the inference log.

Shared by the registry (interactive runs over past logs), the loggers (which count each new
log row into its assays' open windows) and the assayer (live results). Every path selects
values with :func:`values_query` and counts them into :class:`joey_core.assays.streaming.WindowCounts`,
whose summary depends only on the set of values, so the live and interactive results of a
window are the same to the last bit.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Generator, Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, cast

import numpy as np
import numpy.typing as npt
import psycopg
from psycopg import sql
from psycopg.rows import tuple_row

from joey_core.assays import (
    AGGREGATIONS,
    BIN_MODES,
    METRICS,
    Aggregation,
    BinMode,
    Bins,
    Metric,
    Scores,
    Status,
    Summary,
    baseline_summary,
    score_counts,
)
from joey_core.assays._checks import check_min_count
from joey_core.assays.streaming import WindowCounts

DEFAULT_WIDTH = timedelta(hours=24)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MICROSECOND = timedelta(microseconds=1)
MICROS_SQL = sql.SQL("(extract(epoch FROM time) * 1000000)::bigint")
"""A log row's time as microseconds since the epoch: windows are assigned on integers."""
DEFAULT_ALERT_THRESHOLD = 0.25
DEFAULT_MIN_COUNT = 30
"""Windows with fewer values are NoData. Below about 30 values an empty bin decides the score: with
the default 5 quantile bins, windows drawn from the baseline's own distribution leave a bin empty
every time at 1-3 values (PSI 2.7-4.2), half the time at 10, 1 in 140 at 30 (docs/assays.md,
"Small windows")."""
# Values fetched from Postgres per round trip when a window or baseline is read.
FETCH_ROWS = 50_000

_IOPATH = re.compile(r"^\s*(input|output)\s+(\S+)(?:\s+(\d+))?\s*$")


@dataclass(frozen=True)
class IoPath:
    """Which value of a log row an assay follows: ``input features 2`` = ``inputs["features"][2]``."""

    kind: Literal["input", "output"]
    field: str
    index: int | None = None

    @classmethod
    def parse(cls, text: str) -> IoPath:
        match = _IOPATH.match(text)
        if match is None:
            raise ValueError(
                f"invalid iopath {text!r}: expected 'input <field> [<index>]' or 'output <field> [<index>]'"
            )
        kind, name, index = match.groups()
        return cls(cast(Literal["input", "output"], kind), name, None if index is None else int(index))

    def __str__(self) -> str:
        index = "" if self.index is None else f" {self.index}"
        return f"{self.kind} {self.field}{index}"

    def expression(self) -> sql.Composable:
        """The jsonb value the path points at in an ``inference_logs`` row."""
        column = sql.Identifier("inputs" if self.kind == "input" else "outputs")
        value = sql.SQL("{}->{}").format(column, sql.Literal(self.field))
        if self.index is not None:
            value = sql.SQL("{}->{}").format(value, sql.Literal(self.index))
        return value


@dataclass(frozen=True)
class Summarizer:
    num_bins: int = 5
    bin_mode: BinMode = "quantile"
    edges: tuple[float, ...] | None = None
    outlier_bins: bool = True
    aggregation: Aggregation = "density"
    metric: Metric = "psi"
    bin_weights: tuple[float, ...] | None = None

    def check(self) -> None:
        """ValueError naming the first bad setting; weights are checked against the bin count."""
        for name, value, allowed in (
            ("bin_mode", self.bin_mode, BIN_MODES),
            ("aggregation", self.aggregation, AGGREGATIONS),
            ("metric", self.metric, METRICS),
        ):
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; expected one of {', '.join(allowed)}")
        if self.num_bins < 1:
            raise ValueError(f"num_bins must be at least 1, got {self.num_bins}")
        if self.bin_weights is not None:
            expected = self.num_bins + 2 if self.outlier_bins else self.num_bins
            if len(self.bin_weights) != expected:
                raise ValueError(
                    f"bin_weights must have one weight per bin, outlier bins included: "
                    f"expected {expected}, got {len(self.bin_weights)}"
                )


@dataclass(frozen=True)
class BaselineRows:
    """A baseline of log rows chosen by position: ``[start, stop)``, 0-based, among the values the
    assay counts, in log order (time, then row id: the order of ``joey logs`` pages, deterministic
    also for the rows of one batch, which share their time). With ``from_end``, positions count
    back from the newest value: the last N are ``BaselineRows(0, N, from_end=True)``."""

    start: int
    stop: int
    from_end: bool = False

    def check(self) -> None:
        """ValueError naming the SDK's call (baseline_first/baseline_last(N) are start 0)."""
        if self.start == 0 and self.stop < 1:
            raise ValueError(f"baseline_{'last' if self.from_end else 'first'} needs N >= 1, got {self.stop}")
        if self.start < 0 or self.stop <= self.start:
            where = " (counted from the newest)" if self.from_end else ""
            raise ValueError(
                f"baseline_rows{where} needs 0 <= start < stop, got start {self.start}, stop {self.stop}"
            )

    def __str__(self) -> str:
        if self.start == 0:
            return f"the {'last' if self.from_end else 'first'} {self.stop} values"
        where = " counted from the newest" if self.from_end else ""
        return f"values {self.start} to {self.stop}{where} (0-based, stop excluded)"


@dataclass(frozen=True)
class AssayDefinition:
    """What to assay. ``baseline`` is the frozen baseline summary of a stored assay; a definition
    being built has ``baseline_start``/``baseline_end``, ``baseline_rows`` or ``baseline_data``
    instead."""

    workspace: str
    name: str
    pipeline: str
    iopath: IoPath
    model: str = ""
    baseline_start: datetime | None = None
    baseline_end: datetime | None = None
    baseline_data: tuple[float, ...] | None = None
    baseline_rows: BaselineRows | None = None
    width: timedelta = DEFAULT_WIDTH
    interval: timedelta | None = None
    start: datetime | None = None
    summarizer: Summarizer = field(default_factory=Summarizer)
    alert_threshold: float = DEFAULT_ALERT_THRESHOLD
    warning_threshold: float | None = None
    min_count: int = DEFAULT_MIN_COUNT
    baseline: Summary | None = None

    @property
    def step(self) -> timedelta:
        return self.interval or self.width

    def windows(self, start: datetime, end: datetime) -> Iterator[tuple[datetime, datetime]]:
        """Windows ``[s, s + width)`` from ``start`` every interval, ending no later than ``end``."""
        window_start = start
        while window_start + self.width <= end:
            yield window_start, window_start + self.width
            window_start += self.step

    def run_windows(self, end: datetime | None, closed_by: datetime) -> RunWindows:
        """The windows of an interactive run up to ``end`` (None: as far as windows have closed)
        when the windows ending by ``closed_by`` have closed.

        Closed windows end by ``end`` and by ``closed_by``. After them, when ``end`` is before
        ``closed_by`` (a run stopping where windows had closed), the next window is ``cut`` if it
        starts before ``end``: it extends past the run's end. Otherwise the next window to close
        is ``open`` if it has started by ``closed_by``: with sliding windows (interval < width),
        several have started and not closed, and it is the one that started first; with gaps
        between windows (interval > width), none while ``closed_by`` is in a gap.
        """
        assert self.start is not None
        until = end if end is not None and end < closed_by else closed_by
        stops_early = until < closed_by
        closed = list(self.windows(self.start, until))
        following = self.start + len(closed) * self.step
        window = (following, following + self.width)
        if stops_early:
            return RunWindows(until, closed, cut=window if following < until else None)
        return RunWindows(until, closed, open=window if following <= until else None)

    def check_min_count(self) -> None:
        check_min_count(self.min_count)

    @property
    def pane(self) -> timedelta:
        """Every window is a union of consecutive panes of this length (the gcd of width and
        interval), so a log row is counted in one pane however much windows overlap."""
        return math.gcd(self.width // MICROSECOND, self.step // MICROSECOND) * MICROSECOND

    def panes_of(self, micros: npt.NDArray[np.int64]) -> Iterator[tuple[datetime, npt.NDArray[np.intp]]]:
        """Each pane start with the positions of ``micros`` (times as microseconds since the
        epoch, see MICROS_SQL) in that pane; times before the start, or in the gaps between
        windows (interval > width), are in none."""
        assert self.start is not None
        origin = (self.start - EPOCH) // MICROSECOND
        pane, width, step = self.pane // MICROSECOND, self.width // MICROSECOND, self.step // MICROSECOND
        since = micros - origin
        index = since // pane
        kept = np.flatnonzero((since >= 0) & ((index * pane) % step < width))
        order = kept[np.argsort(index[kept], kind="stable")]
        index = index[order]
        starts = np.flatnonzero(np.diff(index, prepend=-1))
        for begin, end in zip(starts.tolist(), [*starts[1:].tolist(), index.size], strict=True):
            yield self.start + int(index[begin]) * self.pane, order[begin:end]

    def panes_in(self, window_start: datetime) -> list[datetime]:
        return [window_start + k * self.pane for k in range(self.width // self.pane)]

    def count(
        self,
        micros: npt.NDArray[np.int64],
        values: npt.NDArray[np.float64],
        into: dict[datetime, WindowCounts],
    ) -> None:
        """Add the values, at their times, to the counts of their panes (by pane start)."""
        assert self.baseline is not None
        bins = self.baseline.bins
        for start, positions in self.panes_of(micros):
            into.setdefault(start, WindowCounts.empty(bins)).add(values[positions], bins)

    def window_counts(self, window_start: datetime, panes: Mapping[datetime, WindowCounts]) -> WindowCounts:
        """The counts of the window from its panes' (missing panes hold nothing)."""
        assert self.baseline is not None
        counts = WindowCounts.empty(self.baseline.bins)
        for pane_start in self.panes_in(window_start):
            if pane_start in panes:
                counts.merge(panes[pane_start])
        return counts

    def score(self, window: Summary) -> Scores:
        assert self.baseline is not None
        s = self.summarizer
        return score_counts(
            self.baseline.bin_counts,
            window.bin_counts,
            aggregation=s.aggregation,
            metric=s.metric,
            bin_weights=s.bin_weights,
            alert_threshold=self.alert_threshold,
            warning_threshold=self.warning_threshold,
            min_count=self.min_count,
        )

    def with_baseline(self, values: npt.ArrayLike) -> AssayDefinition:
        s = self.summarizer
        summary = baseline_summary(
            values,
            num_bins=s.num_bins,
            bin_mode=s.bin_mode,
            edges=s.edges,
            outlier_bins=s.outlier_bins,
            aggregation=s.aggregation,
        )
        return replace(self, baseline=summary)

    def to_json(self) -> dict[str, Any]:
        """The stored form: the baseline is kept as its summary (its values are not needed again)."""
        assert self.baseline is not None
        return {
            "pipeline": self.pipeline,
            "model": self.model,
            "iopath": str(self.iopath),
            "baseline_start": _iso(self.baseline_start),
            "baseline_end": _iso(self.baseline_end),
            "baseline_values": None if self.baseline_data is None else len(self.baseline_data),
            "baseline_rows": None if self.baseline_rows is None else asdict(self.baseline_rows),
            "width_s": self.width.total_seconds(),
            "interval_s": self.step.total_seconds(),
            "start": _iso(self.start),
            "summarizer": {
                **asdict(self.summarizer),
                "edges": _list(self.summarizer.edges),
                "bin_weights": _list(self.summarizer.bin_weights),
            },
            "alert_threshold": self.alert_threshold,
            "warning_threshold": self.warning_threshold,
            "min_count": self.min_count,
            "baseline": summary_to_json(self.baseline),
        }

    @classmethod
    def from_json(cls, workspace: str, name: str, data: dict[str, Any]) -> AssayDefinition:
        s = data["summarizer"]
        summarizer = Summarizer(
            num_bins=int(s["num_bins"]),
            bin_mode=s["bin_mode"],
            edges=_tuple(s["edges"]),
            outlier_bins=bool(s["outlier_bins"]),
            aggregation=s["aggregation"],
            metric=s["metric"],
            bin_weights=_tuple(s["bin_weights"]),
        )
        # Assays stored before these keys existed: no row baseline, and min_count 0, the rule they
        # were created (and may already have results) under, not today's default.
        rows = data.get("baseline_rows")
        return cls(
            workspace=workspace,
            name=name,
            pipeline=data["pipeline"],
            model=data["model"],
            iopath=IoPath.parse(data["iopath"]),
            baseline_start=_time(data["baseline_start"]),
            baseline_end=_time(data["baseline_end"]),
            baseline_rows=None if rows is None else BaselineRows(**rows),
            width=timedelta(seconds=data["width_s"]),
            interval=timedelta(seconds=data["interval_s"]),
            start=_time(data["start"]),
            summarizer=summarizer,
            alert_threshold=float(data["alert_threshold"]),
            warning_threshold=data["warning_threshold"],
            min_count=int(data.get("min_count", 0)),
            baseline=summary_from_json(data["baseline"]),
        )


@dataclass(frozen=True)
class RunWindows:
    """The windows of an interactive run (:meth:`AssayDefinition.run_windows`): those ``closed``
    by ``until``, then the ``open`` one shown with its values so far, or the ``cut`` one that
    extends past the run's end and is not shown."""

    until: datetime
    closed: list[tuple[datetime, datetime]]
    open: tuple[datetime, datetime] | None = None
    cut: tuple[datetime, datetime] | None = None


@dataclass(frozen=True)
class WindowResult:
    window_start: datetime
    window_end: datetime
    scores: Scores
    baseline: Summary
    window: Summary


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _time(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


def _list(values: tuple[float, ...] | None) -> list[float] | None:
    return None if values is None else list(values)


def _tuple(values: list[float] | None) -> tuple[float, ...] | None:
    return None if values is None else tuple(float(v) for v in values)


def _number(value: float) -> float | None:
    # jsonb has no NaN or infinity: the statistics of a window without numbers are stored as null.
    return value if math.isfinite(value) else None


def summary_to_json(summary: Summary) -> dict[str, Any]:
    bins = summary.bins
    return {
        "count": summary.count,
        "min": _number(summary.min),
        "max": _number(summary.max),
        "mean": _number(summary.mean),
        "median": _number(summary.median),
        "std": _number(summary.std),
        "bins": {
            "lower": bins.lower,
            "edges": list(bins.edges),
            "names": list(bins.names),
            "outlier_bins": bins.outlier_bins,
        },
        "bin_counts": list(summary.bin_counts),
        "aggregation": summary.aggregation,
        "aggregated_values": list(summary.aggregated_values),
    }


def summary_from_json(data: dict[str, Any]) -> Summary:
    bins = data["bins"]

    def number(key: str) -> float:
        value = data[key]
        return math.nan if value is None else float(value)

    return Summary(
        count=int(data["count"]),
        min=number("min"),
        max=number("max"),
        mean=number("mean"),
        median=number("median"),
        std=number("std"),
        bins=Bins(
            float(bins["lower"]),
            tuple(float(e) for e in bins["edges"]),
            tuple(bins["names"]),
            bool(bins["outlier_bins"]),
        ),
        bin_counts=tuple(int(c) for c in data["bin_counts"]),
        aggregation=data["aggregation"],
        aggregated_values=tuple(float(v) for v in data["aggregated_values"]),
    )


# --- reading values from the inference log ---


def value_sql(definition: AssayDefinition) -> sql.Composed:
    """The followed value of an ``inference_logs`` row as float8; NULL when the row does not count
    (another pipeline, the path missing or not a number as in failed inferences, another model, a
    number float64 cannot hold).

    The one definition of which rows count and what their value is: the interactive runs and the
    assayer's backfill select with it (:func:`values_query`), and the loggers evaluate it on the
    rows they insert (``INSERT ... RETURNING``), so every path counts the same values.
    """
    value = definition.iopath.expression()
    model: sql.Composable = sql.SQL("TRUE")
    if definition.model:
        model = sql.SQL("models @> jsonb_build_array(jsonb_build_object('name', {}::text))").format(
            sql.Literal(definition.model)
        )
    # A JSON number beyond float64 (1e400, or 1e-400 but not 0) cannot be cast: it does not count.
    return sql.SQL(
        "CASE WHEN workspace = {workspace} AND pipeline = {pipeline} AND jsonb_typeof({value}) = 'number' "
        "AND {model} AND abs(({value})::numeric) <= 1.7976931348623157e308 "
        "AND (({value})::numeric = 0 OR abs(({value})::numeric) >= 4.9406564584124654e-324) "
        "THEN ({value})::float8 END"
    ).format(
        workspace=sql.Literal(definition.workspace),
        pipeline=sql.Literal(definition.pipeline),
        value=value,
        model=model,
    )


def _counted(definition: AssayDefinition, rows: sql.Composable) -> sql.Composed:
    """The pipeline's log rows matching ``rows`` (a condition on ``inference_logs``) that count,
    as ``time, id, micros`` (MICROS_SQL) and ``v`` (:func:`value_sql`), in no order."""
    return sql.SQL(
        "SELECT * FROM (SELECT time, id, {micros} AS micros, {value} AS v FROM inference_logs "
        "WHERE workspace = {workspace} AND pipeline = {pipeline} AND {rows}) AS logged WHERE v IS NOT NULL"
    ).format(
        micros=MICROS_SQL,
        value=value_sql(definition),
        workspace=sql.Literal(definition.workspace),
        pipeline=sql.Literal(definition.pipeline),
        rows=rows,
    )


def values_query(
    definition: AssayDefinition, rows: sql.Composable, *, with_time: bool = False
) -> sql.Composed:
    """The values (:func:`value_sql`) of the pipeline's log rows matching ``rows`` (a condition on
    ``inference_logs``), oldest first; with their time (MICROS_SQL) first when ``with_time``."""
    return sql.SQL("SELECT {columns} FROM ({counted}) AS counted ORDER BY time, id").format(
        columns=sql.SQL("micros, v" if with_time else "v"), counted=_counted(definition, rows)
    )


_IN_RANGE = sql.SQL(
    "(%(start)s::timestamptz IS NULL OR time >= %(start)s) "
    "AND (%(end)s::timestamptz IS NULL OR time < %(end)s)"
)


def value_chunks(
    conn: psycopg.Connection[Any],
    definition: AssayDefinition,
    start: datetime | None,
    end: datetime | None,
) -> Generator[npt.NDArray[np.float64]]:
    """The iopath's numbers in the pipeline's logs with ``start <= time < end``, oldest first, in
    chunks of at most FETCH_ROWS read through a server-side cursor."""
    query = values_query(definition, _IN_RANGE)
    for rows in _chunks(conn, query, {"start": start, "end": end}):
        yield np.fromiter((row[0] for row in rows), dtype=np.float64, count=len(rows))


def timed_value_chunks(
    conn: psycopg.Connection[Any], definition: AssayDefinition, rows: sql.Composable, **params: Any
) -> Iterator[tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]]:
    """The times (MICROS_SQL) and values of :func:`values_query` over ``rows``, in chunks of at
    most FETCH_ROWS."""
    query = values_query(definition, rows, with_time=True)
    for chunk in _chunks(conn, query, params):
        micros = np.fromiter((row[0] for row in chunk), dtype=np.int64, count=len(chunk))
        yield micros, np.fromiter((row[1] for row in chunk), dtype=np.float64, count=len(chunk))


def _chunks(
    conn: psycopg.Connection[Any], query: sql.Composed, params: dict[str, Any]
) -> Iterator[list[Any]]:
    # Tuples whatever the connection's row factory: values are read by position, fast.
    with conn.cursor(name="assay_values", row_factory=tuple_row) as cursor:
        cursor.itersize = FETCH_ROWS
        cursor.execute(query, params)
        while rows := cursor.fetchmany(FETCH_ROWS):
            yield rows


def row_values(
    conn: psycopg.Connection[Any], definition: AssayDefinition, rows: BaselineRows
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
    """The times (MICROS_SQL) and values of the counted log rows ``rows`` selects, oldest first;
    fewer than asked for when the log holds fewer."""
    newest_first = sql.SQL(" DESC" if rows.from_end else "")
    query = sql.SQL(
        "SELECT micros, v FROM (SELECT time, id, micros, v FROM ({counted}) AS counted "
        "ORDER BY time{desc}, id{desc} LIMIT {limit} OFFSET {offset}) AS chosen ORDER BY time, id"
    ).format(
        counted=_counted(definition, sql.SQL("TRUE")),
        desc=newest_first,
        limit=sql.Literal(rows.stop - rows.start),
        offset=sql.Literal(rows.start),
    )
    chunks = list(_chunks(conn, query, {}))
    micros = np.fromiter((r[0] for chunk in chunks for r in chunk), dtype=np.int64)
    return micros, np.fromiter((r[1] for chunk in chunks for r in chunk), dtype=np.float64)


def count_values(conn: psycopg.Connection[Any], definition: AssayDefinition) -> int:
    """How many of the pipeline's log rows count (have a number at the iopath, of the model)."""
    query = sql.SQL("SELECT count(*) FROM ({counted}) AS counted").format(
        counted=_counted(definition, sql.SQL("TRUE"))
    )
    with conn.cursor(row_factory=tuple_row) as cursor:
        row = cursor.execute(query).fetchone()
    return int(row[0]) if row else 0


def time_after(conn: psycopg.Connection[Any], definition: AssayDefinition, rows: BaselineRows) -> int | None:
    """The time (MICROS_SQL) of the counted log row right after those ``rows`` selects, in log
    order; None when they end with the newest."""
    if rows.from_end:
        if rows.start == 0:
            return None
        order, offset = sql.SQL(" DESC"), rows.start - 1
    else:
        order, offset = sql.SQL(""), rows.stop
    query = sql.SQL(
        "SELECT micros FROM ({counted}) AS counted ORDER BY time{d}, id{d} LIMIT 1 OFFSET {o}"
    ).format(counted=_counted(definition, sql.SQL("TRUE")), d=order, o=sql.Literal(offset))
    with conn.cursor(row_factory=tuple_row) as cursor:
        row = cursor.execute(query).fetchone()
    return None if row is None else int(row[0])


def time_of(micros: int) -> datetime:
    return EPOCH + micros * MICROSECOND


def log_values(
    conn: psycopg.Connection[Any],
    definition: AssayDefinition,
    start: datetime | None,
    end: datetime | None,
    limit: int | None = None,
) -> npt.NDArray[np.float64]:
    """Every value of :func:`value_chunks` in one array; with ``limit``, at most ``limit + 1`` of
    them (read no further than that: more than ``limit`` says the range holds too many)."""
    chunks: list[npt.NDArray[np.float64]] = []
    read = 0
    with contextlib.closing(value_chunks(conn, definition, start, end)) as found:
        for chunk in found:
            chunks.append(chunk)
            read += len(chunk)
            if limit is not None and read > limit:
                break
    values = np.concatenate(chunks) if chunks else np.empty(0, dtype=np.float64)
    return values if limit is None else values[: limit + 1]


def log_times(
    conn: psycopg.Connection[Any], workspace: str, pipeline: str
) -> tuple[datetime | None, datetime | None]:
    """The times of the first and the latest row of the pipeline's log (None, None when empty):
    the latest is its event-time watermark, as the live assayer's (failed inferences included)."""
    with conn.cursor(row_factory=tuple_row) as cursor:
        row = cursor.execute(
            "SELECT min(time), max(time) FROM inference_logs WHERE workspace = %s AND pipeline = %s",
            (workspace, pipeline),
        ).fetchone()
    return (None, None) if row is None else (row[0], row[1])


def result_of(
    definition: AssayDefinition, start: datetime, end: datetime, counts: WindowCounts
) -> WindowResult:
    """The result of the window ``[start, end)`` whose values were counted into ``counts``."""
    baseline = definition.baseline
    assert baseline is not None
    window = counts.summary(baseline.bins, definition.summarizer.aggregation)
    return WindowResult(start, end, definition.score(window), baseline, window)


def _open_result(
    definition: AssayDefinition, start: datetime, end: datetime, counts: WindowCounts
) -> WindowResult:
    """The window ``[start, end)`` that has not closed yet, with what it holds so far: status Open
    whatever its score, which is provisional (NaN while it holds nothing)."""
    baseline = definition.baseline
    assert baseline is not None
    if counts.count:
        result = result_of(definition, start, end, counts)
        return replace(result, scores=replace(result.scores, status=Status.OPEN))
    bins, nan = baseline.bins, math.nan
    nothing = Summary(
        count=0,
        min=nan,
        max=nan,
        mean=nan,
        median=nan,
        std=nan,
        bins=bins,
        bin_counts=(0,) * bins.count,
        aggregation=definition.summarizer.aggregation,
        aggregated_values=(nan,) * bins.count,
    )
    scores = Scores(definition.summarizer.metric, nan, (nan,) * bins.count, None, Status.OPEN)
    return WindowResult(start, end, scores, baseline, nothing)


def window_results(
    conn: psycopg.Connection[Any],
    definition: AssayDefinition,
    end: datetime,
    *,
    open_window: tuple[datetime, datetime] | None = None,
) -> list[WindowResult]:
    """The result of every window from the definition's start that has closed by ``end`` and
    holds a value, reading the log once whatever the number of windows; then, given one, the
    ``open_window`` (:func:`_open_result`, with every value logged in it so far), even empty.

    Values are counted by pane into :class:`joey_core.assays.streaming.WindowCounts`, as the loggers
    count them for the live assayer, and each window merges its panes: memory is bounded by
    the panes and the result is the live one to the last bit.
    """
    assert definition.start is not None
    windows = list(definition.windows(definition.start, end))
    read = [*windows, *([open_window] if open_window else [])]
    if not read:
        return []
    panes: dict[datetime, WindowCounts] = {}
    for micros, values in timed_value_chunks(conn, definition, _IN_RANGE, start=read[0][0], end=read[-1][1]):
        definition.count(micros, values, panes)
    results = []
    for start, stop in windows:
        counts = definition.window_counts(start, panes)
        if counts.count:
            results.append(result_of(definition, start, stop, counts))
    if open_window is not None:
        start, stop = open_window
        results.append(_open_result(definition, start, stop, definition.window_counts(start, panes)))
    return results
