"""Assays in the SDK, shaped like Wallaroo's::

    assay = client.build_assay("petal-drift", pipeline, "input features 2",
                               baseline_start=t0, baseline_end=t1)  # or .baseline_first(5000)
    assay.add_width(hours=1).add_metric("maxdiff").add_alert_threshold(0.3).add_min_count(100)
    assay.interactive_baseline_run().chart("baseline.png")
    results = assay.interactive_run()
    results.to_dataframe(); results.chart_scores("scores.png")
    assay.upload()
    client.get_assay_results("petal-drift", start=t1)

The math is :mod:`joey_core.assays`; the registry runs it over the pipeline's inference log.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from google.protobuf.timestamp_pb2 import Timestamp

from joey_core.assays import JUDGED, Status
from joey_core.lazy import LazyModule
from joey_core.settings import CommonSettings
from joey_core.v1 import registry_pb2 as pb

if TYPE_CHECKING:
    import pandas as pd
else:
    pd = LazyModule("pandas")


def timestamp(value: datetime | str) -> Timestamp:
    """A protobuf Timestamp; naive datetimes and ISO strings are taken as UTC."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


def _time(stamp: Timestamp) -> datetime:
    return stamp.ToDatetime(tzinfo=UTC)


def _seconds(hours: float, minutes: float, seconds: float) -> int:
    total = timedelta(hours=hours, minutes=minutes, seconds=seconds).total_seconds()
    if total != int(total):
        raise ValueError(f"window durations are whole seconds, got {total} s")
    return int(total)


@dataclass(frozen=True)
class AssaySummary:
    count: int
    min: float
    max: float
    mean: float
    median: float
    std: float
    edges: tuple[float, ...]
    edge_names: tuple[str, ...]
    bin_counts: tuple[int, ...]
    aggregated_values: tuple[float, ...]
    aggregation: str

    @classmethod
    def from_proto(cls, s: pb.AssaySummary) -> AssaySummary:
        return cls(
            count=s.count,
            min=s.min,
            max=s.max,
            mean=s.mean,
            median=s.median,
            std=s.std,
            edges=tuple(s.edges),
            edge_names=tuple(s.edge_names),
            bin_counts=tuple(s.bin_counts),
            aggregated_values=tuple(s.aggregated_values),
            aggregation=s.aggregation,
        )

    def to_dataframe(self) -> pd.DataFrame:
        """One row per bin: name, upper edge, count and aggregated value."""
        return pd.DataFrame(
            {
                "bin": list(self.edge_names),
                "upper_edge": list(self.edges),
                "count": list(self.bin_counts),
                self.aggregation: list(self.aggregated_values),
            }
        )

    def chart(self, path: str | Path) -> Path:
        """A bar chart of the bins' aggregated values, written as a PNG."""
        plt = _pyplot()
        figure, axes = plt.subplots(figsize=(8, 4))
        axes.bar(range(len(self.edge_names)), self.aggregated_values, color="#4c72b0")
        axes.set_xticks(range(len(self.edge_names)), self.edge_names, rotation=30, ha="right")
        axes.set_ylabel(self.aggregation)
        axes.set_title(f"baseline: {self.count} values, mean {self.mean:.4g}, std {self.std:.4g}")
        figure.tight_layout()
        return _save(plt, figure, path)


@dataclass(frozen=True)
class AssayResult:
    assay: str
    window_start: datetime
    window_end: datetime
    score: float
    scores: tuple[float, ...]
    bin_index: int | None
    status: str
    metric: str
    baseline_summary: AssaySummary
    window_summary: AssaySummary

    @classmethod
    def from_proto(cls, r: pb.AssayResult) -> AssayResult:
        return cls(
            assay=r.assay,
            window_start=_time(r.window_start),
            window_end=_time(r.window_end),
            score=r.score,
            scores=tuple(r.scores),
            bin_index=None if r.bin_index < 0 else r.bin_index,
            status=r.status,
            metric=r.metric,
            baseline_summary=AssaySummary.from_proto(r.baseline_summary),
            window_summary=AssaySummary.from_proto(r.window_summary),
        )


