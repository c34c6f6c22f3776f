"""Who is calling, and may they do this: the one place the registry decides access.

Until users, roles and tokens land, a caller without a token is the local anonymous
admin; a caller presenting a token is refused rather than silently trusted.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass

from joey_registry.errors import NotFound, PermissionDenied, Unauthenticated
from joey_registry.store import Store, WorkspaceRef


class Action(enum.Enum):
    READ = "read"
    WRITE = "write"
    DEPLOY = "deploy"
    ADMIN = "admin"


@dataclass(frozen=True)
class Caller:
    name: str
    admin: bool


ANONYMOUS_ADMIN = Caller(name="anonymous", admin=True)


def caller_from_metadata(metadata: Iterable[tuple[str, str | bytes]]) -> Caller:
    for key, value in metadata:
        if key.lower() != "authorization":
            continue
        text = value.decode() if isinstance(value, bytes) else value
        scheme, _, token = text.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("malformed authorization metadata: expected 'Bearer <token>'")
        raise Unauthenticated("token authentication is not enabled on this registry; call without a token")
    return ANONYMOUS_ADMIN


class Access:
    def __init__(self, store: Store) -> None:
        self._store = store

    def authorize_global(self, caller: Caller, action: Action) -> None:
        """Actions outside any workspace (creating or listing workspaces)."""
        if not caller.admin:
            raise PermissionDenied(f"{caller.name} may not {action.value} workspaces")

    def authorize(self, caller: Caller, workspace: str, action: Action) -> WorkspaceRef:
        """The workspace, if it exists and ``caller`` may perform ``action`` in it."""
        ws = self._store.workspace(workspace)
        if ws is None:
            raise NotFound(f"workspace {workspace!r} not found")
        if not caller.admin:
            raise PermissionDenied(f"{caller.name} may not {action.value} in workspace {workspace!r}")
        return ws
