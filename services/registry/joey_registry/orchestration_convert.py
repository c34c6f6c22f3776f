"""Orchestrations and tasks between their domain form and the wire's."""

from __future__ import annotations

from datetime import datetime

from google.protobuf.timestamp_pb2 import Timestamp

from joey_core.v1 import registry_pb2 as pb
from joey_registry.convert import timestamp
from joey_registry.orchestrations import StoredOrchestration
from joey_registry.tasks import LogLine, StoredRun, StoredTask, TaskDefinition


def _set(field: Timestamp, value: datetime | None) -> None:
    if value is not None:
        field.CopyFrom(timestamp(value))


def orchestration(o: StoredOrchestration) -> pb.Orchestration:
    message = pb.Orchestration(
        workspace=o.workspace,
        name=o.name,
        version=o.version,
        sha256=o.sha256,
        size_bytes=o.size_bytes,
        files=o.files,
        status=o.status,
        packaging_log=o.packaging_log,
        packaged_by=o.packaged_by,
        created_by=o.created_by,
        created_at=timestamp(o.created_at),
    )
    _set(message.packaged_at, o.packaged_at)
    return message


def run(r: StoredRun) -> pb.TaskRun:
    message = pb.TaskRun(
        id=r.id,
        attempt=r.attempt,
        status=r.status,
        reason=r.reason,
        orchestrator=r.orchestrator,
        orchestration_version=r.orchestration_version or 0,
        created_at=timestamp(r.created_at),
    )
    if r.exit_code is not None:
        message.exit_code = r.exit_code
    _set(message.instant, r.instant)
    _set(message.started_at, r.started_at)
    _set(message.ended_at, r.ended_at)
    return message


def task(t: StoredTask) -> pb.Task:
    message = pb.Task(
        workspace=t.workspace,
        name=t.name,
        orchestration=t.orchestration,
        orchestration_version=t.orchestration_version or 0,
        kind=t.kind,
        schedule=t.schedule,
        json_args=t.json_args,
        retries=t.retries,
        owner=t.owner,
        created_at=timestamp(t.created_at),
        status=t.status,
    )
    if t.timeout_s is not None:
        message.timeout_s = t.timeout_s
    if t.last_run is not None:
        message.last_run.CopyFrom(run(t.last_run))
    _set(message.next_run, t.next_run)
    return message


def definition(request: pb.TaskCreateRequest) -> TaskDefinition:
    return TaskDefinition(
        name=request.name,
        orchestration=request.orchestration,
        orchestration_version=request.orchestration_version,
        kind=request.kind,
        schedule=request.schedule,
        json_args=request.json_args,
        timeout_s=request.timeout_s if request.HasField("timeout_s") else None,
        retries=request.retries,
    )


def log_line(line: LogLine) -> pb.TaskRunLogLine:
    return pb.TaskRunLogLine(seq=line.seq, stream=line.stream, time=timestamp(line.time), line=line.line)