class AssayResults(list[AssayResult]):
    """Results in window order, with a table and a chart. ``cut`` is the window that extends
    past an interactive run's end (start, end), not among the results."""

    def __init__(
        self,
        results: Sequence[AssayResult],
        alert_threshold: float | None,
        warning_threshold: float | None,
        *,
        assay: str,
        iopath: str,
        min_count: int,
        cut: tuple[datetime, datetime] | None = None,
    ) -> None:
        super().__init__(results)
        self.alert_threshold = alert_threshold
        self.warning_threshold = warning_threshold
        self.assay = assay
        self.iopath = iopath
        self.min_count = min_count
        self.cut = cut

    @classmethod
    def from_proto(cls, response: pb.AssayResults) -> AssayResults:
        return cls(
            [AssayResult.from_proto(r) for r in response.results],
            response.alert_threshold,
            response.warning_threshold if response.HasField("warning_threshold") else None,
            assay=response.assay,
            iopath=response.iopath,
            min_count=response.min_count,
            cut=(
                (_time(response.cut_window_start), _time(response.cut_window_end))
                if response.HasField("cut_window_start")
                else None
            ),
        )

    def notes(self) -> list[str]:
        """What the table does not say by itself: windows too small to judge, the open one, and
        the one cut by the run's end."""
        notes = []
        closed = [r for r in self if r.status != Status.OPEN]
        small = [r for r in closed if r.status == Status.NO_DATA]
        if small:
            notes.append(
                f"{len(small)} of {len(closed)} windows hold fewer than {self.min_count} values (min_count): "
                "NoData, their scores are not judged against the thresholds"
            )
        if self.cut is not None:
            start, end = self.cut
            notes.append(f"window {start.isoformat()} to {end.isoformat()} extends past end: not shown")
        for r in self:
            if r.status == Status.OPEN:
                notes.append(
                    f"window {r.window_start.isoformat()} is open: {r.window_summary.count:,} values so far, "
                    f"closes at {r.window_end.isoformat()}"
                )
        return notes

    @property
    def title(self) -> str:
        """The chart's title: the assay, its iopath, and how many values its windows hold."""
        name = " · ".join(part for part in (self.assay, self.iopath) if part) or "assay scores"
        judged = [r.window_summary.count for r in self if r.status in JUDGED]
        counts = ["no window scored"]
        if judged:
            low, high = min(judged), max(judged)
            each = f"{low:,}" if low == high else f"{low:,}-{high:,}"
            counts = [f"{_windows(len(judged))} scored, {sum(judged):,} values ({each} each)"]
        small = sum(r.status == Status.NO_DATA for r in self)
        if small:
            counts.append(f"{_windows(small)} NoData (< {self.min_count} values)")
        counts += [f"open: {r.window_summary.count:,} so far" for r in self if r.status == Status.OPEN]
        return f"{name}\n{'; '.join(counts)}"

    def to_dataframe(self) -> pd.DataFrame:
        return pd.DataFrame(
            [
                {
                    "assay": r.assay,
                    "window_start": r.window_start,
                    "window_end": r.window_end,
                    "score": r.score,
                    "status": r.status,
                    "metric": r.metric,
                    "bin_index": r.bin_index,
                    "count": r.window_summary.count,
                    "mean": r.window_summary.mean,
                    "median": r.window_summary.median,
                    "std": r.window_summary.std,
                    "scores": list(r.scores),
                }
                for r in self
            ],
            columns=[
                "assay",
                "window_start",
                "window_end",
                "score",
                "status",
                "metric",
                "bin_index",
                "count",
                "mean",
                "median",
                "std",
                "scores",
            ],
        )

    def chart_scores(self, path: str | Path, title: str = "") -> Path:
        """Scores over time with the alert (and warning) threshold, and each window's count of
        values as a bar behind them, written as a PNG (title: :attr:`title` unless given).

        Only windows judged against the thresholds are plotted at their score: a NoData window
        (fewer values than min_count) is a grey cross on the axis, whatever its score, and the
        open window a hollow circle (at its score so far once it holds min_count values)."""
        plt = _pyplot()
        figure, axes = plt.subplots(figsize=(10, 4.5))
        colors = {"Ok": "#55a868", "Warning": "#dd8452", "Alert": "#c44e52"}
        middles = [r.window_start + (r.window_end - r.window_start) / 2 for r in self]
        counts = axes.twinx()
        counts.set_ylabel("values per window", color="gray")
        counts.bar(
            middles,
            [r.window_summary.count for r in self],
            width=[(r.window_end - r.window_start).total_seconds() / 86400 for r in self],
            color=["#d0d0d0" if r.status in JUDGED else "#f0f0f0" for r in self],
            edgecolor="white",
        )
        if self.min_count:
            counts.axhline(self.min_count, color="gray", linestyle=":", linewidth=1)
        # The scores in front of the bars.
        axes.set_zorder(counts.get_zorder() + 1)
        axes.patch.set_visible(False)
        # The line breaks where a window is not judged, rather than bridging it.
        axes.plot(middles, [r.score if r.status in JUDGED else math.nan for r in self], color="#4c72b0", lw=1)
        judged = [(m, r) for m, r in zip(middles, self, strict=True) if r.status in JUDGED]
        axes.scatter(
            [m for m, _ in judged], [r.score for _, r in judged], c=[colors[r.status] for _, r in judged]
        )
        small = [m for m, r in zip(middles, self, strict=True) if r.status == Status.NO_DATA]
        if small:
            label = f"NoData (< {self.min_count} values)"
            axes.scatter(small, [0] * len(small), marker="x", color="gray", label=label, clip_on=False)
        for m, r in zip(middles, self, strict=True):
            if r.status == Status.OPEN:
                enough = r.window_summary.count >= (self.min_count or 1)
                axes.scatter(
                    [m],
                    [r.score if enough else 0],
                    facecolors="none",
                    edgecolors="#4c72b0",
                    clip_on=False,
                    label=f"open: {r.window_summary.count:,} values so far",
                )
        if self.alert_threshold is not None:
            axes.axhline(self.alert_threshold, color=colors["Alert"], linestyle="--", label="alert")
        if self.warning_threshold is not None:
            axes.axhline(self.warning_threshold, color=colors["Warning"], linestyle=":", label="warning")
        axes.set_ylim(bottom=0)
        axes.set_ylabel(self[0].metric if self else "score")
        axes.set_xlabel("window")
        axes.set_title(title or self.title, fontsize=10)
        if axes.get_legend_handles_labels()[0]:
            axes.legend(fontsize=8)
        figure.autofmt_xdate()
        return _save(plt, figure, path)


