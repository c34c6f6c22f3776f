"""The readiness rules on their own, without Redis or a broker."""

from __future__ import annotations

from datetime import UTC, datetime

from joey_core.heartbeats import ReplicaHeartbeat, ReplicaView
from joey_core.topics import pipeline_topics
from joey_registry.domain import Deployment
from joey_registry.status import compute_status

DEPLOYMENT = Deployment("ws", "p", 3, 2, True, "d-now", pipeline_topics("ws", "p"), datetime.now(UTC))


def view(replica: str, partitions: list[int], alive: bool = True, **extra: object) -> ReplicaView:
    fields: dict[str, object] = {"deployment_id": "d-now", "pipeline_version": 3, "loaded": True} | extra
    return ReplicaView(ReplicaHeartbeat(replica, partitions=partitions, **fields), alive)  # type: ignore[arg-type]


def test_running_needs_every_replica_and_every_partition() -> None:
    status = compute_status(DEPLOYMENT, [view("a", [0, 1]), view("b", [2, 3])], partitions=4)
    assert (status.status, status.ready, status.message) == (
        "Running",
        True,
        "2/2 replicas ready; all 4 partitions assigned",
    )


def test_loading_dead_and_partitionless_replicas_do_not_count() -> None:
    views = [view("a", [0, 1, 2, 3]), view("b", [], loaded=False), view("c", [2, 3], alive=False)]
    status = compute_status(DEPLOYMENT, views, partitions=4)
    assert (status.status, status.ready) == ("Starting", False)
    assert status.message == "1/2 replicas ready; all 4 partitions assigned; 1 loading"
    assert [(r.replica_id, r.alive) for r in status.replicas] == [("a", True), ("b", True), ("c", False)]


def test_missing_inputs_topic_and_errors() -> None:
    status = compute_status(DEPLOYMENT, [view("a", [0], error="out of memory")], partitions=None)
    assert status.status == "Error"
    assert status.message == (
        "0/2 replicas ready; inputs topic joey.ws.p.inputs does not exist; errors: a: out of memory"
    )


def test_undeployed_and_never_deployed() -> None:
    assert compute_status(None, [], None).message == "never deployed"
    stopped = Deployment(**(DEPLOYMENT.__dict__ | {"active": False}))
    assert compute_status(stopped, [view("a", [0])], 4).status == "Undeployed"
