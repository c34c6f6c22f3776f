"""Replies of a pipeline: the records its replicas write to the outputs and errors topics, read
back by request id.

Shared by every synchronous caller (the SDK's ``pipeline.infer`` and the gateway): a reader built by
:func:`reply_consumer` joins no consumer group, so no rebalance of the engine's group can take a
partition away from it. :class:`ReplyReader` keeps one such reader of a pipeline running in a thread of
its own and hands each reply to the :class:`Call` waiting for its request id.

Commit policy: none. A reply reader joins no group and never commits; a new one starts at the ends.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from confluent_kafka import TIMESTAMP_NOT_AVAILABLE, Consumer, Message, TopicPartition

from joey_core import kafka
from joey_core.kafka import client_config
from joey_core.records import REQUEST_ID_HEADER, header_value
from joey_core.settings import CommonSettings
from joey_core.topics import PipelineTopics

log = logging.getLogger(__name__)


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
                # A position past a partition's end means the topic was deleted and made again (a pipeline
                # deleted and created anew keeps its topic names): everything in the new one is unread.
                "auto.offset.reset": "earliest",
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


class Call:
    """The replies one request waits for: one per input record."""

    def __init__(self, request_ids: list[str]) -> None:
        self.request_ids = request_ids
        self.replies: dict[str, Reply] = {}
        self.failure: str | None = None
        self.done = threading.Event()

    def deliver(self, reply: Reply) -> None:
        self.replies.setdefault(reply.request_id, reply)
        if len(self.replies) == len(self.request_ids):
            self.done.set()

    def fail(self, reason: str) -> None:
        self.failure = reason
        self.done.set()


class ReplyReader:
    """Reads one pipeline's replies in a thread of its own and hands each to the call waiting for it.

    It uses ``assign()`` on every partition and never joins a consumer group, so rebalances of the
    engine's group cannot revoke anything from it: a reply is read wherever and whenever a replica writes
    it. It is positioned when made, before the first request is produced, so no reply can be missed.
    Replies nobody waits for (older ones, or a second delivery of an at-least-once reply) are skipped.
    Raise LookupError when the pipeline's topics do not exist.
    """

    def __init__(
        self, settings: CommonSettings, topics: PipelineTopics, error_level: int = logging.WARNING
    ) -> None:
        """``error_level``: how routine consumer errors (a broker reconnecting) are logged; the SDK
        logs them at DEBUG, so that a user's notebook is not filled with what librdkafka recovers from."""
        self.topics = topics
        self._error_level = error_level
        self._consumer: Consumer = reply_consumer(settings, topics)
        self._waiting: dict[str, Call] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"replies-{topics.outputs}", daemon=True)
        self._thread.start()

    def expect(self, call: Call) -> None:
        with self._lock:
            for request_id in call.request_ids:
                self._waiting[request_id] = call

    def forget(self, call: Call) -> None:
        with self._lock:
            for request_id in call.request_ids:
                self._waiting.pop(request_id, None)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                # consume() waits out its whole timeout unless the batch fills: wait for the first reply
                # with poll, then take whatever else already arrived.
                first = self._consumer.poll(0.1)
                if first is None:
                    continue
                batch = [first, *self._consumer.consume(num_messages=1000, timeout=0)]
                for message in kafka.usable(batch, log, self._error_level):
                    request_id = header_value(message.headers(), REQUEST_ID_HEADER)  # type: ignore[arg-type]
                    if request_id is None:
                        continue
                    with self._lock:
                        call = self._waiting.pop(request_id, None)
                    if call is not None:
                        call.deliver(decode_reply(message, request_id, self.topics.outputs))
        except Exception:
            # Its owner replaces a reader that stopped; its waiters get their deadline error.
            log.exception("reader of %s stopped", self.topics.outputs)
        finally:
            self._consumer.close()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
