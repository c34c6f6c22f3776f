"""Replies of a pipeline: the records its replicas write to the outputs and errors topics, read
back by request id.

Shared by every synchronous caller (the SDK's ``pipeline.infer`` and the gateway): a reader built by
:func:`reply_consumer` joins no consumer group, so no rebalance of the engine's group can take a
partition away from it.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from confluent_kafka import TIMESTAMP_NOT_AVAILABLE, Consumer, Message, TopicPartition

from joey_core.kafka import client_config
from joey_core.settings import CommonSettings
from joey_core.topics import PipelineTopics


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
    return failed_reply(request_id, f"reply on {topic} {problem}", _written_at(message))


def failed_reply(request_id: str, error: str, time: str) -> Reply:
    """A failed reply shaped like an error record, for a row that failed on the caller's side."""
    return Reply(request_id, False, {"time": time, "request_id": request_id, "error": error})


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
        client_config(
            settings,
            **{
                # Assign-only reader: the group id is never joined and nothing is committed.
                "group.id": f"joey.client.{uuid.uuid4().hex}",
                "enable.auto.commit": False,
                "fetch.wait.max.ms": 10,
            },
        )
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