def _check_rows(call: str, n: int) -> None:
    if n < 1:
        raise ValueError(f"{call} needs N >= 1, got {n}")


def _windows(n: int) -> str:
    return f"{n} window{'' if n == 1 else 's'}"


def _pyplot() -> Any:
    # Imported on first use: matplotlib is slow to import and only charts need it. Agg renders
    # to files without a display.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt: Any, figure: Any, path: str | Path) -> Path:
    out = Path(path)
    figure.savefig(out, format="png", dpi=100)
    plt.close(figure)
    return out


@dataclass(frozen=True)
class Assay:
    """An uploaded assay."""

    client: AssayClientMixin
    definition: pb.AssayDefinition
    active: bool
    created_at: datetime
    baseline: AssaySummary
    failure: str = ""
    """Why the assay stopped being counted and scored; empty while it works."""

    @classmethod
    def from_proto(cls, client: AssayClientMixin, a: pb.Assay) -> Assay:
        baseline = AssaySummary.from_proto(a.baseline)
        return cls(client, a.definition, a.active, _time(a.created_at), baseline, a.failure)

    @property
    def name(self) -> str:
        return self.definition.name

    def results(self, start: datetime | str | None = None, end: datetime | str | None = None) -> AssayResults:
        return self.client.get_assay_results(self.name, start=start, end=end)

    def pause(self) -> Assay:
        return self.client.pause_assay(self.name)

    def resume(self) -> Assay:
        return self.client.resume_assay(self.name)

    def delete(self) -> None:
        self.client.delete_assay(self.name)


