"""A topic of an external Kafka cluster as a source and a sink, with the connection's own client
settings (its bootstrap and security, never the platform's).

Source: every partition of the topic is read, request ids ``<source>/<partition>/<offset>``. The
position checkpointed in Joey's database (per partition, the next offset, saved after the pipeline's
inputs topic acknowledged the records) is what a restart resumes from; the offsets are then committed to
a consumer group of the bridge's own on that cluster (``joey.bridge.<workspace>.<name>.<id>``), for its
tools to show, and are where a source without a saved position starts. A position out of range starts
at the oldest record; one past a partition's end (the topic made again) at its beginning, saying so in the
status. One process runs a source (its lease), so the partitions are assigned rather than subscribed: a
takeover waits for no group session.
Each record's value is forwarded as it is: one that is no JSON object comes back as an error result.

A pipeline source is the same reader over another pipeline's outputs topic on the platform's own cluster
(docs/workloads.md, "Chaining pipelines"): each result's ``out`` values become one input record.

Sink: each result is one record keyed by its request id (JSON: the Postgres sink's columns), from an
idempotent producer, and the platform's offsets are committed after the cluster acknowledged every
record. A replay after a crash produces its records again: a compacted topic, or a reader keeping the
last record per key, holds one per request id.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Producer, TopicPartition

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
from joey_core.connections.base import first_line
from joey_core.connections.kafka import client_config

log = logging.getLogger(__name__)

TIMEOUT_S = 10.0
"""Longest wait for the cluster's metadata or the group's offsets."""
PARTITIONS_REFRESH_S = 30.0
"""How often a source looks for partitions added to its topic."""


@register_source
class KafkaSource(Source):
    type = "kafka"

    def __init__(self, details: Mapping[str, Any], bridge: Bridge) -> None:
        super().__init__(details, bridge)
        self._topic = str(details["topic"])
        # The group only keeps the offsets, on that cluster, for its tools to show: the partitions are
        # assigned, not subscribed, so a takeover after a crash waits out no dead member's session.
        self._consumer = Consumer(
            self._cluster(details)
            | {
                "group.id": bridge.spec.group,
                "client.id": f"{bridge.settings.instance_id}-{bridge.spec.name}",
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "enable.partition.eof": False,
                # A position out of range (retention deleted it, the topic was made again) restarts
                # at the oldest record, not past every record the topic holds.
                "auto.offset.reset": "earliest",
            }
        )
        self._assigned: set[int] = set()
        self._looked = 0.0
        self._restarted: list[str] = []
        """Partitions whose position was past their end, so read again from their beginning."""

    def _cluster(self, details: Mapping[str, Any]) -> dict[str, Any]:
        """The client settings of the cluster the topic is on: the connection's."""
        return client_config(details)

    def _record(self, record: kafka.ConsumedRecord, position: dict[str, int]) -> SourceRecord | None:
        """The input record a consumed one becomes (None: none), forwarded as it is: one that is no
        JSON object comes back as an error result."""
        return SourceRecord(f"{record.partition}/{record.offset}", position, record.value or b"")

    def _assign(self, after: Any) -> None:
        """Assign the topic's partitions not assigned yet (all at first, then any added since): each
        from the saved position, else the group's offset, else its beginning."""
        self._looked = time.monotonic()
        try:
            # Every topic's metadata: asking for one by name may create it on a broker that auto-creates.
            found = self._consumer.list_topics(timeout=TIMEOUT_S).topics.get(self._topic)
            if found is None or found.error is not None:
                raise Unavailable(
                    f"topic {self._topic} is not there: {found.error if found else 'unknown topic'}"
                )
            new = [
                TopicPartition(self._topic, p) for p in sorted(found.partitions) if p not in self._assigned
            ]
            if not new:
                return
            committed = self._consumer.committed(new, timeout=TIMEOUT_S)
        except KafkaException as exc:
            raise Unavailable(f"cannot read topic {self._topic}'s partitions: {exc}") from None
        saved: dict[str, int] = after or {}
        for tp in committed:
            tp.offset = saved.get(str(tp.partition), tp.offset if tp.offset >= 0 else OFFSET_BEGINNING)
            self._past_end(tp)
        self._consumer.incremental_assign(committed)
        self._assigned |= {tp.partition for tp in committed}

    def _past_end(self, tp: TopicPartition) -> None:
        """Start ``tp`` at its beginning when its position is past its end: the topic was deleted and
        made again (or its broker lost it), which an embedded broker never answers with an offset out
        of range. Its records are sent again under the same request ids: an idempotent sink keeps the
        last answer of each."""
        if tp.offset < 0:
            return
        try:
            _, high = self._consumer.get_watermark_offsets(tp, timeout=TIMEOUT_S, cached=False)
        except KafkaException as exc:
            raise Unavailable(f"cannot read topic {self._topic}'s partitions: {exc}") from None
        if tp.offset <= high or tp.offset <= (end := self._end(tp.partition, high)):
            return
        said = (
            f"partition {tp.partition} of {self._topic} ends at offset {end}, before the position {tp.offset}"
        )
        log.warning(
            "source %s: %s: the topic was made again; read from its beginning", self.bridge.spec.key, said
        )
        self._restarted.append(f"{said}: read again from its beginning")
        tp.offset = OFFSET_BEGINNING

    def _end(self, partition: int, high: int) -> int:
        """One past the partition's last record. Not its high watermark alone: the embedded broker's is
        one past the first record of its last batch, so that batch is read through, to its end."""
        if high <= 0:
            return 0
        reader = Consumer(
            self._cluster(self.details)
            | {"group.id": self.bridge.spec.group, "enable.auto.commit": False, "enable.partition.eof": True}
        )
        try:
            reader.assign([TopicPartition(self._topic, partition, high - 1)])
            end, deadline = high, time.monotonic() + TIMEOUT_S
            while time.monotonic() < deadline:
                for message in reader.consume(100, self.bridge.settings.poll_interval_s):
                    err = message.error()
                    if err is None:
                        end = max(end, (message.offset() or 0) + 1)
                    elif err.code() == KafkaError._PARTITION_EOF:  # noqa: SLF001 (librdkafka's public code)
                        return end
                    else:
                        raise Unavailable(f"cannot read partition {partition} of {self._topic}: {err}")
        finally:
            reader.close()
        raise Unavailable(f"cannot tell where partition {partition} of {self._topic} ends: no answer")

    def warning(self) -> str:
        return "; ".join(self._restarted)

    def read(self, after: Any, limit: int) -> list[SourceRecord]:
        if not self._assigned or time.monotonic() - self._looked >= PARTITIONS_REFRESH_S:
            self._assign(after)
        try:
            messages = self._consumer.consume(limit, self.bridge.settings.poll_interval_s)
        except KafkaException as exc:
            raise Unavailable(f"cannot consume {self._topic}: {exc}") from None
        # Every record of the batch carries the batch's final position: the one checkpointed after it.
        position: dict[str, int] = dict(after or {})
        found = []
        for message in kafka.usable(messages, log):
            record = kafka.ConsumedRecord.of(message)
            position[str(record.partition)] = record.offset + 1
            if (source_record := self._record(record, position)) is not None:
                found.append(source_record)
        return found

    def acknowledged(self, position: Any) -> None:
        offsets = [TopicPartition(self._topic, int(p), o) for p, o in position.items()]
        # Refused: only the group's view lags; the saved position is what a restart resumes from.
        kafka.commit(self._consumer, offsets, kafka.CommitPolicy.BEST_EFFORT, log)

    def lag(self, after: Any) -> int:
        if not self._assigned:
            return -1
        try:
            behind = 0
            for tp in self._consumer.position(self._consumer.assignment()):
                low, high = self._consumer.get_watermark_offsets(tp, cached=True)
                behind += max(0, high - (tp.offset if tp.offset >= 0 else low))
            return behind
        except KafkaException:
            return -1

    def close(self) -> None:
        self._consumer.close()


