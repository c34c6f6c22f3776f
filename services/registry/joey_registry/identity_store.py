"""Postgres access of identity: users, tokens, workspace members and the audit trail.

Shares the catalog store's connection pool. Tokens are looked up by their sha256; the secret
itself never reaches this module's SQL.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime

import psycopg
from psycopg.rows import DictRow
from psycopg_pool import ConnectionPool

from joey_registry.domain import AuditEntry, AuditQuery, Member, TokenInfo, User

Connection = psycopg.Connection[DictRow]

_USER_COLUMNS = "u.username, u.email, u.admin, u.active, u.created_at"
_TOKEN_COLUMNS = "name, kind, created_at, expires_at, last_used_at"  # noqa: S105 (column names)
# A token's last use is written at most this often: every call reads it, few need to write it.
_LAST_USED_RESOLUTION = "60 seconds"


def _user(row: DictRow) -> User:
    return User(row["username"], row["email"], row["admin"], row["active"], row["created_at"])


def _token(row: DictRow) -> TokenInfo:
    return TokenInfo(row["name"], row["kind"], row["created_at"], row["expires_at"], row["last_used_at"])


@dataclass(frozen=True)
class Credentials:
    user: User
    password_hash: str


@dataclass(frozen=True)
class TokenOwner:
    token_id: int
    user: User
    kind: str
    expires_at: datetime | None
    scope: tuple[int, str] | None = None
    """A task token's workspace (id, name): the only one it may act in."""


