"""`joey login`, `logout`, `whoami`, `user ...`, `token ...`, `workspace add-user|remove-user|users` and
`audit`: the SDK's identity verbs on the command line (registered by joey_cli.commands).

Secrets never reach a command line (where `ps` and the shell's history would keep them): passwords are
prompted for with hidden input, or read from stdin with --password-stdin.
"""

from __future__ import annotations

import os
import sys
from datetime import datetime
from typing import Any

import click

from joey_cli.errors import fail
from joey_cli.params import Duration, Since
from joey_cli.tables import echo_table


def _password(from_stdin: bool, confirm: bool = False) -> str:
    if from_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
        if not password:
            raise click.UsageError("--password-stdin: no password on stdin")
        return password
    return str(click.prompt("Password", hide_input=True, confirmation_prompt=confirm))


_PASSWORD_STDIN = click.option(
    "--password-stdin",
    is_flag=True,
    help="Read the password from the first line of stdin instead of prompting for it.",
)


def _credentials() -> Any:
    from joey_core.credentials import CredentialsFile

    return CredentialsFile()


@click.command()
@click.option("--username", "-u", help="User to log in as (prompted for when not given).")
@_PASSWORD_STDIN
@click.option(
    "--expires-in",
    type=Duration(),
    help="Session lifetime, e.g. 8h (default and most: the registry's, 12 h).",
)
@click.pass_obj
def login(obj: Any, username: str | None, password_stdin: bool, expires_in: int | None) -> None:
    """Log in to the registry and store the session's token in the credentials file.

    The file ($JOEY_CREDENTIALS, default ~/.config/joey/credentials, mode 0600) keeps a token per
    registry address; every later `joey` command and joey.Client() for that registry uses it. `joey up`
    logs the local stack's admin in by itself."""
    from joey.client import Client
    from joey_core.credentials import CredentialsError

    if username is None:
        if password_stdin:
            raise click.UsageError("--password-stdin needs --username: stdin holds the password")
        username = str(click.prompt("Username"))
    password = _password(password_stdin)
    try:
        client = Client.login(
            username, password, obj.registry, obj.workspace, expires_in_s=expires_in, store=True
        )
    except CredentialsError as exc:
        fail(exc)
    until = f" until {client.session_expires_at:%Y-%m-%d %H:%M} UTC" if client.session_expires_at else ""
    click.echo(
        f"logged in to {obj.registry_addr} as {username}{until}; token stored in {_credentials().path}"
    )
    if os.environ.get("JOEY_TOKEN"):
        click.echo(
            "note: JOEY_TOKEN is set, and is used instead of the stored token until it is unset", err=True
        )


@click.command()
@click.pass_obj
def logout(obj: Any) -> None:
    """Log out of the registry: revoke the token stored for it and remove it from the credentials file."""
    from joey.client import Client, JoeyError
    from joey_core.credentials import CredentialsError

    addr = obj.registry_addr
    credentials = _credentials()
    try:
        stored = credentials.get(addr)
        if stored is None:
            raise click.ClickException(
                f"not logged in to {addr}: no token is stored for it in {credentials.path}"
            )
        try:
            client = Client(addr, token=stored.token)
            if stored.api_token_name is None:
                client.logout()
            else:
                # Logout ends sessions only (a CI token is not ended by mistake): revoke it by name.
                client.revoke_token(stored.api_token_name)
        except JoeyError as exc:
            if exc.code not in ("UNAUTHENTICATED", "NOT_FOUND"):
                raise
            # Expired or revoked already: nothing is left to revoke, only the entry to remove.
        credentials.remove(addr)
    except CredentialsError as exc:
        fail(exc)
    click.echo(
        f"logged out of {addr} as {stored.username}: the token is revoked and removed from {credentials.path}"
    )


@click.command()
@click.pass_obj
def whoami(obj: Any) -> None:
    """Show the user the registry knows the caller as."""
    user = obj.client.whoami()
    click.echo(f"{user.username}{' (platform admin)' if user.admin else ''}")


@click.group()
def user() -> None:
    """Users of the registry (platform admins only)."""


@user.command("create")
@click.argument("username")
@_PASSWORD_STDIN
@click.option("--email", default="", help="The user's email address.")
@click.option("--admin", is_flag=True, help="Make a platform admin, who sees and manages everything.")
@click.pass_obj
def user_create(obj: Any, username: str, password_stdin: bool, email: str, admin: bool) -> None:
    """Create user USERNAME (2-63 lowercase letters, digits, '.', '_', '-'); the password (at least 12
    characters) is prompted for twice."""
    created = obj.client.create_user(username, _password(password_stdin, confirm=True), admin, email)
    click.echo(f"created user {created.username}{' (platform admin)' if created.admin else ''}")


