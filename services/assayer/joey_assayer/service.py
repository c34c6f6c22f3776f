"""The live assayer loop.

Design (docs/assays.md, "Live assays"): the loggers count each log row they store into its
assays' open windows in the same transaction (:mod:`joey_core.assays.panes`), so every inference is
counted once; a closed window is scored from those counts alone, whatever its number of rows.
The assayer counts, once, the rows stored before an assay existed (its backfill), and follows
``joey.logs`` only to know how far event time has advanced (the watermark) and how far it has
read; it keeps no per-row state, so a crash loses nothing.

A window ``[start, end)`` is due when the watermark of its pipeline (the latest event time seen
on ``joey.logs``) minus the allowed lateness has passed ``end``, or when the wall clock has
passed ``end`` plus the lateness and the assayer has read every record written to ``joey.logs``
before that moment. It is scored only once the loggers' committed offsets have reached what the
assayer has read, so every record seen so far is counted. The result is inserted with ON
CONFLICT DO NOTHING on (assay_id, window_start): exactly one result per window across crashes
and restarts. Results are published on ``joey.assays.results`` (Warning and Alert also on
``joey.assays.alerts``) and marked published after the broker acknowledged them, so a crash
between storing and publishing republishes (at least once, keyed by window).

Commit policy: best effort (``CommitPolicy.BEST_EFFORT``): its offsets on ``joey.logs`` only say how far
it has read; a replay rebuilds the watermark, and results never depend on them.
"""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime, timedelta

import psycopg
import redis
from confluent_kafka import Consumer, KafkaException, Message, Producer, TopicPartition

from joey_assayer.settings import AssayerSettings
from joey_assayer.store import AssayerStore, LiveAssay
from joey_core import db, kafka, topics
from joey_core.assays import ALERTING
from joey_core.heartbeats import ServiceHeartbeat
from joey_core.kafka import DeliveryTracker, consumer_config, producer_config
from joey_core.records import RecordError, is_log_record, log_watermark

log = logging.getLogger(__name__)

SERVICE = "assayer"
POLL_RECORDS = 1000


