"""A topic of an external Kafka cluster as a source and a sink, with the connection's own client
settings (its bootstrap and security, never the platform's).

Source: the topic is consumed in a consumer group of the bridge's own on that cluster; request ids are
``<source>/<partition>/<offset>``. The position checkpointed in Joey's database (per partition, the
next offset, saved after the pipeline's inputs topic acknowledged the records) is what counts: the
group's offsets are committed after it, so a restart resumes from them, and a record below the saved
position (acknowledged, then a crash before the commit) is not sent again. Each record's value is
forwarded as it is: one that is no JSON object comes back as an error result of the pipeline.

Sink: each result is one record keyed by its request id (JSON: the Postgres sink's columns), from an
idempotent producer, and the platform's offsets are committed after the cluster acknowledged every
record. A replay after a crash produces its records again: a compacted topic, or a reader keeping the
last record per key, holds one per request id.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition

from joey_connector_bridge.connectors import (
    Bridge,
    Refused,
    ResultRow,
    Sink,
    Source,
    SourceRecord,
    Unavailable,
    register_sink,
    register_source,
)
from joey_core import kafka
from joey_core.connections.kafka import client_config

log = logging.getLogger(__name__)


@register_source
class KafkaSource(Source):
    type = "kafka"

    def __init__(self, details: Mapping[str, Any], bridge: Bridge) -> None:
        super().__init__(details, bridge)
        self._topic = str(details["topic"])
        self._consumer = Consumer(
            client_config(details)
            | {
                "group.id": bridge.spec.group,
                "client.id": f"{bridge.settings.instance_id}-{bridge.spec.name}",
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "auto.offset.reset": "earliest",
                "enable.partition.eof": False,
            }
        )
        self._consumer.subscribe([self._topic])

    def read(self, after: Any, limit: int) -> list[SourceRecord]:
        try:
            messages = self._consumer.consume(limit, self.bridge.settings.poll_interval_s)
        except KafkaException as exc:
            raise Unavailable(f"cannot consume {self._topic}: {exc}") from None
        # Every record of the batch carries the batch's final position: the one checkpointed after it.
        position: dict[str, int] = dict(after or {})
        found = []
        for message in kafka.usable(messages, log):
            record = kafka.ConsumedRecord.of(message)
            partition, offset = str(record.partition), record.offset
            if offset < position.get(partition, 0):
                continue  # acknowledged before a restart that came before the group's commit
            position[partition] = offset + 1
            found.append(SourceRecord(f"{partition}/{offset}", position, record.value or b""))
        return found

    def acknowledged(self, position: Any) -> None:
        offsets = [TopicPartition(self._topic, int(p), o) for p, o in position.items()]
        # Refused (a rebalance): the saved position keeps the records from being sent twice.
        kafka.commit(self._consumer, offsets, kafka.CommitPolicy.BEST_EFFORT, log)

    def lag(self, after: Any) -> int:
        try:
            assigned = self._consumer.assignment()
            if not assigned:
                return -1
            behind = 0
            for tp in self._consumer.position(assigned):
                low, high = self._consumer.get_watermark_offsets(tp, cached=True)
                start = tp.offset if tp.offset >= 0 else low
                behind += max(0, high - max(start, (after or {}).get(str(tp.partition), 0)))
            return behind
        except KafkaException:
            return -1

    def close(self) -> None:
        self._consumer.close()


@register_sink
class KafkaSink(Sink):
    type = "kafka"

    def __init__(self, details: Mapping[str, Any], bridge: Bridge) -> None:
        super().__init__(details, bridge)
        self._topic = str(details["topic"])
        self._producer: Producer | None = None

    def _produce_to(self) -> Producer:
        if self._producer is None:
            self._producer = Producer(
                client_config(self.details) | {"enable.idempotence": True, "acks": "all", "linger.ms": 5}
            )
        return self._producer

    def write(self, rows: Sequence[ResultRow]) -> None:
        producer = self._produce_to()
        tracker = kafka.DeliveryTracker()
        timeout = self.bridge.settings.delivery_timeout_s
        try:
            for row in rows:
                value = json.dumps(row.columns()).encode()
                tracker.produce(producer, self._topic, value, row.request_id.encode(), timeout=timeout)
            tracker.flush(producer, timeout)
        except kafka.DeliveryError as exc:
            if exc.fatal:
                self._producer = None  # it can deliver nothing more: a new one for the retry
            elif exc.refused() is not None:
                raise Refused(f"topic {self._topic} refused {len(exc.errors)} records: {exc}") from None
            raise Unavailable(f"topic {self._topic} did not acknowledge the results: {exc}") from None
        except (TimeoutError, BufferError) as exc:
            raise Unavailable(f"topic {self._topic} did not acknowledge the results: {exc}") from None

    def close(self) -> None:
        if self._producer is not None:
            self._producer.flush(self.bridge.settings.delivery_timeout_s)
