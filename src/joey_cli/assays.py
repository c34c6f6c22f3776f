"""`joey assay ...`: the SDK's assay verbs on the command line (registered by joey_cli)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps
from typing import Any

import click

from joey_cli.errors import fail

_DEFINITION_OPTIONS: list[Callable[[Any], Any]] = [
    click.option("--pipeline", "-p", required=True, help="Pipeline whose logs are assayed."),
    click.option("--iopath", required=True, help="'input <field> [<index>]' or 'output <field> [<index>]'."),
    click.option("--baseline-start", help="ISO time: the baseline is the logs from here..."),
    click.option("--baseline-end", help="...to here (exclusive)."),
    click.option(
        "--baseline-file", type=click.Path(exists=True, dir_okay=False), help="Or: baseline values."
    ),
    click.option("--baseline-first", type=int, metavar="N", help="Or: the first N values logged."),
    click.option("--baseline-last", type=int, metavar="N", help="Or: the last N values logged."),
    click.option(
        "--baseline-rows",
        metavar="START:STOP",
        help="Or: values START to STOP logged (0-based, STOP excluded), in log order (time, row id).",
    ),
    click.option("--model", default="", help="Only inferences this model took part in."),
    click.option("--width", type=int, default=24 * 3600, show_default=True, help="Window width in seconds."),
    click.option("--interval", type=int, help="Seconds between window starts (default: the width)."),
    click.option("--start", help="ISO time of the first window (default: the baseline end)."),
    click.option("--bins", "num_bins", type=int, default=5, show_default=True, help="Number of bins."),
    click.option(
        "--bin-mode",
        type=click.Choice(["quantile", "equal", "provided"]),
        default="quantile",
        help="How the bins' edges are chosen from the baseline (provided: --edges).",
    ),
    click.option("--edges", help="Comma-separated edges, with --bin-mode provided."),
    click.option("--no-outlier-bins", is_flag=True, help="No bins for values outside the baseline's range."),
    click.option(
        "--metric",
        type=click.Choice(["psi", "maxdiff", "sumdiff"]),
        default="psi",
        help="How a window's bins are compared with the baseline's.",
    ),
    click.option(
        "--aggregation",
        type=click.Choice(["density", "cumulative"]),
        default="density",
        help="Compare the bins' shares (density) or their running totals (cumulative).",
    ),
    click.option("--weights", help="Comma-separated bin weights, outlier bins included."),
    click.option("--alert", type=float, default=0.25, show_default=True, help="Alert threshold."),
    click.option("--warning", type=float, help="Warning threshold."),
    click.option(
        "--min-count",
        type=int,
        help="Windows with fewer values are NoData, not judged (default 30; 0 judges every window).",
    ),
]


def _definition_options(command: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(_DEFINITION_OPTIONS):
        command = option(command)
    return command


def _floats(text: str | None, what: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(v) for v in text.replace("\n", ",").split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(
            f"{what}: expected numbers separated by commas or lines, got {text[:60]!r}"
        ) from None


@contextmanager
def _errors() -> Iterator[None]:
    # SDK and gRPC errors are the group's to report; these are the user's input and files.
    try:
        yield
    except (ValueError, OSError) as exc:
        fail(exc)


def _row_range(text: str) -> tuple[int, int]:
    start, sep, stop = text.partition(":")
    try:
        if sep:
            return int(start), int(stop)
    except ValueError:
        pass
    raise click.ClickException(f"--baseline-rows: expected START:STOP, e.g. 0:5000, got {text!r}")


def _builder(obj: Any, name: str, o: dict[str, Any]) -> Any:
    data = None
    if o["baseline_file"]:
        with open(o["baseline_file"]) as f:
            data = _floats(f.read(), "--baseline-file")
    builder = obj.client.build_assay(
        name,
        o["pipeline"],
        o["iopath"],
        baseline_start=o["baseline_start"],
        baseline_end=o["baseline_end"],
        baseline_data=data,
        model=o["model"],
    )
    builder.add_width(seconds=o["width"]).add_num_bins(o["num_bins"]).add_metric(o["metric"])
    builder.add_bin_mode(o["bin_mode"], _floats(o["edges"], "--edges")).add_aggregation(o["aggregation"])
    builder.add_alert_threshold(o["alert"]).add_outlier_bins(not o["no_outlier_bins"])
    if o["interval"] is not None:
        builder.add_interval(seconds=o["interval"])
    if o["start"]:
        builder.add_start(o["start"])
    if o["weights"]:
        builder.add_bin_weights(_floats(o["weights"], "--weights"))
    if o["warning"] is not None:
        builder.add_warning_threshold(o["warning"])
    if o["min_count"] is not None:
        builder.add_min_count(o["min_count"])
    rows = [
        f"--{k.replace('_', '-')}"
        for k in ("baseline_first", "baseline_last", "baseline_rows")
        if o[k] is not None
    ]
    if len(rows) > 1:
        raise click.ClickException(f"give one of {' or '.join(rows)}, not several")
    for option in ("baseline_first", "baseline_last"):
        if o[option] is not None and o[option] < 1:
            raise click.ClickException(f"--{option.replace('_', '-')} needs N >= 1, got {o[option]}")
    # A row baseline with a time range or a file is refused by the registry, which names both.
    if o["baseline_first"] is not None:
        builder.baseline_first(o["baseline_first"])
    if o["baseline_last"] is not None:
        builder.baseline_last(o["baseline_last"])
    if o["baseline_rows"] is not None:
        builder.baseline_rows(*_row_range(o["baseline_rows"]))
    return builder


def _wide() -> Any:
    import pandas as pd

    return pd.option_context("display.width", 200, "display.max_columns", 14, "display.max_colwidth", 40)


def _echo_results(results: Any, chart: str | None) -> None:
    frame = results.to_dataframe().drop(columns=["scores"])
    with _wide():
        click.echo(frame.to_string(index=False) if len(frame) else "no results")
    for note in results.notes():
        click.echo(note)
    if chart and len(results):
        click.echo(f"chart: {results.chart_scores(chart)}", err=True)


def _describe(a: Any) -> str:
    d = a.definition
    state = f"failed: {a.failure}" if a.failure else "active" if a.active else "paused"
    return (
        f"{a.name}\t{d.pipeline}\t{d.iopath}\t{state}\twidth {d.width_seconds}s\t"
        f"{d.summarizer.metric}\talert > {d.alert_threshold:g}\tmin_count {d.min_count}"
    )


@click.group()
def assay() -> None:
    """Drift detection: assays over a pipeline's inference log (docs/assays.md)."""


