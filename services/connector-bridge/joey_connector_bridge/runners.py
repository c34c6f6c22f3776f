"""One bridge at work, in a thread of its own: a sink's Kafka loop (poll a batch, write it, commit
what is durable) or a source's (read after the checkpoint, produce, flush, checkpoint after the
acknowledgement). A step the store or the broker refuses is retried with backoff, never skipped.

During a sink's outage the consumer's partitions are paused and it keeps polling: the group sees a
live member (``max.poll.interval.ms`` is never exceeded) and nothing is fetched past the batch held.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import psycopg
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition

# Importing a store's module registers its source and sink.
from joey_connector_bridge import files, kafka_topic, metrics, postgres, s3, webhook  # noqa: F401
from joey_connector_bridge.connectors import (
    SINKS,
    SOURCES,
    Bridge,
    Partition,
    Refused,
    ResultRow,
    Sink,
    Source,
    Unavailable,
)
from joey_connector_bridge.registry_client import RegistryClient
from joey_connector_bridge.settings import BridgeSettings
from joey_connector_bridge.store import BridgeStore
from joey_core import bridges, kafka, records, topics
from joey_core.bridges import BridgeSpec
from joey_core.kafka import CommitPolicy, ConsumedRecord, DeliveryError, DeliveryTracker

log = logging.getLogger(__name__)

FIRST_BACKOFF_S = 0.2


class Runner(ABC):
    """A bridge's thread; :meth:`stop` asks it to finish its step and leave."""

    def __init__(
        self, spec: BridgeSpec, settings: BridgeSettings, store: BridgeStore, registry: RegistryClient
    ) -> None:
        self.spec = spec
        self.settings = settings
        self.store = store
        self.registry = registry
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, name=f"bridge-{spec.key}", daemon=True)
        self._lag = -1
        self._reported = 0.0
        self._backoff = FIRST_BACKOFF_S
        self._standing_error = ""
        """Shown in every report of this runner: rows a sink's store refused for good, a source's
        warning."""

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def alive(self) -> bool:
        return self._thread.is_alive()

    def _main(self) -> None:
        metrics.RUNNING.labels(self.spec.kind).inc()
        try:
            while not self._stop.is_set():
                try:
                    self.run()
                except Unavailable as exc:
                    self.retry(str(exc))
                except psycopg.OperationalError as exc:
                    self.retry(f"lost Joey's database: {exc}")
                except Exception as exc:
                    # A bug or a surprise of the store's: reported and retried, the other bridges go on.
                    log.exception("bridge %s failed; retrying", self.spec.key)
                    self.retry(f"{type(exc).__name__}: {exc}")
        finally:
            metrics.RUNNING.labels(self.spec.kind).dec()

    @abstractmethod
    def run(self) -> None:
        """Work until stopped; Unavailable to be retried after a backoff."""

    def bridge(self) -> Bridge:
        return Bridge(self.spec, self.settings)

    def retry(self, why: str) -> None:
        log.warning("bridge %s retries in %.1fs: %s", self.spec.key, self._backoff, why)
        metrics.RETRIES.labels(self.spec.kind).inc()
        self.report(bridges.RETRYING, why, force=True)
        self._stop.wait(self._backoff)
        self._backoff = min(self._backoff * 2, self.settings.retry_backoff_max_s)

    def moved(self, rows: int) -> None:
        self._backoff = FIRST_BACKOFF_S
        metrics.ROWS_MOVED.labels(self.spec.kind).inc(rows)

    def due(self) -> bool:
        return time.monotonic() - self._reported >= self.settings.status_interval_s

    def report(self, state: str, error: str = "", force: bool = False) -> None:
        if not force and not self.due():
            return
        shown = "; ".join(e for e in (error, self._standing_error) if e)
        self.store.report(self.spec.id, state, self._lag, shown, self.settings.instance_id)
        self._reported = time.monotonic()


