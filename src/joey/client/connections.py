"""Data connections: the connection verbs of :class:`joey.Client` and the :class:`Connection` they
return::

    conn = client.create_connection("wine-db", "postgres", {"url": "postgresql://...", "table": "wine_in"})
    client.list_connections()                  # secrets shown as ***
    client.get_connection("wine-db").details() # in full: members of a workspace that sees it only
    conn.test()                                # what the registry found there
    ws.add_connection("wine-db")               # usable in workspace ws too (see Workspace)
    conn.delete()
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from google.protobuf.struct_pb2 import Struct

from joey.client.calls import RegistryCaller
from joey.client.catalog import Listing, optional_time
from joey_core import structs
from joey_core.v1 import registry_pb2 as pb

TEST_TIMEOUT_S = 180.0
"""Beyond any registry's test timeout (JOEY_CONNECTION_TEST_TIMEOUT_S is at most 120 s)."""


@dataclass(frozen=True)
class ConnectionTest:
    """What a connection's test found; ``str()`` is its message."""

    ok: bool
    message: str
    found: dict[str, Any]

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class Connection:
    """A connection a workspace sees; ``str()`` is its name. ``owner`` is the workspace it belongs to,
    ``workspace`` the one it was looked up in (the same, or one it is added to). Its details are never
    part of its repr: :meth:`details` reads them."""

    client: RegistryCaller = field(repr=False, compare=False)
    workspace: str
    name: str
    type: str
    owner: str
    created_by: str = ""
    created_at: datetime | None = None
    shared_with: tuple[str, ...] = ()
    listed: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    """The details as listed: every secret value ``***``."""
    _full: dict[str, Any] | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_proto(
        cls, client: RegistryCaller, workspace: str, c: pb.Connection, full: bool = False
    ) -> Connection:
        details = structs.plain(c.details)
        return cls(
            client,
            workspace,
            c.name,
            c.type,
            c.workspace,
            c.created_by,
            optional_time(c.created_at),
            tuple(c.shared_with),
            {} if full else details,
            details if full else None,
        )

    def __str__(self) -> str:
        return self.name

    def row(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.type,
            "workspace": self.owner,
            "details": ", ".join(f"{k}={v}" for k, v in self.listed.items()) if self.listed else "-",
            "shared_with": ", ".join(self.shared_with) or "-",
            "created": self.created_at,
        }

    def details(self) -> dict[str, Any]:
        """The details in full, secrets included (each read is recorded in the audit trail)."""
        if self._full is None:
            request = pb.ConnectionGetRequest(workspace=self.workspace, name=self.name)
            return structs.plain(self.client.call("GetConnection", request).details)
        return dict(self._full)

    def test(self) -> ConnectionTest:
        """Connect and report what was found (a table's rows and columns, a topic's partitions, files,
        objects, an HTTP status). ``ok`` is false when it cannot be reached or is not as described;
        the registry's policy may refuse to test at all (FAILED_PRECONDITION, naming its setting)."""
        request = pb.ConnectionTestRequest(workspace=self.workspace, name=self.name)
        result = self.client.call("TestConnection", request, timeout=TEST_TIMEOUT_S)
        return ConnectionTest(result.ok, result.message, structs.plain(result.found))

    def delete(self) -> None:
        """Delete the connection (its own workspace's only) and its shares with other workspaces."""
        self.client.call(
            "DeleteConnection", pb.ConnectionDeleteRequest(workspace=self.workspace, name=self.name)
        )


def list_connections(client: RegistryCaller, workspace: str) -> Listing[Connection]:
    response = client.call("ListConnections", pb.ConnectionListRequest(workspace=workspace))
    return Listing(Connection.from_proto(client, workspace, c) for c in response.connections)


class ConnectionClientMixin(ABC):
    """The connection verbs of :class:`joey.Client`, which provides ``workspace`` and ``call``."""

    workspace: str

    @abstractmethod
    def call(self, name: str, request: Any, timeout: float = 60.0) -> Any: ...

    def create_connection(self, name: str, type: str, details: dict[str, Any]) -> Connection:  # noqa: A002
        """Store connection ``name`` of ``type`` (postgres, kafka, files, s3, http) in the current
        workspace; ``details`` are checked for the type (the error names the bad field) and their
        secrets sealed (docs/workloads.md, "Connections")."""
        values = Struct()
        values.update(details)
        request = pb.ConnectionCreateRequest(workspace=self.workspace, name=name, type=type, details=values)
        return Connection.from_proto(self, self.workspace, self.call("CreateConnection", request))  # type: ignore[arg-type]

    def list_connections(self) -> Listing[Connection]:
        """The connections of the current workspace and those added to it, secrets shown as ``***``."""
        return list_connections(self, self.workspace)  # type: ignore[arg-type]

    def get_connection(self, name: str | Connection) -> Connection:
        """Connection ``name`` of the current workspace (its own or added to it), with its details in full."""
        request = pb.ConnectionGetRequest(workspace=self.workspace, name=str(name))
        found = self.call("GetConnection", request)
        return Connection.from_proto(self, self.workspace, found, full=True)  # type: ignore[arg-type]