def _with_definition(command: Callable[..., Any]) -> Callable[..., Any]:
    @wraps(command)
    def run(obj: Any, name: str, **options: Any) -> None:
        with _errors():
            command(obj, _builder(obj, name, options), options)

    return _definition_options(run)


@assay.command("create")
@click.argument("name")
@click.pass_obj
@_with_definition
def create(obj: Any, builder: Any, options: dict[str, Any]) -> None:
    """Store assay NAME; the assayer scores each window as it closes."""
    click.echo(_describe(builder.upload()))


@assay.command("preview")
@click.argument("name")
@click.option("--chart", type=click.Path(dir_okay=False), help="Write a PNG histogram of the baseline.")
@click.pass_obj
@_with_definition
def preview(obj: Any, builder: Any, options: dict[str, Any]) -> None:
    """Show the baseline summary of a definition (nothing stored)."""
    summary = builder.interactive_baseline_run()
    click.echo(
        f"count {summary.count}  min {summary.min:.6g}  max {summary.max:.6g}  mean {summary.mean:.6g}  "
        f"median {summary.median:.6g}  std {summary.std:.6g}"
    )
    with _wide():
        click.echo(summary.to_dataframe().to_string(index=False))
    if options.get("chart"):
        click.echo(f"chart: {summary.chart(options['chart'])}", err=True)


@assay.command("run")
@click.argument("name")
@click.option(
    "--end", help="ISO time: the windows shown end by then (default: as far as windows have closed)."
)
@click.option("--chart", type=click.Path(dir_okay=False), help="Write a PNG of the scores.")
@click.pass_obj
@_with_definition
def run(obj: Any, builder: Any, options: dict[str, Any]) -> None:
    """Score a definition over past logs, one row per closed window with data (nothing stored).

    Without --end (or with one no earlier than windows have closed), one more row for the window
    still open, if it has started; with an earlier --end, a note names the window that extends
    past it instead."""
    _echo_results(builder.interactive_run(end=options.get("end")), options.get("chart"))


@assay.command("list")
@click.option("--pipeline", "-p", default="", help="Only assays of this pipeline.")
@click.pass_obj
def list_assays(obj: Any, pipeline: str) -> None:
    """List the workspace's assays."""
    with _errors():
        found = obj.client.list_assays(pipeline)
    for a in found:
        click.echo(_describe(a))
    if not found:
        click.echo("no assays")


@assay.command("get")
@click.argument("name")
@click.pass_obj
def get(obj: Any, name: str) -> None:
    """Show assay NAME: its definition and baseline."""
    from google.protobuf.json_format import MessageToJson

    with _errors():
        found = obj.client.get_assay(name)
    click.echo(_describe(found))
    click.echo(MessageToJson(found.definition))
    b = found.baseline
    click.echo(f"baseline: count {b.count}, bins {', '.join(b.edge_names)}, counts {list(b.bin_counts)}")


@assay.command("pause")
@click.argument("name")
@click.pass_obj
def pause(obj: Any, name: str) -> None:
    """Stop scoring new windows of NAME."""
    with _errors():
        click.echo(_describe(obj.client.pause_assay(name)))


@assay.command("resume")
@click.argument("name")
@click.pass_obj
def resume(obj: Any, name: str) -> None:
    """Resume NAME; windows closed while paused are scored too."""
    with _errors():
        click.echo(_describe(obj.client.resume_assay(name)))


@assay.command("delete")
@click.argument("name")
@click.pass_obj
def delete(obj: Any, name: str) -> None:
    """Delete NAME and its results."""
    with _errors():
        obj.client.delete_assay(name)
    click.echo(f"deleted assay {name}")


@assay.command("results")
@click.argument("name")
@click.option("--start", help="ISO time: windows starting from here.")
@click.option("--end", help="ISO time: windows starting before this.")
@click.option("--chart", type=click.Path(dir_okay=False), help="Write a PNG of the scores.")
@click.pass_obj
def results(obj: Any, name: str, start: str | None, end: str | None, chart: str | None) -> None:
    """Stored results of NAME, one row per window."""
    with _errors():
        _echo_results(obj.client.get_assay_results(name, start=start, end=end), chart)
