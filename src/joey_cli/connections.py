"""`joey connection ...` and `joey workspace add-connection|remove-connection|connections`: the SDK's
connection verbs on the command line (registered by joey_cli.commands). Secrets are never echoed:
`get` prints them as ``***`` unless asked with --show-secrets."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from joey_cli.confirm import YES, confirm
from joey_cli.errors import fail
from joey_cli.tables import echo_table


def _details(pairs: tuple[str, ...], file: str | None) -> dict[str, Any]:
    """Details from a JSON file, then ``key=value`` pairs over it (``headers.Authorization=...`` sets a
    nested value)."""
    details: dict[str, Any] = {}
    if file:
        try:
            loaded = json.loads(Path(file).read_text())
        except (OSError, ValueError) as exc:
            fail(ValueError(f"--details-file {file}: {exc}"))
        if not isinstance(loaded, dict):
            raise click.BadParameter("must hold a JSON object", param_hint="--details-file")
        details = loaded
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {key!r}", param_hint="--detail")
        *parents, last = key.split(".")
        target = details
        for part in parents:
            target = target.setdefault(part, {})
        target[last] = value
    return details


@click.group()
def connection() -> None:
    """Data connections: details of external sources and sinks (docs/workloads.md)."""


@connection.command("create")
@click.argument("name")
@click.option(
    "--type",
    "kind",
    required=True,
    type=click.Choice(["postgres", "kafka", "files", "s3", "http"]),
    help="The kind of store.",
)
@click.option("--detail", "-d", "pairs", multiple=True, metavar="KEY=VALUE", help="A detail (repeatable).")
@click.option(
    "--details-file", type=click.Path(exists=True, dir_okay=False), help="Details as a JSON object."
)
@click.pass_obj
def connection_create(
    obj: Any, name: str, kind: str, pairs: tuple[str, ...], details_file: str | None
) -> None:
    """Store connection NAME in the workspace; its secrets are sealed and never printed. Prefer
    --details-file for secrets: a --detail value stays in your shell's history."""
    created = obj.client.create_connection(name, kind, _details(pairs, details_file))
    click.echo(f"created {created.type} connection {created.name}")


@connection.command("list")
@click.pass_obj
def connection_list(obj: Any) -> None:
    """The connections of the workspace and those added to it (secrets as ***)."""
    echo_table(obj.client.list_connections(), f"workspace {obj.workspace} has no connections")


@connection.command("get")
@click.argument("name")
@click.option("--show-secrets", is_flag=True, help="Print the details in full, secrets included.")
@click.pass_obj
def connection_get(obj: Any, name: str, show_secrets: bool) -> None:
    """Connection NAME: its type, workspace and details as JSON (secrets as *** unless --show-secrets,
    without which they are not even fetched)."""
    if show_secrets:
        found = obj.client.get_connection(name)
        details = found.details()
    else:
        found = next((c for c in obj.client.list_connections() if c.name == name), None)
        if found is None:
            raise click.ClickException(f"connection {name!r} not found in workspace {obj.workspace!r}")
        details = found.listed
    shared = f", added to {', '.join(found.shared_with)}" if found.shared_with else ""
    click.echo(f"{found.name}: {found.type} connection of workspace {found.owner}{shared}")
    click.echo(json.dumps(details, indent=2, sort_keys=True))


@connection.command("test")
@click.argument("name")
@click.pass_obj
def connection_test(obj: Any, name: str) -> None:
    """Connect to NAME and say what was found; exit status 1 when it does not work."""
    from joey.client import Connection

    result = Connection(obj.client, obj.workspace, name, "", "").test()
    click.echo(f"{'ok' if result.ok else 'FAILED'}: {result.message}")
    if not result.ok:
        raise SystemExit(1)


@connection.command("delete")
@click.argument("name")
@YES
@click.pass_obj
def connection_delete(obj: Any, name: str, yes: bool) -> None:
    """Delete connection NAME of the workspace, and its shares (refused while bridges use it). Asks
    first (--yes does not)."""
    from joey.client import Connection

    confirm(
        yes,
        f"connection {name}",
        lambda: f"delete connection {name} of workspace {obj.workspace}, and its shares?",
    )
    Connection(obj.client, obj.workspace, name, "", "").delete()
    click.echo(f"deleted connection {name}")


def _workspace(obj: Any, name: str) -> Any:
    from joey.client import Workspace

    return Workspace(obj.client, name)


@click.command("add-connection")
@click.argument("workspace")
@click.argument("name")
@click.pass_obj
def workspace_add_connection(obj: Any, workspace: str, name: str) -> None:
    """Make connection NAME of the current workspace (-w) usable in WORKSPACE."""
    _workspace(obj, workspace).add_connection(name, obj.workspace)
    click.echo(f"added connection {name} of workspace {obj.workspace} to workspace {workspace}")


@click.command("remove-connection")
@click.argument("workspace")
@click.argument("name")
@click.pass_obj
def workspace_remove_connection(obj: Any, workspace: str, name: str) -> None:
    """Stop sharing connection NAME with WORKSPACE (it stays in its own workspace)."""
    _workspace(obj, workspace).remove_connection(name)
    click.echo(f"removed connection {name} from workspace {workspace}")


@click.command("connections")
@click.argument("workspace")
@click.pass_obj
def workspace_connections(obj: Any, workspace: str) -> None:
    """The connections WORKSPACE sees: its own and those added to it (secrets as ***)."""
    echo_table(_workspace(obj, workspace).list_connections(), f"workspace {workspace} has no connections")


WORKSPACE_COMMANDS = (workspace_add_connection, workspace_remove_connection, workspace_connections)
"""Subcommands of `joey workspace`."""
