"""Workspaces and their members: the workspace verbs of :class:`joey.Client` and the
:class:`Workspace` they return::

    ws = client.create_workspace("team-a")   # the caller is its owner
    ws.add_user("bob"); ws.add_owner("carol")
    ws.users()                               # [("alice", "owner"), ("bob", "collaborator"), ...]
    ws.add_connection("wine-db")             # a connection of the client's workspace, usable in ws too
    client.set_current_workspace(ws)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple

from joey.client.calls import JoeyError, RegistryCaller
from joey.client.catalog import Listing, optional_time
from joey.client.connections import Connection, list_connections
from joey_core.settings import CommonSettings
from joey_core.v1 import registry_pb2 as pb

OWNER = "owner"
COLLABORATOR = "collaborator"


class Member(NamedTuple):
    """A member of a workspace: a ``(username, role)`` pair; ``str()`` is the username."""

    username: str
    role: str
    """``"owner"`` (manages members, deletes the workspace) or ``"collaborator"``."""

    def __str__(self) -> str:
        return self.username

    def row(self) -> dict[str, Any]:
        return {"username": self.username, "role": self.role}


@dataclass(frozen=True)
class Workspace:
    """A workspace the caller may see; ``str()`` is its name. ``role`` is the caller's role in it
    (``"owner"`` or ``"collaborator"``; empty for a platform admin who is not a member)."""

    client: RegistryCaller = field(repr=False, compare=False)
    name: str
    role: str = ""
    created_at: datetime | None = None

    @classmethod
    def from_proto(cls, client: RegistryCaller, w: pb.Workspace) -> Workspace:
        return cls(client, w.name, w.role, optional_time(w.created_at))

    def __str__(self) -> str:
        return self.name

    def row(self) -> dict[str, Any]:
        return {"name": self.name, "role": self.role or "-", "created": self.created_at}

    def add_user(self, username: str) -> Member:
        """Make ``username`` a collaborator (an owner who is added again becomes one): owners and
        platform admins only."""
        return self._add(username, COLLABORATOR)

    def add_owner(self, username: str) -> Member:
        """Make ``username`` an owner, who may also manage members: owners and platform admins only."""
        return self._add(username, OWNER)

    def _add(self, username: str, role: str) -> Member:
        request = pb.AddWorkspaceMemberRequest(workspace=self.name, username=username, role=role)
        member = self.client.call("AddWorkspaceMember", request)
        return Member(member.username, member.role)

    def remove_user(self, username: str) -> None:
        """Remove ``username`` from the workspace (refused for its last owner): owners and platform admins
        only."""
        self.client.call(
            "RemoveWorkspaceMember", pb.RemoveWorkspaceMemberRequest(workspace=self.name, username=username)
        )

    def users(self) -> Listing[Member]:
        """The members with their roles, as ``(username, role)`` pairs that print as a table."""
        response = self.client.call(
            "ListWorkspaceMembers", pb.ListWorkspaceMembersRequest(workspace=self.name)
        )
        return Listing(Member(m.username, m.role) for m in response.members)

    def add_connection(self, name: str | Connection, from_workspace: str | None = None) -> None:
        """Make connection ``name`` of ``from_workspace`` (default: the client's current workspace, or
        the connection's own) usable in this workspace: its members may then read its details and test
        it. Owners of the connection's workspace who may write in this one only."""
        owner = from_workspace or (name.owner if isinstance(name, Connection) else self.client.workspace)
        request = pb.ConnectionShareRequest(workspace=self.name, name=str(name), owner_workspace=owner)
        self.client.call("AddWorkspaceConnection", request)

    def remove_connection(self, name: str | Connection) -> None:
        """Stop sharing connection ``name`` with this workspace (it stays in its own): owners of either
        workspace."""
        request = pb.ConnectionUnshareRequest(workspace=self.name, name=str(name))
        self.client.call("RemoveWorkspaceConnection", request)

    def list_connections(self) -> Listing[Connection]:
        """The connections this workspace sees: its own and those added to it, secrets shown as ``***``."""
        return list_connections(self.client, self.name)


class WorkspaceClientMixin(ABC):
    """The workspace verbs of :class:`joey.Client`, which provides ``workspace``, ``settings`` and
    ``call``."""

    workspace: str
    settings: CommonSettings

    @abstractmethod
    def call(self, name: str, request: Any, timeout: float = 60.0) -> Any: ...

    def create_workspace(self, name: str) -> Workspace:
        """Create workspace ``name`` (lowercase letters, digits and dashes); the caller is its owner."""
        return Workspace.from_proto(self, self.call("CreateWorkspace", pb.CreateWorkspaceRequest(name=name)))

    def list_workspaces(self) -> Listing[Workspace]:
        """The workspaces the caller is a member of (every one, for a platform admin), as a table;
        ``"name" in client.list_workspaces()`` works."""
        response = self.call("ListWorkspaces", pb.ListWorkspacesRequest())
        return Listing(Workspace.from_proto(self, w) for w in response.workspaces)

    def get_workspace(self, name: str) -> Workspace:
        """Workspace ``name``, if the caller may see it (the same error as a missing one otherwise)."""
        for found in self.list_workspaces():
            if found.name == name:
                return found
        raise JoeyError("NOT_FOUND", f"workspace '{name}' not found")

    def set_current_workspace(self, workspace: str | Workspace) -> None:
        """Work in ``workspace`` (a name or a :class:`Workspace`) from now on."""
        self.workspace = str(workspace)

    def delete_workspace(self, name: str | Workspace) -> None:
        """Delete an empty workspace; refused while it holds models, pipelines or assays, and for
        ``default``. Its contents are never deleted along with it: delete each first."""
        self.call("DeleteWorkspace", pb.DeleteWorkspaceRequest(name=str(name)))
