"""Assay definitions, their windows, and scoring a window from the inference log.

Shared by the registry (interactive runs over past logs) and the assayer (live results): both
score a window with :func:`window_result`, which reads the window's values from
``inference_logs`` and scores them with :mod:`joey.assays`, so the two paths give the same
numbers for the same window by construction. The logger's table is deduplicated on the input
record's identity, so a replayed log record is one row and counted once.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, Literal, cast

import numpy as np
import numpy.typing as npt
import psycopg
from psycopg import sql

from joey.assays import (
    AGGREGATIONS,
    BIN_MODES,
    METRICS,
    Aggregation,
    BinMode,
    Bins,
    Metric,
    Scores,
    Summary,
    aggregate,
    baseline_summary,
    bin_counts,
    score_counts,
    summarize,
)

DEFAULT_WIDTH = timedelta(hours=24)
DEFAULT_ALERT_THRESHOLD = 0.25
# Values fetched from Postgres per round trip when a window or baseline is read.
FETCH_ROWS = 50_000
# Larger windows are binned chunk by chunk (8 bytes a value: 80 MB).
MAX_IN_MEMORY_VALUES = 10_000_000

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
class AssayDefinition:
    """What to assay. ``baseline`` is the frozen baseline summary of a stored assay; a definition
    being built has ``baseline_start``/``baseline_end`` or ``baseline_data`` instead."""

    workspace: str
    name: str
    pipeline: str
    iopath: IoPath
    model: str = ""
    baseline_start: datetime | None = None
    baseline_end: datetime | None = None
    baseline_data: tuple[float, ...] | None = None
    width: timedelta = DEFAULT_WIDTH
    interval: timedelta | None = None
    start: datetime | None = None
    summarizer: Summarizer = field(default_factory=Summarizer)
    alert_threshold: float = DEFAULT_ALERT_THRESHOLD
    warning_threshold: float | None = None
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
        return cls(
            workspace=workspace,
            name=name,
            pipeline=data["pipeline"],
            model=data["model"],
            iopath=IoPath.parse(data["iopath"]),
            baseline_start=_time(data["baseline_start"]),
            baseline_end=_time(data["baseline_end"]),
            width=timedelta(seconds=data["width_s"]),
            interval=timedelta(seconds=data["interval_s"]),
            start=_time(data["start"]),
            summarizer=summarizer,
            alert_threshold=float(data["alert_threshold"]),
            warning_threshold=data["warning_threshold"],
            baseline=summary_from_json(data["baseline"]),
        )


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
    # jsonb has no NaN: the statistics of a window without numbers are stored as null.
    return None if math.isnan(value) else value


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


def _values_query(definition: AssayDefinition) -> sql.Composed:
    value = definition.iopath.expression()
    return sql.SQL(
        "SELECT ({value})::float8 FROM inference_logs "
        "WHERE workspace = %(workspace)s AND pipeline = %(pipeline)s "
        "AND (%(start)s::timestamptz IS NULL OR time >= %(start)s) "
        "AND (%(end)s::timestamptz IS NULL OR time < %(end)s) "
        "AND jsonb_typeof({value}) = 'number' "
        "AND (%(model)s = '' OR models @> jsonb_build_array(jsonb_build_object('name', %(model)s::text))) "
        "ORDER BY time, id"
    ).format(value=value)


def _params(definition: AssayDefinition, start: datetime | None, end: datetime | None) -> dict[str, Any]:
    return {
        "workspace": definition.workspace,
        "pipeline": definition.pipeline,
        "start": start,
        "end": end,
        "model": definition.model,
    }


def value_chunks(
    conn: psycopg.Connection[Any],
    definition: AssayDefinition,
    start: datetime | None,
    end: datetime | None,
) -> Iterator[npt.NDArray[np.float64]]:
    """The iopath's numbers in the pipeline's logs with ``start <= time < end``, oldest first, in
    chunks of at most FETCH_ROWS read through a server-side cursor.

    Rows where the path is missing or not a number (failed inferences have no outputs) are skipped.
    """
    with conn.cursor(name="assay_values") as cursor:
        cursor.itersize = FETCH_ROWS
        cursor.execute(_values_query(definition), _params(definition, start, end))
        while rows := cursor.fetchmany(FETCH_ROWS):
            yield np.fromiter((_first(row) for row in rows), dtype=np.float64, count=len(rows))


def log_values(
    conn: psycopg.Connection[Any],
    definition: AssayDefinition,
    start: datetime | None,
    end: datetime | None,
) -> npt.NDArray[np.float64]:
    """Every value of :func:`value_chunks` in one array."""
    chunks = list(value_chunks(conn, definition, start, end))
    return np.concatenate(chunks) if chunks else np.empty(0, dtype=np.float64)


def _first(row: Any) -> float:
    return float(row[0] if isinstance(row, tuple) else next(iter(row.values())))


def first_log_time(conn: psycopg.Connection[Any], workspace: str, pipeline: str) -> datetime | None:
    row = conn.execute(
        "SELECT min(time) AS first FROM inference_logs WHERE workspace = %s AND pipeline = %s",
        (workspace, pipeline),
    ).fetchone()
    if row is None:
        return None
    first = row[0] if isinstance(row, tuple) else row["first"]
    return cast(datetime | None, first)


def window_result(
    conn: psycopg.Connection[Any],
    definition: AssayDefinition,
    start: datetime,
    end: datetime,
    max_in_memory: int = MAX_IN_MEMORY_VALUES,
) -> WindowResult | None:
    """The score of the window ``[start, end)``, or None when it holds no value.

    A window of up to ``max_in_memory`` values is summarised exactly as :func:`joey.assays.score`
    does. A larger one is binned chunk by chunk, so memory stays bounded by the chunk size: its
    bin counts, and so its scores and status, are still exact; mean and std are then summed chunk
    by chunk and the median is Postgres' ``percentile_cont(0.5)``, equal to numpy's up to rounding
    in the last digits.
    """
    baseline = definition.baseline
    assert baseline is not None
    aggregation = definition.summarizer.aggregation
    held: list[npt.NDArray[np.float64]] = []
    held_count = 0
    streamed: _Moments | None = None
    for chunk in value_chunks(conn, definition, start, end):
        if streamed is None:
            held.append(chunk)
            held_count += chunk.size
            if held_count <= max_in_memory:
                continue
            streamed = _Moments(baseline.bins.count)
            for part in held:
                streamed.add(part, baseline.bins)
            held = []
        else:
            streamed.add(chunk, baseline.bins)
    if streamed is not None:
        window = streamed.summary(baseline.bins, aggregation, _median(conn, definition, start, end))
    elif held_count:
        window = summarize(np.concatenate(held), baseline.bins, aggregation=aggregation)
    else:
        return None
    return WindowResult(start, end, definition.score(window), baseline, window)


class _Moments:
    """Counts and moments of a window added chunk by chunk (Chan et al.'s parallel variance)."""

    def __init__(self, bins: int) -> None:
        self.counts = np.zeros(bins, dtype=np.int64)
        self.n = 0
        self.mean = 0.0
        self.m2 = 0.0
        self.min = math.inf
        self.max = -math.inf

    def add(self, chunk: npt.NDArray[np.float64], bins: Bins) -> None:
        self.counts += bin_counts(chunk, bins)
        n = chunk.size
        mean = float(chunk.mean())
        m2 = float(((chunk - mean) ** 2).sum())
        total = self.n + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta * delta * self.n * n / total
        self.n = total
        self.min = min(self.min, float(chunk.min()))
        self.max = max(self.max, float(chunk.max()))

    def summary(self, bins: Bins, aggregation: Aggregation, median: float) -> Summary:
        return Summary(
            count=self.n,
            min=self.min,
            max=self.max,
            mean=self.mean,
            median=median,
            std=math.sqrt(self.m2 / self.n),
            bins=bins,
            bin_counts=tuple(self.counts.tolist()),
            aggregation=aggregation,
            aggregated_values=tuple(aggregate(self.counts, aggregation).tolist()),
        )


def _median(
    conn: psycopg.Connection[Any], definition: AssayDefinition, start: datetime, end: datetime
) -> float:
    query = sql.SQL("SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY v) FROM ({values}) AS w(v)").format(
        values=_values_query(definition)
    )
    row = conn.execute(query, _params(definition, start, end)).fetchone()
    assert row is not None
    return float(row[0] if isinstance(row, tuple) else next(iter(row.values())))
