from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import grpc
import psycopg
import pytest
import redis
from google.protobuf import json_format
from pydantic import SecretStr

from joey_cli.broker import EmbeddedBroker
from joey_core import heartbeats, topics
from joey_core.heartbeats import ReplicaHeartbeat
from joey_core.kafka import TopicSpec, admin_client, ensure_topics, topic_partitions
from joey_core.v1 import registry_pb2 as pb
from joey_core.v1 import registry_pb2_grpc
from joey_registry.app import RegistryServer
from joey_registry.domain import DeploymentSpec
from joey_registry.settings import RegistrySettings
from tests.conftest import REDIS_URL, free_port, kill_broker, scratch_database, wait_until
from tests.registry.helpers import Stub, read_deployments, rpc_error, step, token_stub, upload


def make_pipeline(stub: Stub, workspace: str, iris_bytes: bytes) -> str:
    """Pipeline "p" of ``workspace`` at two versions, each of one iris model version."""
    upload(stub, workspace, "iris", iris_bytes)
    upload(stub, workspace, "iris", iris_bytes)
    stub.CreatePipeline(pb.CreatePipelineRequest(workspace=workspace, name="p", steps=[step("iris", 1)]))
    stub.CreatePipeline(pb.CreatePipelineRequest(workspace=workspace, name="p", steps=[step("iris", 2)]))
    return "p"


@pytest.fixture
def pipeline(stub: Stub, workspace: str, iris_bytes: bytes) -> str:
    return make_pipeline(stub, workspace, iris_bytes)


@pytest.fixture
def redis_client() -> redis.Redis:
    return redis.Redis.from_url(REDIS_URL)


def deploy(
    stub: Stub, workspace: str, pipeline: str, version: int = 0, replicas: int | None = None, **extra: object
) -> pb.Deployment:
    """``replicas`` None leaves the field unset (the default)."""
    request = pb.DeployRequest(
        workspace=workspace, pipeline=pipeline, pipeline_version=version, replicas=replicas, **extra
    )
    return stub.Deploy(request, timeout=30)


def specs_of(messages: list) -> list[pb.DeploymentSpec | None]:  # type: ignore[type-arg]
    return [
        None if m.value() is None else json_format.Parse(m.value(), pb.DeploymentSpec()) for m in messages
    ]


def test_deploy_publishes_spec_and_creates_topics(
    stub: Stub, workspace: str, pipeline: str, registry_settings: RegistrySettings
) -> None:
    deployment = deploy(stub, workspace, pipeline, version=1, replicas=2)
    assert (deployment.pipeline_version, deployment.replicas, deployment.active) == (1, 2, True)
    assert deployment.topics.inputs == f"joey.{workspace}.p.inputs"

    key = topics.deployment_key(workspace, pipeline)
    [message] = read_deployments(registry_settings, lambda found: len(found) >= 1, key)
    spec = json_format.Parse(message.value(), pb.DeploymentSpec())
    assert spec.deployment_id == deployment.deployment_id
    assert (spec.workspace, spec.pipeline, spec.pipeline_version, spec.replicas) == (workspace, "p", 1, 2)
    model = stub.GetModelVersion(pb.GetModelVersionRequest(workspace=workspace, name="iris", version=1))
    assert [(s.model, s.version, s.sha256) for s in spec.steps] == [("iris", 1, model.sha256)]
    assert [i.name for i in spec.steps[0].inputs] == ["features"]
    assert spec.topics == deployment.topics
    assert spec.deployed_at == deployment.updated_at
    assert b'"pipeline_version": "1"' in message.value()  # proto field names, as engines parse them

    counts = topic_partitions(admin_client(registry_settings), topics.pipeline_topics(workspace, "p").all())
    assert counts == dict.fromkeys(topics.pipeline_topics(workspace, "p").all(), 4)

    again = deploy(stub, workspace, pipeline)  # latest version, 1 replica
    assert (again.pipeline_version, again.replicas) == (2, 1)
    assert again.deployment_id != deployment.deployment_id
    current = stub.GetPipeline(pb.GetPipelineRequest(workspace=workspace, name="p")).deployment
    assert current.deployment_id == again.deployment_id


