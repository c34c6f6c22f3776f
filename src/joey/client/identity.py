"""Who is calling: the identity verbs of :class:`joey.Client` (logging in and out, users, API tokens, the
audit trail), with the types they return. Verbs follow what Wallaroo users know::

    client = joey.Client.login("alice", password)   # or joey.Client(token=...), JOEY_TOKEN, `joey login`
    client.whoami()                                  # User(username='alice', admin=False, active=True)
    token = client.create_token("ci")                # the secret, shown this once
    client.revoke_token("ci")                        # refused from the next call on
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from joey.client.assays import timestamp
from joey.client.auth import Bearer
from joey.client.catalog import Listing, optional_time
from joey_core.credentials import Credential, CredentialsError, CredentialsFile
from joey_core.settings import CommonSettings
from joey_core.v1 import registry_pb2 as pb

LOGIN_TIMEOUT_S = 30.0
"""Login verifies an Argon2 hash: deliberately slow, but well under this."""


@dataclass(frozen=True)
class User:
    """A user of the registry; ``str()`` is the username. ``admin``: a platform admin."""

    username: str
    admin: bool
    active: bool
    email: str = ""
    created_at: datetime | None = None

    @classmethod
    def from_proto(cls, u: pb.User) -> User:
        return cls(u.username, u.admin, u.active, u.email, optional_time(u.created_at))

    def __str__(self) -> str:
        return self.username

    def row(self) -> dict[str, Any]:
        return {
            "username": self.username,
            "admin": self.admin,
            "active": self.active,
            "email": self.email or "-",
            "created": self.created_at,
        }


@dataclass(frozen=True)
class TokenInfo:
    """One of the caller's live tokens (never its secret): an API token, or a login session."""

    name: str
    kind: str
    """``"api"`` (made by ``create_token``) or ``"session"`` (made by a login)."""
    created_at: datetime | None
    expires_at: datetime | None
    """None: never expires."""
    last_used_at: datetime | None

    @classmethod
    def from_proto(cls, t: pb.TokenInfo) -> TokenInfo:
        return cls(
            t.name,
            t.kind,
            optional_time(t.created_at),
            optional_time(t.expires_at) if t.HasField("expires_at") else None,
            optional_time(t.last_used_at) if t.HasField("last_used_at") else None,
        )

    def __str__(self) -> str:
        return self.name

    def row(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "created": self.created_at,
            "expires": self.expires_at if self.expires_at else "never",
            "last used": self.last_used_at if self.last_used_at else "-",
        }


@dataclass(frozen=True)
class AuditEntry:
    """One management action: who did what, when, in which workspace, and whether it was allowed."""

    time: datetime | None
    username: str
    """Empty for a call refused before its caller was known (no or a bad token)."""
    action: str
    """The registry call, e.g. ``"Deploy"``."""
    workspace: str
    target: str
    outcome: str
    """``"OK"``, or the error's status code name (e.g. ``"PERMISSION_DENIED"``)."""
    message: str

    @classmethod
    def from_proto(cls, e: pb.AuditEntry) -> AuditEntry:
        return cls(optional_time(e.time), e.username, e.action, e.workspace, e.target, e.outcome, e.message)

    def row(self) -> dict[str, Any]:
        return {
            "time": self.time,
            "user": self.username or "-",
            "action": self.action,
            "workspace": self.workspace or "-",
            "target": self.target or "-",
            "outcome": self.outcome,
            "message": self.message,
        }


