"""Helpers of the logger tests: log records, producing them, reading rows and dead letters."""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

import psycopg
import redis
from confluent_kafka import OFFSET_BEGINNING, Consumer, Message, Producer, TopicPartition

from joey_core import heartbeats, topics
from joey_core.kafka import DeliveryTracker, admin_client, consumer_config, producer_config, topic_partitions
from joey_core.records import (
    CONTENT_TYPE_HEADER,
    LOG_BATCH_CONTENT_TYPE,
    LOG_CONTENT_TYPE,
    encode_log,
    encode_log_batch,
)
from joey_core.settings import CommonSettings
from joey_logger.service import SERVICE, LoggerService
from joey_logger.settings import LoggerSettings
from joey_logger.sink import create_sink


def log_record(pipeline: str, i: int, **fields: Any) -> dict[str, Any]:
    """The i-th inference log of a pipeline; distinct i give distinct identities."""
    record: dict[str, Any] = {
        "workspace": "default",
        "pipeline": pipeline,
        "pipeline_version": 1,
        "deployment_id": "dep-1",
        "request_id": f"req-{i}",
        "record_key": f"key-{i}".encode(),
        "time": datetime.now(UTC),
        "input_topic": f"joey.default.{pipeline}.inputs",
        "input_partition": i % 3,
        "input_offset": i,
        "ok": True,
        "error": None,
        "inputs": f'{{"features": [{i}, 1.5, 2.5, 3.5]}}',
        "raw_input": None,
        "outputs": '{"label": [1]}',
        "shadow_outputs": None,
        "check_failures": [],
        "models": [{"name": "iris", "version": 1, "sha256": "ab" * 32}],
        "elapsed_ns": [1200],
    }
    return record | fields


def count_rows(database_url: str, pipeline: str) -> tuple[int, int]:
    """(rows, distinct identities) of the pipeline."""
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT count(*), count(DISTINCT (workspace, request_id, input_partition, input_offset))"
            " FROM inference_logs WHERE pipeline = %s",
            (pipeline,),
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


class LogProducer:
    """Produces to joey.logs round-robin over its partitions; every call is flushed and delivery-checked."""

    def __init__(self, settings: CommonSettings) -> None:
        self.producer = Producer(producer_config(settings))
        self.partitions = topic_partitions(admin_client(settings), [topics.LOGS])[topics.LOGS]

    def values(self, values: Iterable[bytes], content_type: str = LOG_CONTENT_TYPE) -> None:
        tracker = DeliveryTracker()
        for i, value in enumerate(values):
            self.producer.produce(
                topics.LOGS,
                value=value,
                partition=i % self.partitions,
                headers=[(CONTENT_TYPE_HEADER, content_type.encode())],
                on_delivery=tracker.on_delivery,
            )
            self.producer.poll(0)
        tracker.flush(self.producer)

    def records(self, records: Iterable[dict[str, Any]]) -> None:
        """One old-format record (joey.v1.InferenceLog) per log."""
        self.values(encode_log(r) for r in records)

    def batches(self, records: Sequence[dict[str, Any]], size: int) -> None:
        """Batch records (joey.v1.InferenceLogBatch) of ``size`` logs each, as the engine writes them."""
        self.values(
            (encode_log_batch(records[i : i + size]) for i in range(0, len(records), size)),
            content_type=LOG_BATCH_CONTENT_TYPE,
        )


def read_dead_letters(settings: CommonSettings, wanted: set[bytes], timeout: float) -> dict[bytes, Message]:
    """The dead-letter records whose value is in ``wanted``, read from the start of the topic."""
    consumer = Consumer(consumer_config(settings, f"logtest-dlq-{secrets.token_hex(4)}"))
    consumer.assign([TopicPartition(topics.LOGS_DEAD_LETTER, 0, OFFSET_BEGINNING)])
    found: dict[bytes, Message] = {}
    deadline = time.monotonic() + timeout
    try:
        while set(found) != wanted:
            if time.monotonic() > deadline:
                raise TimeoutError(f"dead letters not found after {timeout:.0f}s: {wanted - set(found)}")
            for message in consumer.consume(500, 0.5):
                value = message.value()
                if message.error() is None and value in wanted:
                    found[value] = message
    finally:
        consumer.close()
    return found


def is_live(settings: LoggerSettings) -> bool:
    client = redis.Redis.from_url(settings.redis_url.get_secret_value())
    return settings.instance_id in heartbeats.live_services(client, settings.redis_prefix, SERVICE)


class InProcessLogger:
    """A LoggerService on a thread, stopped through its event like `serve()` does on SIGTERM."""

    def __init__(self, settings: LoggerSettings) -> None:
        self.settings = settings
        self.stop_event = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=f"logger-{settings.instance_id}", daemon=True)

    def _run(self) -> None:
        try:
            LoggerService(self.settings, create_sink(self.settings)).run(self.stop_event)
        except BaseException as exc:
            self.error = exc

    def start(self) -> InProcessLogger:
        self.thread.start()
        return self

    def alive(self) -> bool:
        return self.thread.is_alive()

    def stop(self, timeout: float = 30.0) -> None:
        self.stop_event.set()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"logger did not stop within {timeout:.0f}s"
        assert self.error is None, f"logger failed: {self.error!r}"
