"""Who is calling, and may they do this: the one place the registry decides access.

A caller is a user (by their token) or the service token of engines, connector-bridges and orchestrators,
which may only fetch artifacts, read the connections of bridges and run tasks. A task's token is a user's
(the lesser of its task's owner and the uploader of the version it runs: joey_registry.tasks), scoped to
the task's workspace: every other workspace does not exist for it, it may do nothing outside a workspace
(users, tokens, new workspaces), and it may not manage its own (members, sharing, deleting it): a task
is code, perhaps a collaborator's, and its workspace's membership is its owners' to decide.
Platform admins may do everything. In a workspace, owners and collaborators read and write; only
owners manage it. A workspace the caller is not a member of does not exist for them: they get the
same NOT_FOUND as for a missing one, so a non-member learns nothing of what it holds.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime

from joey_registry.domain import User
from joey_registry.errors import PermissionDenied, Unauthenticated, WorkspaceNotFound
from joey_registry.store import Store, WorkspaceRef


class Action(enum.Enum):
    READ = "read"
    """Models, pipelines, status, logs, assays, members."""
    WRITE = "write"
    """Upload models, create and delete pipelines, deploy, undeploy, roll back, assays, infer."""
    MANAGE = "manage"
    """Add and remove members, delete the workspace."""
    ADMIN = "admin"
    """Users and the audit trail: platform admins only."""
    FETCH_ARTIFACT = "fetch artifact"
    """Download a model artifact: what READ allows, and one of the two things the service token may do."""
    RUN_BRIDGE = "run bridge"
    """Read a bridge's connection in full: a right of the service token (connector-bridges)."""
    RUN_TASK = "run task"
    """Fetch an orchestration's zip, issue and revoke task tokens: a right of the service token
    (orchestrators)."""


_OWNER_ONLY = frozenset({Action.MANAGE})
_SERVICE_ACTIONS = frozenset({Action.FETCH_ARTIFACT, Action.RUN_BRIDGE, Action.RUN_TASK})
SCOPED = "a task's token acts only in its task's workspace"
SCOPED_MANAGE = (
    "a task's token may not manage its workspace (members, sharing connections, deleting it): "
    "its owners do, with their own token"
)


@dataclass(frozen=True)
class Caller:
    user: User | None
    """None for the service token."""
    token_id: int | None
    is_service: bool
    token_kind: str = ""
    """'session' or 'api' for a user's token."""
    expires_at: datetime | None = None
    """When the calling token expires; None if it never does."""
    peer: str = ""
    """Where the call comes from (gRPC's ``ipv4:host:port``): logins back off per host."""
    scope: WorkspaceRef | None = None
    """A task token's workspace: the only one it acts in (docs/security.md, "Task tokens")."""

    @property
    def name(self) -> str:
        return self.user.username if self.user else "the service token" if self.is_service else ""


class Access:
    def __init__(self, store: Store) -> None:
        self._store = store

    def user(self, caller: Caller) -> User:
        """The calling user; the service token is no user and may only fetch artifacts."""
        if caller.user is None:
            if caller.is_service:
                raise PermissionDenied(
                    "the service token may only download artifacts, read the connections of bridges "
                    "and run tasks"
                )
            raise Unauthenticated("this call needs a token: log in (`joey login`) or set JOEY_TOKEN")
        return caller.user

    def unscoped(self, caller: Caller) -> User:
        """The calling user, for what acts beyond one workspace: refused to a task's token."""
        user = self.user(caller)
        if caller.scope is not None:
            raise PermissionDenied(SCOPED)
        return user

    def admin(self, caller: Caller) -> User:
        user = self.unscoped(caller)
        if not user.admin:
            raise PermissionDenied(f"only platform admins may do this; {user.username!r} is not one")
        return user

    def authorize(self, caller: Caller, workspace: str, action: Action) -> WorkspaceRef:
        """The workspace, if it exists for ``caller`` and they may perform ``action`` in it."""
        if caller.is_service and action in _SERVICE_ACTIONS:
            ws = self._store.workspace(workspace)
            if ws is None:
                raise WorkspaceNotFound(workspace)
            return ws
        user = self.user(caller)
        if caller.scope is not None and workspace != caller.scope.name:
            raise WorkspaceNotFound(workspace)
        found = self._store.workspace_role(workspace, user.username)
        if found is None or (found[1] is None and not user.admin):
            raise WorkspaceNotFound(workspace)
        ws, role = found
        if action is Action.ADMIN and caller.scope is not None:
            raise PermissionDenied(SCOPED)
        if action in _OWNER_ONLY and caller.scope is not None:
            raise PermissionDenied(SCOPED_MANAGE)
        if user.admin:
            return ws
        if action in (Action.ADMIN, Action.RUN_BRIDGE, Action.RUN_TASK):
            raise PermissionDenied(f"only platform admins may do this; {user.username!r} is not one")
        if action in _OWNER_ONLY and role != "owner":
            raise PermissionDenied(
                f"{user.username!r} is a {role} of workspace {workspace!r}: "
                f"only its owners may {action.value} it"
            )
        return ws