class IdentityClientMixin(ABC):
    """The identity verbs of :class:`joey.Client`, which provides ``settings`` and ``call``."""

    settings: CommonSettings
    bearer: Bearer
    session_expires_at: datetime | None

    @abstractmethod
    def call(self, name: str, request: Any, timeout: float = 60.0, *, anonymous: bool = False) -> Any: ...

    def _log_in(self, username: str, password: str, expires_in_s: int | None, store: bool) -> None:
        """Exchange the password for a session token, used by this client from now on (see Client.login)."""
        request = pb.LoginRequest(username=username, password=password, expires_in_s=expires_in_s)
        response = self.call("Login", request, timeout=LOGIN_TIMEOUT_S, anonymous=True)
        self.bearer = Bearer.of(
            response.token, f"the session token of this client's login as {response.user.username}"
        )
        self.session_expires_at = optional_time(response.expires_at)
        if store:
            try:
                CredentialsFile().put(
                    self.settings.registry_addr, Credential(response.user.username, response.token)
                )
            except (CredentialsError, OSError):
                # Not kept: nothing would revoke a session no one holds.
                self.logout()
                raise

    def whoami(self) -> User:
        """The user this client calls as."""
        return User.from_proto(self.call("WhoAmI", pb.WhoAmIRequest()))

    def logout(self) -> None:
        """End the session this client calls with: its token is refused from now on. Refused
        (FAILED_PRECONDITION) for an API token, which :meth:`revoke_token` revokes by name."""
        self.call("Logout", pb.LogoutRequest())

    def change_password(self, old_password: str, new_password: str) -> None:
        """Change the caller's password (at least 12 characters). Their other login sessions are revoked;
        this client's token and their API tokens stay valid."""
        self.call(
            "ChangePassword", pb.ChangePasswordRequest(old_password=old_password, new_password=new_password)
        )

    # API tokens, for CI and services
    def create_token(self, name: str, expires_in_s: int | None = None) -> str:
        """A new API token of the caller named ``name``, valid until revoked or for ``expires_in_s``
        seconds. Returns its secret, shown this once: the registry keeps only a hash of it."""
        request = pb.CreateTokenRequest(name=name, expires_in_s=expires_in_s)
        return str(self.call("CreateToken", request).token)

    def list_tokens(self) -> Listing[TokenInfo]:
        """The caller's live API tokens and login sessions, without their secrets."""
        response = self.call("ListTokens", pb.ListTokensRequest())
        return Listing(TokenInfo.from_proto(t) for t in response.tokens)

    def revoke_token(self, name: str) -> None:
        """Revoke the caller's token ``name``: refused from the next call on."""
        self.call("RevokeToken", pb.RevokeTokenRequest(name=name))

    # Users: platform admins only
    def create_user(
        self, username: str, password: str, admin: bool = False, email: str | None = None
    ) -> User:
        """A new user (``[a-z0-9][a-z0-9._-]{1,62}``, a password of at least 12 characters); ``admin``
        makes a platform admin."""
        request = pb.CreateUserRequest(username=username, password=password, email=email or "", admin=admin)
        return User.from_proto(self.call("CreateUser", request))

    def list_users(self) -> Listing[User]:
        return Listing(User.from_proto(u) for u in self.call("ListUsers", pb.ListUsersRequest()).users)

    def deactivate_user(self, username: str) -> User:
        """Refuse every token of ``username`` from the next call on, and their logins; the last active
        platform admin cannot be deactivated."""
        return self._set_active(username, False)

    def activate_user(self, username: str) -> User:
        """Let a deactivated user log in and call again."""
        return self._set_active(username, True)

    def _set_active(self, username: str, active: bool) -> User:
        request = pb.SetUserActiveRequest(username=username, active=active)
        return User.from_proto(self.call("SetUserActive", request))

    def audit_log(
        self,
        username: str | None = None,
        workspace: str | None = None,
        action: str | None = None,
        start: datetime | str | None = None,
        end: datetime | str | None = None,
        limit: int = 100,
    ) -> Listing[AuditEntry]:
        """Management actions, newest first: platform admins only. Filters: the user who acted, the
        workspace, the action (the registry call, e.g. ``"Deploy"``), a time range (naive times and ISO
        strings are UTC), at most ``limit`` entries (up to 10,000)."""
        request = pb.QueryAuditRequest(
            username=username or "",
            workspace=workspace or "",
            action=action or "",
            start=None if start is None else timestamp(start),
            end=None if end is None else timestamp(end),
            limit=limit,
        )
        return Listing(AuditEntry.from_proto(e) for e in self.call("QueryAudit", request).entries)