class Assayer:
    def __init__(self, settings: AssayerSettings, store: AssayerStore) -> None:
        self.settings = settings
        self.store = store
        self.lateness = timedelta(seconds=settings.allowed_lateness_s)
        # Latest event time seen per (workspace, pipeline), and the next offset per partition read.
        self.watermarks: dict[tuple[str, str], datetime] = {}
        self.positions: dict[int, int] = {}
        # A wall-clock time before which every record written to joey.logs has been read: the wall
        # clock closes windows only up to it, or a backlog not read yet could hold their records.
        self.read_until: datetime | None = None
        self._mark: tuple[datetime, dict[int, tuple[int, int]]] | None = None
        self._heartbeat = ServiceHeartbeat(
            redis.Redis.from_url(settings.redis_url.get_secret_value()), settings, SERVICE
        )

    def run(self, stop: threading.Event) -> None:
        s = self.settings
        admin = kafka.admin_client(s)
        kafka.ensure_topics(admin, kafka.platform_topics(s))
        consumer = Consumer(consumer_config(s, s.assayer_group))
        # Never subscribes: it only reads the loggers' committed offsets.
        logger_offsets = Consumer(consumer_config(s, s.logger_group))
        producer = Producer(producer_config(s))
        # Every assayer reads every partition (from its group's committed offsets): the work per
        # record is tiny, and so each one sees the whole watermark and waits for the loggers on
        # all partitions. Without group membership, no rebalance can leave it without partitions.
        assigned = [
            TopicPartition(topics.LOGS, p)
            for p in range(kafka.topic_partitions(admin, [topics.LOGS])[topics.LOGS])
        ]
        consumer.assign(assigned)
        # Where reading resumes, also on partitions with nothing new to read. An offset below the
        # low watermark (expired) counts as read up to it, in track_reading.
        for tp in consumer.committed(assigned, timeout=10):
            if tp.offset >= 0:
                self.positions[tp.partition] = tp.offset
        log.info("assayer %s following %s (lateness %.0fs)", s.instance_id, topics.LOGS, s.allowed_lateness_s)
        try:
            while not stop.is_set():
                self.observe(consumer.consume(POLL_RECORDS, timeout=s.tick_s))
                self.track_reading(consumer, assigned)
                try:
                    if self.logger_caught_up(logger_offsets):
                        self.close_windows()
                        self.commit(consumer)
                    # Also retries what an earlier tick stored but could not publish.
                    self.publish(producer)
                except psycopg.Error as exc:
                    if not db.is_unavailable(exc):
                        raise
                    # Nothing is lost while Postgres is away: windows stay due and are scored later.
                    log.warning("database unavailable, scoring later: %s", exc)
                    stop.wait(s.tick_s)
                self._heartbeat.beat()
        finally:
            self._heartbeat.retire()
            consumer.close()
            logger_offsets.close()
            producer.flush(10)

    def observe(self, messages: list[Message]) -> None:
        """Advance watermarks and read positions; records the logger cannot decode are its business.

        Only the fields of a watermark are read from each record (``log_watermark``: of a batch
        record, its latest time), several times faster than decoding it: following ``joey.logs`` must
        outpace the engine's logging.
        """
        horizon = datetime.now(UTC) + self.lateness
        for message in kafka.usable(messages, log):
            record = kafka.ConsumedRecord.of(message)
            self.positions[record.partition] = max(self.positions.get(record.partition, 0), record.offset + 1)
            if not is_log_record(record.headers):
                continue  # not a log record: the logger dead-letters it
            try:
                workspace, pipeline, event_time = log_watermark(record.headers, record.value)
            except RecordError:
                continue
            if event_time > horizon:
                continue  # a clock far ahead must not close windows early; the row still counts
            key = (workspace, pipeline)
            if key not in self.watermarks or event_time > self.watermarks[key]:
                self.watermarks[key] = event_time

    def track_reading(self, consumer: Consumer, assigned: list[TopicPartition]) -> None:
        """Advance ``read_until`` to the last mark whose log ends this assayer has read up to, then
        mark again: the time now and the partitions' watermarks.

        The embedded broker reports a high watermark at the start of a partition's last batch
        (docs/assays.md); on Kafka it is the end, so then nothing written before the mark is unread.
        """
        if self._mark is not None:
            marked_at, ends = self._mark
            # A partition never read from this run is read up to its low watermark (retention).
            if any(max(self.positions.get(p, low), low) < high for p, (low, high) in ends.items()):
                return
            self.read_until = marked_at
        now = datetime.now(UTC)
        ends = {}
        for tp in assigned:
            try:
                ends[tp.partition] = consumer.get_watermark_offsets(tp, timeout=5, cached=False)
            except KafkaException as exc:
                log.warning("could not read the ends of %s[%d]: %s", tp.topic, tp.partition, exc)
                return
        self._mark = (now, ends)

    def logger_caught_up(self, logger_offsets: Consumer) -> bool:
        """True when the loggers have stored every record this assayer has read."""
        if not self.positions:
            return True
        wanted = [TopicPartition(topics.LOGS, p) for p in sorted(self.positions)]
        try:
            committed = logger_offsets.committed(wanted, timeout=10)
        except KafkaException as exc:
            log.warning("could not read the loggers' offsets: %s", exc)
            return False
        behind = [tp.partition for tp in committed if tp.offset < self.positions[tp.partition]]
        if behind:
            log.info("waiting for the logger to store partitions %s", behind)
        return not behind

    def due(self, assay: LiveAssay, end: datetime) -> bool:
        d = assay.definition
        if self.read_until is not None and self.read_until >= end + self.lateness:
            return True
        watermark = self.watermarks.get((d.workspace, d.pipeline))
        return watermark is not None and watermark - self.lateness >= end

    def close_windows(self) -> None:
        """Score every due window of every active assay, up to the per-tick limit."""
        budget = self.settings.max_windows_per_tick
        for assay in self.store.active_assays():
            try:
                budget = self._close_windows_of(assay, budget)
            except Exception as exc:
                if db.is_unavailable(exc):
                    raise  # the database, not the assay: the loop waits for it
                # One assay that cannot be scored must not stop the others; it is retried every tick.
                d = assay.definition
                log.exception("assay %s/%s could not be scored", d.workspace, d.name)

    def _close_windows_of(self, assay: LiveAssay, budget: int) -> int:
        start, end = self.store.next_window(assay)
        if not assay.backfilled:
            self.store.backfill(assay, start)
        step = assay.definition.step
        while budget > 0 and self.due(assay, end):
            budget -= 1
            if not self.store.score_window(assay, start, end):
                break  # stored by another assayer, or the assay was deleted: look again next tick
            log.info("scored assay %s/%s window %s", assay.definition.workspace, assay.definition.name, start)
            start, end = start + step, end + step
        return budget

    def publish(self, producer: Producer) -> None:
        pending = self.store.unpublished()
        if not pending:
            return
        tracker = DeliveryTracker()
        for result in pending:
            producer.produce(
                topics.ASSAY_RESULTS, result.payload, result.key, on_delivery=tracker.on_delivery
            )
            if result.status in ALERTING:
                producer.produce(
                    topics.ASSAY_ALERTS, result.payload, result.key, on_delivery=tracker.on_delivery
                )
        try:
            tracker.flush(producer)
        except (KafkaException, TimeoutError) as exc:
            log.warning("results not acknowledged, publishing again later: %s", exc)
            return
        self.store.mark_published([r.id for r in pending])

    def commit(self, consumer: Consumer) -> None:
        """Commit what was read: the results of every window it closed are stored by now."""
        offsets = [TopicPartition(topics.LOGS, p, o) for p, o in self.positions.items()]
        kafka.commit(consumer, offsets, kafka.CommitPolicy.BEST_EFFORT, log)
