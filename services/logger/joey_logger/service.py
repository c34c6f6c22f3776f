"""The logger's core: sink batches of ``joey.logs`` records, then commit their offsets.

Order of a batch, which is what makes it at-least-once without doubles:

1. consume about ``batch_size`` rows' worth of records within ``batch_timeout_ms``;
2. decode each into its rows (a ``joey.v1.InferenceLogBatch`` record holds the rows of a whole
   micro-batch of the engine, an old ``joey.v1.InferenceLog`` record one row); an undecodable
   record is set aside whole for the dead-letter topic;
3. the sink writes the rows as they are decoded, ``batch_size`` per transaction (idempotently: a row whose
   identity exists is skipped), on a thread of its own, one transaction at a time and in order, while
   the next transaction's rows are decoded (the database's share of a write overlaps the decoding);
   if the sink refuses a transaction's data, its rows are bisected
   until the refused rows are alone, and they are set aside too (with the database's reason),
   each as a ``joey.v1.InferenceLog`` record of its own: the other rows of its batch record are stored;
4. the set-aside records are produced to ``joey.logs.dead-letter`` with a reason header,
   flushed and delivery-checked;
5. only then (every write of the batch finished) are the batch's offsets committed, synchronously:
   a record's offset only once every one of its rows is stored or dead-lettered.

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
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NamedTuple

import redis
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from joey_core import kafka, topics
from joey_core.heartbeats import ServiceHeartbeat
from joey_core.kafka import ConsumedRecord, DeliveryTracker, Headers, consumer_config, producer_config
from joey_core.records import (
    CONTENT_TYPE_HEADER,
    LOG_BATCH_CONTENT_TYPE,
    LOG_CONTENT_TYPE,
    RecordError,
    decode_log_entries,
    encode_log,
    header_value,
)
from joey_logger import metrics
from joey_logger.settings import LoggerSettings
from joey_logger.sink import BatchRejected, LogSink, SinkUnavailable, WriteResult

log = logging.getLogger(__name__)

SERVICE = "logger"
REASON_HEADER = "joey-dead-letter-reason"
SOURCE_HEADER = "joey-dead-letter-source"
"""``<topic>[<partition>]@<offset>`` of the dead-lettered record."""
ENTRY_HEADER = "joey-dead-letter-entry"
"""Position, in its batch record, of a row dead-lettered alone."""
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


class Row(NamedTuple):
    """One inference's log row, and the record it came in."""

    source: ConsumedRecord
    entry: dict[str, Any]
    position: int | None
    """Its position in a batch record; None for a record of one row."""


@dataclass(frozen=True)
class DeadLetter:
    """What goes to the dead-letter topic for one record, or one row of a batch record."""

    source: ConsumedRecord
    reason: str
    value: bytes | None
    headers: Headers
    key: bytes | None
    position: int | None = None

    @classmethod
    def whole(cls, source: ConsumedRecord, reason: str) -> DeadLetter:
        return cls(source, reason, source.value, source.headers, source.key)

    @classmethod
    def of_row(cls, row: Row, reason: str) -> DeadLetter:
        """A record of one row goes as it came; a row of a batch record goes alone, as a
        ``joey.v1.InferenceLog`` record: the rest of its batch is stored, and people read one row."""
        if row.position is None:
            return cls.whole(row.source, reason)
        others = [(k, v) for k, v in row.source.headers if k != CONTENT_TYPE_HEADER]
        headers: Headers = [(CONTENT_TYPE_HEADER, LOG_CONTENT_TYPE.encode()), *others]
        # Keyed as a record of one row is, by its own request id (its batch's key is its first entry's).
        key = str(row.entry["request_id"]).encode()
        return cls(row.source, reason, encode_log(row.entry), headers, key, row.position)

    def where(self) -> str:
        entry = "" if self.position is None else f" entry {self.position}"
        return f"{self.source.where()}{entry}"


