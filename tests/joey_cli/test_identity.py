"""`joey login`, `logout`, `whoami`, `user`, `token`, `workspace` members and `audit`, run as a user runs
them, against the session's registry; and the login `joey up` does by itself."""

from __future__ import annotations

import json
import os
import secrets
import stat
from pathlib import Path

import pytest

from joey.client import Client
from joey_cli.local_login import token_name
from joey_core.credentials import Credential, CredentialsFile
from joey_core.settings import CommonSettings
from tests.conftest import Stack
from tests.joey_cli.conftest import CliStack, error_line, joey


@pytest.fixture
def user_env(stack: Stack, tmp_path: Path) -> dict[str, str]:
    """A user's shell: no JOEY_TOKEN, and a credentials file of its own."""
    base = {k: v for k, v in os.environ.items() if k != "JOEY_TOKEN"}
    return base | stack.env | {"JOEY_CREDENTIALS": str(tmp_path / "config" / "joey" / "credentials")}


@pytest.fixture
def admin_env(stack: Stack) -> dict[str, str]:
    """The session's admin, by the JOEY_TOKEN the session sets."""
    return os.environ | stack.env


def new_user(settings: CommonSettings) -> tuple[str, str]:
    name, password = f"u-{secrets.token_hex(4)}", secrets.token_urlsafe(16)
    Client(settings=settings).create_user(name, password)
    return name, password


def login(env: dict[str, str], name: str, password: str) -> str:
    return joey(env, "login", "--username", name, "--password-stdin", stdin=f"{password}\n").stdout


def test_login_whoami_tokens_and_logout(user_env: dict[str, str], settings: CommonSettings) -> None:
    name, password = new_user(settings)
    addr, path = settings.registry_addr, Path(user_env["JOEY_CREDENTIALS"])
    before = error_line(joey(user_env, "whoami", check=False))
    assert "no token was sent" in before and "joey login" in before, before

    said = login(user_env, name, password)
    assert said.startswith(f"logged in to {addr} as {name} until ") and said.rstrip().endswith(
        f"token stored in {path}"
    )
    assert password not in said
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert json.loads(path.read_text())[addr]["username"] == name
    assert joey(user_env, "whoami").stdout == f"{name}\n"

    # The secret alone on stdout, usable as it is.
    created = joey(user_env, "token", "create", "ci", "--expires-in", "7d")
    secret = created.stdout.strip()
    assert created.stdout == f"{secret}\n" and "not shown again" in created.stderr
    assert Client(settings=settings, token=secret).whoami().username == name
    listed = joey(user_env, "token", "list").stdout
    assert "ci" in listed and "session" in listed and secret not in listed
    assert joey(user_env, "token", "revoke", "ci").stdout == "revoked token ci\n"
    assert "ci " not in joey(user_env, "token", "list").stdout

    assert joey(user_env, "logout").stdout == (
        f"logged out of {addr} as {name}: the token is revoked and removed from {path}\n"
    )
    assert addr not in json.loads(path.read_text())
    after = error_line(joey(user_env, "whoami", check=False))
    assert "joey login" in after and "no token was sent" in after, after
    assert error_line(joey(user_env, "logout", check=False)) == (
        f"Error: not logged in to {addr}: no token is stored for it in {path}"
    )


def test_a_revoked_stored_token_says_how_to_log_in(
    user_env: dict[str, str], settings: CommonSettings
) -> None:
    name, password = new_user(settings)
    login(user_env, name, password)
    token = CredentialsFile(Path(user_env["JOEY_CREDENTIALS"])).get(settings.registry_addr)
    assert token is not None
    Client(settings=settings, token=token.token).logout()
    refused = error_line(joey(user_env, "whoami", check=False))
    assert "joey login" in refused and f"stored for {settings.registry_addr}" in refused, refused
    # Logging out of a session that is gone already still removes it.
    assert joey(user_env, "logout").stdout.startswith(f"logged out of {settings.registry_addr}")


def test_logout_revokes_a_stored_api_token_by_name(
    user_env: dict[str, str], settings: CommonSettings
) -> None:
    """`joey up` stores an API token, which the Logout RPC refuses to end: logout revokes it by name."""
    name, password = new_user(settings)
    secret = Client.login(name, password, settings.registry_addr).create_token("laptop")
    path = Path(user_env["JOEY_CREDENTIALS"])
    CredentialsFile(path).put(settings.registry_addr, Credential(name, secret, api_token_name="laptop"))
    assert joey(user_env, "whoami").stdout == f"{name}\n"
    assert joey(user_env, "logout").stdout.startswith(f"logged out of {settings.registry_addr} as {name}")
    assert settings.registry_addr not in json.loads(path.read_text())
    refused = error_line(joey(user_env | {"JOEY_TOKEN": secret}, "whoami", check=False))
    assert "UNAUTHENTICATED" in refused, refused


