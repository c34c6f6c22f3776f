"""The logger's core: sink batches of ``joey.logs`` records, then commit their offsets.

Order of a batch, which is what makes it at-least-once without doubles:

1. consume up to ``batch_size`` records within ``batch_timeout_ms``;
2. decode each; an undecodable record is set aside for the dead-letter topic;
3. the sink writes the decoded records in one transaction (idempotently: a record whose row
   exists is skipped); if the sink refuses the batch's data, the batch is bisected until the
   refused records are alone, and they are set aside too (with the database's reason);
4. the set-aside records are produced to ``joey.logs.dead-letter`` with a reason header,
   flushed and delivery-checked;
5. only then are the batch's offsets committed, synchronously.

Commit policy: best effort (``CommitPolicy.BEST_EFFORT``): the rows are durable before the commit, so
a refused commit only replays the batch into no-ops.

A crash anywhere before 5 replays the batch from the last committed offsets, and the sink
turns the replayed rows into no-ops (dead-lettered records may appear twice on the
dead-letter topic, which is only read by people).

Only an unavailable sink (anything but a refusal of the data: a lost connection, a shutdown, a
read-only server, a schema mismatch, see ``joey_core.db.is_refusal``) or dead-letter topic holds
the batch back; a record the database refuses never does. When either is unavailable, nothing is
committed: the consumer seeks back to the first offset of the batch, pauses its partitions for a
growing backoff, and keeps polling meanwhile so group membership and rebalances go on as usual. A
stop during that pause closes the consumer without a commit, leaving the batch to the next owner.

Rebalances: the batch is handled start to finish between two ``consume`` calls, and
rebalance callbacks only run inside ``consume`` (or ``close``), so when partitions are revoked
the previous batch has already been written and committed. If the group was lost behind our
back instead (a stall longer than the session timeout), the commit fails and the next owner
replays the batch from the last committed offsets, which the idempotent sink makes harmless.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import redis
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from joey_core import kafka, topics
from joey_core.heartbeats import ServiceHeartbeat
from joey_core.kafka import ConsumedRecord, DeliveryTracker, consumer_config, producer_config
from joey_core.records import RecordError, decode_log_record
from joey_logger import metrics
from joey_logger.settings import LoggerSettings
from joey_logger.sink import BatchRejected, LogSink, SinkUnavailable, WriteResult

log = logging.getLogger(__name__)

SERVICE = "logger"
REASON_HEADER = "joey-dead-letter-reason"
SOURCE_HEADER = "joey-dead-letter-source"
"""``<topic>[<partition>]@<offset>`` of the dead-lettered record."""
DROPPED_HEADER = "joey-dead-letter-value-dropped"
"""Bytes of a value left out because the dead letter would not fit with it (it stays at its source)."""
# Errors of producing one record that no retry fixes: the record too large (for the producer, the
# broker or the topic) or invalid for the broker. Anything else is the topic being unavailable.
_UNFIXABLE = frozenset(
    {KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.RECORD_LIST_TOO_LARGE, KafkaError.INVALID_RECORD}
)


class Backoff:
    """Doubling delays between retries of one failing batch, reset by a success."""

    def __init__(self, initial_s: float, maximum_s: float) -> None:
        self._initial_s = initial_s
        self._maximum_s = maximum_s
        self._next_s = initial_s

    def next(self) -> float:
        delay = self._next_s
        self._next_s = min(self._next_s * 2, self._maximum_s)
        return delay

    def reset(self) -> None:
        self._next_s = self._initial_s


class RetryLater(Exception):
    """The batch cannot be finished now; replay it after a pause."""


class LoggerService:
    """Sinks ``joey.logs`` into a LogSink, committing offsets only after the rows are durable."""

    def __init__(self, settings: LoggerSettings, sink: LogSink) -> None:
        self._settings = settings
        self._sink = sink
        self._backoff = Backoff(min(0.5, settings.retry_backoff_max_s), settings.retry_backoff_max_s)
        self._heartbeat = ServiceHeartbeat(
            redis.Redis.from_url(settings.redis_url.get_secret_value()), settings, SERVICE
        )
        self._joined = False
        self._resume_at: float | None = None

    def run(self, stop: threading.Event) -> None:
        """Consume until ``stop`` is set; the batch in hand is finished and committed first."""
        if not self._open_sink(stop):
            return
        consumer = Consumer(consumer_config(self._settings, self._settings.logger_group))
        producer = Producer(producer_config(self._settings))
        try:
            consumer.subscribe(
                [topics.LOGS], on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost
            )
            log.info("logger %s consuming %s", self._settings.instance_id, topics.LOGS)
            while not stop.is_set():
                # Ready once it has joined the group: `joey up` waits for that.
                if self._joined:
                    self._heartbeat.beat()
                self._maybe_resume(consumer)
                messages = consumer.consume(self._settings.batch_size, self._settings.batch_timeout_ms / 1000)
                if messages:
                    self._handle(consumer, producer, messages)
        finally:
            log.info("logger %s stopping", self._settings.instance_id)
            consumer.close()
            producer.flush(5)
            self._sink.close()
            self._heartbeat.retire()

    def _open_sink(self, stop: threading.Event) -> bool:
        while not stop.is_set():
            try:
                self._sink.open()
                self._backoff.reset()
                return True
            except SinkUnavailable as exc:
                delay = self._backoff.next()
                log.warning("log sink unavailable at start, retrying in %.1fs: %s", delay, exc)
                stop.wait(delay)
        return False

    def _handle(self, consumer: Consumer, producer: Producer, messages: Sequence[Message]) -> None:
        started = time.perf_counter()
        batch = [ConsumedRecord.of(m) for m in kafka.usable(messages, log)]
        if not batch:
            return
        decoded: list[tuple[ConsumedRecord, dict[str, Any]]] = []
        dead: list[tuple[ConsumedRecord, str]] = []
        for message in batch:
            try:
                decoded.append((message, decode_log_record(message.headers, message.value)))
            except RecordError as exc:
                dead.append((message, str(exc)))
        try:
            result, rejected = self._write(decoded)
            self._dead_letter(producer, dead, rejected)
        except RetryLater as exc:
            self._retry_later(consumer, batch, str(exc))
            return
        self._commit(consumer, batch)
        self._backoff.reset()
        metrics.ROWS_WRITTEN.inc(result.written)
        metrics.DUPLICATES_SKIPPED.inc(result.duplicates)
        metrics.BATCHES.labels("committed").inc()
        metrics.BATCH_SECONDS.observe(time.perf_counter() - started)
        log.debug("batch of %d: %d rows, %d duplicates", len(batch), result.written, result.duplicates)

    def _write(
        self, decoded: Sequence[tuple[ConsumedRecord, dict[str, Any]]]
    ) -> tuple[WriteResult, list[tuple[ConsumedRecord, str]]]:
        """Write the batch; if the sink refuses it, bisect it to single out the refused records.

        k bad records among n cost about 2k log2(n) more transactions, not n; the good records
        of a refused half are stored by its halves. Each write is tried once: only an unavailable
        sink replays the batch, never a refusal.
        """
        try:
            return self._sink.write([record for _, record in decoded]), []
        except SinkUnavailable as exc:
            raise RetryLater(str(exc)) from exc
        except BatchRejected as exc:
            if len(decoded) == 1:
                return WriteResult(0, 0), [
                    (decoded[0][0], f"rejected by the {self._settings.sink} sink: {exc}")
                ]
            log.warning("sink rejected a batch of %d (%s); bisecting it", len(decoded), exc)
        middle = len(decoded) // 2
        first, first_rejected = self._write(decoded[:middle])
        second, second_rejected = self._write(decoded[middle:])
        written = WriteResult(first.written + second.written, first.duplicates + second.duplicates)
        return written, first_rejected + second_rejected

    def _dead_letter(
        self,
        producer: Producer,
        undecodable: list[tuple[ConsumedRecord, str]],
        rejected: list[tuple[ConsumedRecord, str]],
    ) -> None:
        letters = [*undecodable, *rejected]
        if not letters:
            return
        for message, reason in letters:
            log.error("dead-lettering log record at %s: %s", message.where(), reason)
        # Refused for good as they are (too large with the reason headers added, or for the
        # dead-letter topic's own limit, or invalid): retrying never changes that, so they go without
        # their values; the reason and source still go, and the record stays where it came from.
        refused = self._send(producer, letters, with_values=True)
        if refused and self._send(producer, refused, with_values=False):
            raise RetryLater(
                f"dead-letter topic refuses even the value-less dead letter of {refused[0][0].where()}"
            )
        metrics.DEAD_LETTERED.labels("undecodable").inc(len(undecodable))
        metrics.DEAD_LETTERED.labels("rejected").inc(len(rejected))

    def _send(
        self, producer: Producer, letters: list[tuple[ConsumedRecord, str]], with_values: bool
    ) -> list[tuple[ConsumedRecord, str]]:
        """Produce and flush the dead letters; the ones refused for a reason no retry can fix.
        RetryLater for anything else (the topic unavailable, a flush timing out)."""
        tracker = DeliveryTracker()
        refused: list[tuple[ConsumedRecord, str]] = []

        def delivered(letter: tuple[ConsumedRecord, str]) -> Callable[[KafkaError | None, Message], None]:
            def on_delivery(err: KafkaError | None, msg: Message) -> None:
                if err is not None and err.code() in _UNFIXABLE:
                    refused.append(letter)
                else:
                    tracker.on_delivery(err, msg)

            return on_delivery

        for message, reason in letters:
            source = message.where()
            trail = [(REASON_HEADER, reason.encode()), (SOURCE_HEADER, source.encode())]
            headers: list[tuple[str, str | bytes | None]]
            if with_values:
                value, headers = message.value, [*message.headers, *trail]
            else:
                log.error("dead letter of %s goes without its value", source)
                value, headers = None, [*trail, (DROPPED_HEADER, str(len(message.value or b"")).encode())]
            try:
                producer.produce(
                    topics.LOGS_DEAD_LETTER,
                    value=value,
                    key=message.key,
                    headers=headers,
                    on_delivery=delivered((message, reason)),
                )
            except KafkaException as exc:
                if exc.args[0].code() not in _UNFIXABLE:
                    raise RetryLater(f"dead-letter topic unavailable: {exc}") from exc
                log.error("dead letter of %s refused by the producer: %s", source, exc)
                refused.append((message, reason))
        try:
            tracker.flush(producer)
        except (KafkaException, TimeoutError) as exc:
            raise RetryLater(f"dead-letter topic unavailable: {exc}") from exc
        return refused

    def _commit(self, consumer: Consumer, batch: Sequence[ConsumedRecord]) -> None:
        kafka.commit(consumer, kafka.next_offsets(batch), kafka.CommitPolicy.BEST_EFFORT, log)

    def _retry_later(self, consumer: Consumer, batch: Sequence[ConsumedRecord], reason: str) -> None:
        """Rewind every partition of the batch to its first record and pause consumption for a while."""
        first: dict[tuple[str, int], int] = {}
        for message in batch:
            first.setdefault((message.topic, message.partition), message.offset)
        for (topic, partition), offset in first.items():
            consumer.seek(TopicPartition(topic, partition, offset))
        consumer.pause(consumer.assignment())
        delay = self._backoff.next()
        self._resume_at = time.monotonic() + delay
        metrics.BATCHES.labels("retried").inc()
        starts = ", ".join(f"{topic}[{partition}]@{offset}" for (topic, partition), offset in first.items())
        log.warning("batch not stored, replaying from %s in %.1fs: %s", starts, delay, reason)

    def _maybe_resume(self, consumer: Consumer) -> None:
        if self._resume_at is not None and time.monotonic() >= self._resume_at:
            self._resume_at = None
            consumer.resume(consumer.assignment())

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        log.info("assigned %s", [f"{tp.topic}[{tp.partition}]" for tp in partitions])
        self._joined = True

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Nothing to flush: the last batch was committed before consume() ran this callback.
        log.info("revoked %s", [f"{tp.topic}[{tp.partition}]" for tp in partitions])

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        lost = [f"{tp.topic}[{tp.partition}]" for tp in partitions]
        log.warning("lost %s; their uncommitted records go to the next owner", lost)