def test_undeploy_publishes_tombstone(
    stub: Stub, workspace: str, pipeline: str, registry_settings: RegistrySettings
) -> None:
    deploy(stub, workspace, pipeline)
    undeployed = stub.Undeploy(pb.UndeployRequest(workspace=workspace, pipeline=pipeline))
    assert not undeployed.active

    key = topics.deployment_key(workspace, pipeline)
    messages = read_deployments(registry_settings, lambda found: len(found) >= 2, key)
    assert specs_of(messages)[1] is None
    assert not stub.GetPipeline(pb.GetPipelineRequest(workspace=workspace, name="p")).deployment.active

    error = rpc_error(lambda: stub.Undeploy(pb.UndeployRequest(workspace=workspace, pipeline=pipeline)))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "is not deployed" in error.details()
    status = stub.GetDeploymentStatus(pb.GetDeploymentStatusRequest(workspace=workspace, pipeline=pipeline))
    assert (status.status, status.ready) == ("Undeployed", False)


def test_replicas_beyond_partitions_are_rejected(stub: Stub, workspace: str, pipeline: str) -> None:
    error = rpc_error(lambda: deploy(stub, workspace, pipeline, replicas=5))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "between 1 and 4" in error.details() and "JOEY_PIPELINE_PARTITIONS" in error.details()
    assert not stub.GetPipeline(pb.GetPipelineRequest(workspace=workspace, name="p")).HasField("deployment")


def test_zero_or_negative_replicas_are_refused_and_change_nothing(
    stub: Stub, workspace: str, pipeline: str
) -> None:
    running = deploy(stub, workspace, pipeline, replicas=2)
    for replicas in (0, -1):
        error = rpc_error(lambda r=replicas: deploy(stub, workspace, pipeline, replicas=r))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error.details().startswith("replicas must be between 1 and 4 ")
        assert f"got {replicas}; to stop serving, undeploy the pipeline" in error.details()
    current = stub.GetPipeline(pb.GetPipelineRequest(workspace=workspace, name="p")).deployment
    assert (current.deployment_id, current.replicas) == (running.deployment_id, 2)
    # Left unset, replicas is the default: one.
    assert deploy(stub, workspace, pipeline).replicas == 1


def test_bad_autoscaling_and_resources_are_refused_and_change_nothing(
    stub: Stub, workspace: str, pipeline: str
) -> None:
    running = deploy(stub, workspace, pipeline, replicas=2)
    refused = {
        "min_replicas <= max_replicas, got min 3 and max 2": {
            "autoscale": pb.AutoscaleConfig(min_replicas=3, max_replicas=2)
        },
        "got min 0 and max 2": {"autoscale": pb.AutoscaleConfig(min_replicas=0, max_replicas=2)},
        "queue_age_threshold_s must be a positive number of seconds, got -1.0": {
            "autoscale": pb.AutoscaleConfig(min_replicas=1, max_replicas=2, queue_age_threshold_s=-1)
        },
        "replicas (3) must be between the autoscaling min (1) and max (2)": {
            "replicas": 3,
            "autoscale": pb.AutoscaleConfig(min_replicas=1, max_replicas=2),
        },
        "cpus must be more than zero, got '0'": {"resources": pb.ResourceHints(cpus="0")},
        "memory must be more than zero, got '0Gi'": {"resources": pb.ResourceHints(memory="0Gi")},
    }
    for expected, fields in refused.items():
        replicas = fields.pop("replicas", None)
        error = rpc_error(lambda f=fields, r=replicas: deploy(stub, workspace, pipeline, replicas=r, **f))  # type: ignore[misc]
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, expected
        assert expected in error.details()
    current = stub.GetPipeline(pb.GetPipelineRequest(workspace=workspace, name="p")).deployment
    assert (current.deployment_id, current.replicas) == (running.deployment_id, 2)


def test_existing_topic_with_too_few_partitions(
    stub: Stub, workspace: str, pipeline: str, registry_settings: RegistrySettings
) -> None:
    inputs = topics.pipeline_topics(workspace, pipeline).inputs
    ensure_topics(admin_client(registry_settings), [TopicSpec(inputs, 1)])
    error = rpc_error(lambda: deploy(stub, workspace, pipeline, replicas=2))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"topic {inputs} has 1 partitions" in error.details()
    assert not stub.GetPipeline(pb.GetPipelineRequest(workspace=workspace, name="p")).HasField("deployment")


