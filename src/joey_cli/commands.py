"""The `joey` command line: the local stack, the services, and the SDK's verbs."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import click

from joey_cli import bridges, connections, identity, orchestrations
from joey_cli.assays import assay
from joey_cli.confirm import YES as _YES
from joey_cli.confirm import confirm as _confirm
from joey_cli.errors import error_line
from joey_cli.errors import fail as _fail
from joey_cli.params import POSITIVE_SECONDS, IsoTime
from joey_cli.services import SERVICES, module
from joey_cli.tables import echo_table, wide_pandas


class Context:
    def __init__(self, registry: str | None, workspace: str, registry_given: bool = False) -> None:
        self.registry = registry
        self.workspace = workspace
        self.registry_given = registry_given
        """Whether --registry was on the command line (not only in JOEY_REGISTRY_ADDR)."""
        self._client: Any = None

    @property
    def client(self) -> Any:
        if self._client is None:
            from joey.client import Client

            self._client = Client(self.registry, self.workspace)
        return self._client

    @property
    def registry_addr(self) -> str:
        """The address the client calls (or would call)."""
        if self._client is not None:
            return str(self._client.settings.registry_addr)
        if self.registry:
            return self.registry
        from pydantic import ValidationError

        from joey_core.settings import CommonSettings

        try:
            return CommonSettings().registry_addr
        except ValidationError:  # another JOEY_* variable is invalid; this is asked while reporting an error
            return str(CommonSettings.model_fields["registry_addr"].default)


class _Group(click.Group):
    """The `joey` group: an SDK or gRPC error of any command ends as one `Error:` line, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except Exception as exc:
            message = error_line(exc, ctx.obj)
            if message is None:
                raise
            raise click.ClickException(message) from None


@click.group(cls=_Group)
@click.version_option(package_name="joey", prog_name="joey", message="%(prog)s %(version)s")
@click.option(
    "--registry", envvar="JOEY_REGISTRY_ADDR", help="Registry host:port (default $JOEY_REGISTRY_ADDR)."
)
@click.option(
    "--workspace",
    "-w",
    envvar="JOEY_WORKSPACE",
    default="default",
    show_default=True,
    help="Workspace to work in (default $JOEY_WORKSPACE).",
)
@click.pass_context
def main(ctx: click.Context, registry: str | None, workspace: str) -> None:
    """Joey: Kafka-native MLOps."""
    given = ctx.get_parameter_source("registry") == click.core.ParameterSource.COMMANDLINE
    ctx.obj = Context(registry, workspace, given)


@main.command()
@click.argument("service", type=click.Choice(SERVICES))
def serve(service: str) -> None:
    """Run one service in the foreground (what compose.yaml and production run)."""
    # Replaced by `python -P -m joey_<service>` (same pid, so signals still reach it): the service runs as its
    # own main module, which the engine's spawned replicas rely on; -P keeps the current directory off
    # sys.path, as the console script did.
    os.execv(sys.executable, [sys.executable, "-P", "-m", module(service)])  # noqa: S606  # a fixed module


@main.command()
@click.option(
    "--detach",
    "-d",
    is_flag=True,
    help="Run in the background and return once it is ready; `joey down` stops it.",
)
@click.pass_obj
def up(obj: Context, detach: bool) -> None:
    """Start the local stack: the embedded broker (unless JOEY_KAFKA_BOOTSTRAP is set), registry, engine,
    logger, assayer, gateway and connector-bridge.

    One stack per user, refused while one runs: its state and logs are in JOEY_STATE_DIR (default
    ~/.local/state/joey), so `joey status` and `joey down` find it from any directory. --registry is
    the address the registry listens on."""
    from joey_cli.stack import StackError, StackSettings, describe, run_foreground, start_detached
    from joey_core.lifecycle import configure_logging

    settings = StackSettings()
    if obj.registry_given:
        settings = settings.model_copy(update={"registry_addr": obj.registry})
    configure_logging(settings)
    try:
        if detach:
            state = start_detached(settings, say=click.echo)
            click.echo(f"Joey is up (pid {state['pid']}); `joey down` stops it")
            click.echo("\n".join(describe(state)))
        else:
            run_foreground(settings, say=click.echo)
    except StackError as exc:
        _fail(exc)


def _no_registry(obj: Context, command: str) -> None:
    if obj.registry_given:
        raise click.ClickException(
            f"--registry does not apply to `joey {command}`: it finds the stack through JOEY_STATE_DIR; "
            "leave --registry out"
        )


@main.command()
@click.pass_obj
def down(obj: Context) -> None:
    """Stop the stack started by `joey up`, from any directory (it is found through JOEY_STATE_DIR)."""
    from joey_cli.stack import StackError, StackSettings, stop_detached

    _no_registry(obj, "down")
    try:
        click.echo(stop_detached(StackSettings()))
    except StackError as exc:
        _fail(exc)


