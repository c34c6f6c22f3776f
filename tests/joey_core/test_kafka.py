from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any

import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from pydantic import ValidationError

from joey_core import kafka, records
from joey_core.kafka import (
    CommitPolicy,
    ConsumedRecord,
    DeliveryTracker,
    TopicSpec,
    admin_client,
    client_config,
    commit,
    consumer_config,
    ensure_topics,
    next_offsets,
    producer_config,
    usable,
)
from joey_core.records import DEADLINE_HEADER, REQUEST_ID_HEADER
from joey_core.settings import CommonSettings
from tests.conftest import free_port


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


SCRAM = {
    "kafka_bootstrap": "kafka-1.example.com:9093",
    "kafka_security_protocol": "SASL_SSL",
    "kafka_sasl_mechanism": "SCRAM-SHA-512",
    "kafka_sasl_username": "joey",
    "kafka_sasl_password": "s3cret-sasl",
    "kafka_ssl_ca_location": "/etc/ssl/kafka-ca.pem",
    "kafka_config": {"ssl.endpoint.identification.algorithm": "https", "linger.ms": 7},
}
SECURITY = {
    "bootstrap.servers": "kafka-1.example.com:9093",
    "security.protocol": "SASL_SSL",
    "sasl.mechanism": "SCRAM-SHA-512",
    "sasl.username": "joey",
    "sasl.password": "s3cret-sasl",
    "ssl.ca.location": "/etc/ssl/kafka-ca.pem",
    "ssl.endpoint.identification.algorithm": "https",
}


def test_every_client_config_carries_the_security_settings() -> None:
    settings = CommonSettings(**SCRAM)  # type: ignore[arg-type]
    configs = {
        "consumer": consumer_config(settings, "g"),
        "producer": producer_config(settings),
        "client": client_config(settings),
    }
    for built in configs.values():
        assert built.items() >= SECURITY.items()
    # JOEY_KAFKA_CONFIG tunes Joey's defaults; a caller's own settings win over both.
    assert configs["producer"]["linger.ms"] == 7
    assert producer_config(settings, **{"linger.ms": 0})["linger.ms"] == 0
    assert configs["consumer"]["group.id"] == "g" and configs["consumer"]["enable.auto.commit"] is False


def test_the_kafka_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in SCRAM.items():
        monkeypatch.setenv(f"JOEY_{name.upper()}", json.dumps(value) if isinstance(value, dict) else value)
    assert client_config(CommonSettings()).items() >= (SECURITY | {"linger.ms": 7}).items()


def test_plaintext_by_default() -> None:
    config = producer_config(CommonSettings(kafka_bootstrap="b:9092"))
    assert not [key for key in config if key.startswith(("security.", "sasl.", "ssl."))]


@pytest.mark.parametrize(
    ("settings", "error"),
    [
        (
            {"kafka_security_protocol": "SASL_SSL"},
            "JOEY_KAFKA_SECURITY_PROTOCOL=SASL_SSL needs JOEY_KAFKA_SASL_MECHANISM",
        ),
        (
            {"kafka_sasl_mechanism": "PLAIN", "kafka_sasl_username": "u", "kafka_sasl_password": "p"},
            "JOEY_KAFKA_SASL_MECHANISM, JOEY_KAFKA_SASL_USERNAME, JOEY_KAFKA_SASL_PASSWORD set, but "
            "JOEY_KAFKA_SECURITY_PROTOCOL is PLAINTEXT",
        ),
        (
            {"kafka_security_protocol": "SASL_SSL", "kafka_sasl_mechanism": "SCRAM-SHA-256"},
            "JOEY_KAFKA_SASL_MECHANISM=SCRAM-SHA-256 needs JOEY_KAFKA_SASL_USERNAME and "
            "JOEY_KAFKA_SASL_PASSWORD",
        ),
        (
            {
                "kafka_security_protocol": "SASL_PLAINTEXT",
                "kafka_sasl_mechanism": "GSSAPI",
                "kafka_ssl_ca_location": "/ca.pem",
            },
            "JOEY_KAFKA_SSL_CA_LOCATION set, but JOEY_KAFKA_SECURITY_PROTOCOL is SASL_PLAINTEXT",
        ),
        ({"kafka_security_protocol": "TLS"}, "kafka_security_protocol"),
        (
            {"kafka_config": {"sasl.password": "p"}},
            "JOEY_KAFKA_CONFIG sets 'sasl.password': set JOEY_KAFKA_SASL_PASSWORD",
        ),
        (
            {"kafka_config": {"enable.auto.commit": True}},
            "JOEY_KAFKA_CONFIG sets 'enable.auto.commit': Joey sets it",
        ),
    ],
)
def test_an_invalid_combination_is_a_clear_settings_error(settings: dict[str, Any], error: str) -> None:
    with pytest.raises(ValidationError) as refused:
        CommonSettings(**settings)
    assert error in str(refused.value)
    # The error never quotes what was given: a password beside the refused setting stays out of it.
    assert "input_value" not in str(refused.value)


