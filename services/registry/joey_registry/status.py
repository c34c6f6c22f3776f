"""Deployment readiness from replica heartbeats: a pure function, so the rules read in one place."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime

from joey_core.heartbeats import ReplicaView
from joey_registry.domain import Deployment, DeploymentStatus, ReplicaStatus

RUNNING = "Running"
STARTING = "Starting"
ERROR = "Error"
UNDEPLOYED = "Undeployed"

# Phases of a replica (ReplicaStatus.phase in the proto says what each means).
STARTING_PHASE, LOADING, JOINING, RUNNING_PHASE = "starting", "loading", "joining", "running"
RETIRING, STOPPING, FAILED, DEAD = "retiring", "stopping", "failed", "dead"
_REPORTED = (STARTING_PHASE, LOADING, JOINING, RUNNING_PHASE)


def phase(view: ReplicaView, deployment: Deployment | None) -> str:
    """The replica's phase as users see it: what it reports, or what its deployment makes of it."""
    beat = view.beat
    if beat.error:
        return FAILED
    if not view.alive:
        return DEAD
    if deployment is None or not deployment.active:
        return STOPPING
    if beat.deployment_id != deployment.deployment_id:
        return RETIRING
    if beat.phase in _REPORTED:
        return beat.phase
    # Heartbeats of engines that do not report a phase.
    if not beat.loaded:
        return LOADING
    return RUNNING_PHASE if beat.assigned or beat.partitions else JOINING


def compute_status(
    deployment: Deployment | None, views: list[ReplicaView], partitions: int | None
) -> DeploymentStatus:
    """``partitions`` is the partition count of the inputs topic, None if the topic is missing.

    A replica counts toward readiness when it is alive, runs the current deployment, has
    loaded its models, reports no error and holds at least one partition; a rollout is ready once
    no replica of the deployment it replaced is alive. Replicas of an undeployed pipeline that are
    still draining are listed as stopping, never as alive."""
    if deployment is None or not deployment.active:
        return _undeployed(deployment, views)
    replicas = tuple(_replica(v, phase(v, deployment)) for v in views)

    current = [v for v in views if v.alive and v.beat.deployment_id == deployment.deployment_id]
    errors = [f"{v.beat.replica_id}: {v.beat.error}" for v in current if v.beat.error]
    counting = [v for v in current if v.beat.loaded and v.beat.partitions and not v.beat.error]
    assigned = {p for v in counting for p in v.beat.partitions}

    parts = [f"{len(counting)}/{deployment.replicas} replicas ready"]
    waiting = Counter(_waiting(v, deployment) for v in current if v not in counting and not v.beat.error)
    parts += [f"{count} {what}" for what, count in waiting.items()]
    dead = sum(1 for v in views if not v.alive and v.beat.deployment_id == deployment.deployment_id)
    if dead:
        parts.append(f"{dead} dead (heartbeat expired)")
    unstarted = deployment.replicas - len(current) - dead
    if unstarted > 0:
        parts.append(f"{unstarted} not started by an engine yet")
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


def _undeployed(deployment: Deployment | None, views: list[ReplicaView]) -> DeploymentStatus:
    # A replica still beating after the undeploy is draining its batch: listed as stopping, not alive.
    # Dead ones belong to the history of a deployment that is gone.
    draining = tuple(_replica(v, STOPPING, alive=False) for v in views if v.alive)
    if deployment is None:
        return DeploymentStatus(None, UNDEPLOYED, False, draining, "never deployed")
    when = deployment.updated_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    message = (
        f"not deployed; last deployed: version {deployment.pipeline_version} with "
        f"{deployment.replicas} replica{'s' if deployment.replicas != 1 else ''}, undeployed {when}"
    )
    if draining:
        message += f"; {len(draining)} replica{'s' if len(draining) != 1 else ''} still stopping"
    return DeploymentStatus(deployment, UNDEPLOYED, False, draining, message)


def _waiting(view: ReplicaView, deployment: Deployment) -> str:
    """What a replica of the current deployment that is not ready yet is doing."""
    current = phase(view, deployment)
    detail = f" ({view.beat.detail})" if view.beat.detail else ""
    if current == STARTING_PHASE:
        return f"starting{detail or ' (fetching models)'}"
    if current == LOADING:
        return f"loading{detail}"
    if current == JOINING:
        return "joining the consumer group"
    return "waiting for partitions (rebalancing)"


def _replica(view: ReplicaView, current_phase: str, alive: bool | None = None) -> ReplicaStatus:
    beat = view.beat
    return ReplicaStatus(
        replica_id=beat.replica_id,
        alive=view.alive if alive is None else alive,
        pipeline_version=beat.pipeline_version,
        loaded=beat.loaded,
        partitions=tuple(sorted(beat.partitions)),
        last_seen=datetime.fromtimestamp(beat.sent_at, UTC),
        error=beat.error,
        queue_age_s=beat.queue_age_s,
        deployment_id=beat.deployment_id,
        phase=current_phase,
    )