ROWS_PER_RECORD_GUESS = 256
"""Rows of a batch record at the engine's default batch size, for the first poll's size."""


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
        # Until a poll shows how many rows a record holds, assume batch records as engines write them: asking
        # batch_size of those would take hundreds of batches' rows in one handle and one commit.
        self._records_wanted = max(1, settings.batch_size // ROWS_PER_RECORD_GUESS)
        # One thread: the sink's transactions stay one at a time, in the rows' order.
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="logger-sink")

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
                polled = time.perf_counter()
                messages = consumer.consume(self._records_wanted, self._settings.batch_timeout_ms / 1000)
                metrics.STAGE_SECONDS.labels("consume").inc(time.perf_counter() - polled)
                if messages:
                    self._handle(consumer, producer, messages)
        finally:
            log.info("logger %s stopping", self._settings.instance_id)
            consumer.close()
            producer.flush(5)
            self._writer.shutdown()
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
        rows: list[Row] = []
        dead: list[DeadLetter] = []
        rejected: list[DeadLetter] = []
        written = duplicates = count = 0
        size = self._settings.batch_size
        writing: Future[tuple[WriteResult, list[DeadLetter]]] | None = None

        def written_so_far() -> None:
            """Wait for the write in progress (RetryLater if the sink was unavailable)."""
            nonlocal written, duplicates, writing
            if writing is None:
                return
            done, writing = writing, None
            result, refused = done.result()
            written, duplicates = written + result.written, duplicates + result.duplicates
            rejected.extend(refused)

        def write(chunk: list[Row]) -> None:
            nonlocal count, writing
            written_so_far()
            writing = self._writer.submit(self._write, chunk)
            count += len(chunk)

        try:
            # Rows are written as soon as a transaction's worth is decoded: only that many are held
            # decoded at once beside the ones being written, whatever the records consumed hold.
            for message in batch:
                decoding = time.perf_counter()
                try:
                    entries = decode_log_entries(message.headers, message.value)
                except RecordError as exc:
                    dead.append(DeadLetter.whole(message, str(exc)))
                    continue
                if header_value(message.headers, CONTENT_TYPE_HEADER) == LOG_BATCH_CONTENT_TYPE:
                    rows.extend(Row(message, entry, i) for i, entry in enumerate(entries))
                else:
                    rows.append(Row(message, entries[0], None))
                metrics.STAGE_SECONDS.labels("decode").inc(time.perf_counter() - decoding)
                while len(rows) >= size:
                    write(rows[:size])
                    del rows[:size]
            if rows:
                write(rows)
            written_so_far()
            self._dead_letter(producer, dead, rejected)
        except RetryLater as exc:
            self._retry_later(consumer, batch, str(exc))
            return
        # Consume about batch_size rows next time, whichever format the topic holds; never more records
        # than batch_size (a poll of undecodable records yields no rows, and must not make the next poll
        # unbounded: the consumer refuses over a million, which stopped the logger).
        self._records_wanted = min(size, max(1, size * len(batch) // max(1, count)))
        stored = time.perf_counter()
        self._commit(consumer, batch)
        metrics.STAGE_SECONDS.labels("commit").inc(time.perf_counter() - stored)
        self._backoff.reset()
        metrics.ROWS_WRITTEN.inc(written)
        metrics.DUPLICATES_SKIPPED.inc(duplicates)
        metrics.BATCHES.labels("committed").inc()
        metrics.BATCH_SECONDS.observe(time.perf_counter() - started)
        log.debug("batch of %d records: %d rows, %d duplicates", len(batch), written, duplicates)

    def _write(self, rows: Sequence[Row]) -> tuple[WriteResult, list[DeadLetter]]:
        """Write the rows; if the sink refuses them, bisect them to single out the refused rows.

        k bad rows among n cost about 2k log2(n) more transactions, not n; the good rows
        of a refused half are stored by its halves. Each write is tried once: only an unavailable
        sink replays the batch, never a refusal.
        """
        try:
            return self._sink.write([row.entry for row in rows]), []
        except SinkUnavailable as exc:
            raise RetryLater(str(exc)) from exc
        except BatchRejected as exc:
            if len(rows) == 1:
                return WriteResult(0, 0), [
                    DeadLetter.of_row(rows[0], f"rejected by the {self._settings.sink} sink: {exc}")
                ]
            log.warning("sink rejected a batch of %d rows (%s); bisecting it", len(rows), exc)
        middle = len(rows) // 2
        first, first_rejected = self._write(rows[:middle])
        second, second_rejected = self._write(rows[middle:])
        written = WriteResult(first.written + second.written, first.duplicates + second.duplicates)
        return written, first_rejected + second_rejected

    def _dead_letter(
        self, producer: Producer, undecodable: list[DeadLetter], rejected: list[DeadLetter]
    ) -> None:
        letters = [*undecodable, *rejected]
        if not letters:
            return
        started = time.perf_counter()
        for letter in letters:
            log.error("dead-lettering log record at %s: %s", letter.where(), letter.reason)
        # Refused for good as they are (too large with the reason headers added, or for the
        # dead-letter topic's own limit, or invalid): retrying never changes that, so they go without
        # their values; the reason and source still go, and the record stays where it came from.
        refused = self._send(producer, letters, with_values=True)
        if refused and self._send(producer, refused, with_values=False):
            raise RetryLater(
                f"dead-letter topic refuses even the value-less dead letter of {refused[0].where()}"
            )
        metrics.DEAD_LETTERED.labels("undecodable").inc(len(undecodable))
        metrics.DEAD_LETTERED.labels("rejected").inc(len(rejected))
        metrics.STAGE_SECONDS.labels("dead_letter").inc(time.perf_counter() - started)

    def _send(self, producer: Producer, letters: list[DeadLetter], with_values: bool) -> list[DeadLetter]:
        """Produce and flush the dead letters; the ones refused for a reason no retry can fix.
        RetryLater for anything else (the topic unavailable, a flush timing out)."""
        tracker = DeliveryTracker()
        refused: list[DeadLetter] = []

        def delivered(letter: DeadLetter) -> Callable[[KafkaError | None, Message], None]:
            def on_delivery(err: KafkaError | None, msg: Message) -> None:
                if err is not None and err.code() in _UNFIXABLE:
                    refused.append(letter)
                else:
                    tracker.on_delivery(err, msg)

            return on_delivery

        for letter in letters:
            source = letter.where()
            trail = [(REASON_HEADER, letter.reason.encode()), (SOURCE_HEADER, letter.source.where().encode())]
            if letter.position is not None:
                trail.append((ENTRY_HEADER, str(letter.position).encode()))
            headers: list[tuple[str, str | bytes | None]]
            if with_values:
                value, headers = letter.value, [*letter.headers, *trail]
            else:
                log.error("dead letter of %s goes without its value", source)
                value, headers = None, [*trail, (DROPPED_HEADER, str(len(letter.value or b"")).encode())]
            try:
                producer.produce(
                    topics.LOGS_DEAD_LETTER,
                    value=value,
                    key=letter.key,
                    headers=headers,
                    on_delivery=delivered(letter),
                )
            except KafkaException as exc:
                if exc.args[0].code() not in _UNFIXABLE:
                    raise RetryLater(f"dead-letter topic unavailable: {exc}") from exc
                log.error("dead letter of %s refused by the producer: %s", source, exc)
                refused.append(letter)
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