@main.command()
@click.pass_obj
def status(obj: Context) -> None:
    """Show the stack `joey up` started: its pid, addresses, services and logs."""
    from joey_cli.stack import StackSettings, describe, pid_alive, stack_status

    _no_registry(obj, "status")
    settings = StackSettings()
    running, stale = stack_status(settings)
    if running is None:
        left = ""
        if stale:
            left = f"; pid {stale['pid']} exited without stopping it, `joey down` stops what it left"
        raise click.ClickException(
            f"Joey is not running (no stack in {settings.state_dir}{left}): start it with `joey up`"
        )
    started = f", since {running['started_at']}" if "started_at" in running else ""
    phase = {"ready": "up"}.get(running.get("status", ""), running.get("status", "starting"))
    click.echo(f"Joey is {phase} (pid {running['pid'] or 'unknown'}{started}); `joey down` stops it")
    click.echo("\n".join(describe(running)))
    services = running.get("services", {})
    if services:
        shown = (f"{name} {pid}" + ("" if pid_alive(pid) else " (exited)") for name, pid in services.items())
        click.echo(f"  services  {', '.join(shown)}")


@main.command()
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell: str) -> None:
    """Print the script that completes `joey` commands and options in SHELL.

    \b
    bash: add  eval "$(joey completion bash)"  to ~/.bashrc
    zsh:  add  eval "$(joey completion zsh)"   to ~/.zshrc
    fish: run  joey completion fish > ~/.config/fish/completions/joey.fish
    """
    from click.shell_completion import get_completion_class

    completer = get_completion_class(shell)
    assert completer is not None  # one for each of the choices
    click.echo(completer(main, {}, "joey", "_JOEY_COMPLETE").source())


# Workspaces
@main.group()
def workspace() -> None:
    """Workspaces: separate sets of models, pipelines and assays (select one with -w)."""


@workspace.command("create")
@click.argument("name")
@click.pass_obj
def workspace_create(obj: Context, name: str) -> None:
    """Create workspace NAME (lowercase letters, digits and dashes); you are its owner."""

    click.echo(f"created workspace {obj.client.create_workspace(name).name}")


@workspace.command("list")
@click.pass_obj
def workspace_list(obj: Context) -> None:
    """List your workspaces (every one, for a platform admin); in a terminal, * marks the current one,
    and your role in each is shown.

    The current workspace is chosen with -w or $JOEY_WORKSPACE."""

    workspaces = obj.client.list_workspaces()
    # Marked only for a person: piped, the names are bare, one a line.
    marked = sys.stdout.isatty()
    width = max((len(w.name) for w in workspaces), default=0)
    for ws in workspaces:
        current = "*" if ws.name == obj.workspace else " "
        click.echo(f"{current} {ws.name:<{width}}  {ws.role or '-'}" if marked else ws.name)


@workspace.command("delete")
@click.argument("name")
@_YES
@click.pass_obj
def workspace_delete(obj: Context, name: str, yes: bool) -> None:
    """Delete the empty workspace NAME.

    Refused while it holds models, pipelines or assays (delete them first), and for the default
    workspace. Asks first (--yes does not)."""

    _confirm(yes, f"workspace {name}", lambda: f"delete workspace {name}?")
    obj.client.delete_workspace(name)
    click.echo(f"deleted workspace {name}")


# Models
@main.group()
def model() -> None:
    """Models and their versions: upload, list, describe, tag, artifacts, delete."""