def _require_topics(client: Consumer | Producer, names: list[str], spec: BridgeSpec) -> None:
    """Unavailable until the pipeline's topics exist (it is deployed once): subscribed or produced to
    before, a client would wait for its next metadata refresh, minutes later, or time records out."""
    try:
        known = client.list_topics(timeout=10).topics
    except KafkaException as exc:
        raise Unavailable(f"cannot list the broker's topics: {exc}") from None
    missing = [name for name in names if name not in known]
    if missing:
        raise Unavailable(f"pipeline {spec.pipeline!r} has no topic {missing[0]} yet: deploy it")


def result_row(record: ConsumedRecord) -> ResultRow | None:
    """The row of an output or error record of a pipeline, or None when it is neither."""
    try:
        value = json.loads(record.value or b"")
    except ValueError:
        return None
    if not isinstance(value, dict):
        return None
    request_id = str(value.get("request_id") or record.request_id)
    metadata = value.get("metadata")
    version = metadata.get("pipeline_version") if isinstance(metadata, dict) else None
    failed = record.topic.endswith(".errors")
    out = value.get("out")
    return ResultRow(
        request_id,
        _source_key(request_id, record.key),
        value.get("time"),
        None if failed or not isinstance(out, dict) else out,
        str(value.get("error", "")) if failed else None,
        version if isinstance(version, int) else None,
        record.topic,
        record.partition,
        record.offset,
        record.timestamp_ms,
    )


def _source_key(request_id: str, key: bytes | None) -> str | None:
    # A source's records are keyed by their row's key and named <source>/<key>.
    text = (key or b"").decode("utf-8", errors="replace")
    return text if text and request_id.endswith(f"/{text}") else None


def log_rows(record: ConsumedRecord, spec: BridgeSpec) -> list[ResultRow] | None:
    """The rows of the bridge's pipeline in a ``joey.logs`` record (none: another pipeline's), or None
    when it is no log record."""
    try:
        entries = records.decode_log_entries(record.headers, record.value)
    except records.RecordError:
        return None
    rows = []
    for entry in entries:
        if (entry["workspace"], entry["pipeline"]) != (spec.workspace, spec.pipeline):
            continue
        outputs = json.loads(entry["outputs"]) if entry["ok"] and entry["outputs"] else None
        rows.append(
            ResultRow(
                entry["request_id"],
                _source_key(entry["request_id"], entry["record_key"]),
                entry["time"].isoformat(),
                outputs if isinstance(outputs, dict) else None,
                None if entry["ok"] else str(entry["error"] or ""),
                int(entry["pipeline_version"]),
                record.topic,
                record.partition,
                record.offset,
                record.timestamp_ms,
            )
        )
    return rows


def wanted_topics(spec: BridgeSpec) -> list[str]:
    names = spec.topics
    if spec.what == bridges.LOGS:
        return [topics.LOGS]
    return [names.errors] if spec.what == bridges.ERRORS else [names.outputs, names.errors]


