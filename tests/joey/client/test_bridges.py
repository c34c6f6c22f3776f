"""Bridge definitions through the SDK against the session's registry: created after their checks,
listed, paused, resumed and deleted, each change published on joey.bridges; their connection in full
only to the service token."""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from joey.client import Client, JoeyError
from joey_core import topics
from joey_core.kafka import consumer_config
from joey_core.settings import CommonSettings
from joey_core.v1 import registry_pb2 as pb
from tests.conftest import SERVICE_TOKEN, Stack
from tests.externals import external_database


@pytest.fixture(scope="module")
def external_db() -> Iterator[str]:
    with external_database() as url:
        yield url


@pytest.fixture(scope="module")
def admin(stack: Stack, settings: CommonSettings) -> Iterator[Client]:
    with Client(settings=settings) as client:
        client.set_current_workspace(client.create_workspace(f"bridges-{secrets.token_hex(3)}"))
        yield client


@pytest.fixture(scope="module")
def pipeline(admin: Client, iris_model: Path) -> str:
    model = admin.upload_model("iris-bridged", iris_model)
    admin.build_pipeline("bridged").add_model_step(model).create()
    return "bridged"


def refused(call: Callable[[], object], code: str, *words: str) -> JoeyError:
    with pytest.raises(JoeyError) as caught:
        call()
    assert caught.value.code == code, caught.value
    for word in words:
        assert word in str(caught.value)
    return caught.value


def published(settings: CommonSettings, key: str) -> dict | None:
    """The last value of ``key`` on joey.bridges (None: a tombstone)."""
    consumer = Consumer(consumer_config(settings, f"test-bridges-{secrets.token_hex(4)}"))
    partition = TopicPartition(topics.BRIDGES, 0)
    try:
        consumer.assign([TopicPartition(topics.BRIDGES, 0, OFFSET_BEGINNING)])
        _, high = consumer.get_watermark_offsets(partition, timeout=10)
        last: dict | None | str = "missing"
        while consumer.position([partition])[0].offset < high:
            for message in consumer.consume(100, 1.0):
                if message.error() is None and message.key() == key.encode():
                    last = json.loads(message.value()) if message.value() is not None else None
        assert last != "missing", f"{key} was never published"
        return last  # type: ignore[return-value]
    finally:
        consumer.close()


def test_bridges_are_created_listed_paused_resumed_and_deleted(
    admin: Client, pipeline: str, external_db: str, settings: CommonSettings
) -> None:
    admin.create_connection("feed-db", "postgres", {"url": external_db, "table": "wine_in", "key": "id"})
    admin.create_connection("out-db", "postgres", {"url": external_db, "table": "wine_out"})
    source = admin.create_source("wine-feed", connection="feed-db", pipeline=pipeline)
    sink = admin.create_sink("wine-results", pipeline=pipeline, connection="out-db")
    assert (source.kind, source.what, sink.kind, sink.what) == ("source", "inputs", "sink", "outputs")
    assert [(b.name, b.kind) for b in admin.list_bridges()] == [
        ("wine-feed", "source"),
        ("wine-results", "sink"),
    ]
    assert sink.status().state == "waiting"  # no connector-bridge runs in this module

    key = f"{admin.workspace}/wine-results"
    spec = published(settings, key)
    assert spec is not None
    assert (spec["kind"], spec["pipeline"], spec["connection"], spec["paused"]) == (
        "sink",
        pipeline,
        "out-db",
        False,
    )
    assert "url" not in json.dumps(spec), "the connection's details are never published"

    assert sink.pause().paused
    assert sink.status().state == "paused"
    assert published(settings, key)["paused"] is True  # type: ignore[index]
    assert not sink.resume().paused
    assert published(settings, key)["paused"] is False  # type: ignore[index]

    sink.delete()
    assert published(settings, key) is None
    assert [b.name for b in admin.list_bridges()] == ["wine-feed"]
    refused(sink.status, "NOT_FOUND", "wine-results")
    source.delete()