@register_source
class PipelineSource(KafkaSource):
    """Another pipeline's results into this source's pipeline: a result's ``out`` values (output name ->
    value) are the input record, with request id ``<source>/<the result's request id>``, so a result the
    first pipeline answered twice (it answers at least once) is one request of the second. Outputs a
    split or shadow step adds (names starting with ``_``) stay behind; a result that is not a JSON object
    with ``out`` (never written by an engine) is skipped, with a warning."""

    type = "pipeline"

    def _cluster(self, details: Mapping[str, Any]) -> dict[str, Any]:
        return kafka.client_config(self.bridge.settings)

    def _record(self, record: kafka.ConsumedRecord, position: dict[str, int]) -> SourceRecord | None:
        try:
            result = json.loads(record.value or b"")
            request_id, out = str(result["request_id"]), result["out"]
            if not isinstance(out, dict):
                raise TypeError("out is not an object")
        except (ValueError, KeyError, TypeError) as exc:
            log.warning(
                "source %s: skipped the record at %s/%d offset %d of %s: %s",
                self.bridge.spec.key,
                record.topic,
                record.partition,
                record.offset,
                self._topic,
                first_line(exc),
            )
            return None
        inputs = {name: value for name, value in out.items() if not name.startswith("_")}
        return SourceRecord(request_id, position, json.dumps(inputs).encode())


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
                raise Refused(
                    f"topic {self._topic} refused {len(exc.errors)} records: {exc}", len(exc.errors)
                ) from None
            raise Unavailable(f"topic {self._topic} did not acknowledge the results: {exc}") from None
        except (TimeoutError, BufferError) as exc:
            raise Unavailable(f"topic {self._topic} did not acknowledge the results: {exc}") from None

    def close(self) -> None:
        if self._producer is not None:
            self._producer.flush(self.bridge.settings.delivery_timeout_s)
