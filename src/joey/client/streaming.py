"""Client side of the streaming path: send records to a pipeline's input topic and collect
the matching outputs and errors by request id.

Reply positions are taken before anything is produced, so no reply can be missed. The
embedded broker under-reports high-watermarks, which only means some older replies are
read and skipped here; on real Kafka the positions are exact.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from confluent_kafka import KafkaError, Producer

from joey.client.inputs import InputError
from joey_core import kafka
from joey_core.kafka import producer_config
from joey_core.records import REQUEST_ID_HEADER, dumps, header_value
from joey_core.replies import Reply, decode_reply, failed_reply, reply_consumer
from joey_core.settings import CommonSettings
from joey_core.topics import PipelineTopics

log = logging.getLogger(__name__)

_PURGE_MARGIN_S = 5.0

Progress = Callable[[int, int], None]
"""Called with (answered, total) as replies arrive."""


class InferenceTimeout(TimeoutError):
    """Not every record was answered in time. ``replies`` has one entry per record, in order: its reply
    (a failed one for a record that was not sent), or None for a record sent and not answered yet."""

    def __init__(self, replies: list[Reply | None], timeout: float) -> None:
        answered = sum(r is not None for r in replies)
        super().__init__(
            f"{answered} of {len(replies)} records answered within {timeout:.0f}s; "
            "is the pipeline deployed and ready? (check `joey pipeline status`)"
        )
        self.answered = answered
        self.total = len(replies)
        self.replies = replies


def check_rows(rows: Sequence[Any]) -> None:
    for index, row in enumerate(rows):
        if not isinstance(row, dict | bytes):
            raise InputError(
                f"record {index} is a {type(row).__name__}, not a dict mapping input names to values "
                "(e.g. {'features': [5.1, 3.5, 1.4, 0.2]}); Pipeline.infer also takes a pandas DataFrame "
                "or a numpy array and shapes it for the pipeline's input"
            )


class PipelineStream:
    """Produces records to one pipeline's inputs topic and waits for their replies."""

    def __init__(self, settings: CommonSettings, topics: PipelineTopics) -> None:
        self._settings = settings
        self._topics = topics

    def infer(
        self, rows: Sequence[dict[str, Any] | bytes], timeout: float = 60.0, progress: Progress | None = None
    ) -> list[Reply]:
        """Send ``rows`` (one input record each; bytes are sent as they are); return replies in order.

        Any number of rows: when the producer's queue is full this waits for deliveries to free it, so
        memory stays bounded by the queue. Sending takes at most ``timeout``, and waiting for replies
        ``timeout`` more. A row that did not leave (refused as too large, the broker refusing it, or still
        queued when the time is up) is a failed reply of its own saying it was not sent, and is not waited
        for; a row whose delivery timed out may have reached the pipeline and is waited for.

        Raise InputError, having sent nothing, when a row is neither a dict nor bytes: the engine would
        refuse each such record alone."""
        check_rows(rows)
        request_ids = [uuid.uuid4().hex for _ in rows]
        pending = set(request_ids)
        replies: dict[str, Reply] = {}
        consumer = reply_consumer(self._settings, self._topics)
        try:
            # Longer than the sending time, so that a row still queued when it is up is purged below
            # (known never to have left) rather than timed out (which a row in flight also is).
            timeout_ms = int((timeout + _PURGE_MARGIN_S) * 1000)
            config = producer_config(self._settings, **{"message.timeout.ms": timeout_ms})
            producer = Producer(config)
            tracker = kafka.DeliveryTracker()
            sending_until = time.monotonic() + timeout
            for sent, (request_id, row) in enumerate(zip(request_ids, rows, strict=True)):
                try:
                    tracker.produce(
                        producer,
                        self._topics.inputs,
                        row if isinstance(row, bytes) else dumps(row),
                        request_id.encode(),
                        headers=[(REQUEST_ID_HEADER, request_id.encode())],
                        timeout=max(sending_until - time.monotonic(), 0),
                        tag=request_id,
                    )
                except BufferError:
                    # The queue stayed full until the time was up: the tracker purged what it held (those
                    # rows fail below, from their reports), and the rest is not sent.
                    for unsent in request_ids[sent:]:
                        replies[unsent] = not_sent(
                            unsent, "the producer's queue stayed full (is the broker reachable?)"
                        )
                    break
                producer.poll(0)
            # Rows still queued when the time is up never left: purged, they fail as not sent. A row whose
            # delivery timed out may have reached the pipeline unacknowledged: it stays pending, so the
            # reply of a record the pipeline did process is not hidden by a failure.
            tracker.settle(producer, max(sending_until - time.monotonic(), 0))
            for request_id, err in tracker.errors:
                if err.code() != KafkaError._MSG_TIMED_OUT:  # noqa: SLF001 (librdkafka's public local codes)
                    replies[request_id] = not_sent(request_id, str(err))
            pending.difference_update(replies)
            deadline = time.monotonic() + timeout
            while pending:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise InferenceTimeout([replies.get(r) for r in request_ids], timeout)
                batch = consumer.consume(num_messages=1000, timeout=min(remaining, 0.5))
                # The client recovers from non-fatal errors by itself: not the user's concern.
                for message in kafka.usable(batch, log, logging.DEBUG):
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


def not_sent(request_id: str, reason: str) -> Reply:
    """The failed reply of a row that never reached the pipeline's inputs topic."""
    return failed_reply(request_id, f"not sent to the pipeline: {reason}", datetime.now(UTC).isoformat())