def test_deploy_unknown_pipeline_or_version(stub: Stub, workspace: str, pipeline: str) -> None:
    error = rpc_error(lambda: deploy(stub, workspace, "ghost"))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert error.details() == (
        f"pipeline 'ghost' not found in workspace {workspace!r}; "
        "create it with at least one step before deploying it"
    )
    error = rpc_error(lambda: deploy(stub, workspace, pipeline, version=9))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert "no version 9" in error.details()


def test_restart_republishes_active_deployments(
    stub: Stub, workspace: str, pipeline: str, registry_settings: RegistrySettings
) -> None:
    deployment = deploy(stub, workspace, pipeline)
    restarted = RegistryServer(registry_settings)
    restarted.start()
    restarted.stop()
    key = topics.deployment_key(workspace, pipeline)
    specs = specs_of(read_deployments(registry_settings, lambda found: len(found) >= 2, key))
    assert [s.deployment_id for s in specs if s] == [deployment.deployment_id] * 2
    assert specs[0] == specs[1]


def beat(replica: str, deployment_id: str, partitions: list[int], **extra: object) -> ReplicaHeartbeat:
    return ReplicaHeartbeat(replica, deployment_id, 2, loaded=True, partitions=partitions, **extra)  # type: ignore[arg-type]


def test_status_from_heartbeats(
    stub: Stub,
    workspace: str,
    pipeline: str,
    redis_client: redis.Redis,
    registry_settings: RegistrySettings,
) -> None:
    prefix = registry_settings.redis_prefix
    request = pb.GetDeploymentStatusRequest(workspace=workspace, pipeline=pipeline)

    never = stub.GetDeploymentStatus(request)
    assert (never.status, never.message, never.HasField("deployment")) == (
        "Undeployed",
        "never deployed",
        False,
    )

    deployment = deploy(stub, workspace, pipeline, replicas=2)
    status = stub.GetDeploymentStatus(request)
    assert (status.status, status.ready, list(status.replicas)) == ("Starting", False, [])
    assert (
        status.message == "0/2 replicas ready; 2 not started by an engine yet; partitions 0,1,2,3 unassigned"
    )

    def publish(b: ReplicaHeartbeat, ttl_s: float = 30.0) -> None:
        heartbeats.publish(redis_client, prefix, workspace, pipeline, b, ttl_s)

    publish(beat("r1", deployment.deployment_id, [0, 1]))
    publish(beat("old", "previous-deployment", [2, 3]))
    status = stub.GetDeploymentStatus(request)
    assert (status.status, status.ready) == ("Starting", False)
    assert (
        status.message == "1/2 replicas ready; 1 not started by an engine yet; partitions 2,3 unassigned; "
        "1 still on a previous deployment (serving until the new one is ready)"
    )

    publish(beat("r2", deployment.deployment_id, [2, 3]), ttl_s=1.0)
    status = stub.GetDeploymentStatus(request)
    assert (status.status, status.ready) == ("Starting", False), "the replaced deployment still serves"
    heartbeats.retire(redis_client, prefix, workspace, pipeline, "old")
    status = stub.GetDeploymentStatus(request)
    assert (status.status, status.ready) == ("Running", True)
    assert status.deployment.deployment_id == deployment.deployment_id
    replicas = {r.replica_id: r for r in status.replicas}
    assert sorted(replicas) == ["r1", "r2"]
    assert list(replicas["r2"].partitions) == [2, 3] and replicas["r2"].alive and replicas["r2"].loaded
    assert abs(replicas["r2"].last_seen.ToDatetime().timestamp() - time.time()) < 30

    # r2 stops beating: after its TTL it is listed dead and the deployment is no longer ready.
    def r2_dead() -> pb.DeploymentStatus | None:
        current = stub.GetDeploymentStatus(request)
        dead = [r for r in current.replicas if r.replica_id == "r2" and not r.alive]
        return current if dead else None

    status = wait_until(r2_dead, 10, "replica r2 reported dead")  # type: ignore[assignment]
    assert (status.status, status.ready) == ("Starting", False)
    assert status.message.startswith(
        "1/2 replicas ready; 1 dead (heartbeat expired); partitions 2,3 unassigned"
    )

    publish(beat("r3", deployment.deployment_id, [], error="model iris v2 failed to load: boom"))
    status = stub.GetDeploymentStatus(request)
    assert status.status == "Error"
    assert "r3: model iris v2 failed to load: boom" in status.message
    assert {r.replica_id: r.error for r in status.replicas}["r3"] == "model iris v2 failed to load: boom"


