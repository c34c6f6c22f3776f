"""`joey orchestration ...` and `joey task ...`: the SDK's orchestration and task verbs on the command
line (registered by joey_cli.commands)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from joey_cli.errors import fail
from joey_cli.params import POSITIVE_SECONDS
from joey_cli.tables import echo_table


@click.group(help="Orchestrations: Python code (main.py, requirements.txt, any files) the platform runs.")
def orchestration() -> None:
    pass


@orchestration.command("upload")
@click.argument("name")
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option("--no-wait", is_flag=True, help="Return while the orchestrators still package it.")
@click.option("--timeout", type=POSITIVE_SECONDS, default=900.0, show_default=True, help="Seconds to wait.")
@click.pass_obj
def upload(obj: Any, name: str, path: Path, no_wait: bool, timeout: float) -> None:
    """Upload directory (or .zip) PATH as a new version of orchestration NAME, then wait while its
    requirements are installed."""
    orch = obj.client.upload_orchestration(name, path, wait=False)
    click.echo(
        f"uploaded {orch.name} version {orch.version} ({orch.files} files, {orch.size_bytes} bytes)", err=True
    )
    if not no_wait:
        with click.progressbar(
            length=1, label="packaging (installing requirements.txt)", file=sys.stderr
        ) as bar:
            try:
                orch.wait_ready(timeout)
            finally:
                bar.update(1)
    click.echo(f"{orch.name} version {orch.version} {orch.status()}")


@orchestration.command("list")
@click.pass_obj
def list_orchestrations(obj: Any) -> None:
    """The latest version of each orchestration, with its packaging status."""
    echo_table(obj.client.list_orchestrations(), f"workspace {obj.workspace} has no orchestrations")


@orchestration.command("status")
@click.argument("name")
@click.option("--version", type=click.IntRange(min=1), default=None, help="Default: the latest.")
@click.pass_obj
def status(obj: Any, name: str, version: int | None) -> None:
    """Packaging status of NAME and its packaging log."""
    found = obj.client.get_orchestration(name, version).status()
    click.echo(f"{name} version {found.version}: {found.status}")
    if found.log:
        click.echo(found.log)


@orchestration.command("delete")
@click.argument("name")
@click.pass_obj
def delete_orchestration(obj: Any, name: str) -> None:
    """Delete every version of NAME (refused while a task uses it)."""
    versions = obj.client.get_orchestration(name).delete()
    click.echo(f"deleted orchestration {name} ({versions} versions)")


@click.group(help="Tasks: an orchestration run once, on a cron schedule, or continuously.")
def task() -> None:
    pass


def _task_options(command: Any) -> Any:
    for option in reversed(
        (
            click.option("--orchestration", "-o", required=True, help="The orchestration to run."),
            click.option(
                "--args", "json_args", default="{}", help="A JSON object: joey.task_args() in main.py."
            ),
            click.option("--timeout", type=POSITIVE_SECONDS, default=None, help="Seconds a run may take."),
            click.option(
                "--pin", is_flag=True, help="Run its latest version now, even once newer ones exist."
            ),
        )
    ):
        command = option(command)
    return command


def _create(obj: Any, kind: str, name: str, orchestration: str, json_args: str, **options: Any) -> None:
    try:
        args = json.loads(json_args)
    except ValueError as exc:
        fail(ValueError(f"--args is not JSON: {exc}"))
    orch = obj.client.get_orchestration(orchestration)
    created = getattr(orch, kind)(name, json_args=args, **options)
    when = f", next at {created.next_run:%Y-%m-%d %H:%M:%S} UTC" if created.next_run else ""
    click.echo(f"created task {created.name} ({created.kind} of {created.orchestration}){when}")


@task.command("run-once")
@click.argument("name")
@_task_options
@click.option("--retries", type=click.IntRange(0, 100), default=0, help="Further attempts of a failed run.")
@click.pass_obj
def run_once(obj: Any, name: str, orchestration: str, json_args: str, **options: Any) -> None:
    """Run ORCHESTRATION's main.py once, as task NAME."""
    _create(obj, "run_once", name, orchestration, json_args, **options)


@task.command("schedule")
@click.argument("name")
@_task_options
@click.option(
    "--schedule", required=True, help="A cron expression, UTC ('0 2 * * *'; a 6th field is seconds)."
)
@click.option("--retries", type=click.IntRange(0, 100), default=0, help="Further attempts of a failed run.")
@click.pass_obj
def schedule(obj: Any, name: str, orchestration: str, json_args: str, **options: Any) -> None:
    """Run ORCHESTRATION's main.py at every instant of a cron schedule, as task NAME."""
    _create(obj, "run_scheduled", name, orchestration, json_args, **options)


@task.command("continuous")
@click.argument("name")
@_task_options
@click.pass_obj
def continuous(obj: Any, name: str, orchestration: str, json_args: str, **options: Any) -> None:
    """Run ORCHESTRATION's main.py as task NAME, again whenever it exits, until killed."""
    _create(obj, "run_continuously", name, orchestration, json_args, **options)


@task.command("list")
@click.pass_obj
def list_tasks(obj: Any) -> None:
    """Every task, with its status and next scheduled run."""
    echo_table(obj.client.list_tasks(), f"workspace {obj.workspace} has no tasks")


@task.command("status")
@click.argument("name")
@click.pass_obj
def task_status(obj: Any, name: str) -> None:
    """NAME's status, and its latest run."""
    found = obj.client.get_task(name)
    click.echo(f"{found.name}: {found.status()}")
    runs = found.last_runs(1)
    if runs:
        echo_table(runs, "")


@task.command("kill")
@click.argument("name")
@click.pass_obj
def kill(obj: Any, name: str) -> None:
    """Stop NAME: no more runs, and its running one's processes get SIGTERM, then SIGKILL."""
    obj.client.get_task(name).kill()
    click.echo(f"killed task {name}")


@task.command("delete")
@click.argument("name")
@click.pass_obj
def delete_task(obj: Any, name: str) -> None:
    """Delete NAME with its runs and their logs (kill it first)."""
    obj.client.get_task(name).delete()
    click.echo(f"deleted task {name}")


@task.command("runs")
@click.argument("name")
@click.option("--limit", type=click.IntRange(1, 10_000), default=20, show_default=True, help="Runs shown.")
@click.pass_obj
def runs(obj: Any, name: str, limit: int) -> None:
    """NAME's latest runs: status, start, end, exit code."""
    echo_table(obj.client.get_task(name).last_runs(limit), f"task {name} has not run yet")


@task.command("logs")
@click.argument("name")
@click.option("--run", "run_id", type=click.IntRange(min=1), default=None, help="Default: the latest run.")
@click.option("--follow", "-f", is_flag=True, help="Print lines as they come, until the run ends.")
@click.pass_obj
def logs(obj: Any, name: str, run_id: int | None, follow: bool) -> None:
    """The output of NAME's latest run (or of --run): stdout and stderr, line by line."""
    found = obj.client.get_task(name).last_runs(10_000 if run_id else 1)
    chosen = next((r for r in found if run_id is None or r.id == run_id), None)
    if chosen is None:
        fail(LookupError(f"task {name} has no run {run_id}" if run_id else f"task {name} has not run yet"))
    for line in chosen.follow() if follow else chosen.logs():
        click.echo(line.text, err=line.stream == "stderr")
