"""The SDK's identity verbs against the real registry: logging in, users, tokens, workspace members, the
audit trail, and where a client finds its token."""

from __future__ import annotations

import secrets
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from joey.client import Client, JoeyError, User, Workspace
from joey_core.credentials import CredentialsFile
from joey_core.settings import CommonSettings
from tests.conftest import Stack

Login = Callable[..., tuple[str, str, Client]]


@pytest.fixture
def admin(stack: Stack, settings: CommonSettings) -> Client:
    """The session's admin, by the JOEY_TOKEN the session sets."""
    return Client(settings=settings)


@pytest.fixture
def person(admin: Client, settings: CommonSettings) -> Login:
    """A new user, created by the admin, and a client logged in as them."""

    def make(is_admin: bool = False) -> tuple[str, str, Client]:
        name, password = f"u-{secrets.token_hex(4)}", secrets.token_urlsafe(16)
        admin.create_user(name, password, admin=is_admin, email=f"{name}@example.com")
        return name, password, Client.login(name, password, settings=settings)

    return make


def refused(call: Callable[[], object], code: str) -> JoeyError:
    with pytest.raises(JoeyError) as caught:
        call()
    assert caught.value.code == code, caught.value
    return caught.value


def test_login_and_whoami(person: Login, admin: Client, settings: CommonSettings) -> None:
    name, password, alice = person()
    assert alice.whoami() == User(
        name, admin=False, active=True, email=f"{name}@example.com", created_at=alice.whoami().created_at
    )
    assert alice.session_expires_at is not None
    assert admin.whoami().username == "admin" and admin.whoami().admin
    assert name in admin.list_users()
    wrong = refused(lambda: Client.login(name, password + "x", settings=settings), "UNAUTHENTICATED")
    unknown = refused(lambda: Client.login("nobody-here", password, settings=settings), "UNAUTHENTICATED")
    assert wrong.message == unknown.message, "an unknown user and a wrong password look the same"
    # Only platform admins manage users.
    refused(
        lambda: alice.create_user(f"u-{secrets.token_hex(4)}", "long-enough-password"), "PERMISSION_DENIED"
    )
    refused(alice.list_users, "PERMISSION_DENIED")


def test_api_tokens_work_until_revoked(person: Login, settings: CommonSettings) -> None:
    name, _, alice = person()
    secret = alice.create_token("ci")
    assert secret.startswith("joey_")
    ci = Client(settings=settings, token=secret)
    assert ci.whoami().username == name
    tokens = {t.name: t for t in alice.list_tokens()}
    assert tokens["ci"].kind == "api" and tokens["ci"].expires_at is None
    assert any(t.kind == "session" for t in tokens.values()), "the login's session is listed too"
    assert secret not in repr(alice.list_tokens()), "never the secret"

    alice.revoke_token("ci")
    error = refused(ci.whoami, "UNAUTHENTICATED")
    assert "the one given to joey.Client" in error.message and "joey login" in error.message
    refused(lambda: alice.revoke_token("ci"), "NOT_FOUND")
    short = Client(settings=settings, token=alice.create_token("short", expires_in_s=3600))
    assert short.list_tokens()[0].expires_at is not None


def test_deactivating_a_user_refuses_them_at_once(
    person: Login, admin: Client, settings: CommonSettings
) -> None:
    name, password, bob = person()
    token = Client(settings=settings, token=bob.create_token("ci"))
    assert admin.deactivate_user(name).active is False
    refused(bob.whoami, "UNAUTHENTICATED")
    refused(token.whoami, "UNAUTHENTICATED")
    refused(lambda: Client.login(name, password, settings=settings), "UNAUTHENTICATED")
    assert admin.activate_user(name).active
    assert Client.login(name, password, settings=settings).whoami().username == name


def test_change_password_and_logout(person: Login, settings: CommonSettings) -> None:
    name, password, carol = person()
    other_session = Client.login(name, password, settings=settings)
    carol.change_password(password, "a-new-password-of-length")
    refused(lambda: Client.login(name, password, settings=settings), "UNAUTHENTICATED")
    refused(other_session.whoami, "UNAUTHENTICATED")
    assert carol.whoami().username == name, "the session that changed it stays"
    carol.logout()
    error = refused(carol.whoami, "UNAUTHENTICATED")
    assert "joey login" in error.message


