"""Bridges between their domain form and the wire's."""

from __future__ import annotations

from joey_core.v1 import registry_pb2 as pb
from joey_registry.bridges import StoredBridge
from joey_registry.convert import timestamp


def bridge(b: StoredBridge) -> pb.Bridge:
    s = b.status
    status = pb.BridgeStatus(
        state=s.state, rows_moved=s.rows_moved, lag=s.lag, last_error=s.last_error, instance=s.instance
    )
    if s.updated_at is not None:
        status.updated_at.CopyFrom(timestamp(s.updated_at))
    return pb.Bridge(
        workspace=b.workspace,
        name=b.name,
        kind=b.kind,
        pipeline=b.pipeline,
        connection=b.connection,
        what=b.what,
        paused=b.paused,
        created_by=b.created_by,
        created_at=timestamp(b.created_at),
        status=status,
        from_pipeline=b.from_pipeline,
    )