def test_the_record_limit_follows_the_producers_message_max_bytes() -> None:
    assert (
        kafka.max_record_bytes(CommonSettings())
        == kafka.DEFAULT_MESSAGE_MAX_BYTES - kafka.RECORD_OVERHEAD_BYTES
    )
    tuned = CommonSettings(kafka_config={"message.max.bytes": 20_000})
    assert kafka.max_record_bytes(tuned) == 20_000 - kafka.RECORD_OVERHEAD_BYTES
    assert kafka.record_size(b"k", b"value", [("request-id", b"r-1"), ("empty", None)]) == 1 + 5 + 13 + 5


def test_a_failed_flush_raises_and_leaves_nothing_queued_to_be_delivered_later() -> None:
    unreachable = CommonSettings(kafka_bootstrap=f"127.0.0.1:{free_port()}")
    producer = Producer(producer_config(unreachable))
    tracker = DeliveryTracker()
    tracker.produce(producer, "t", b"v", b"k")
    with pytest.raises(TimeoutError, match="^1 records not acknowledged"):
        tracker.flush(producer, timeout=0.5)
    assert len(producer) == 0, "purged: a later flush cannot deliver the failed batch's records"
    expiring = Producer(producer_config(unreachable, **{"message.timeout.ms": 200}))
    tracker.produce(expiring, "t", b"v", b"k")
    with pytest.raises(KafkaException):
        tracker.flush(expiring, timeout=10)
    assert tracker.errors == [], "its reports do not count against the next batch"


def test_a_consumed_request_id_is_bounded_and_its_problem_kept() -> None:
    huge = ConsumedRecord("t", 0, 5, None, b"{}", [(REQUEST_ID_HEADER, b"r" * 5000)])
    assert (huge.request_id, huge.request_id_problem) == records.parse_request_id(b"r" * 5000)
    assert huge.request_id_problem is not None
    assert ConsumedRecord("t", 0, 5, None, b"{}", [(REQUEST_ID_HEADER, b"ok")]).request_id_problem is None


def test_a_delivery_error_names_each_failed_record_and_tells_refused_from_transient() -> None:
    unreachable = CommonSettings(kafka_bootstrap=f"127.0.0.1:{free_port()}")
    expiring = Producer(producer_config(unreachable, **{"message.timeout.ms": 200}))
    tracker = DeliveryTracker()
    tracker.produce(expiring, "t", b"a", tag=0)
    tracker.produce(expiring, "t", b"b", tag=1)
    with pytest.raises(kafka.DeliveryError) as raised:
        tracker.flush(expiring, timeout=10)
    assert sorted(tag for tag, _ in raised.value.errors) == [0, 1]
    assert raised.value.refused() is None, "a timed-out record may pass when sent again"
    assert not raised.value.fatal
    # Built as delivery reports build them: neither fatal nor retriable, whatever the code.
    too_large = KafkaError(KafkaError.MSG_SIZE_TOO_LARGE)
    refused = kafka.DeliveryError([(3, too_large), (5, KafkaError(KafkaError.INVALID_RECORD))])
    assert refused.refused() == {3, 5}
    assert not refused.fatal
    mixed = kafka.DeliveryError([(3, too_large), (4, KafkaError(KafkaError._MSG_TIMED_OUT))])  # noqa: SLF001
    assert mixed.refused() is None
    for passing in (
        KafkaError.UNKNOWN_TOPIC_OR_PART,
        KafkaError._UNKNOWN_TOPIC,  # noqa: SLF001
        KafkaError.NOT_ENOUGH_REPLICAS,
        KafkaError.LEADER_NOT_AVAILABLE,
        KafkaError.KAFKA_STORAGE_ERROR,
        KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER,
        KafkaError.TOPIC_AUTHORIZATION_FAILED,  # an ACL granted later mends it
    ):
        may_pass = kafka.DeliveryError([(2, KafkaError(passing))])
        assert may_pass.refused() is None, f"{KafkaError(passing)} may pass when sent again"
        assert not may_pass.fatal
    fatal = kafka.DeliveryError([(1, KafkaError(KafkaError._FATAL))])  # noqa: SLF001
    assert not KafkaError(KafkaError._FATAL).fatal(), "as in a delivery report"  # noqa: SLF001
    assert fatal.fatal
    assert fatal.refused() is None
    fenced = kafka.DeliveryError([(1, KafkaError(KafkaError.PRODUCER_FENCED))])
    assert fenced.fatal, "a fenced producer fails every later record: it must be replaced"


def test_a_record_produce_refuses_at_once_is_reported_by_flush_with_its_tag(settings: CommonSettings) -> None:
    topic = f"test.{uuid.uuid4().hex}"
    ensure_topics(admin_client(settings), [TopicSpec(topic, 1)])
    producer = Producer(producer_config(settings, **{"message.max.bytes": 2000}))
    tracker = DeliveryTracker()
    tracker.produce(producer, topic, b"x" * 5000, tag=7)
    tracker.produce(producer, topic, b"small", tag=8)
    with pytest.raises(kafka.DeliveryError) as raised:
        tracker.flush(producer)
    assert [(tag, err.code()) for tag, err in raised.value.errors] == [(7, KafkaError.MSG_SIZE_TOO_LARGE)]
    assert raised.value.refused() == {7}, "refused for good, like a delivery report saying so"
    assert not raised.value.fatal
