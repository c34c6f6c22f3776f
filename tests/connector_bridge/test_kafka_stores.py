"""The Kafka source and sink against the session's broker, without the rest of the stack: what the
end-to-end test cannot cheaply show: a record the cluster refuses for good among ones it takes, and a
source whose saved position is past its topic's end (the topic made again)."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from joey_cli.broker import EmbeddedBroker
from joey_connector_bridge.connectors import Bridge, Refused, ResultRow
from joey_connector_bridge.kafka_topic import KafkaSink, KafkaSource
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


def read_keys(source: KafkaSource, after: Any, count: int) -> list[str]:
    found: list[str] = []
    wait_until(
        lambda: found.extend(r.key for r in source.read(after, 10)) or len(found) >= count,
        timeout=20,
        what=f"{count} records",
    )
    return found


def test_a_kafka_source_past_its_topics_end_reads_it_again_from_its_beginning_saying_so(
    broker: EmbeddedBroker,
) -> None:
    """A saved position past the partition's end (the topic deleted and made again, which the embedded
    broker never answers with an offset out of range) starts the partition at its beginning, and the
    status says so; a position at its end is kept, though past the embedded broker's high watermark
    (one past its last batch's first record: the three records are one batch)."""
    topic = new_topic(broker)
    producer = Producer({"bootstrap.servers": broker.bootstrap})
    for i in range(3):
        producer.produce(topic, f'{{"x": {i}}}'.encode())
    producer.flush(10)
    details = {"bootstrap": broker.bootstrap, "topic": topic}
    within = KafkaSource(details, BRIDGE)
    past = KafkaSource(details, BRIDGE)
    try:
        assert within.read({"0": 3}, 10) == [] and within.warning() == ""
        producer.produce(topic, b'{"x": 3}')
        producer.flush(10)
        assert read_keys(within, {"0": 3}, 1) == ["0/3"]
        assert read_keys(past, {"0": 50}, 4) == ["0/0", "0/1", "0/2", "0/3"]
        assert "partition 0" in past.warning() and "offset 4, before the position 50" in past.warning()
    finally:
        within.close()
        past.close()