class IdentityStore:
    def __init__(self, pool: ConnectionPool[Connection]) -> None:
        self.pool = pool

    @contextmanager
    def _conn(self) -> Iterator[Connection]:
        # The pool commits when the block ends normally and rolls back when it raises.
        with self.pool.connection() as conn:
            yield conn

    # --- users ---

    def has_users(self) -> bool:
        with self._conn() as conn:
            return conn.execute("SELECT EXISTS (SELECT 1 FROM users) AS any").fetchone()["any"]  # type: ignore[index]

    def bootstrap_admin(self, username: str, password_hash: str) -> bool:
        """Create the first platform admin, owner of every workspace, unless a user exists already
        (another registry may be starting too). True if this call created it."""
        with self._conn() as conn:
            conn.execute("LOCK TABLE users IN EXCLUSIVE MODE")
            if conn.execute("SELECT 1 FROM users LIMIT 1").fetchone():
                return False
            conn.execute(
                "INSERT INTO users (username, password_hash, admin) VALUES (%s, %s, true)",
                (username, password_hash),
            )
            conn.execute(
                "INSERT INTO workspace_members (workspace_id, username, role) "
                "SELECT id, %s, 'owner' FROM workspaces ON CONFLICT DO NOTHING",
                (username,),
            )
        return True

    def create_user(self, username: str, password_hash: str, email: str, admin: bool) -> User | None:
        """The new user, or None if the username is taken."""
        with self._conn() as conn:
            row = conn.execute(
                "INSERT INTO users AS u (username, password_hash, email, admin) VALUES (%s, %s, %s, %s) "
                f"ON CONFLICT (username) DO NOTHING RETURNING {_USER_COLUMNS}",
                (username, password_hash, email, admin),
            ).fetchone()
        return _user(row) if row else None

    def user(self, username: str) -> User | None:
        with self._conn() as conn:
            row = conn.execute(
                f"SELECT {_USER_COLUMNS} FROM users u WHERE username = %s", (username,)
            ).fetchone()
        return _user(row) if row else None

    def credentials(self, username: str) -> Credentials | None:
        with self._conn() as conn:
            row = conn.execute(
                f"SELECT {_USER_COLUMNS}, u.password_hash FROM users u WHERE username = %s", (username,)
            ).fetchone()
        return Credentials(_user(row), row["password_hash"]) if row else None

    def list_users(self) -> list[User]:
        with self._conn() as conn:
            rows = conn.execute(f"SELECT {_USER_COLUMNS} FROM users u ORDER BY username").fetchall()
        return [_user(r) for r in rows]

    def set_password(self, username: str, password_hash: str) -> None:
        with self._conn() as conn:
            conn.execute("UPDATE users SET password_hash = %s WHERE username = %s", (password_hash, username))

    def set_active(self, username: str, active: bool, check: Callable[[User, int], None]) -> User | None:
        """Set the flag unless ``check(user, other active admins)`` raises; None for an unknown user.
        The active admins are locked first, so two admins deactivating each other cannot both succeed.

        Deactivating revokes the user's sessions: a reactivated user logs in again. Their API tokens
        are refused while they are inactive (token_owner needs an active user) and work again on
        reactivation, so reactivating does not break the CI jobs that hold them."""
        with self._conn() as conn:
            admins = conn.execute(
                "SELECT username FROM users WHERE admin AND active ORDER BY username FOR UPDATE"
            ).fetchall()
            row = conn.execute(
                f"SELECT {_USER_COLUMNS} FROM users u WHERE username = %s FOR UPDATE", (username,)
            ).fetchone()
            if row is None:
                return None
            check(_user(row), sum(1 for a in admins if a["username"] != username))
            row = conn.execute(
                f"UPDATE users u SET active = %s WHERE username = %s RETURNING {_USER_COLUMNS}",
                (active, username),
            ).fetchone()
            if not active:
                conn.execute(
                    "UPDATE tokens SET revoked_at = now() WHERE username = %s AND kind = 'session' "
                    "AND revoked_at IS NULL",
                    (username,),
                )
        assert row is not None
        return _user(row)

    # --- tokens ---

    def add_token(
        self, username: str, token_sha256: str, name: str, kind: str, expires_at: datetime | None
    ) -> TokenInfo | None:
        """The new token, or None if the user holds a live API token of that name. An expired one of
        that name is revoked first: it no longer holds the name."""
        with self._conn() as conn:
            conn.execute(
                "UPDATE tokens SET revoked_at = now() WHERE username = %s AND name = %s AND kind = 'api' "
                "AND revoked_at IS NULL AND expires_at <= now()",
                (username, name),
            )
            row = conn.execute(
                "INSERT INTO tokens (token_sha256, username, name, kind, expires_at) "
                "VALUES (%s, %s, %s, %s, %s) "
                f"ON CONFLICT DO NOTHING RETURNING {_TOKEN_COLUMNS}",
                (token_sha256, username, name, kind, expires_at),
            ).fetchone()
        return _token(row) if row else None

    def token_owner(self, token_sha256: str) -> TokenOwner | None:
        """The active user holding this live token, straight from the table: a revocation or a
        deactivation acts on the next call."""
        with self._conn() as conn:
            # A task token lives only while its run runs: revoked or not, a run that ended (or that an
            # orchestrator's lease loss failed) takes its token's rights with it.
            row = conn.execute(
                "SELECT t.id, t.kind, t.expires_at, t.workspace_id, w.name AS scope_name, "
                f"t.last_used_at < now() - interval '{_LAST_USED_RESOLUTION}' "
                f"OR t.last_used_at IS NULL AS stale, {_USER_COLUMNS} "
                "FROM tokens t JOIN users u ON u.username = t.username "
                "LEFT JOIN workspaces w ON w.id = t.workspace_id "
                "WHERE t.token_sha256 = %s AND t.revoked_at IS NULL "
                "AND (t.expires_at IS NULL OR t.expires_at > now()) AND u.active "
                "AND (t.run_id IS NULL OR EXISTS "
                "(SELECT 1 FROM task_runs r WHERE r.id = t.run_id AND r.status = 'running'))",
                (token_sha256,),
            ).fetchone()
            if row is None:
                return None
            if row["stale"]:
                conn.execute("UPDATE tokens SET last_used_at = now() WHERE id = %s", (row["id"],))
        scope = (row["workspace_id"], row["scope_name"]) if row["workspace_id"] is not None else None
        return TokenOwner(row["id"], _user(row), row["kind"], row["expires_at"], scope)

    def add_task_token(
        self, username: str, token_sha256: str, run_id: int, workspace_id: int, expires_at: datetime
    ) -> None:
        with self._conn() as conn:
            conn.execute(
                "INSERT INTO tokens (token_sha256, username, name, kind, expires_at, workspace_id, run_id) "
                "VALUES (%s, %s, %s, 'task', %s, %s, %s)",
                (token_sha256, username, f"task-run-{run_id}", expires_at, workspace_id, run_id),
            )

    def revoke_run_tokens(self, run_id: int) -> int:
        with self._conn() as conn:
            cur = conn.execute(
                "UPDATE tokens SET revoked_at = now() WHERE run_id = %s AND revoked_at IS NULL", (run_id,)
            )
        return cur.rowcount

    def live_tokens(self, username: str) -> list[TokenInfo]:
        with self._conn() as conn:
            rows = conn.execute(
                f"SELECT {_TOKEN_COLUMNS} FROM tokens WHERE username = %s AND revoked_at IS NULL "
                "AND (expires_at IS NULL OR expires_at > now()) ORDER BY kind, name, created_at",
                (username,),
            ).fetchall()
        return [_token(r) for r in rows]

    def revoke_named(self, username: str, name: str) -> int:
        """Revoke the user's live tokens of that name; how many."""
        with self._conn() as conn:
            cur = conn.execute(
                "UPDATE tokens SET revoked_at = now() WHERE username = %s AND name = %s "
                "AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > now())",
                (username, name),
            )
        return cur.rowcount

    def revoke(self, token_id: int) -> None:
        with self._conn() as conn:
            conn.execute(
                "UPDATE tokens SET revoked_at = now() WHERE id = %s AND revoked_at IS NULL", (token_id,)
            )

    def revoke_sessions(self, username: str, keep: int | None) -> None:
        with self._conn() as conn:
            conn.execute(
                "UPDATE tokens SET revoked_at = now() WHERE username = %s AND kind = 'session' "
                "AND revoked_at IS NULL AND id IS DISTINCT FROM %s",
                (username, keep),
            )

    # --- workspace members ---

    def members(self, workspace_id: int) -> list[Member]:
        with self._conn() as conn:
            rows = conn.execute(
                "SELECT username, role FROM workspace_members WHERE workspace_id = %s ORDER BY username",
                (workspace_id,),
            ).fetchall()
        return [Member(r["username"], r["role"]) for r in rows]

    def set_member(
        self, workspace_id: int, username: str, role: str | None, check: Callable[[str | None, int], None]
    ) -> None:
        """Give ``username`` the role (None: remove them) unless ``check(current role, other owners)``
        raises. The workspace's members are locked first, so concurrent changes cannot leave it ownerless."""
        with self._conn() as conn:
            rows = conn.execute(
                "SELECT username, role FROM workspace_members WHERE workspace_id = %s FOR UPDATE",
                (workspace_id,),
            ).fetchall()
            current = next((r["role"] for r in rows if r["username"] == username), None)
            check(current, sum(1 for r in rows if r["role"] == "owner" and r["username"] != username))
            if role is None:
                conn.execute(
                    "DELETE FROM workspace_members WHERE workspace_id = %s AND username = %s",
                    (workspace_id, username),
                )
            else:
                conn.execute(
                    "INSERT INTO workspace_members (workspace_id, username, role) VALUES (%s, %s, %s) "
                    "ON CONFLICT (workspace_id, username) DO UPDATE SET role = excluded.role",
                    (workspace_id, username, role),
                )

    # --- audit ---

    def record(self, entry: AuditEntry) -> None:
        with self._conn() as conn:
            conn.execute(
                "INSERT INTO audit_log (time, username, action, workspace, target, outcome, message) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s)",
                (
                    entry.time,
                    entry.username,
                    entry.action,
                    entry.workspace,
                    entry.target,
                    entry.outcome,
                    entry.message,
                ),
            )

    def audit(self, query: AuditQuery) -> list[AuditEntry]:
        with self._conn() as conn:
            rows = conn.execute(
                "SELECT time, username, action, workspace, target, outcome, message FROM audit_log "
                "WHERE (%(username)s = '' OR username = %(username)s) "
                "AND (%(workspace)s = '' OR workspace = %(workspace)s) "
                "AND (%(action)s = '' OR action = %(action)s) "
                "AND (%(start)s::timestamptz IS NULL OR time >= %(start)s) "
                "AND (%(end)s::timestamptz IS NULL OR time < %(end)s) "
                "ORDER BY time DESC, id DESC LIMIT %(limit)s",
                {
                    "username": query.username,
                    "workspace": query.workspace,
                    "action": query.action,
                    "start": query.start,
                    "end": query.end,
                    "limit": query.limit,
                },
            ).fetchall()
        return [AuditEntry(**r) for r in rows]
