"""Client side of the streaming path: send records to a pipeline's input topic and collect
the matching outputs and errors by request id.

Reply positions are taken before anything is produced, so no reply can be missed. The
embedded broker under-reports high-watermarks, which only means some older replies are
read and skipped here; on real Kafka the positions are exact.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from confluent_kafka import TIMESTAMP_NOT_AVAILABLE, Consumer, Message, Producer, TopicPartition

from joey.kafka import DeliveryTracker, producer_config
from joey.records import REQUEST_ID_HEADER, dumps, header_value
from joey.settings import CommonSettings
from joey.topics import PipelineTopics

Progress = Callable[[int, int], None]
"""Called with (answered, total) as replies arrive."""


class InferenceTimeout(TimeoutError):
    def __init__(self, answered: int, total: int, timeout: float) -> None:
        super().__init__(
            f"{answered} of {total} records answered within {timeout:.0f}s; "
            "is the pipeline deployed and ready? (check `joey pipeline status`)"
        )
        self.answered = answered
        self.total = total


@dataclass
class Reply:
    request_id: str
    ok: bool
    body: dict[str, Any]


def decode_reply(message: Message, request_id: str, outputs_topic: str) -> Reply:
    """The reply a record of a pipeline's outputs or errors topic carries.

    A value that is not a JSON object becomes a failed reply naming the problem, shaped like an error
    record, so that only its own row fails rather than the whole call waiting for it.
    """
    topic = message.topic()
    try:
        body = json.loads(message.value() or b"{}")
    except ValueError as exc:  # undecodable bytes too: UnicodeDecodeError is a ValueError
        problem = f"is not valid JSON: {exc}"
    else:
        if isinstance(body, dict):
            return Reply(request_id, topic == outputs_topic, body)
        problem = f"is not a JSON object but {type(body).__name__}"
    return Reply(
        request_id,
        False,
        {"time": _written_at(message), "request_id": request_id, "error": f"reply on {topic} {problem}"},
    )


def _written_at(message: Message) -> str:
    """When the record was written: error records carry a time, and the SDK's result frames need one."""
    kind, ms = message.timestamp()
    at = datetime.now(UTC) if kind == TIMESTAMP_NOT_AVAILABLE else datetime.fromtimestamp(ms / 1000, UTC)
    return at.isoformat(timespec="microseconds")


def reply_consumer(settings: CommonSettings, topics: PipelineTopics) -> Consumer:
    """An assign-only reader of a pipeline's outputs and errors topics, positioned at their ends.

    It joins no group, so no rebalance can take a partition away from it; every reply
    produced after this returns is read.
    """
    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka_bootstrap,
            # Assign-only reader: the group id is never joined and nothing is committed.
            "group.id": f"joey.client.{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "fetch.wait.max.ms": 10,
        }
    )
    assignments = []
    metadata = consumer.list_topics(timeout=10)
    for topic in (topics.outputs, topics.errors):
        if topic not in metadata.topics:
            consumer.close()
            raise LookupError(f"topic {topic} does not exist: deploy the pipeline first")
        for partition in metadata.topics[topic].partitions:
            _, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)
            assignments.append(TopicPartition(topic, partition, high))
    consumer.assign(assignments)
    return consumer


class PipelineStream:
    """Produces records to one pipeline's inputs topic and waits for their replies."""

    def __init__(self, settings: CommonSettings, topics: PipelineTopics) -> None:
        self._settings = settings
        self._topics = topics

    def infer(
        self, rows: Sequence[dict[str, Any] | bytes], timeout: float = 60.0, progress: Progress | None = None
    ) -> list[Reply]:
        """Send ``rows`` (one input record each; bytes are sent as they are); return replies in order."""
        request_ids = [uuid.uuid4().hex for _ in rows]
        pending = set(request_ids)
        replies: dict[str, Reply] = {}
        consumer = reply_consumer(self._settings, self._topics)
        try:
            producer = Producer(producer_config(self._settings))
            tracker = DeliveryTracker()
            for request_id, row in zip(request_ids, rows, strict=True):
                producer.produce(
                    self._topics.inputs,
                    value=row if isinstance(row, bytes) else dumps(row),
                    key=request_id.encode(),
                    headers=[(REQUEST_ID_HEADER, request_id.encode())],
                    on_delivery=tracker.on_delivery,
                )
                producer.poll(0)
            tracker.flush(producer, timeout)
            deadline = time.monotonic() + timeout
            while pending:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise InferenceTimeout(len(replies), len(rows), timeout)
                for message in consumer.consume(num_messages=1000, timeout=min(remaining, 0.5)):
                    if message.error():
                        continue
                    reply_id = header_value(message.headers(), REQUEST_ID_HEADER)  # type: ignore[arg-type]
                    if reply_id is None or reply_id not in pending:
                        continue
                    pending.discard(reply_id)
                    replies[reply_id] = decode_reply(message, reply_id, self._topics.outputs)
                if progress:
                    progress(len(replies), len(rows))
        finally:
            consumer.close()
        return [replies[request_id] for request_id in request_ids]
