"""Assay messages <-> domain types, at the gRPC edge."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import cast

from joey_core.assays import Aggregation, BinMode, Metric, Summary
from joey_core.assays.runs import (
    DEFAULT_ALERT_THRESHOLD,
    DEFAULT_MIN_COUNT,
    AssayDefinition,
    BaselineRows,
    IoPath,
    Summarizer,
    WindowResult,
)
from joey_core.v1 import registry_pb2 as pb
from joey_registry.assays import MAX_WINDOW, StoredAssay, UnreadableDefinition
from joey_registry.convert import optional_datetime, timestamp
from joey_registry.errors import InvalidArgument

MAX_SECONDS = int(MAX_WINDOW.total_seconds())
"""Larger width_seconds or interval_seconds are refused here, before a timedelta overflows."""


def _seconds(message: pb.AssayDefinition, field: str) -> int:
    value = int(getattr(message, field))
    if value < 0:
        raise InvalidArgument(f"{field} must be positive (or 0 for the default), got {value}")
    if value > MAX_SECONDS:
        raise InvalidArgument(
            f"{field} must be at most {MAX_WINDOW.days} days ({MAX_SECONDS} s), got {value}"
        )
    return value


def definition(message: pb.AssayDefinition) -> AssayDefinition:
    try:
        iopath = IoPath.parse(message.iopath)
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from None
    width_seconds, interval_seconds = (
        _seconds(message, "width_seconds"),
        _seconds(message, "interval_seconds"),
    )
    s = message.summarizer
    summarizer = Summarizer(
        num_bins=s.num_bins or 5,
        bin_mode=cast(BinMode, s.bin_mode or "quantile"),
        edges=tuple(s.edges) if s.edges else None,
        outlier_bins=not s.no_outlier_bins,
        aggregation=cast(Aggregation, s.aggregation or "density"),
        metric=cast(Metric, s.metric or "psi"),
        bin_weights=tuple(s.bin_weights) if s.bin_weights else None,
    )
    return AssayDefinition(
        workspace=message.workspace,
        name=message.name,
        pipeline=message.pipeline,
        model=message.model,
        iopath=iopath,
        baseline_start=optional_datetime(message, "baseline_start"),  # type: ignore[arg-type]
        baseline_end=optional_datetime(message, "baseline_end"),  # type: ignore[arg-type]
        baseline_data=tuple(message.baseline_data) if message.baseline_data else None,
        baseline_rows=baseline_rows(message.baseline_rows) if message.HasField("baseline_rows") else None,
        width=timedelta(seconds=width_seconds or 24 * 3600),
        interval=timedelta(seconds=interval_seconds) if interval_seconds else None,
        start=optional_datetime(message, "start"),  # type: ignore[arg-type]
        summarizer=summarizer,
        alert_threshold=(
            message.alert_threshold if message.HasField("alert_threshold") else DEFAULT_ALERT_THRESHOLD
        ),
        warning_threshold=message.warning_threshold if message.HasField("warning_threshold") else None,
        min_count=message.min_count if message.HasField("min_count") else DEFAULT_MIN_COUNT,
    )


def baseline_rows(message: pb.AssayBaselineRows) -> BaselineRows:
    return BaselineRows(message.start, message.stop, message.from_end)


def definition_message(d: AssayDefinition) -> pb.AssayDefinition:
    s = d.summarizer
    message = pb.AssayDefinition(
        workspace=d.workspace,
        name=d.name,
        pipeline=d.pipeline,
        model=d.model,
        iopath=str(d.iopath),
        width_seconds=int(d.width.total_seconds()),
        interval_seconds=int(d.step.total_seconds()),
        summarizer=pb.AssaySummarizer(
            num_bins=s.num_bins,
            bin_mode=s.bin_mode,
            edges=list(s.edges or ()),
            no_outlier_bins=not s.outlier_bins,
            aggregation=s.aggregation,
            metric=s.metric,
            bin_weights=list(s.bin_weights or ()),
        ),
        alert_threshold=d.alert_threshold,
        min_count=d.min_count,
    )
    if d.baseline_rows is not None:
        rows = d.baseline_rows
        message.baseline_rows.start, message.baseline_rows.stop = rows.start, rows.stop
        message.baseline_rows.from_end = rows.from_end
    if d.warning_threshold is not None:
        message.warning_threshold = d.warning_threshold
    for field in ("baseline_start", "baseline_end", "start"):
        value = getattr(d, field)
        if value is not None:
            getattr(message, field).CopyFrom(timestamp(value))
    return message


def summary(s: Summary) -> pb.AssaySummary:
    return pb.AssaySummary(
        count=s.count,
        min=s.min,
        max=s.max,
        mean=s.mean,
        median=s.median,
        std=s.std,
        edges=list(s.edges),
        edge_names=list(s.edge_names),
        aggregated_values=list(s.aggregated_values),
        bin_counts=list(s.bin_counts),
        aggregation=s.aggregation,
    )


def assay(stored: StoredAssay) -> pb.Assay:
    d = stored.definition
    message = pb.Assay(active=stored.active, created_at=timestamp(stored.created_at), failure=stored.failure)
    if isinstance(d, UnreadableDefinition):
        message.definition.CopyFrom(
            pb.AssayDefinition(workspace=d.workspace, name=d.name, pipeline=d.pipeline)
        )
    else:
        assert d.baseline is not None
        message.definition.CopyFrom(definition_message(d))
        message.baseline.CopyFrom(summary(d.baseline))
    if stored.failed_at is not None:
        message.failed_at.CopyFrom(timestamp(stored.failed_at))
    return message


def result(r: WindowResult, assay_name: str) -> pb.AssayResult:
    return pb.AssayResult(
        assay=assay_name,
        window_start=timestamp(r.window_start),
        window_end=timestamp(r.window_end),
        score=r.scores.score,
        scores=list(r.scores.scores),
        bin_index=-1 if r.scores.bin_index is None else r.scores.bin_index,
        status=str(r.scores.status),
        metric=r.scores.metric,
        baseline_summary=summary(r.baseline),
        window_summary=summary(r.window),
    )


def results(
    rs: list[WindowResult], d: AssayDefinition, *, cut: tuple[datetime, datetime] | None = None
) -> pb.AssayResults:
    """The results of the assay ``d``, each named after it (interactive runs too); ``cut``, the
    window extending past an interactive run's end."""
    message = pb.AssayResults(
        results=[result(r, d.name) for r in rs],
        alert_threshold=d.alert_threshold,
        warning_threshold=d.warning_threshold,
        assay=d.name,
        iopath=str(d.iopath),
        min_count=d.min_count,
    )
    if cut is not None:
        message.cut_window_start.CopyFrom(timestamp(cut[0]))
        message.cut_window_end.CopyFrom(timestamp(cut[1]))
    return message