@model.command("upload")
@click.argument("name")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--framework",
    default="onnx",
    show_default=True,
    help="onnx; python for a python step; sklearn, xgboost, lightgbm or pytorch for a native model, "
    "which the registry converts to ONNX (docs/models.md)",
)
@click.option(
    "--input",
    "inputs",
    multiple=True,
    metavar="NAME:DTYPE:SHAPE",
    help="A declared input of a python step or a PyTorch model, e.g. features:float32:-1,4 (repeatable).",
)
@click.option(
    "--output",
    "outputs",
    multiple=True,
    metavar="NAME:DTYPE:SHAPE",
    help="A declared output of a python step (repeatable).",
)
@click.option(
    "--artifact",
    "artifacts",
    multiple=True,
    type=click.Path(exists=True, path_type=Path),
    help="An extra file the version carries (repeatable): notebooks, samples, code, test results. One "
    "directory: its files, named relative to it; several: files by name, directories under their name.",
)
@click.option("--description", default=None, help="What the version is.")
@click.option("--source", default=None, help="Where it came from: a training run id, a git commit.")
@click.option("--metadata", default=None, metavar="JSON", help="A JSON object, e.g. '{\"auc\": 0.91}'.")
@click.option("--no-wait", is_flag=True, help="Return while a native model is still converting.")
@click.pass_obj
def model_upload(
    obj: Context,
    name: str,
    path: Path,
    framework: str,
    inputs: tuple[str, ...],
    outputs: tuple[str, ...],
    artifacts: tuple[Path, ...],
    description: str | None,
    source: str | None,
    metadata: str | None,
    no_wait: bool,
) -> None:
    """Upload PATH as a new version of model NAME, with the files it carries and its lineage."""
    import json

    from joey.client.artifacts import collect
    from joey.client.signatures import parse_option
    from joey_core.models import CONVERTING

    try:
        input_schema = dict(parse_option(text) for text in inputs) or None
        output_schema = dict(parse_option(text) for text in outputs) or None
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    try:
        extra = (artifacts[0] if len(artifacts) == 1 else list(artifacts)) if artifacts else None
        files = collect(extra) if extra is not None else []
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="'--artifact'") from None
    try:
        given = json.loads(metadata) if metadata is not None else None
    except ValueError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint="'--metadata'") from None
    if given is not None and not isinstance(given, dict):
        raise click.BadParameter("must be a JSON object", param_hint="'--metadata'")

    total = path.stat().st_size + sum(p.stat().st_size for _, p in files)
    with click.progressbar(length=total, label=f"uploading {path.name}", file=sys.stderr) as bar:
        sent = [0]

        def progress(done: int, total: int) -> None:
            bar.update(done - sent[0])
            sent[0] = done

        mv = obj.client.upload_model(
            name,
            path,
            framework,
            progress=progress,
            input_schema=input_schema,
            output_schema=output_schema,
            artifacts=extra,
            description=description,
            source=source,
            metadata=given,
            wait=False,
        )
    if mv.status == CONVERTING:
        click.echo(f"{mv.name} version {mv.version}: {mv.conversion_log}", err=True)
        if no_wait:
            click.echo(
                f"{mv.name} version {mv.version} converting (`joey model get {mv.name}` shows its status)"
            )
            return
        with click.progressbar(length=1, label="converting to ONNX and verifying", file=sys.stderr) as bar:
            mv = obj.client.wait_for_model(mv)
            bar.update(1)
        for line in mv.conversion_log.splitlines()[1:]:
            click.echo(f"  {line}", err=True)
    click.echo(f"{mv.name} version {mv.version} {mv.status} sha256 {mv.sha256}")
    if mv.artifact_count:
        click.echo(f"  artifacts: {mv.artifact_count} files, {mv.artifact_bytes} bytes")
    for kind, specs in (("input", mv.inputs), ("output", mv.outputs)):
        for s in specs:
            click.echo(f"  {kind} {s.name}: {s.dtype} {list(s.shape)}")


_VERSION_HELP = "Only this version (default: every version)."


@model.command("list")
@click.option("--tag", default=None, help="Only models with this tag.")
@click.option("--framework", default=None, help="Only versions of this framework.")
@click.option("--search", default=None, metavar="TERM", help="In model names and descriptions, any case.")
@click.option("--all-versions", is_flag=True, help="One row per version.")
@click.pass_obj
def model_list(
    obj: Context, tag: str | None, framework: str | None, search: str | None, all_versions: bool
) -> None:
    """List the models.

    One row per model: versions, latest version, framework, its inputs and outputs (name, dtype,
    shape; -1 is any size), tags and upload time. With --search or --all-versions, one row per
    version. Filters keep what matches them all."""

    if search:
        rows: Any = obj.client.search_models(search, tag=tag, framework=framework)
    else:
        rows = obj.client.list_models(all_versions, tag=tag, framework=framework)
    echo_table(
        rows, f"no models in workspace {obj.workspace}" + (" match" if tag or framework or search else "")
    )


@model.command("tag")
@click.argument("name")
@click.argument("tag")
@click.option("--remove", is_flag=True, help="Remove the tag instead.")
@click.pass_obj
def model_tag(obj: Context, name: str, tag: str, remove: bool) -> None:
    """Tag model NAME with TAG (or --remove it); prints its tags.

    A tag is 1 to 64 lowercase letters, digits, '.', '_', ':' or '-'. Adding a tag it has, or removing
    one it has not, changes nothing."""
    from joey.client.tags import set_tag

    _echo_tags(set_tag(obj.client, obj.workspace, "model", name, tag, add=not remove))


def _echo_tags(tags: tuple[str, ...]) -> None:
    click.echo(" ".join(tags) if tags else "(no tags)")


@model.command("artifacts")
@click.argument("name")
@click.option("--version", type=click.IntRange(min=1), help="This version (default: the latest).")
@click.option(
    "--download",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    metavar="DIR",
    help="Download them under DIR (created if needed), each checked against its sha256.",
)
@click.pass_obj
def model_artifacts(obj: Context, name: str, version: int | None, download: Path | None) -> None:
    """List the files a version of model NAME carries: name, size and sha256."""
    mv = obj.client.get_model(name, version)
    if download is None:
        echo_table(mv.artifacts(), f"model {name} version {mv.version} carries no artifacts")
        return
    written = mv.download_artifacts(download)
    click.echo(f"downloaded {len(written)} artifacts of {name} version {mv.version} to {download}")


@model.command("get")
@click.argument("name")
@click.option("--version", type=click.IntRange(min=1), help=_VERSION_HELP)
@click.pass_obj
def model_get(obj: Context, name: str, version: int | None) -> None:
    """Show the versions of model NAME.

    One row per version: framework, inputs, outputs, sha256, size and upload time."""
    from joey.client.catalog import Listing

    versions = Listing([obj.client.get_model(name, version)]) if version else obj.client.model_versions(name)
    echo_table(versions, f"model {name} has no versions")


