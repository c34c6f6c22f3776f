from __future__ import annotations

import uuid

from confluent_kafka import Consumer, Producer, TopicPartition

from joey_core.kafka import (
    DeliveryTracker,
    TopicSpec,
    admin_client,
    consumer_config,
    ensure_topics,
    producer_config,
)
from joey_core.settings import CommonSettings


def test_ensure_topics_creates_once_with_the_requested_partitions(settings: CommonSettings) -> None:
    name = f"test.{uuid.uuid4().hex}"
    admin = admin_client(settings)
    assert ensure_topics(admin, [TopicSpec(name, 3)]) == {name: 3}
    assert ensure_topics(admin, [TopicSpec(name, 3)]) == {name: 3}


def test_delivery_tracker_flushes_and_commit_is_visible_to_the_next_member(settings: CommonSettings) -> None:
    topic = f"test.{uuid.uuid4().hex}"
    ensure_topics(admin_client(settings), [TopicSpec(topic, 1)])
    producer = Producer(producer_config(settings))
    tracker = DeliveryTracker()
    for i in range(10):
        producer.produce(topic, value=str(i).encode(), on_delivery=tracker.on_delivery)
    tracker.flush(producer)

    group = f"g.{uuid.uuid4().hex}"
    first = Consumer(consumer_config(settings, group))
    first.assign([TopicPartition(topic, 0, 0)])
    got = []
    while len(got) < 4:
        got += [m for m in first.consume(4 - len(got), timeout=5) if not m.error()]
    first.commit(offsets=[TopicPartition(topic, 0, got[-1].offset() + 1)], asynchronous=False)
    first.close()

    second = Consumer(consumer_config(settings, group))
    committed = second.committed([TopicPartition(topic, 0)], timeout=10)
    second.close()
    assert committed[0].offset == 4
