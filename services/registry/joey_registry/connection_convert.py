"""Connections between their domain form and the wire's."""

from __future__ import annotations

from typing import Any

from google.protobuf.struct_pb2 import Struct

from joey_core import structs
from joey_core.connections import Report
from joey_core.v1 import registry_pb2 as pb
from joey_registry.connections import StoredConnection
from joey_registry.convert import timestamp


def struct(values: dict[str, Any]) -> Struct:
    out = Struct()
    out.update(values)
    return out


def details(request: pb.ConnectionCreateRequest) -> dict[str, Any]:
    return structs.plain(request.details)


def connection(c: StoredConnection) -> pb.Connection:
    return pb.Connection(
        workspace=c.workspace,
        name=c.name,
        type=c.type,
        details=struct(c.details),
        created_by=c.created_by,
        created_at=timestamp(c.created_at),
        shared_with=list(c.shared_with),
    )


def report(r: Report) -> pb.ConnectionTestResult:
    return pb.ConnectionTestResult(ok=r.ok, message=r.message, found=struct(r.found))