def test_a_wrong_password_is_one_error_line(user_env: dict[str, str], settings: CommonSettings) -> None:
    name, password = new_user(settings)
    failed = joey(user_env, "login", "-u", name, "--password-stdin", check=False, stdin="wrong-password-x\n")
    assert error_line(failed) == "Error: invalid username or password (UNAUTHENTICATED)"
    assert not Path(user_env["JOEY_CREDENTIALS"]).exists()
    empty = joey(user_env, "login", "-u", name, "--password-stdin", check=False, stdin="")
    assert empty.returncode == 2 and "no password on stdin" in empty.stderr
    needs_user = joey(user_env, "login", "--password-stdin", check=False, stdin=f"{password}\n")
    assert needs_user.returncode == 2 and "--password-stdin needs --username" in needs_user.stderr


def test_users_workspaces_members_and_audit(
    admin_env: dict[str, str], user_env: dict[str, str], settings: CommonSettings
) -> None:
    bob, carol = f"bob-{secrets.token_hex(4)}", f"carol-{secrets.token_hex(4)}"
    password = secrets.token_urlsafe(16)
    for name in (bob, carol):
        created = joey(admin_env, "user", "create", name, "--password-stdin", stdin=f"{password}\n")
        assert created.stdout == f"created user {name}\n"
    assert bob in joey(admin_env, "user", "list").stdout

    ws = f"team-{secrets.token_hex(4)}"
    assert joey(admin_env, "workspace", "create", ws).stdout == f"created workspace {ws}\n"
    assert (
        joey(admin_env, "workspace", "add-user", ws, bob).stdout
        == f"{bob} is collaborator of workspace {ws}\n"
    )
    users = joey(admin_env, "workspace", "users", ws).stdout.splitlines()
    assert users[0].split() == ["username", "role"]
    assert sorted(line.split() for line in users[1:]) == sorted([["admin", "owner"], [bob, "collaborator"]])

    login(user_env, bob, password)
    assert ws in joey(user_env, "workspace", "list").stdout.splitlines()
    denied = error_line(joey(user_env, "workspace", "add-user", ws, carol, check=False))
    assert denied.endswith("(PERMISSION_DENIED)"), denied
    assert error_line(joey(user_env, "user", "list", check=False)).endswith("(PERMISSION_DENIED)")

    owner = joey(admin_env, "workspace", "add-user", ws, bob, "--owner").stdout
    assert owner == f"{bob} is owner of workspace {ws}\n"
    assert joey(user_env, "workspace", "add-user", ws, carol).returncode == 0, "an owner adds members"
    assert (
        joey(user_env, "workspace", "remove-user", ws, carol).stdout
        == f"removed {carol} from workspace {ws}\n"
    )

    assert joey(admin_env, "user", "deactivate", bob).stdout == f"deactivated user {bob}\n"
    assert "UNAUTHENTICATED" in error_line(joey(user_env, "whoami", check=False))
    assert joey(admin_env, "user", "activate", bob).stdout == f"activated user {bob}\n"
    # Deactivation ended bob's session: reactivated, he logs in again.
    assert "UNAUTHENTICATED" in error_line(joey(user_env, "whoami", check=False))
    login(user_env, bob, password)

    audit = joey(admin_env, "audit", "--user", bob, "--action", "AddWorkspaceMember", "--since", "1h").stdout
    header, *rows = audit.splitlines()
    assert header.split()[:4] == ["time", "user", "action", "workspace"]
    assert len(rows) == 2 and all(bob in row and ws in row for row in rows), audit
    assert " OK " in rows[0] and "PERMISSION_DENIED" in rows[1], "newest first; the refusal is kept"
    assert "(PERMISSION_DENIED)" in error_line(joey(user_env, "audit", check=False))
    assert joey(admin_env, "audit", "--since", "yesterday", check=False).returncode == 2


def test_up_logs_the_local_admin_in(cli_stack: CliStack) -> None:
    env = {k: v for k, v in cli_stack.env.items() if k != "JOEY_TOKEN"}
    addr, path = env["JOEY_REGISTRY_ADDR"], Path(env["JOEY_CREDENTIALS"])
    assert json.loads(path.read_text())[addr]["username"] == "admin"
    assert json.loads(path.read_text())[addr]["api_token_name"] == token_name(addr), "so logout can revoke it"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert joey(env, "whoami").stdout == "admin (platform admin)\n", "no prompt, no JOEY_TOKEN"
    assert f"  login     admin (token in {path})" in joey(env, "status").stdout.splitlines()
