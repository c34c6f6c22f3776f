"""The Kafka source and sink against the session's broker, without the rest of the stack: what the
end-to-end test cannot cheaply show (a record the cluster refuses for good among ones it takes)."""

from __future__ import annotations

import uuid

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from joey_cli.broker import EmbeddedBroker
from joey_connector_bridge.connectors import Bridge, Refused, ResultRow
from joey_connector_bridge.kafka_topic import KafkaSink
from joey_connector_bridge.settings import BridgeSettings
from joey_core.bridges import BridgeSpec
from joey_core.kafka import DEFAULT_MESSAGE_MAX_BYTES, TopicSpec, admin_client, ensure_topics
from joey_core.settings import CommonSettings
from tests.conftest import wait_until

BRIDGE = Bridge(
    BridgeSpec(7, "ws", "ext", "sink", "p", "c", "outputs"),
    BridgeSettings(delivery_timeout_s=10, poll_interval_s=0.1),
)


def new_topic(broker: EmbeddedBroker) -> str:
    name = f"test.ext.{uuid.uuid4().hex[:8]}"
    ensure_topics(admin_client(CommonSettings(kafka_bootstrap=broker.bootstrap)), [TopicSpec(name, 1)])
    return name


def keys_in(broker: EmbeddedBroker, topic: str, count: int) -> list[str]:
    consumer = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": uuid.uuid4().hex})
    consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
    found: list[str] = []
    try:
        wait_until(
            lambda: (
                found.extend(m.key().decode() for m in consumer.consume(10, 0.2) if not m.error())
                or len(found) >= count
            ),
            timeout=20,
            what=f"{count} records in {topic}",
        )
    finally:
        consumer.close()
    return found


def test_a_kafka_sink_counts_only_the_records_the_cluster_refused(broker: EmbeddedBroker) -> None:
    topic = new_topic(broker)
    sink = KafkaSink({"bootstrap": broker.bootstrap, "topic": topic}, BRIDGE)
    rows = [
        ResultRow(
            f"ext/{i}",
            None,
            None,
            {"blob": "x" * (DEFAULT_MESSAGE_MAX_BYTES if i == 1 else 1)},
            None,
            1,
            "t",
            0,
            i,
        )
        for i in range(3)
    ]
    try:
        with pytest.raises(Refused, match="refused 1 records") as refused:
            sink.write(rows)
        assert refused.value.rows == 1, "the two others were delivered"
        assert sorted(keys_in(broker, topic, 2)) == ["ext/0", "ext/2"]
    finally:
        sink.close()
