from __future__ import annotations

import logging
import time
import uuid

import pytest
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition

from joey_core.kafka import (
    CommitPolicy,
    ConsumedRecord,
    DeliveryTracker,
    TopicSpec,
    admin_client,
    commit,
    consumer_config,
    ensure_topics,
    next_offsets,
    producer_config,
    usable,
)
from joey_core.records import DEADLINE_HEADER, REQUEST_ID_HEADER
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


class _Error:
    """A consumer error as confluent-kafka reports it on a message (the client has no public way to
    make one): only ``fatal()`` and its text matter to :func:`usable`."""

    def __init__(self, fatal: bool) -> None:
        self._fatal = fatal

    def fatal(self) -> bool:
        return self._fatal

    def __str__(self) -> str:
        return "broker down" if not self._fatal else "fenced"


class _Message:
    def __init__(self, error: _Error | None) -> None:
        self._error = error

    def error(self) -> _Error | None:
        return self._error

    def topic(self) -> str:
        return "t"

    def partition(self) -> int:
        return 0


def test_usable_drops_consumer_errors_and_raises_a_fatal_one() -> None:
    ok, transient = _Message(None), _Message(_Error(fatal=False))
    assert usable([ok, transient, ok], logging.getLogger("test")) == [ok, ok]
    with pytest.raises(KafkaException):
        usable([ok, _Message(_Error(fatal=True))], logging.getLogger("test"))


def test_consumed_records_carry_their_identity_and_headers(settings: CommonSettings) -> None:
    topic = f"test.{uuid.uuid4().hex}"
    ensure_topics(admin_client(settings), [TopicSpec(topic, 1)])
    producer = Producer(producer_config(settings))
    tracker = DeliveryTracker()
    headers = [(REQUEST_ID_HEADER, b"req-1"), (DEADLINE_HEADER, b"12.5")]
    producer.produce(topic, value=b'{"a": 1}', key=b"k", headers=headers, on_delivery=tracker.on_delivery)
    producer.produce(topic, value=b"x", headers=[(DEADLINE_HEADER, b"soon")], on_delivery=tracker.on_delivery)
    tracker.flush(producer)
    consumer = Consumer(consumer_config(settings, f"g.{uuid.uuid4().hex}"))
    consumer.assign([TopicPartition(topic, 0, 0)])
    got: list[ConsumedRecord] = []
    while len(got) < 2:
        got += [ConsumedRecord.of(m) for m in usable(consumer.consume(2, timeout=5), logging.getLogger("t"))]
    consumer.close()
    first, second = got
    assert (first.topic, first.partition, first.offset, first.key) == (topic, 0, 0, b"k")
    assert first.request_id == "req-1" and first.deadline_ms == 12.5
    assert first.value_json == '{"a": 1}' and first.where() == f"{topic}[0]@0"
    assert first.timestamp_ms is not None and abs(first.timestamp_ms / 1000 - time.time()) < 60
    assert second.request_id == f"{topic}/0/1", "a record without a request id is named by its position"
    assert second.deadline_ms is None, "a malformed deadline is no deadline"
    assert next_offsets([second, first]) == [TopicPartition(topic, 0, 2)]


def test_commit_policies(settings: CommonSettings) -> None:
    topic = f"test.{uuid.uuid4().hex}"
    ensure_topics(admin_client(settings), [TopicSpec(topic, 1)])
    group = f"g.{uuid.uuid4().hex}"
    consumer = Consumer(consumer_config(settings, group))
    consumer.assign([TopicPartition(topic, 0, 0)])
    log = logging.getLogger("test")
    assert commit(consumer, [TopicPartition(topic, 0, 3)], CommitPolicy.BEST_EFFORT, log)
    assert consumer.committed([TopicPartition(topic, 0)], timeout=10)[0].offset == 3
    # A partition the broker refuses fails the commit as a whole: best effort says so and goes on;
    # retry-when-rebalancing raises, since this is no rebalance and the loop cannot know what was stored.
    refused = [TopicPartition(topic, 0, 4), TopicPartition(f"missing.{uuid.uuid4().hex}", 0, 1)]
    try:
        assert not commit(consumer, refused, CommitPolicy.BEST_EFFORT, log)
        with pytest.raises(KafkaException):
            commit(consumer, refused, CommitPolicy.RETRY_WHEN_REBALANCING, log)
    finally:
        consumer.close()