class SinkRunner(Runner):
    """A sink: the pipeline's results (outputs and errors), its errors or its inference logs, into the
    store, in the sink's consumer group, so several connector-bridges share its partitions."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._consumed: dict[Partition, int] = {}
        """Per partition, one past the last record consumed."""
        self._committed: dict[Partition, int] = {}
        self._uncounted: list[ResultRow] = []
        """Rows the sink took whose offsets are not committed yet."""

    def run(self) -> None:
        found = self.registry.connection(self.spec)
        sink: Sink = SINKS[found.type](found.details, self.bridge())
        wanted = wanted_topics(self.spec)
        consumer = Consumer(
            kafka.consumer_config(
                self.settings,
                self.spec.group,
                **{"client.id": f"{self.settings.instance_id}-{self.spec.name}"},
            )
        )
        self._consumed, self._committed, self._uncounted = {}, {}, []

        def revoked(_: Consumer, partitions: list[TopicPartition]) -> None:
            gone = {(tp.topic, tp.partition) for tp in partitions}
            sink.revoked(sorted(gone))
            for where in gone:
                self._consumed.pop(where, None)
                self._committed.pop(where, None)
            self._uncounted = [r for r in self._uncounted if (r.topic, r.partition) not in gone]

        try:
            _require_topics(consumer, wanted, self.spec)
            consumer.subscribe(wanted, on_revoke=revoked, on_lost=revoked)
            while not self._stop.is_set():
                self._step(consumer, sink)
        finally:
            consumer.close()
            sink.close()

    def _rows(self, consumed: list[ConsumedRecord]) -> list[ResultRow]:
        rows: list[ResultRow] = []
        for record in consumed:
            found = log_rows(record, self.spec) if self.spec.what == bridges.LOGS else result_row(record)
            if found is None:
                metrics.UNDECODABLE.inc()
                log.warning("bridge %s skips %s: not a pipeline's result", self.spec.key, record.where())
            elif isinstance(found, ResultRow):
                rows.append(found)
            else:
                rows.extend(found)
        return rows

    def _step(self, consumer: Consumer, sink: Sink) -> None:
        messages = consumer.consume(self.settings.batch_size, self.settings.poll_interval_s)
        consumed = [ConsumedRecord.of(m) for m in kafka.usable(messages, log)]
        rows = self._rows(consumed)
        for tp in kafka.next_offsets(consumed):
            self._consumed[(tp.topic, tp.partition)] = tp.offset

        def write() -> None:
            # Rows of partitions revoked during an outage are the new owner's to write.
            rows[:] = [r for r in rows if (r.topic, r.partition) in self._consumed]
            if rows:
                sink.write(rows)
            sink.tick()

        try:
            if not self._until_done(consumer, write):
                return  # stopped before the batch was written: its offsets stay uncommitted
            self._uncounted += rows
        except Refused as exc:
            metrics.REFUSED.inc(exc.rows)
            self._standing_error = f"{exc.rows} rows refused for good by the store, skipped: {exc}"
            log.warning(
                "bridge %s: %d rows of a batch (%s ... %s) refused: %s",
                self.spec.key,
                exc.rows,
                rows[0].request_id,
                rows[-1].request_id,
                exc,
            )
            self.report(bridges.RUNNING, force=True)
        self._settle(consumer, sink)
        if self.due():
            self._lag = _lag(consumer)
        self.report(bridges.RUNNING)

    def _until_done(self, consumer: Consumer, step: Callable[[], None]) -> bool:
        """Run ``step`` until it succeeds (True) or the runner is stopped (False). Back-pressure: while
        the store refuses, the partitions are paused and the consumer polled, so it stays in its group
        however long the outage lasts, and nothing is fetched meanwhile."""
        paused = False
        try:
            while not self._stop.is_set():
                try:
                    step()
                    return True
                except Unavailable as exc:
                    _hold(consumer)
                    paused = True
                    self.retry(str(exc))
            return False
        finally:
            if paused:
                consumer.resume(consumer.assignment())

    def _settle(self, consumer: Consumer, sink: Sink) -> None:
        """Count the rows now durable and commit their offsets: per partition, up to the first row the
        sink still holds, or past everything consumed. A refused commit only replays durable rows
        into no-ops; the count is kept first, so a replay counts nothing twice."""
        held = sink.held()
        durable = {where: held.get(where, end) for where, end in self._consumed.items()}
        done = [r for r in self._uncounted if r.offset < durable[(r.topic, r.partition)]]
        self._uncounted = [r for r in self._uncounted if r.offset >= durable[(r.topic, r.partition)]]
        offsets: dict[str, list[int]] = {}
        for row in done:
            offsets.setdefault(f"{row.topic}:{row.partition}", []).append(row.offset)
        try:
            self.store.count(self.spec.id, offsets)
        except psycopg.Error as exc:
            raise Unavailable(f"cannot count the rows written in Joey's database: {exc}") from None
        self.moved(len(done))
        changed = {w: o for w, o in durable.items() if self._committed.get(w) != o}
        commits = [TopicPartition(t, p, o) for (t, p), o in changed.items()]
        if kafka.commit(consumer, commits, CommitPolicy.BEST_EFFORT, log):
            self._committed |= changed


def _hold(consumer: Consumer) -> None:
    """Pause every assigned partition and poll once: the group's poll interval starts again, and a
    record a new assignment delivers before its pause is sought back to, to be read after the outage."""
    try:
        consumer.pause(consumer.assignment())
        message = consumer.poll(0)
        if message is not None and message.error() is None:
            record = ConsumedRecord.of(message)
            consumer.seek(TopicPartition(record.topic, record.partition, record.offset))
            consumer.pause([TopicPartition(record.topic, record.partition)])
    except KafkaException as exc:
        log.warning("could not pause the consumer during an outage: %s", exc)


def _lag(consumer: Consumer) -> int:
    try:
        assigned = consumer.assignment()
        if not assigned:
            return -1
        positions = consumer.position(assigned)
        behind = 0
        for tp in positions:
            _, high = consumer.get_watermark_offsets(TopicPartition(tp.topic, tp.partition), cached=True)
            if tp.offset >= 0 and high >= 0:
                behind += max(0, high - tp.offset)
        return behind
    except KafkaException:
        return -1


class SourceRunner(Runner):
    """A source: records of the store into the pipeline's inputs, in one process at a time (a lease),
    its position checkpointed only after the broker acknowledged every record before it."""

    def run(self) -> None:
        lease = self.store.lease(self.spec.id)
        if lease is None:
            # Another connector-bridge runs it (and reports its status); take over when its lease ends.
            self._stop.wait(self.settings.poll_interval_s)
            return
        try:
            log.info("bridge %s: this process runs the source", self.spec.key)
            source = self._source()
            producer = Producer(kafka.producer_config(self.settings))
            try:
                _require_topics(producer, [self.spec.topics.inputs], self.spec)
                after = self.store.position(self.spec.id)
                while not self._stop.is_set():
                    lease.execute("SELECT 1")  # a lease whose connection broke is no lease
                    after = self._step(source, producer, after)
            finally:
                producer.flush(self.settings.delivery_timeout_s)
                source.close()
        finally:
            lease.close()

    def _source(self) -> Source:
        if self.spec.from_pipeline:
            upstream = topics.pipeline_topics(self.spec.workspace, self.spec.from_pipeline)
            return SOURCES["pipeline"]({"topic": upstream.outputs}, self.bridge())
        found = self.registry.connection(self.spec)
        return SOURCES[found.type](found.details, self.bridge())

    def _step(self, source: Source, producer: Producer, after: Any) -> Any:
        batch = source.read(after, self.settings.batch_size)
        self._standing_error = source.warning()
        if self.due():
            self._lag = source.lag(after)
        if not batch:
            self.report(bridges.RUNNING)
            self._stop.wait(self.settings.poll_interval_s)
            return after
        tracker = DeliveryTracker()
        inputs = self.spec.topics.inputs
        for record in batch:
            request_id = f"{self.spec.name}/{record.key}"
            tracker.produce(
                producer,
                inputs,
                record.value,
                record.key.encode(),
                [(records.REQUEST_ID_HEADER, request_id.encode())],
                timeout=self.settings.delivery_timeout_s,
            )
        try:
            tracker.flush(producer, self.settings.delivery_timeout_s)
        except (DeliveryError, TimeoutError, BufferError) as exc:
            # Sent again from the same position: a record the broker did take is a duplicate the
            # pipeline answers twice and an idempotent sink keeps once.
            raise Unavailable(f"the broker did not acknowledge the records for {inputs}: {exc}") from None
        last = batch[-1].position
        self.store.save_position(self.spec.id, last, len(batch))
        source.acknowledged(last)
        self.moved(len(batch))
        self._lag = max(0, self._lag - len(batch)) if self._lag >= 0 else -1
        self.report(bridges.RUNNING)
        return last


RUNNERS: dict[str, type[Runner]] = {bridges.SOURCE: SourceRunner, bridges.SINK: SinkRunner}