@model.command("configure")
@click.argument("name")
@click.option("--version", type=click.IntRange(min=1), help=_VERSION_HELP)
@click.option(
    "--batch-config",
    type=click.Choice(["single", "batched"]),
    default="batched",
    show_default=True,
    help="single: the model runs on one record per call.",
)
@click.option(
    "--max-batch-delay-ms",
    type=click.IntRange(min=0),
    help="Longest wait for more records of a batch (default: the engine's JOEY_MAX_BATCH_DELAY_MS).",
)
@click.option(
    "--batch-size-target",
    type=click.IntRange(min=1),
    help="Most records in a batch (default: the engine's JOEY_MAX_BATCH_SIZE).",
)
@click.pass_obj
def model_configure(
    obj: Context,
    name: str,
    version: int | None,
    batch_config: str,
    max_batch_delay_ms: int | None,
    batch_size_target: int | None,
) -> None:
    """Set how the engine runs model NAME (its latest version by default).

    Each call sets the whole config; pipeline versions created after it use it (the next deploy)."""
    try:
        mv = obj.client.configure_model(
            name,
            version,
            "single" if batch_config == "single" else None,
            max_batch_delay_ms,
            batch_size_target,
        )
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    click.echo(f"model {mv.name} version {mv.version}: {mv.config}")


@model.command("describe")
@click.argument("name")
@click.option("--version", type=click.IntRange(min=1), help=_VERSION_HELP)
@click.pass_obj
def model_describe(obj: Context, name: str, version: int | None) -> None:
    """Show model NAME in full and what uses it.

    Each version's framework, signature, artifact and the pipeline versions that use it (deployed
    or not)."""

    described = obj.client.describe_model(name)
    numbers = [mv.version for mv in described.model.versions]
    if version and version not in numbers:
        have = f"latest is {numbers[-1]}" if numbers else "it has no versions"
        raise click.ClickException(
            f"model {name!r} has no version {version} in workspace {obj.workspace!r} ({have})"
        )
    click.echo(described.text(version))


@model.command("delete")
@click.argument("name")
@click.option(
    "--version",
    type=click.IntRange(min=1),
    help="Delete only this version; the model stays (default: every version, and the model).",
)
@_YES
@click.pass_obj
def model_delete(obj: Context, name: str, version: int | None, yes: bool) -> None:
    """Delete model NAME, or one version of it.

    Refused while a deployed pipeline's current version uses a version to delete. Pipeline versions
    that are not deployed may keep naming it, but can no longer be deployed. A deleted version's
    number is never reused. Deleting every version asks first (--yes does not)."""
    from joey.client.catalog import plural

    def question() -> str:
        numbers = [mv.version for mv in obj.client.model_versions(name)]
        listed = ", ".join(map(str, numbers))
        listed = f": {plural(len(numbers), 'version', False)} {listed}" if numbers else ""
        return f"delete model {name}{listed}, and the model itself?"

    if version is None:
        _confirm(yes, f"model {name}", question)
    click.echo(str(obj.client.delete_model(name, version)))


# Pipelines
@main.group()
def pipeline() -> None:
    """Pipelines (steps, stored as numbered versions) and their deployments."""