def test_workspaces_and_their_members(person: Login, admin: Client) -> None:
    alice_name, _, alice = person()
    bob_name, _, bob = person()
    carol_name, _, carol = person()
    name = f"team-{secrets.token_hex(4)}"

    ws = alice.create_workspace(name)
    assert isinstance(ws, Workspace) and ws.name == name and str(ws) == name and ws.role == "owner"
    assert ws.users() == [(alice_name, "owner")]
    assert alice.get_workspace(name).role == "owner"

    assert ws.add_user(bob_name) == (bob_name, "collaborator")
    assert sorted(ws.users()) == sorted([(alice_name, "owner"), (bob_name, "collaborator")])
    assert bob_name in ws.users()
    assert [w.name for w in bob.list_workspaces()] == [name], "only the caller's workspaces"
    assert bob.get_workspace(name).role == "collaborator"
    # A collaborator works in the workspace but does not manage its members.
    refused(lambda: bob.get_workspace(name).add_user(carol_name), "PERMISSION_DENIED")
    refused(lambda: bob.get_workspace(name).remove_user(alice_name), "PERMISSION_DENIED")

    # A non-member learns nothing, not even that it exists.
    assert name not in carol.list_workspaces()
    missing = refused(lambda: carol.get_workspace(name), "NOT_FOUND")
    hidden = refused(lambda: Workspace(carol, name).users(), "NOT_FOUND")
    assert missing.message == hidden.message == f"workspace '{name}' not found"

    # Platform admins see every workspace, and manage it without being a member.
    assert name in admin.list_workspaces()
    assert admin.get_workspace(name).role == ""
    assert admin.get_workspace(name).add_owner(carol_name) == (carol_name, "owner")
    assert carol.get_workspace(name).role == "owner"

    ws.remove_user(bob_name)
    assert name not in bob.list_workspaces()
    refused(lambda: bob.get_workspace(name), "NOT_FOUND")

    alice.set_current_workspace(ws)
    assert alice.workspace == name
    assert alice.list_models() == []
    alice.set_current_workspace("default")
    assert alice.workspace == "default"


def test_the_audit_trail_is_for_admins(person: Login, admin: Client) -> None:
    name, _, dave = person()
    ws = dave.create_workspace(f"audit-{secrets.token_hex(4)}")
    refused(lambda: Workspace(dave, "default").add_user(name), "NOT_FOUND")  # not a member

    entries = admin.audit_log(username=name, limit=10)
    assert [(e.action, e.workspace, e.outcome) for e in entries][:2] == [
        ("AddWorkspaceMember", "default", "NOT_FOUND"),
        ("CreateWorkspace", ws.name, "OK"),
    ], "newest first, refusals included"
    assert [e.action for e in admin.audit_log(workspace=ws.name, action="CreateWorkspace")] == [
        "CreateWorkspace"
    ]
    assert "CreateWorkspace" in admin.audit_log(username=name).table()
    refused(dave.audit_log, "PERMISSION_DENIED")


def test_a_client_finds_its_token_in_the_credentials_file(
    person: Login, settings: CommonSettings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name, password, _ = person()
    path = tmp_path / "config" / "credentials"
    monkeypatch.setenv("JOEY_CREDENTIALS", str(path))
    monkeypatch.delenv("JOEY_TOKEN")

    nobody = refused(Client(settings=settings).whoami, "UNAUTHENTICATED")
    assert "no token was sent" in nobody.message and "joey login" in nobody.message
    assert not path.exists(), "reading makes no file"

    Client.login(name, password, settings=settings)
    assert not path.exists(), "a login stores nothing unless asked"
    stored = Client.login(name, password, settings=settings, store=True)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    entry = CredentialsFile(path).get(settings.registry_addr)
    assert entry is not None and entry.username == name
    assert Client(settings=settings).whoami().username == name, "found for the registry's address"
    assert Client("127.0.0.1:1").bearer.metadata == (), "none stored for another address"

    # JOEY_TOKEN comes before the file, an explicit token before both.
    admin_token = Client(settings=settings, token=stored.create_token("ci"))
    monkeypatch.setenv("JOEY_TOKEN", "joey_not-a-token")
    error = refused(Client(settings=settings).whoami, "UNAUTHENTICATED")
    assert "JOEY_TOKEN's" in error.message
    assert admin_token.whoami().username == name

    monkeypatch.delenv("JOEY_TOKEN")
    stored.logout()
    error = refused(Client(settings=settings).whoami, "UNAUTHENTICATED")
    assert f"stored for {settings.registry_addr} in {path}" in error.message

    path.chmod(0o644)
    error = refused(Client(settings=settings).whoami, "UNAUTHENTICATED")
    assert "chmod 600" in error.message