class AssayBuilder:
    """A definition being built; nothing reaches the registry until a run or :meth:`upload`."""

    def __init__(
        self,
        client: AssayClientMixin,
        name: str,
        pipeline: str,
        iopath: str,
        *,
        baseline_start: datetime | str | None = None,
        baseline_end: datetime | str | None = None,
        baseline_data: Sequence[float] | None = None,
        model: str = "",
    ) -> None:
        self.client = client
        self.definition = pb.AssayDefinition(
            workspace=client.workspace, name=name, pipeline=pipeline, iopath=iopath, model=model
        )
        if baseline_start is not None:
            self.definition.baseline_start.CopyFrom(timestamp(baseline_start))
        if baseline_end is not None:
            self.definition.baseline_end.CopyFrom(timestamp(baseline_end))
        if baseline_data is not None:
            self.definition.baseline_data.extend(float(v) for v in baseline_data)

    # window
    def add_width(self, *, hours: float = 0, minutes: float = 0, seconds: float = 0) -> AssayBuilder:
        self.definition.width_seconds = _seconds(hours, minutes, seconds)
        return self

    def add_interval(self, *, hours: float = 0, minutes: float = 0, seconds: float = 0) -> AssayBuilder:
        self.definition.interval_seconds = _seconds(hours, minutes, seconds)
        return self

    def add_start(self, start: datetime | str) -> AssayBuilder:
        self.definition.start.CopyFrom(timestamp(start))
        return self

    # summarizer
    def add_num_bins(self, num_bins: int) -> AssayBuilder:
        self.definition.summarizer.num_bins = num_bins
        return self

    def add_bin_mode(self, bin_mode: str, edges: Sequence[float] | None = None) -> AssayBuilder:
        """``quantile``, ``equal`` or ``provided`` (with ``edges``, one per bin)."""
        self.definition.summarizer.bin_mode = bin_mode.lower()
        del self.definition.summarizer.edges[:]
        if edges is not None:
            self.definition.summarizer.edges.extend(edges)
            self.definition.summarizer.num_bins = len(edges)
        return self

    def add_outlier_bins(self, enabled: bool = True) -> AssayBuilder:
        self.definition.summarizer.no_outlier_bins = not enabled
        return self

    def add_metric(self, metric: str) -> AssayBuilder:
        """``psi``, ``maxdiff`` or ``sumdiff``."""
        self.definition.summarizer.metric = metric.lower()
        return self

    def add_aggregation(self, aggregation: str) -> AssayBuilder:
        """``density`` or ``cumulative``."""
        self.definition.summarizer.aggregation = aggregation.lower()
        return self

    def add_bin_weights(self, weights: Sequence[float]) -> AssayBuilder:
        """One weight per bin, outlier bins included."""
        del self.definition.summarizer.bin_weights[:]
        self.definition.summarizer.bin_weights.extend(weights)
        return self

    # baseline by rows of the log (instead of a time range or data given to build_assay)
    def baseline_first(self, n: int) -> AssayBuilder:
        """The first ``n`` values logged at the iopath, in log order (time, then row id)."""
        _check_rows("baseline_first", n)
        self.definition.baseline_rows.CopyFrom(pb.AssayBaselineRows(start=0, stop=n))
        return self

    def baseline_last(self, n: int) -> AssayBuilder:
        """The last ``n`` values logged at the iopath when the assay is run or uploaded; an uploaded
        assay keeps that baseline."""
        _check_rows("baseline_last", n)
        self.definition.baseline_rows.CopyFrom(pb.AssayBaselineRows(start=0, stop=n, from_end=True))
        return self

    def baseline_rows(self, start: int, stop: int) -> AssayBuilder:
        """Values ``start`` to ``stop`` (0-based, stop excluded) logged at the iopath, in log order
        (time, then row id: the order of ``pipeline.logs()`` pages; rows without a number at the
        iopath, as failed inferences, are not counted)."""
        if start < 0 or stop <= start:
            raise ValueError(f"baseline_rows needs 0 <= start < stop, got start {start}, stop {stop}")
        self.definition.baseline_rows.CopyFrom(pb.AssayBaselineRows(start=start, stop=stop))
        return self

    # thresholds
    def add_min_count(self, min_count: int) -> AssayBuilder:
        """Windows with fewer values are NoData, not judged against the thresholds (default 30;
        0 judges every window, as Wallaroo does)."""
        self.definition.min_count = min_count
        return self

    def add_alert_threshold(self, threshold: float) -> AssayBuilder:
        self.definition.alert_threshold = threshold
        return self

    def add_warning_threshold(self, threshold: float) -> AssayBuilder:
        self.definition.warning_threshold = threshold
        return self

    # runs
    def interactive_baseline_run(self) -> AssaySummary:
        summary = self.client.call("PreviewBaseline", pb.PreviewBaselineRequest(definition=self.definition))
        return AssaySummary.from_proto(summary)

    def interactive_run(self, end: datetime | str | None = None) -> AssayResults:
        """One result per window with data that has closed, from the start up to ``end``, then
        the window still open (status Open, with its values so far; ``window_end`` is when it
        closes) if it has started. A window has closed once its end has passed on the wall clock
        or in event time (the pipeline's latest logged time), as for the live assayer.

        Without ``end``, or with an ``end`` no earlier than windows have closed, the run goes as
        far as windows have closed and shows the open window. With an earlier ``end``, it stops
        there and shows no open window; a window that extends past ``end`` is named in
        :meth:`AssayResults.notes` (``cut``). Windows with fewer values than min_count have the
        status NoData."""
        request = pb.RunAssayInteractiveRequest(definition=self.definition)
        if end is not None:
            request.end.CopyFrom(timestamp(end))
        return AssayResults.from_proto(self.client.call("RunAssayInteractive", request, timeout=600))

    def upload(self) -> Assay:
        """Store the assay; the assayer then scores every window as it closes."""
        created = self.client.call("CreateAssay", pb.CreateAssayRequest(definition=self.definition))
        return Assay.from_proto(self.client, created)