def test_status_of_unknown_pipeline(stub: Stub, workspace: str) -> None:
    error = rpc_error(
        lambda: stub.GetDeploymentStatus(pb.GetDeploymentStatusRequest(workspace=workspace, pipeline="ghost"))
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND


def intents(db: psycopg.Connection, workspace: str) -> list[tuple[str, str | None]]:
    rows = db.execute(
        "SELECT pipeline, deployment_id FROM deployment_intents WHERE workspace = %s", (workspace,)
    ).fetchall()
    return [(r[0], r[1]) for r in rows]


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[EmbeddedBroker]:
    """A broker of this test's own, to kill and start again without disturbing the session's."""
    broker = EmbeddedBroker(free_port(), tmp_path / "broker.log").start()
    yield broker
    kill_broker(broker)


@pytest.fixture
def isolated(registry_settings: RegistrySettings) -> Iterator[RegistrySettings]:
    """Settings of a registry on a database of its own. The session's other registries (the stack's
    reconciles every few seconds) would otherwise settle this test's intents, on their own broker."""
    with scratch_database("joey_deployments") as url:
        yield registry_settings.model_copy(
            update={
                "database_url": SecretStr(url),
                "redis_prefix": f"{registry_settings.redis_prefix}:own-{secrets.token_hex(4)}",
            }
        )


@contextmanager
def serving(settings: RegistrySettings) -> Iterator[tuple[RegistryServer, Stub]]:
    """A registry of the test's own on ``settings`` and the admin's stub to it (the registry bootstraps
    `admin` on a fresh database)."""
    assert settings.admin_password is not None
    server = RegistryServer(settings)
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            login = pb.LoginRequest(username="admin", password=settings.admin_password.get_secret_value())
            token = registry_pb2_grpc.RegistryStub(channel).Login(login).token
            yield server, token_stub(channel, token)
    finally:
        server.stop()


def own_workspace(stub: Stub) -> str:
    # Random: records of joey.deployments are keyed by names, and the session's broker is shared.
    name = f"ws-{secrets.token_hex(4)}"
    stub.CreateWorkspace(pb.CreateWorkspaceRequest(name=name))
    return name


def test_a_change_the_broker_does_not_acknowledge_is_unavailable_changes_nothing_and_is_reconciled(
    isolated: RegistrySettings, own_broker: EmbeddedBroker, iris_bytes: bytes
) -> None:
    settings = isolated.model_copy(
        update={
            "kafka_bootstrap": own_broker.bootstrap,
            "publish_timeout_s": 1.0,
            # Reconciled by the restart below, not by a round of the running registry's reconciler.
            "reconcile_interval_s": 3600.0,
        }
    )
    with serving(settings) as (_, own), psycopg.connect(settings.database_url.get_secret_value()) as db:
        db.autocommit = True
        workspace = own_workspace(own)
        pipeline = make_pipeline(own, workspace, iris_bytes)
        running = deploy(own, workspace, pipeline, version=1, replicas=2)
        kill_broker(own_broker)

        # The undeploy reaches the publish (its topics exist): the tombstone is never acknowledged.
        error = rpc_error(lambda: own.Undeploy(pb.UndeployRequest(workspace=workspace, pipeline=pipeline)))
        assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
        assert "did not acknowledge the change on joey.deployments" in error.details()
        error = rpc_error(lambda: deploy(own, workspace, pipeline, version=2))
        assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()

        shown = own.GetPipeline(pb.GetPipelineRequest(workspace=workspace, name=pipeline)).deployment
        assert (shown.active, shown.deployment_id, shown.pipeline_version, shown.replicas) == (
            True,
            running.deployment_id,
            1,
            2,
        )
        # The tombstone may have reached the broker unacknowledged: Kafka is suspect until reconciled.
        assert intents(db, workspace) == [(pipeline, None)]

    # The broker comes back (empty: the embedded one forgets everything), and so does the registry.
    own_broker.start()
    restarted = RegistryServer(settings)
    restarted.start()
    restarted.stop()
    with psycopg.connect(settings.database_url.get_secret_value()) as db:
        assert intents(db, workspace) == []
    specs = specs_of(
        read_deployments(settings, lambda found: len(found) >= 1, topics.deployment_key(workspace, pipeline))
    )
    assert [(s.deployment_id, s.pipeline_version, s.replicas) for s in specs if s] == [
        (running.deployment_id, 1, 2)
    ]
    assert len(specs) == 1


def test_a_registry_killed_after_publishing_is_reconciled_to_what_postgres_holds(
    isolated: RegistrySettings, iris_bytes: bytes
) -> None:
    settings = isolated.model_copy(update={"reconcile_interval_s": 3600.0})  # reconcile() is called here
    with serving(settings) as (server, stub), psycopg.connect(settings.database_url.get_secret_value()) as db:
        db.autocommit = True
        registry = server.registry
        workspace = own_workspace(stub)
        pipeline = make_pipeline(stub, workspace, iris_bytes)
        running = deploy(stub, workspace, pipeline, version=1)
        [spec] = registry.store.active_deployments()
        # What a deploy of version 2 leaves when the registry dies between the acknowledged publish and
        # the commit: the intent and the spec on Kafka, Postgres still at version 1.
        crashed = replace(spec.deployment, deployment_id="crashed-deploy", pipeline_version=2)
        registry.store.record_intent(workspace, pipeline, crashed.deployment_id)
        registry.publisher.publish(DeploymentSpec(crashed, spec.steps))
        # And a first deploy of another pipeline, dead at the same point.
        stub.CreatePipeline(
            pb.CreatePipelineRequest(workspace=workspace, name="never", steps=[step("iris", 1)])
        )
        registry.store.record_intent(workspace, "never", "crashed-first-deploy")
        registry.publisher.publish(DeploymentSpec(replace(crashed, pipeline="never"), spec.steps))

        assert registry.reconcile(everything=False) == 2
        assert intents(db, workspace) == []
        key = topics.deployment_key(workspace, pipeline)
        specs = specs_of(read_deployments(settings, lambda found: len(found) >= 3, key))
        assert [s.deployment_id if s else None for s in specs] == [
            running.deployment_id,
            "crashed-deploy",
            running.deployment_id,
        ]
        never = topics.deployment_key(workspace, "never")
        assert specs_of(read_deployments(settings, lambda found: len(found) >= 2, never))[1] is None
        shown = stub.GetPipeline(pb.GetPipelineRequest(workspace=workspace, name=pipeline)).deployment
        assert (shown.deployment_id, shown.pipeline_version) == (running.deployment_id, 1)
        # Nothing left to reconcile: a second round publishes nothing.
        assert registry.reconcile(everything=False) == 0


def test_a_running_registry_reconciles_a_failed_change_once_the_broker_is_back(
    isolated: RegistrySettings, own_broker: EmbeddedBroker, iris_bytes: bytes
) -> None:
    settings = isolated.model_copy(
        update={
            "kafka_bootstrap": own_broker.bootstrap,
            "publish_timeout_s": 1.0,
            # This registry's own reconciler settles the intent, without a restart.
            "reconcile_interval_s": 0.2,
        }
    )
    with serving(settings) as (_, own), psycopg.connect(settings.database_url.get_secret_value()) as db:
        db.autocommit = True
        workspace = own_workspace(own)
        pipeline = make_pipeline(own, workspace, iris_bytes)
        running = deploy(own, workspace, pipeline, version=1, replicas=2)
        kill_broker(own_broker)
        error = rpc_error(lambda: own.Undeploy(pb.UndeployRequest(workspace=workspace, pipeline=pipeline)))
        assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
        # Rounds of the reconciler fail while the broker is gone: the intent stays.
        assert intents(db, workspace) == [(pipeline, None)]

        own_broker.start()  # empty: the embedded broker forgets everything
        wait_until(lambda: intents(db, workspace) == [], 60, "the reconciler to settle the intent")
        key = topics.deployment_key(workspace, pipeline)
        specs = specs_of(read_deployments(settings, lambda found: len(found) >= 1, key))
        assert [(s.deployment_id, s.pipeline_version, s.replicas) if s else None for s in specs] == [
            (running.deployment_id, 1, 2)
        ]
        shown = own.GetPipeline(pb.GetPipelineRequest(workspace=workspace, name=pipeline)).deployment
        assert (shown.active, shown.deployment_id) == (True, running.deployment_id)
