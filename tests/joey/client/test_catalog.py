"""Listings, descriptions and deletes through the SDK, against the stack's registry and engine."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from confluent_kafka import Consumer, Producer, TopicPartition

from joey.client import Client, JoeyError, ModelSummary, Pipeline, PipelineSummary
from joey.client.catalog import DeletedPipeline
from joey_core import heartbeats, topics
from joey_core.kafka import consumer_config, producer_config
from joey_core.settings import CommonSettings
from tests.conftest import Stack, wait_until

IRIS_RECORD = {"features": [5.1, 3.5, 1.4, 0.2]}


@pytest.fixture
def client(stack: Stack, settings: CommonSettings) -> Iterator[Client]:
    client = Client(settings=settings, workspace=f"ws-{secrets.token_hex(4)}")
    client.create_workspace(client.workspace)
    yield client
    client.close()


def delete_when_stopped(pipeline: Pipeline) -> DeletedPipeline:
    """Delete an undeployed pipeline once its replicas have stopped (until then it is refused)."""

    def attempt() -> DeletedPipeline | None:
        try:
            return pipeline.delete()
        except JoeyError as exc:
            if "still stopping" not in exc.message:
                raise
            return None

    deleted = wait_until(attempt, 60, f"pipeline {pipeline.name}'s replicas to stop", interval=0.5)
    assert isinstance(deleted, DeletedPipeline)
    return deleted


def wait_for_the_logger(settings: CommonSettings) -> None:
    """Until the logger has committed every record of joey.logs: what it will ever write is written."""
    consumer = Consumer(consumer_config(settings, topics.LOGGER_GROUP))
    try:
        partitions = consumer.list_topics(topics.LOGS, timeout=10).topics[topics.LOGS].partitions

        def caught_up() -> bool:
            committed = consumer.committed([TopicPartition(topics.LOGS, p) for p in partitions], timeout=10)
            ends = [consumer.get_watermark_offsets(tp, timeout=10)[1] for tp in committed]
            return all(end == 0 or tp.offset >= end for tp, end in zip(committed, ends, strict=True))

        wait_until(caught_up, 60, "the logger to consume every log record", interval=0.2)
    finally:
        consumer.close()


def test_listings_are_tables_of_what_each_thing_is(client: Client, iris_model: Path) -> None:
    client.upload_model("iris", iris_model)
    client.upload_model("iris", iris_model)
    client.build_pipeline("idle").add_model_step("iris").create()
    live = client.build_pipeline("live").add_model_step("iris", 1)
    live.deploy(replicas=1)

    pipelines = client.list_pipelines()
    assert all(isinstance(p, PipelineSummary) for p in pipelines)
    assert [str(p) for p in pipelines] == ["idle", "live"] and "live" in pipelines and "nope" not in pipelines
    idle, running = pipelines
    assert (idle.latest_version, idle.deployed, idle.replicas, idle.status) == (1, False, None, "Undeployed")
    assert (running.deployed, running.deployed_version, running.replicas, running.status) == (
        True,
        1,
        1,
        "Running",
    )
    frame = pipelines.to_frame()
    assert list(frame.columns) == ["name", "latest", "deployed", "replicas", "status", "tags", "updated"]
    assert frame["deployed"].tolist() == ["no", "v1"]
    assert repr(pipelines).splitlines()[0].split() == [
        "name",
        "latest",
        "deployed",
        "replicas",
        "status",
        "tags",
        "updated",
    ]

    models = client.list_models()
    assert isinstance(models[0], ModelSummary) and [m.name for m in models] == ["iris"]
    assert (models[0].version, len(models[0].versions), models[0].framework) == (2, 2, "onnx")
    row = models.to_frame().iloc[0].to_dict()
    assert row["inputs"] == "features float32[-1,4]"
    assert row["outputs"] == "label int64[-1], probabilities float32[-1,3]"
    assert client.model_versions("iris").to_frame()["version"].tolist() == [1, 2]

    described = client.describe_model("iris")
    assert [str(u) for u in described.used_by(1)] == ["live v1 (deployed)"]
    assert [str(u) for u in described.used_by(2)] == ["idle v1"]
    assert "    used by: live v1 (deployed)" in str(described).splitlines()

    text = str(live.describe()).splitlines()
    assert text[0] == f"pipeline live (workspace {client.workspace}), 1 version"
    assert text[1].startswith("  version 1 (created ") and text[1].endswith("): iris:1")
    assert text[2].startswith("deployment: Running, version 1, 1 replica: 1/1 replicas ready")
    assert text[3] == (
        f"topics: inputs joey.{client.workspace}.live.inputs, outputs joey.{client.workspace}.live.outputs, "
        f"errors joey.{client.workspace}.live.errors"
    )
    assert text[4] == "assays: none"

    # Listing items go where names and model versions went before.
    assert [client.get_pipeline(p).name for p in pipelines] == ["idle", "live"]
    assert str(client.describe_pipeline(pipelines[1])).startswith("pipeline live ")
    from_listing = client.build_pipeline("from-listing").add_model_step(models[0]).create()
    assert [str(s) for s in from_listing.steps] == ["iris:2"]
    assert client.describe_model(models[0]).model.name == "iris"
    live.undeploy()


def test_deletes_refuse_while_in_use_and_say_what_to_do(client: Client, iris_model: Path) -> None:
    client.upload_model("iris", iris_model)
    client.upload_model("iris", iris_model)
    live = client.build_pipeline("live").add_model_step("iris", 1)
    live.deploy(replicas=1)

    with pytest.raises(JoeyError) as refused:
        client.delete_model("iris", 1)
    assert refused.value.code == "FAILED_PRECONDITION"
    assert refused.value.message.startswith("version 1 of model 'iris' is in use by deployed pipeline 'live'")
    with pytest.raises(JoeyError) as refused:
        live.delete()
    assert refused.value.code == "FAILED_PRECONDITION"
    assert refused.value.message.endswith("undeploy it first: `joey pipeline undeploy live`")
    with pytest.raises(JoeyError) as refused:
        client.delete_workspace(client.workspace)
    assert refused.value.code == "FAILED_PRECONDITION"
    assert [m.version for m in client.model_versions("iris")] == [1, 2]

    assert str(client.delete_model("iris", 2)) == "deleted model iris version 2"
    live.undeploy()
    assert str(delete_when_stopped(live)) == "deleted pipeline live: 1 version, 0 logged inferences"
    assert client.list_pipelines() == []
    deleted = client.delete_model("iris")
    assert (deleted.versions, deleted.model_deleted) == ((1,), True)
    client.delete_workspace(client.workspace)
    assert client.workspace not in client.list_workspaces()


def test_a_new_pipeline_of_a_deleted_ones_name_inherits_nothing(
    client: Client, iris_model: Path, settings: CommonSettings
) -> None:
    client.upload_model("iris", iris_model)
    old = client.build_pipeline("p").add_model_step("iris")
    old.deploy(replicas=1)
    old.infer([IRIS_RECORD] * 20)
    deployment_id = old.status().deployment_id
    old.undeploy()
    # A replica still finishing its batch after the undeploy keeps its heartbeat until it stops. How long
    # the real one takes is a race with this call (it often retires first), so one more replica of the
    # deployment reports itself as replicas do, live until it retires.
    store = redis.Redis.from_url(settings.redis_url.get_secret_value())
    stopping = heartbeats.ReplicaHeartbeat("stopping-replica", deployment_id, 1, loaded=True)
    heartbeats.publish(store, settings.redis_prefix, old.workspace, "p", stopping, ttl_s=60)
    with pytest.raises(JoeyError) as refused:
        old.delete()
    assert refused.value.code == "FAILED_PRECONDITION"
    assert refused.value.message.startswith("pipeline 'p' has ")
    assert "still stopping (" in refused.value.message and "stopping-replica" in refused.value.message
    assert refused.value.message.endswith("); retry in a few seconds")
    heartbeats.retire(store, settings.redis_prefix, old.workspace, "p", "stopping-replica")
    # Input records no replica will read: a new pipeline of the same name must not answer them.
    producer = Producer(producer_config(settings))
    for _ in range(5):
        producer.produce(old.topics.inputs, json.dumps(IRIS_RECORD).encode())
    assert producer.flush(10) == 0

    delete_when_stopped(old)
    wait_for_the_logger(settings)
    new = client.build_pipeline("p").add_model_step("iris")
    new.create()
    assert new.status().replicas == ()  # the old pipeline's stopped replica is forgotten
    new.deploy(replicas=1)
    assert new.log_count() == 0
    new.infer([IRIS_RECORD])
    wait_for_the_logger(settings)
    assert new.log_count() == 1
    new.undeploy()
