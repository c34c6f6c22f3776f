"""`joey source ...` and `joey sink ...`: the SDK's bridge verbs on the command line (registered by
joey_cli.commands). Both groups list, show, pause, resume and delete bridges of their own kind."""

from __future__ import annotations

from typing import Any

import click

from joey_cli.tables import echo_table


def _group(kind: str) -> click.Group:
    @click.group(name=kind, help=f"{kind.capitalize()}s: bridges between connections and pipelines.")
    def group() -> None:
        pass

    def bridge(obj: Any, name: str) -> Any:
        found = obj.client.get_bridge(name)
        if found.kind != kind:
            raise click.UsageError(f"{name!r} is a {found.kind}, not a {kind}: use `joey {found.kind} ...`")
        return found

    @group.command("list")
    @click.pass_obj
    def list_(obj: Any) -> None:
        """The workspace's bridges of this kind, with their state."""
        from joey.client.catalog import Listing  # with the client: `joey --help` loads no SDK

        found = Listing(b for b in obj.client.list_bridges() if b.kind == kind)
        echo_table(found, f"workspace {obj.workspace} has no {kind}s")

    @group.command("status")
    @click.argument("name")
    @click.pass_obj
    def status(obj: Any, name: str) -> None:
        """State, rows moved, lag and the last error."""
        s = bridge(obj, name).status()
        lag = s.lag if s.lag >= 0 else "unknown"
        click.echo(f"{name}: {s.state}, {s.rows_moved} rows moved, lag {lag}")
        if s.last_error:
            click.echo(f"last error: {s.last_error}")

    for verb in ("pause", "resume", "delete"):

        def act(obj: Any, name: str, verb: str = verb) -> None:
            getattr(bridge(obj, name), verb)()
            click.echo(f"{verb}d {kind} {name}" if verb != "pause" else f"paused {kind} {name}")

        group.command(verb, help=f"{verb.capitalize()} {kind} NAME.")(
            click.argument("name")(click.pass_obj(act))
        )
    return group


source = _group("source")
sink = _group("sink")


@source.command("create")
@click.argument("name")
@click.option(
    "--connection",
    help="The connection read from: a Postgres table with a key, a directory, an S3 prefix, a Kafka topic.",
)
@click.option(
    "--from-pipeline",
    help="Instead of a connection: a pipeline whose results' outputs become PIPELINE's inputs (a chain).",
)
@click.option("--pipeline", required=True, help="The pipeline whose inputs the rows become.")
@click.pass_obj
def source_create(
    obj: Any, name: str, connection: str | None, from_pipeline: str | None, pipeline: str
) -> None:
    """Stream every record of CONNECTION, existing and new, in order, into PIPELINE: a table's rows in
    key order, the rows of the files of a directory or an S3 prefix in name order, a topic's records;
    or every result of another pipeline (--from-pipeline)."""
    if (connection is None) == (from_pipeline is None):
        raise click.UsageError("give one of --connection or --from-pipeline")
    created = obj.client.create_source(
        name, connection=connection, pipeline=pipeline, from_pipeline=from_pipeline
    )
    origin = created.connection or f"pipeline {created.from_pipeline}"
    click.echo(f"created source {created.name}: {origin} -> {created.pipeline}")


@sink.command("create")
@click.argument("name")
@click.option("--pipeline", required=True, help="The pipeline whose results are written.")
@click.option(
    "--connection",
    required=True,
    help="The connection written to: a Postgres table, a directory, an S3 prefix, a Kafka topic, a URL.",
)
@click.option(
    "--what",
    type=click.Choice(["outputs", "errors", "logs"]),
    default="outputs",
    show_default=True,
    help="outputs: every result, errors included; errors: the errors only; logs: its inference logs.",
)
@click.pass_obj
def sink_create(obj: Any, name: str, pipeline: str, connection: str, what: str) -> None:
    """Write PIPELINE's results into CONNECTION, one row per request id: a table (created if absent),
    Parquet files, a topic's records, or POSTs."""
    created = obj.client.create_sink(name, pipeline=pipeline, connection=connection, what=what)
    click.echo(f"created sink {created.name}: {created.pipeline} {created.what} -> {created.connection}")