@user.command("list")
@click.pass_obj
def user_list(obj: Any) -> None:
    """List every user."""
    echo_table(obj.client.list_users(), "no users")


@user.command("deactivate")
@click.argument("username")
@click.pass_obj
def user_deactivate(obj: Any, username: str) -> None:
    """Deactivate USERNAME: their tokens are refused from the next call on, and they cannot log in."""
    obj.client.deactivate_user(username)
    click.echo(f"deactivated user {username}")


@user.command("activate")
@click.argument("username")
@click.pass_obj
def user_activate(obj: Any, username: str) -> None:
    """Activate USERNAME again."""
    obj.client.activate_user(username)
    click.echo(f"activated user {username}")


@click.group()
def token() -> None:
    """Your API tokens, for CI and services (pass one in JOEY_TOKEN)."""


@token.command("create")
@click.argument("name")
@click.option("--expires-in", type=Duration(), help="Lifetime, e.g. 90d (default: until revoked).")
@click.pass_obj
def token_create(obj: Any, name: str, expires_in: int | None) -> None:
    """Create API token NAME and print its secret, this once: the registry keeps only its hash."""
    secret = obj.client.create_token(name, expires_in)
    # Only the secret on stdout, so that `TOKEN=$(joey token create ci)` takes it whole.
    click.echo(secret)
    click.echo(f"created token {name}; it is not shown again: keep it now", err=True)


@token.command("list")
@click.pass_obj
def token_list(obj: Any) -> None:
    """List your live API tokens and login sessions (never their secrets)."""
    echo_table(obj.client.list_tokens(), "no tokens")


@token.command("revoke")
@click.argument("name")
@click.pass_obj
def token_revoke(obj: Any, name: str) -> None:
    """Revoke your token NAME: it is refused from the next call on."""
    obj.client.revoke_token(name)
    click.echo(f"revoked token {name}")


def _workspace(obj: Any, name: str) -> Any:
    from joey.client import Workspace

    # The registry checks the caller on every member call: no lookup first.
    return Workspace(obj.client, name)


@click.command("add-user")
@click.argument("workspace")
@click.argument("username")
@click.option("--owner", is_flag=True, help="As an owner, who may manage members (default: a collaborator).")
@click.pass_obj
def workspace_add_user(obj: Any, workspace: str, username: str, owner: bool) -> None:
    """Add USERNAME to WORKSPACE, or change their role (owners and platform admins only)."""
    ws = _workspace(obj, workspace)
    member = ws.add_owner(username) if owner else ws.add_user(username)
    click.echo(f"{member.username} is {member.role} of workspace {workspace}")


@click.command("remove-user")
@click.argument("workspace")
@click.argument("username")
@click.pass_obj
def workspace_remove_user(obj: Any, workspace: str, username: str) -> None:
    """Remove USERNAME from WORKSPACE (owners and platform admins only; its last owner stays)."""
    _workspace(obj, workspace).remove_user(username)
    click.echo(f"removed {username} from workspace {workspace}")


@click.command("users")
@click.argument("workspace")
@click.pass_obj
def workspace_users(obj: Any, workspace: str) -> None:
    """List the members of WORKSPACE with their roles."""
    echo_table(_workspace(obj, workspace).users(), f"workspace {workspace} has no members")


WORKSPACE_COMMANDS = (workspace_add_user, workspace_remove_user, workspace_users)
"""Subcommands of `joey workspace`."""


@click.command()
@click.option("--user", "username", help="Only actions of this user.")
@click.option("--workspace", help="Only actions in this workspace.")
@click.option("--action", help="Only this action: the registry call, e.g. Deploy or CreateToken.")
@click.option("--since", type=Since(), help="From this ISO time, or this long ago (30m, 12h, 7d).")
@click.option("--until", type=Since(), help="Up to this ISO time, or this long ago.")
@click.option(
    "--limit", type=click.IntRange(1, 10_000), default=100, show_default=True, help="At most this many."
)
@click.pass_obj
def audit(
    obj: Any,
    username: str | None,
    workspace: str | None,
    action: str | None,
    since: datetime | None,
    until: datetime | None,
    limit: int,
) -> None:
    """Show the audit trail of management actions, newest first (platform admins only)."""
    entries = obj.client.audit_log(username, workspace, action, since, until, limit)
    echo_table(entries, "no audit entries")


COMMANDS = (login, logout, whoami, user, token, audit)
"""Commands of `joey`."""