class AssayClientMixin(ABC):
    """The assay verbs of :class:`joey.Client`, which provides ``workspace``, ``settings`` and ``call``."""

    workspace: str
    settings: CommonSettings

    @abstractmethod
    def call(self, name: str, request: Any, timeout: float = 60.0) -> Any: ...

    def build_assay(
        self,
        assay_name: str,
        pipeline: Any,
        iopath: str,
        *,
        baseline_start: datetime | str | None = None,
        baseline_end: datetime | str | None = None,
        baseline_data: Sequence[float] | None = None,
        model: str = "",
    ) -> AssayBuilder:
        """``pipeline`` is a pipeline name or an SDK Pipeline; ``iopath`` e.g. ``"input features 2"``."""
        name = pipeline if isinstance(pipeline, str) else pipeline.name
        return AssayBuilder(
            self,
            assay_name,
            name,
            iopath,
            baseline_start=baseline_start,
            baseline_end=baseline_end,
            baseline_data=baseline_data,
            model=model,
        )

    def list_assays(self, pipeline: str = "") -> list[Assay]:
        response = self.call("ListAssays", pb.ListAssaysRequest(workspace=self.workspace, pipeline=pipeline))
        return [Assay.from_proto(self, a) for a in response.assays]

    def get_assay(self, name: str) -> Assay:
        found = self.call("GetAssay", pb.GetAssayRequest(workspace=self.workspace, name=name))
        return Assay.from_proto(self, found)

    def _set_assay_active(self, name: str, active: bool) -> Assay:
        request = pb.SetAssayActiveRequest(workspace=self.workspace, name=name, active=active)
        return Assay.from_proto(self, self.call("SetAssayActive", request))

    def pause_assay(self, name: str) -> Assay:
        return self._set_assay_active(name, False)

    def resume_assay(self, name: str) -> Assay:
        return self._set_assay_active(name, True)

    def delete_assay(self, name: str) -> None:
        self.call("DeleteAssay", pb.DeleteAssayRequest(workspace=self.workspace, name=name))

    def get_assay_results(
        self, name: str, *, start: datetime | str | None = None, end: datetime | str | None = None
    ) -> AssayResults:
        """Stored results of an uploaded assay whose window starts in ``[start, end)``."""
        request = pb.GetAssayResultsRequest(workspace=self.workspace, name=name)
        if start is not None:
            request.start.CopyFrom(timestamp(start))
        if end is not None:
            request.end.CopyFrom(timestamp(end))
        return AssayResults.from_proto(self.call("GetAssayResults", request))


__all__ = ["Assay", "AssayBuilder", "AssayClientMixin", "AssayResult", "AssayResults", "AssaySummary"]