def _parse_checks(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> dict[str, str]:
    checks: dict[str, str] = {}
    for value in values:
        # Split at the first "=" only: expressions contain "==" and "!=".
        name, sep, expression = value.partition("=")
        name, expression = name.strip(), expression.strip()
        if not sep or not name or not expression:
            raise click.BadParameter(
                f"expected NAME=EXPRESSION, e.g. --check 'too_sure=out.probabilities[0] > 0.99', "
                f"got {value!r}",
                ctx,
                param,
            )
        if name in checks:
            raise click.BadParameter(f"check {name!r} is given twice", ctx, param)
        checks[name] = expression
    return checks


_MAP_USAGE = "expected STEP:INPUT=SOURCE, e.g. --map 2:x=probabilities"


def _parse_maps(
    ctx: click.Context, param: click.Parameter, values: tuple[str, ...]
) -> dict[int, dict[str, str]]:
    maps: dict[int, dict[str, str]] = {}
    for value in values:
        index, colon, assignment = value.partition(":")
        name, equals, source = assignment.partition("=")
        index, name, source = index.strip(), name.strip(), source.strip()
        if not colon or not equals or not index.isdigit() or int(index) < 1 or not name or not source:
            raise click.BadParameter(
                f"{_MAP_USAGE} (STEP counts the --model steps from 1), got {value!r}", ctx, param
            )
        step_map = maps.setdefault(int(index), {})
        if name in step_map:
            raise click.BadParameter(f"input {name!r} of model step {index} is mapped twice", ctx, param)
        step_map[name] = source
    return maps


def _parse_challengers(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> list[str]:
    usage = "MODEL or MODEL:VERSION, e.g. --challenger iris-b:2"
    return [_model_spec(ctx, param, value, usage) for value in values]


def _model_spec(ctx: click.Context, param: click.Parameter, value: str, usage: str) -> str:
    model, colon, version = value.strip().partition(":")
    if not model or (colon and not (version.isdigit() and int(version) > 0)):
        raise click.BadParameter(f"expected {usage} (VERSION a positive number), got {value!r}", ctx, param)
    return value.strip()


def _parse_splits(
    ctx: click.Context, param: click.Parameter, values: tuple[str, ...]
) -> list[tuple[float, str]]:
    arms: list[tuple[float, str]] = []
    for value in values:
        weight, _, model = value.partition(":")
        try:
            number = float(weight)
        except ValueError:
            number = 0.0
        if not number > 0:
            raise click.BadParameter(
                f"expected WEIGHT:MODEL[:VERSION] with a positive WEIGHT, e.g. --split 2:iris, got {value!r}",
                ctx,
                param,
            )
        arms.append((number, _model_spec(ctx, param, model, "WEIGHT:MODEL[:VERSION], e.g. --split 2:iris")))
    return arms


def _parse_routes(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> dict[str, str]:
    routes: dict[str, str] = {}
    for value in values:
        # Split at the last "=": the routed value is free text.
        key, equals, model = value.rpartition("=")
        if not equals:
            raise click.BadParameter(
                f"expected VALUE=MODEL[:VERSION], e.g. --route gold=iris-b, got {value!r}", ctx, param
            )
        if key in routes:
            raise click.BadParameter(f"value {key!r} is routed twice", ctx, param)
        routes[key] = _model_spec(ctx, param, model, "VALUE=MODEL[:VERSION], e.g. --route gold=iris-b")
    return routes


@pipeline.command("create")
@click.argument("name")
@click.option(
    "--model",
    "-m",
    "models",
    multiple=True,
    help="MODEL or MODEL:VERSION (repeatable): model steps, in order.",
)
@click.option(
    "--map",
    "maps",
    multiple=True,
    callback=_parse_maps,
    help="STEP:INPUT=SOURCE: feed input INPUT of the STEP-th --model from SOURCE, a field of the "
    "input record for step 1, an output of the previous model otherwise. Unmapped inputs are fed "
    "by their own name.",
)
@click.option(
    "--challenger",
    "challengers",
    multiple=True,
    callback=_parse_challengers,
    help="MODEL or MODEL:VERSION: makes the last --model the champion of a shadow step with this "
    "challenger (repeatable). Challengers see every record, fed by their own input names (a --map of "
    "that step applies to the champion); only the champion's outputs are the result.",
)
@click.option(
    "--check",
    "-c",
    "checks",
    multiple=True,
    callback=_parse_checks,
    help="NAME=EXPRESSION over in.<field> and out.<field>; true flags an anomaly. "
    "All checks form one validations step after the model steps.",
)
@click.option(
    "--split",
    "splits",
    multiple=True,
    callback=_parse_splits,
    help="WEIGHT:MODEL[:VERSION] (repeatable, at least 2): a random split step after the --model steps; "
    "each record is served by one arm, chosen in proportion to the weights.",
)
@click.option("--hash-key", default="", help="FIELD: make --split sticky per value of this record field.")
@click.option(
    "--key-split",
    "meta_key",
    default="",
    help="FIELD: a key split step (after any --split): the record field whose value picks the model "
    "among the --route options, else the --default model.",
)
@click.option(
    "--route",
    "routes",
    multiple=True,
    callback=_parse_routes,
    help="VALUE=MODEL[:VERSION] (repeatable): records whose --key-split field is VALUE go to MODEL.",
)
@click.option(
    "--default", "default_model", default="", help="MODEL[:VERSION]: the --key-split default model."
)
@click.pass_obj
def pipeline_create(
    obj: Context,
    name: str,
    models: tuple[str, ...],
    maps: dict[int, dict[str, str]],
    challengers: list[str],
    checks: dict[str, str],
    splits: list[tuple[float, str]],
    hash_key: str,
    meta_key: str,
    routes: dict[str, str],
    default_model: str,
) -> None:
    """Create pipeline NAME, or a new version of it.

    From model steps, validation checks and optionally a shadow step (--challenger), a random split
    (--split) and a key split (--key-split); a new version is made only when the steps changed.
    Steps run in that order: --model steps, --split, --key-split, then the checks."""

    if not (models or splits or meta_key):
        raise click.UsageError("give at least one --model, --split or --key-split")
    if hash_key and not splits:
        raise click.BadParameter("applies to a --split step; give --split too", param_hint="'--hash-key'")
    if bool(meta_key) != bool(default_model) or (routes and not meta_key):
        raise click.UsageError("a key split needs --key-split FIELD, --default MODEL and --route VALUE=MODEL")
    beyond = sorted(index for index in maps if index > len(models))
    if beyond:
        raise click.BadParameter(
            f"there is no model step {beyond[0]}: {len(models)} --model given", param_hint="'--map'"
        )
    builder = obj.client.build_pipeline(name)
    for index, spec in enumerate(models, 1):
        model_name, _, version = spec.partition(":")
        if index == len(models) and challengers:
            builder.add_shadow_deploy(spec, challengers, {model_name: maps[index]} if index in maps else None)
        else:
            builder.add_model_step(model_name, int(version) if version else None, maps.get(index))
    if splits:
        builder.add_random_split(splits, hash_key=hash_key or None)
    if meta_key:
        builder.add_key_split(default_model, meta_key, dict(routes))
    if checks:
        builder.add_validations(**checks)
    pv = builder.create()
    click.echo(f"{pv.pipeline} version {pv.version}: {' -> '.join(str(s) for s in pv.steps)}")


@pipeline.command("list")
@click.option("--tag", default=None, help="Only pipelines with this tag.")
@click.option("--search", default=None, metavar="TERM", help="In pipeline names, any case.")
@click.pass_obj
def pipeline_list(obj: Context, tag: str | None, search: str | None) -> None:
    """List the pipelines.

    One row per pipeline: latest version, deployed version, replicas, status, tags and last change."""

    pipelines = obj.client.search_pipelines(search, tag) if search or tag else obj.client.list_pipelines()
    echo_table(pipelines, f"no pipelines in workspace {obj.workspace}" + (" match" if search or tag else ""))


@pipeline.command("tag")
@click.argument("name")
@click.argument("tag")
@click.option("--remove", is_flag=True, help="Remove the tag instead.")
@click.pass_obj
def pipeline_tag(obj: Context, name: str, tag: str, remove: bool) -> None:
    """Tag pipeline NAME with TAG (or --remove it); prints its tags.

    Tags are as for `joey model tag`."""
    from joey.client.tags import set_tag

    _echo_tags(set_tag(obj.client, obj.workspace, "pipeline", name, tag, add=not remove))


@pipeline.command("describe")
@click.argument("name")
@click.pass_obj
def pipeline_describe(obj: Context, name: str) -> None:
    """Show pipeline NAME in full.

    Its versions and their steps, its deployment and status, its topics and assays."""

    click.echo(str(obj.client.describe_pipeline(name)))


@pipeline.command("delete")
@click.argument("name")
@_YES
@click.pass_obj
def pipeline_delete(obj: Context, name: str, yes: bool) -> None:
    """Delete the undeployed pipeline NAME.

    Its versions, deployment history and logged inferences go with it, then its topics. Refused
    while it is deployed (`joey pipeline undeploy NAME` first), while its replicas are still
    stopping, or while assays watch it. Asks first, saying what goes (--yes does not)."""
    from joey.client.catalog import plural

    def question() -> str:
        pipe = obj.client.build_pipeline(name)  # a handle: no steps, nothing stored
        logged = pipe.log_count()
        return (
            f"delete pipeline {name}: {plural(len(pipe.versions()), 'version')}, "
            f"{logged:,} logged {'inference' if logged == 1 else 'inferences'}"
            + (f" (export them first: joey export-logs {name} --dir DIR)" if logged else "")
            + "?"
        )

    _confirm(yes, f"pipeline {name}", question)
    click.echo(str(obj.client.delete_pipeline(name)))


def _print_status(status: Any, name: str = "") -> None:
    if not status.deployed:
        prefix = f"{name}: " if name else ""
        if status.undeployed_at is None:
            click.echo(f"{prefix}not deployed (never deployed)")
        else:
            click.echo(f"{prefix}{status.message}")
        for r in status.replicas:
            click.echo(f"  {r.replica_id}: {r.phase} (finishing its batch, then leaving)")
        return
    scaling = ""
    if status.autoscale is not None:
        a = status.autoscale
        scaling = (
            f", autoscaling {a.min_replicas}-{a.max_replicas} on queue age > {a.queue_age_threshold_s:g} s"
        )
    click.echo(
        f"{status.status} (version {status.pipeline_version}, {status.replicas_wanted} replicas{scaling}): "
        f"{status.message}"
    )
    for r in status.replicas:
        click.echo(
            f"  {r.replica_id}: {r.phase or ('alive' if r.alive else 'dead')}, version {r.pipeline_version}, "
            f"partitions={list(r.partitions)}, queue age {r.queue_age_s:.2f} s"
            + (f", error: {r.error}" if r.error else "")
        )


def _on_status(status: Any) -> None:
    click.echo(f"  {status.status}: {status.message}")


class _DeployProgress:
    """Prints each change of a deployment's progress with the time since the deploy began, to stderr."""

    def __init__(self) -> None:
        self.started = time.monotonic()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def __call__(self, status: Any) -> None:
        click.echo(f"  {self.elapsed:5.1f} s  {status.message}", err=True)


_ISO_TIME = IsoTime()


@pipeline.command("deploy")
@click.argument("name")
@click.option("--version", type=click.IntRange(min=1), help="Pipeline version to deploy (default: latest).")
@click.option(
    "--replicas",
    type=click.IntRange(min=1),
    help="Replicas, 1 to the partitions of the pipeline's topics (default: 1, or the autoscaling minimum).",
)
@click.option(
    "--autoscale",
    metavar="MIN-MAX",
    help="Scale between MIN and MAX replicas (1 <= MIN <= MAX) on queue age, e.g. 1-4.",
)
@click.option(
    "--queue-age",
    type=POSITIVE_SECONDS,
    default=1.0,
    show_default=True,
    help="Autoscaling threshold: seconds records may wait in the inputs topic.",
)
@click.option(
    "--scale-up-after",
    type=POSITIVE_SECONDS,
    default=10.0,
    show_default=True,
    help="Seconds the queue age must stay above the threshold before one replica is added.",
)
@click.option(
    "--scale-down-after",
    type=POSITIVE_SECONDS,
    default=300.0,
    show_default=True,
    help="Seconds the queue age must stay below the threshold before one replica is removed.",
)
@click.option("--cpus", help='Per-replica CPU request for production manifests, e.g. "2" or "500m".')
@click.option("--memory", help='Per-replica memory request for production manifests, e.g. "2Gi".')
@click.option(
    "--timeout",
    type=POSITIVE_SECONDS,
    default=120.0,
    show_default=True,
    help="Seconds to wait for every replica to be ready.",
)
@click.pass_obj
def pipeline_deploy(
    obj: Context,
    name: str,
    version: int | None,
    replicas: int | None,
    autoscale: str | None,
    queue_age: float,
    scale_up_after: float,
    scale_down_after: float,
    cpus: str | None,
    memory: str | None,
    timeout: float,
) -> None:
    """Deploy NAME and wait until every replica is ready, showing progress; a running deployment is
    rolled over to it."""
    from joey.client import Autoscale, Pipeline

    scaling = None
    if autoscale is not None:
        low, sep, high = autoscale.partition("-")
        if not (sep and low.isdigit() and high.isdigit()):
            raise click.BadParameter(
                f"expected MIN-MAX such as 1-4, got {autoscale!r}", param_hint="--autoscale"
            )
        try:
            scaling = Autoscale(int(low), int(high), queue_age, scale_up_after, scale_down_after)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--autoscale") from None
    progress = _DeployProgress()
    try:
        status = Pipeline(obj.client, name).deploy(
            replicas,
            version,
            timeout=timeout,
            on_status=progress,
            autoscale=scaling,
            cpus=cpus,
            memory=memory,
        )
    except ValueError as exc:
        _fail(exc)
    click.echo(f"{name} ready in {progress.elapsed:.1f} s")
    _print_status(status)


@pipeline.command("rollback")
@click.argument("name")
@click.option(
    "--version",
    type=click.IntRange(min=1),
    help="Version to roll back to (default: the one deployed before).",
)
@click.option(
    "--timeout",
    type=POSITIVE_SECONDS,
    default=120.0,
    show_default=True,
    help="Seconds to wait for every replica to be ready.",
)
@click.pass_obj
def pipeline_rollback(obj: Context, name: str, version: int | None, timeout: float) -> None:
    """Roll NAME back to an earlier version without a pause in serving."""
    from joey.client import Pipeline

    status = Pipeline(obj.client, name).rollback(version, timeout=timeout, on_status=_on_status)
    _print_status(status)


@pipeline.command("status")
@click.argument("name")
@click.pass_obj
def pipeline_status(obj: Context, name: str) -> None:
    """Show whether NAME is deployed, what each replica is doing, and what readiness still waits for."""
    from joey.client import Pipeline

    _print_status(Pipeline(obj.client, name).status(), name)


@pipeline.command("undeploy")
@click.argument("name")
@click.pass_obj
def pipeline_undeploy(obj: Context, name: str) -> None:
    """Stop serving NAME: its replicas finish their current batch, commit and leave."""
    from joey.client import Pipeline

    pipeline = Pipeline(obj.client, name)
    pipeline.undeploy()
    stopping = len(pipeline.status().replicas)
    click.echo(
        f"{name} undeployed"
        + (f"; {stopping} replica{'s' if stopping != 1 else ''} finishing their batch" if stopping else "")
    )


class _ProgressBar:
    """A progress(done, total) callback drawing a bar on stderr, made at the first call with a total: a
    command learns its total only once it has begun."""

    def __init__(self, stack: contextlib.ExitStack, label: str) -> None:
        self._stack = stack
        self._label = label
        self._bar: Any = None
        self.done = 0

    def __call__(self, done: int, total: int) -> None:
        if self._bar is None and total:
            self._bar = self._stack.enter_context(
                click.progressbar(length=total, label=self._label, file=sys.stderr)
            )
        if self._bar is not None:
            self._bar.update(done - self.done)
        self.done = done


def _file_format(value: str | None) -> str | None:
    """``--format`` checked against the SDK's formats (imported here: the SDK is slow to import)."""
    from joey.client.bulk import FORMATS

    if value is not None and value not in FORMATS:
        raise click.BadParameter(f"{value!r} is not one of {', '.join(FORMATS)}")
    return value


@main.command()
@click.argument("pipeline_name", metavar="PIPELINE")
@click.option(
    "--file",
    "-f",
    "path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    required=True,
    help="Records: a JSON array, one JSON object or JSON lines (.json, .jsonl), Arrow IPC (.arrow, .feather) "
    "or Parquet.",
)
@click.option(
    "--format",
    "data_format",
    metavar="FORMAT",
    callback=lambda _ctx, _param, value: _file_format(value),
    help="The file's format (json, arrow or parquet), when its suffix does not say.",
)
@click.option(
    "--timeout",
    type=float,
    default=60.0,
    show_default=True,
    help="Seconds to wait for the results of each chunk of records.",
)
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write results as JSON lines here instead of a table on stdout.",
)
@click.pass_obj
def infer(
    obj: Context, pipeline_name: str, path: Path, data_format: str | None, timeout: float, output: Path | None
) -> None:
    """Stream the records of a file through PIPELINE, a chunk at a time, and show the results.

    Exits with code 1 when any record failed (the count is on stderr, the reasons in the error column)."""
    import pyarrow as pa

    from joey.client import Pipeline
    from joey.client.bulk import InputFileError

    with contextlib.ExitStack() as stack:
        # The total is known once the file has been read through, before the first record is sent.
        progress = _ProgressBar(stack, "inferring")
        try:
            result = Pipeline(obj.client, pipeline_name).infer_from_file(path, data_format, timeout, progress)
        except InputFileError as exc:
            raise click.BadParameter(exc.message, param_hint="--file") from None
        except (TimeoutError, LookupError) as exc:
            _fail(exc)
    frame = result.to_pandas() if isinstance(result, pa.Table) else result
    if output:
        frame.to_json(output, orient="records", lines=True, date_format="iso")
        click.echo(f"wrote {len(frame)} results to {output}")
    else:
        groups = ("time", "in", "out", "shadow", "shadow_errors", "check_failures", "error")
        shown = [c for c in frame.columns if c.split(".")[0] in groups]
        with wide_pandas():
            click.echo(frame[shown].to_string())
    failed = int(frame["error"].notna().sum()) if "error" in frame else 0
    click.echo(f"{len(frame)} records, {failed} failed", err=True)
    if failed:
        # A script must not take a partly failed batch for a success; the results are written all the same.
        raise click.exceptions.Exit(1)


_ANOMALIES_HELP = "Only inferences where a validation check was true."


@main.command()
@click.argument("pipeline_name", metavar="PIPELINE")
@click.option("--limit", type=int, default=20, show_default=True, help="At most this many rows.")
@click.option("--failed", is_flag=True, help="Only failed inferences.")
@click.option("--anomalies", is_flag=True, help=_ANOMALIES_HELP)
@click.option("--start", type=_ISO_TIME, help="ISO time; returns rows chronologically from here.")
@click.option("--end", type=_ISO_TIME, help="ISO time.")
@click.pass_obj
def logs(
    obj: Context,
    pipeline_name: str,
    limit: int,
    failed: bool,
    anomalies: bool,
    start: datetime | None,
    end: datetime | None,
) -> None:
    """Show logged inferences of PIPELINE (newest first unless a range is given)."""
    from joey.client import Pipeline

    frame = Pipeline(obj.client, pipeline_name).logs(
        limit, start, end, valid=False if failed else None, anomalies_only=anomalies
    )
    with wide_pandas():
        click.echo(frame.to_string() if len(frame) else "no logged inferences")


@main.command("export-logs")
@click.argument("pipeline_name", metavar="PIPELINE")
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Directory for the files (created if missing).",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["parquet", "jsonl"]),
    default="parquet",
    show_default=True,
    help="File format: Parquet, or JSON lines.",
)
@click.option("--start", type=_ISO_TIME, help="ISO time; default: the oldest row.")
@click.option("--end", type=_ISO_TIME, help="ISO time (exclusive).")
@click.option("--failed", is_flag=True, help="Only failed inferences.")
@click.option("--anomalies", is_flag=True, help=_ANOMALIES_HELP)
@click.option(
    "--rows-per-file",
    type=click.IntRange(min=1),
    default=100_000,
    show_default=True,
    help="Rows in each file before the next one starts.",
)
@click.option("--overwrite", is_flag=True, help="Replace files of an earlier export to the same place.")
@click.pass_obj
def export_logs(
    obj: Context,
    pipeline_name: str,
    directory: Path,
    fmt: str,
    start: datetime | None,
    end: datetime | None,
    failed: bool,
    anomalies: bool,
    rows_per_file: int,
    overwrite: bool,
) -> None:
    """Write every logged inference of PIPELINE, oldest first, to numbered files in DIR."""
    from joey.client import Pipeline

    with contextlib.ExitStack() as stack:
        # The total is known only once the first page arrives.
        progress = _ProgressBar(stack, "exporting")

        try:
            files = Pipeline(obj.client, pipeline_name).export_logs(
                directory,
                fmt,
                start,
                end,
                valid=False if failed else None,
                rows_per_file=rows_per_file,
                progress=progress,
                overwrite=overwrite,
                anomalies_only=anomalies,
            )
        except (OSError, ValueError) as exc:
            _fail(exc)
    for path in files:
        click.echo(str(path))
    click.echo(f"wrote {progress.done} rows to {len(files)} file(s) in {directory}", err=True)


main.add_command(assay)
main.add_command(connections.connection)
main.add_command(bridges.source)
main.add_command(bridges.sink)
main.add_command(orchestrations.orchestration)
main.add_command(orchestrations.task)
for _command in identity.COMMANDS:
    main.add_command(_command)
for _command in (*identity.WORKSPACE_COMMANDS, *connections.WORKSPACE_COMMANDS):
    workspace.add_command(_command)

if __name__ == "__main__":
    main()
