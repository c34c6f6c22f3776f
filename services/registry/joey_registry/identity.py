"""Identity: who a caller is (tokens), how they prove it (passwords), and who may manage whom.

Passwords are hashed with Argon2id; tokens are random and stored only as their sha256. Every call
resolves its token against Postgres, so a revocation or a deactivation acts on the next call.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
from collections.abc import Iterable
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import argon2
import redis

from joey_registry.access import Access, Action, Caller
from joey_registry.domain import AuditEntry, AuditQuery, Member, TokenInfo, User
from joey_registry.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
)
from joey_registry.identity_store import IdentityStore
from joey_registry.login_guard import LoginGuard, peer_host
from joey_registry.settings import RegistrySettings
from joey_registry.store import WorkspaceRef

log = logging.getLogger(__name__)

ADMIN_USERNAME = "admin"
MIN_PASSWORD_CHARS = 12
# Hashing is deliberately slow; a bound keeps one request from making it slower still.
MAX_PASSWORD_CHARS = 1024
TOKEN_PREFIX = "joey_"  # noqa: S105 (a prefix, no secret)
USERNAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]{1,62}")
TOKEN_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
ROLES = ("owner", "collaborator")
# Inference writes (its log, its outputs topic): it needs what uploading and deploying need.
_GATEWAY_ACTIONS = {"read": Action.READ, "infer": Action.WRITE}
DEFAULT_AUDIT_LIMIT = 100
MAX_AUDIT_LIMIT = 10_000

BAD_LOGIN = "invalid username or password"
# Error messages, no secrets.
BAD_TOKEN = "invalid, expired or revoked token: log in again (`joey login`) or use a valid JOEY_TOKEN"  # noqa: S105
NO_TOKEN = "this call needs a token: log in (`joey login`) or set JOEY_TOKEN"  # noqa: S105
SESSION = "session"  # noqa: S105 (a token kind)
WRONG_PASSWORD = "current password is wrong"  # noqa: S105 (a message)
LOGOUT_API_TOKEN = "logout ends a session; revoke API tokens with `joey token revoke <name>`"  # noqa: S105


class BootstrapRefused(RuntimeError):
    """The registry cannot start: no user exists and no valid JOEY_ADMIN_PASSWORD was given."""


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def check_password(password: str, what: str = "password") -> str:
    if len(password) < MIN_PASSWORD_CHARS:
        raise InvalidArgument(f"{what} too short: at least {MIN_PASSWORD_CHARS} characters")
    if len(password) > MAX_PASSWORD_CHARS:
        raise InvalidArgument(f"{what} too long: at most {MAX_PASSWORD_CHARS} characters")
    return password


def _expiry(expires_in_s: int | None, most: int | None) -> datetime | None:
    if expires_in_s is None:
        return None
    if expires_in_s <= 0 or (most is not None and expires_in_s > most):
        bound = f" and at most {most}" if most is not None else ""
        raise InvalidArgument(f"expires_in_s must be above 0{bound} seconds, got {expires_in_s}")
    return datetime.now(UTC) + timedelta(seconds=expires_in_s)


def bearer_token(metadata: Iterable[tuple[str, str | bytes]]) -> str:
    """The token of ``authorization: Bearer <token>`` metadata."""
    for key, value in metadata:
        if key.lower() != "authorization":
            continue
        text = value.decode(errors="replace") if isinstance(value, bytes) else value
        scheme, _, token = text.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("malformed authorization metadata: expected 'Bearer <token>'")
        return token.strip()
    raise Unauthenticated(NO_TOKEN)


class Identity:
    def __init__(
        self, settings: RegistrySettings, store: IdentityStore, access: Access, redis_client: redis.Redis
    ) -> None:
        self.settings = settings
        self.store = store
        self.access = access
        self.guard = LoginGuard(settings, redis_client)
        self._hasher = argon2.PasswordHasher()  # Argon2id with the library's recommended parameters
        # Verified against for unknown users, so they take as long as a wrong password.
        self._dummy_hash = self._hasher.hash(secrets.token_urlsafe(16))
        service = settings.service_token.get_secret_value() if settings.service_token else ""
        self._service_token = service.encode() if service else None

    # --- start ---

    def bootstrap(self) -> None:
        """Create the platform admin from JOEY_ADMIN_PASSWORD while no user exists; it owns every
        workspace there is (an upgraded database's included)."""
        if self.store.has_users():
            return
        secret = self.settings.admin_password
        password = secret.get_secret_value() if secret else ""
        if len(password) < MIN_PASSWORD_CHARS:
            problem = "is not set" if not password else f"is shorter than {MIN_PASSWORD_CHARS} characters"
            raise BootstrapRefused(
                f"no user exists yet and JOEY_ADMIN_PASSWORD {problem}: set it (at least "
                f"{MIN_PASSWORD_CHARS} characters) to create the platform admin {ADMIN_USERNAME!r}"
            )
        if self.store.bootstrap_admin(ADMIN_USERNAME, self._hash(password)):
            log.info("created the platform admin %r, owner of every existing workspace", ADMIN_USERNAME)

    # --- callers ---

    def resolve(self, metadata: Iterable[tuple[str, str | bytes]]) -> Caller:
        token = bearer_token(metadata)
        if self._service_token is not None and hmac.compare_digest(token.encode(), self._service_token):
            return Caller(user=None, token_id=None, is_service=True)
        owner = self.store.token_owner(token_sha256(token))
        if owner is None:
            raise Unauthenticated(BAD_TOKEN)
        return Caller(
            user=owner.user,
            token_id=owner.token_id,
            is_service=False,
            token_kind=owner.kind,
            expires_at=owner.expires_at,
            scope=WorkspaceRef(*owner.scope) if owner.scope else None,
        )

    def _hash(self, password: str) -> str:
        with self.guard.hashing():
            return self._hasher.hash(password)

    def login(
        self, username: str, password: str, expires_in_s: int | None, peer: str = ""
    ) -> tuple[str, datetime, User]:
        """A session for the user; wrong passwords for a username from one host back off (see
        LoginGuard), refused with the same error as a wrong password."""
        expires_at = _expiry(
            expires_in_s if expires_in_s is not None else self.settings.session_ttl_s,
            self.settings.session_ttl_s,
        )
        assert expires_at is not None
        key = (username, peer_host(peer))
        if self.guard.blocked(*key):
            raise Unauthenticated(BAD_LOGIN)
        try:
            user = self._verify(username, password)
        except Unauthenticated:
            self.guard.failed(*key)
            raise
        self.guard.succeeded(*key)
        token = self._issue(user.username, f"session-{secrets.token_hex(4)}", SESSION, expires_at)[0]
        return token, expires_at, user

    def _verify(self, username: str, password: str) -> User:
        """The active user with this password; the same error, after the same work, otherwise."""
        found = self.store.credentials(username) if len(password) <= MAX_PASSWORD_CHARS else None
        try:
            with self.guard.hashing():
                self._hasher.verify(
                    found.password_hash if found else self._dummy_hash, password[:MAX_PASSWORD_CHARS]
                )
        except argon2.exceptions.VerificationError:
            raise Unauthenticated(BAD_LOGIN) from None
        except argon2.exceptions.InvalidHashError:
            log.error("the stored password hash of %r is not a valid Argon2 hash", username)
            raise Unauthenticated(BAD_LOGIN) from None
        if found is None or not found.user.active:
            raise Unauthenticated(BAD_LOGIN)
        if self._hasher.check_needs_rehash(found.password_hash):
            self.store.set_password(username, self._hash(password))
        return found.user

    def _issue(
        self, username: str, name: str, kind: str, expires_at: datetime | None
    ) -> tuple[str, TokenInfo]:
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        info = self.store.add_token(username, token_sha256(token), name, kind, expires_at)
        if info is None:
            raise AlreadyExists(f"a live token named {name!r} exists: revoke it first or pick another name")
        return token, info

    def logout(self, caller: Caller) -> None:
        self.access.user(caller)
        if caller.token_kind != SESSION:
            raise FailedPrecondition(LOGOUT_API_TOKEN)
        assert caller.token_id is not None
        self.store.revoke(caller.token_id)

    def whoami(self, caller: Caller) -> User:
        return self.access.user(caller)

    def change_password(self, caller: Caller, old: str, new: str) -> None:
        user = self.access.unscoped(caller)
        check_password(new, "new password")
        # Keyed by username alone: whoever holds the token, from wherever, guesses the same password.
        key = ("change-password", user.username)
        if self.guard.blocked(*key):
            raise PermissionDenied(WRONG_PASSWORD)
        try:
            self._verify(user.username, old)
        except Unauthenticated:
            self.guard.failed(*key)
            raise PermissionDenied(WRONG_PASSWORD) from None
        self.guard.succeeded(*key)
        self.store.set_password(user.username, self._hash(new))
        self.store.revoke_sessions(user.username, keep=caller.token_id)

    # --- API tokens ---

    def create_token(self, caller: Caller, name: str, expires_in_s: int | None) -> tuple[str, TokenInfo]:
        """An API token of the caller's. Called with a session (the password was shown for it) any
        expiry, as for CI tokens; called with an API token, none later than the calling token's, so a
        leaked short-lived token cannot turn itself into one that never expires. A task's token makes
        none: it would outlive its run and its workspace scope."""
        user = self.access.unscoped(caller)
        if not TOKEN_NAME_PATTERN.fullmatch(name):
            raise InvalidArgument(
                f"invalid token name {name!r}: 1-63 letters, digits, '.', '_' or '-', "
                "starting with a letter or digit"
            )
        expires_at = _expiry(expires_in_s, None)
        limit = caller.expires_at if caller.token_kind != SESSION else None
        if limit is not None and (expires_at is None or expires_at > limit):
            left = max(0, int((limit - datetime.now(UTC)).total_seconds()))
            raise InvalidArgument(
                f"the calling token expires at {limit.isoformat(timespec='seconds')}: a token it creates "
                f"must expire by then too, so expires_in_s must be at most {left} seconds"
            )
        return self._issue(user.username, name, "api", expires_at)

    def issue_task_token(self, username: str, run_id: int, ws: WorkspaceRef, expires_at: datetime) -> str:
        """A token acting as ``username`` in ``ws`` only, while run ``run_id`` runs, until ``expires_at``."""
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        self.store.add_task_token(username, token_sha256(token), run_id, ws.id, expires_at)
        return token

    def list_tokens(self, caller: Caller) -> list[TokenInfo]:
        return self.store.live_tokens(self.access.unscoped(caller).username)

    def revoke_token(self, caller: Caller, name: str) -> None:
        user = self.access.unscoped(caller)
        if not self.store.revoke_named(user.username, name):
            raise NotFound(f"no live token named {name!r}")

    # --- users ---

    def create_user(self, caller: Caller, username: str, password: str, email: str, admin: bool) -> User:
        self.access.admin(caller)
        if not USERNAME_PATTERN.fullmatch(username):
            raise InvalidArgument(
                f"invalid username {username!r}: 2-63 lowercase letters, digits, '.', '_' or '-', "
                "starting with a letter or digit"
            )
        check_password(password)
        created = self.store.create_user(username, self._hash(password), email, admin)
        if created is None:
            raise AlreadyExists(f"user {username!r} already exists")
        log.info("created user %s (admin: %s)", username, admin)
        return created

    def list_users(self, caller: Caller) -> list[User]:
        self.access.admin(caller)
        return self.store.list_users()

    def set_user_active(self, caller: Caller, username: str, active: bool) -> User:
        """Deactivating revokes the user's sessions for good; their API tokens are refused while they
        are inactive and work again once they are reactivated (CI jobs holding them carry on)."""
        self.access.admin(caller)

        def check(user: User, other_active_admins: int) -> None:
            if not active and user.admin and user.active and other_active_admins == 0:
                raise FailedPrecondition(f"{username!r} is the last active platform admin: it stays active")

        changed = self.store.set_active(username, active, check)
        if changed is None:
            raise NotFound(f"user {username!r} not found")
        return changed

    # --- workspace members ---

    def members(self, caller: Caller, workspace: str) -> list[Member]:
        return self.store.members(self.access.authorize(caller, workspace, Action.READ).id)

    def set_member(self, caller: Caller, workspace: str, username: str, role: str) -> Member:
        ws = self.access.authorize(caller, workspace, Action.MANAGE)
        role = role or "collaborator"
        if role not in ROLES:
            raise InvalidArgument(f"invalid role {role!r}: 'owner' or 'collaborator'")
        if self.store.user(username) is None:
            raise NotFound(f"user {username!r} not found")

        def check(current: str | None, other_owners: int) -> None:
            if current == "owner" and role != "owner" and other_owners == 0:
                raise FailedPrecondition(f"{username!r} is the last owner of workspace {workspace!r}")

        self.store.set_member(ws.id, username, role, check)
        return Member(username, role)

    def remove_member(self, caller: Caller, workspace: str, username: str) -> None:
        ws = self.access.authorize(caller, workspace, Action.MANAGE)

        def check(current: str | None, other_owners: int) -> None:
            if current is None:
                raise NotFound(f"{username!r} is not a member of workspace {workspace!r}")
            if current == "owner" and other_owners == 0:
                raise FailedPrecondition(
                    f"{username!r} is the last owner of workspace {workspace!r}: add another owner first"
                )

        self.store.set_member(ws.id, username, None, check)

    def authorize(self, caller: Caller, workspace: str, action: str) -> User:
        """What the gateway asks before serving an inference or its metadata."""
        wanted = _GATEWAY_ACTIONS.get(action)
        if wanted is None:
            raise InvalidArgument(
                f"invalid action {action!r}: one of {', '.join(map(repr, _GATEWAY_ACTIONS))}"
            )
        self.access.authorize(caller, workspace, wanted)
        return self.access.user(caller)

    # --- audit ---

    def record(self, entry: AuditEntry) -> None:
        self.store.record(entry)

    def audit(self, caller: Caller, query: AuditQuery) -> list[AuditEntry]:
        self.access.admin(caller)
        if not 0 <= query.limit <= MAX_AUDIT_LIMIT:
            raise InvalidArgument(
                f"limit must be 0 (= {DEFAULT_AUDIT_LIMIT}) to {MAX_AUDIT_LIMIT}, got {query.limit}"
            )
        if query.limit == 0:
            query = replace(query, limit=DEFAULT_AUDIT_LIMIT)
        return self.store.audit(query)