def test_bad_bridges_are_refused_and_nothing_is_stored(
    admin: Client, pipeline: str, external_db: str
) -> None:
    admin.create_connection("no-key", "postgres", {"url": external_db, "table": "wine_in"})
    admin.create_connection("a-query", "postgres", {"url": external_db, "query": "SELECT 1"})
    admin.create_connection("no-topic", "kafka", {"bootstrap": "127.0.0.1:9"})
    admin.create_connection("csv-dir", "files", {"path": "/tmp", "format": "csv"})
    admin.create_connection("ok-db", "postgres", {"url": external_db, "table": "wine_in", "key": "id"})
    refused(
        lambda: admin.create_source("s1", connection="no-key", pipeline=pipeline), "INVALID_ARGUMENT", "key"
    )
    refused(
        lambda: admin.create_sink("s2", pipeline=pipeline, connection="a-query"), "INVALID_ARGUMENT", "query"
    )
    refused(
        lambda: admin.create_sink("s3", pipeline=pipeline, connection="no-topic"), "INVALID_ARGUMENT", "topic"
    )
    refused(
        lambda: admin.create_sink("s3", pipeline=pipeline, connection="csv-dir"),
        "INVALID_ARGUMENT",
        "Parquet",
    )
    refused(lambda: admin.create_sink("s4", pipeline="nowhere", connection="ok-db"), "NOT_FOUND", "nowhere")
    refused(lambda: admin.create_sink("s5", pipeline=pipeline, connection="missing"), "NOT_FOUND", "missing")
    refused(
        lambda: admin.create_sink("s6", pipeline=pipeline, connection="ok-db", what="inputs"),
        "INVALID_ARGUMENT",
        "inputs",
    )
    refused(
        lambda: admin.create_source("Bad_Name", connection="ok-db", pipeline=pipeline), "INVALID_ARGUMENT"
    )
    # A source of another pipeline's results: a source only, of another pipeline than its own that exists.
    refused(
        lambda: admin.create_source("c1", pipeline=pipeline, from_pipeline=pipeline),
        "INVALID_ARGUMENT",
        "own",
    )
    refused(
        lambda: admin.create_source("c2", pipeline=pipeline, from_pipeline="nowhere"), "NOT_FOUND", "nowhere"
    )
    refused(
        lambda: admin.create_source("c3", connection="ok-db", pipeline=pipeline, from_pipeline="x"),
        "INVALID_ARGUMENT",
        "not both",
    )
    refused(
        lambda: admin._create_bridge("c4", "sink", pipeline, None, "outputs", from_pipeline=pipeline),
        "INVALID_ARGUMENT",
        "only a source",
    )
    refused(lambda: admin.create_source("c5", pipeline=pipeline), "INVALID_ARGUMENT", "connection")
    assert list(admin.list_bridges()) == []
    admin.build_pipeline("upstream").add_model_step(admin.list_models()[0]).create()
    chained = admin.create_source("chained", pipeline=pipeline, from_pipeline="upstream")
    assert (chained.from_pipeline, chained.connection, chained.kind) == ("upstream", "", "source")
    refused(lambda: admin.get_pipeline("upstream").delete(), "FAILED_PRECONDITION", "'chained'")
    chained.delete()
    admin.get_pipeline("upstream").delete()
    admin.create_source("once", connection="ok-db", pipeline=pipeline)
    refused(lambda: admin.create_source("once", connection="ok-db", pipeline=pipeline), "ALREADY_EXISTS")
    # What a bridge uses cannot go from under it: its pipeline, its workspace.
    refused(lambda: admin.get_pipeline(pipeline).delete(), "FAILED_PRECONDITION", "'once'")
    refused(lambda: admin.delete_workspace(admin.workspace), "FAILED_PRECONDITION", "bridges 'once'")
    used = admin.get_connection("ok-db")
    refused(used.delete, "FAILED_PRECONDITION", f"{admin.workspace}/once")
    admin.get_bridge("once").delete()
    used.delete()


def test_only_the_service_token_reads_a_bridges_connection(
    admin: Client, pipeline: str, external_db: str, settings: CommonSettings
) -> None:
    admin.create_connection("svc-db", "postgres", {"url": external_db, "table": "wine_svc"})
    admin.create_sink("svc-sink", pipeline=pipeline, connection="svc-db")
    request = pb.BridgeRequest(workspace=admin.workspace, name="svc-sink")
    with Client(settings=settings, token=SERVICE_TOKEN) as service:
        found = service.call("GetBridgeConnection", request)
        assert found.details["url"] == external_db
        refused(lambda: service.list_bridges(), "PERMISSION_DENIED")
    name, password = f"u-{secrets.token_hex(4)}", secrets.token_urlsafe(16)
    admin.create_user(name, password)
    admin.get_workspace(admin.workspace).add_user(name)
    with Client.login(name, password, settings=settings) as member:
        member.set_current_workspace(admin.workspace)
        assert [b.name for b in member.list_bridges()] == ["svc-sink"]
        refused(lambda: member.call("GetBridgeConnection", request), "PERMISSION_DENIED")
    admin.get_bridge("svc-sink").delete()
