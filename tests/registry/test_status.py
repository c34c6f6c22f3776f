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
    assert (
        status.message
        == "1/2 replicas ready; 1 loading; 1 dead (heartbeat expired); all 4 partitions assigned"
    )
    assert [(r.replica_id, r.alive, r.phase) for r in status.replicas] == [
        ("a", True, "running"),
        ("b", True, "loading"),
        ("c", False, "dead"),
    ]


def test_missing_inputs_topic_and_errors() -> None:
    status = compute_status(DEPLOYMENT, [view("a", [0], error="out of memory")], partitions=None)
    assert status.status == "Error"
    assert status.message == (
        "0/2 replicas ready; 1 not started by an engine yet; inputs topic joey.ws.p.inputs does not exist; "
        "errors: a: out of memory"
    )


def test_each_phase_of_a_start_is_named_until_ready() -> None:
    views = [
        view("a", [], loaded=False, phase="starting", detail="fetching models"),
        view(
            "b", [], loaded=False, phase="loading", detail="loading 1 model, starting 1 python step sandbox"
        ),
    ]
    status = compute_status(DEPLOYMENT, views, partitions=4)
    assert status.message == (
        "0/2 replicas ready; 1 starting (fetching models); "
        "1 loading (loading 1 model, starting 1 python step sandbox); partitions 0,1,2,3 unassigned"
    )
    joining = [view("a", [], phase="joining"), view("b", [0, 1, 2, 3], phase="running", assigned=True)]
    status = compute_status(DEPLOYMENT, joining, partitions=4)
    assert status.message == "1/2 replicas ready; 1 joining the consumer group; all 4 partitions assigned"
    assert [r.phase for r in status.replicas] == ["joining", "running"]
    assert compute_status(DEPLOYMENT, [], 4).message == (
        "0/2 replicas ready; 2 not started by an engine yet; partitions 0,1,2,3 unassigned"
    )


def test_replicas_of_a_replaced_deployment_are_retiring() -> None:
    views = [view("new", [0, 1, 2, 3], phase="running"), view("old", [], deployment_id="d-before")]
    status = compute_status(DEPLOYMENT, views, partitions=4)
    assert [(r.replica_id, r.alive, r.phase) for r in status.replicas] == [
        ("new", True, "running"),
        ("old", True, "retiring"),
    ]


def test_undeployed_and_never_deployed() -> None:
    assert compute_status(None, [], None).message == "never deployed"
    stopped = Deployment(**(DEPLOYMENT.__dict__ | {"active": False}))
    draining = [view("a", [0], phase="running"), view("gone", [1], alive=False)]
    status = compute_status(stopped, draining, 4)
    assert (status.status, status.ready) == ("Undeployed", False)
    when = stopped.updated_at.strftime("%Y-%m-%d %H:%M:%S UTC")
    assert status.message == (
        f"not deployed; last deployed: version 3 with 2 replicas, undeployed {when}; 1 replica still stopping"
    )
    # Still beating while it drains its batch, but never shown alive for an undeployed pipeline.
    assert [(r.replica_id, r.alive, r.phase) for r in status.replicas] == [("a", False, "stopping")]
