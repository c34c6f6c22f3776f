"""Deployment readiness from replica heartbeats: a pure function, so the rules read in one place."""

from __future__ import annotations

from datetime import UTC, datetime

from joey_core.heartbeats import ReplicaView
from joey_registry.domain import Deployment, DeploymentStatus, ReplicaStatus

RUNNING = "Running"
STARTING = "Starting"
ERROR = "Error"
UNDEPLOYED = "Undeployed"


def compute_status(
    deployment: Deployment | None, views: list[ReplicaView], partitions: int | None
) -> DeploymentStatus:
    """``partitions`` is the partition count of the inputs topic, None if the topic is missing.

    A replica counts toward readiness when it is alive, runs the current deployment, has
    loaded its models, reports no error and holds at least one partition; a rollout is ready once
    no replica of the deployment it replaced is alive."""
    replicas = tuple(
        ReplicaStatus(
            replica_id=v.beat.replica_id,
            alive=v.alive,
            pipeline_version=v.beat.pipeline_version,
            loaded=v.beat.loaded,
            partitions=tuple(sorted(v.beat.partitions)),
            last_seen=datetime.fromtimestamp(v.beat.sent_at, UTC),
            error=v.beat.error,
            queue_age_s=v.beat.queue_age_s,
            deployment_id=v.beat.deployment_id,
        )
        for v in views
    )
    if deployment is None or not deployment.active:
        message = "never deployed" if deployment is None else "undeployed"
        return DeploymentStatus(deployment, UNDEPLOYED, False, replicas, message)

    current = [v for v in views if v.alive and v.beat.deployment_id == deployment.deployment_id]
    errors = [f"{v.beat.replica_id}: {v.beat.error}" for v in current if v.beat.error]
    counting = [v for v in current if v.beat.loaded and v.beat.partitions and not v.beat.error]
    assigned = {p for v in counting for p in v.beat.partitions}

    parts = [f"{len(counting)}/{deployment.replicas} replicas ready"]
    if partitions is None:
        parts.append(f"inputs topic {deployment.topics.inputs} does not exist")
        all_assigned = False
    else:
        unassigned = sorted(set(range(partitions)) - assigned)
        all_assigned = not unassigned
        parts.append(
            f"partitions {','.join(map(str, unassigned))} unassigned"
            if unassigned
            else f"all {partitions} partitions assigned"
        )
    loading = sum(1 for v in current if not v.beat.loaded)
    if loading:
        parts.append(f"{loading} loading")
    stale = sum(1 for v in views if v.alive and v.beat.deployment_id != deployment.deployment_id)
    if stale:
        parts.append(f"{stale} still on a previous deployment (serving until the new one is ready)")
    if errors:
        parts.append("errors: " + "; ".join(errors))
    message = "; ".join(parts)

    if errors:
        return DeploymentStatus(deployment, ERROR, False, replicas, message)
    # Until the replicas of a replaced deployment are gone, records may still be answered by them.
    ready = len(counting) == deployment.replicas and all_assigned and not stale
    return DeploymentStatus(deployment, RUNNING if ready else STARTING, ready, replicas, message)
