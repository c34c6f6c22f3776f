"""One bridge at work, in a thread of its own: a sink's Kafka loop (poll a batch, write it, commit
after the write) or a source's (read after the checkpoint, produce, flush, checkpoint after the
acknowledgement). A step the store or the broker refuses is retried with backoff, never skipped."""

from __future__ import annotations

import json
import logging
import threading
import time
from abc import ABC, abstractmethod
from typing import Any

import psycopg
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition

# Importing a store's module registers its source and sink.
from joey_connector_bridge import metrics, postgres  # noqa: F401
from joey_connector_bridge.connectors import SINKS, SOURCES, ResultRow, Sink, Source, Unavailable
from joey_connector_bridge.registry_client import RegistryClient
from joey_connector_bridge.settings import BridgeSettings
from joey_connector_bridge.store import BridgeStore
from joey_core import bridges, kafka, records
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
        self._moved = 0
        self._lag = -1
        self._reported = 0.0
        self._backoff = FIRST_BACKOFF_S

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
                except Exception as exc:
                    # A bug or a surprise of the store's: reported and retried, the other bridges go on.
                    log.exception("bridge %s failed; retrying", self.spec.key)
                    self.retry(f"{type(exc).__name__}: {exc}")
        finally:
            metrics.RUNNING.labels(self.spec.kind).dec()

    @abstractmethod
    def run(self) -> None:
        """Work until stopped; Unavailable to be retried after a backoff."""

    def retry(self, why: str) -> None:
        log.warning("bridge %s retries in %.1fs: %s", self.spec.key, self._backoff, why)
        metrics.RETRIES.labels(self.spec.kind).inc()
        self.report(bridges.RETRYING, why, force=True)
        self._stop.wait(self._backoff)
        self._backoff = min(self._backoff * 2, self.settings.retry_backoff_max_s)

    def moved(self, rows: int) -> None:
        self._moved += rows
        self._backoff = FIRST_BACKOFF_S
        metrics.ROWS_MOVED.labels(self.spec.kind).inc(rows)

    def due(self) -> bool:
        return time.monotonic() - self._reported >= self.settings.status_interval_s

    def report(self, state: str, error: str = "", force: bool = False) -> None:
        if not force and not self.due():
            return
        self.store.report(self.spec.id, state, self._moved, self._lag, error, self.settings.instance_id)
        self._moved = 0
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
    key = (record.key or b"").decode("utf-8", errors="replace")
    # A source's records are keyed by their row's key and named <source>/<key>.
    source_key = key if key and request_id.endswith(f"/{key}") else None
    metadata = value.get("metadata")
    version = metadata.get("pipeline_version") if isinstance(metadata, dict) else None
    failed = record.topic.endswith(".errors")
    out = value.get("out")
    return ResultRow(
        request_id,
        source_key,
        value.get("time"),
        None if failed or not isinstance(out, dict) else out,
        str(value.get("error", "")) if failed else None,
        version if isinstance(version, int) else None,
    )


class SinkRunner(Runner):
    """A sink: the pipeline's results (outputs and errors) or its errors, into the store, in the sink's
    consumer group, so several connector-bridges share its partitions."""

    def run(self) -> None:
        found = self.registry.connection(self.spec)
        sink: Sink = SINKS[found.type](found.details)
        names = self.spec.topics
        wanted = [names.errors] if self.spec.what == bridges.ERRORS else [names.outputs, names.errors]
        consumer = Consumer(
            kafka.consumer_config(
                self.settings,
                self.spec.group,
                **{"client.id": f"{self.settings.instance_id}-{self.spec.name}"},
            )
        )
        try:
            _require_topics(consumer, wanted, self.spec)
            consumer.subscribe(wanted)
            while not self._stop.is_set():
                self._step(consumer, sink)
        finally:
            consumer.close()
            sink.close()

    def _step(self, consumer: Consumer, sink: Sink) -> None:
        messages = consumer.consume(self.settings.batch_size, self.settings.poll_interval_s)
        consumed = [ConsumedRecord.of(m) for m in kafka.usable(messages, log)]
        rows = []
        for record in consumed:
            row = result_row(record)
            if row is None:
                metrics.UNDECODABLE.inc()
                log.warning("bridge %s skips %s: not a pipeline's result", self.spec.key, record.where())
            else:
                rows.append(row)
        while rows and not self._stop.is_set():
            try:
                sink.write(rows)
                break
            except Unavailable as exc:
                # Back-pressure: the batch stays uncommitted and is written again; nothing is consumed
                # meanwhile. A long outage may cost the group membership; rejoined, it resumes from the
                # committed offsets, which still name this batch.
                self.retry(str(exc))
        else:
            if rows:
                return  # stopped before the batch was written: its offsets stay uncommitted
        # The sink is idempotent: a refused commit only replays durable rows into no-ops.
        kafka.commit(consumer, kafka.next_offsets(consumed), CommitPolicy.BEST_EFFORT, log)
        self.moved(len(rows))
        if self.due():
            self._lag = _lag(consumer)
        self.report(bridges.RUNNING)


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
    """A source: rows of the store into the pipeline's inputs, in one process at a time (a lease), its
    position checkpointed only after the broker acknowledged every record before it."""

    def run(self) -> None:
        lease = self.store.lease(self.spec.id)
        if lease is None:
            # Another connector-bridge runs it (and reports its status); take over when its lease ends.
            self._stop.wait(self.settings.poll_interval_s)
            return
        try:
            log.info("bridge %s: this process runs the source", self.spec.key)
            found = self.registry.connection(self.spec)
            source: Source = SOURCES[found.type](found.details)
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
        except psycopg.OperationalError as exc:
            raise Unavailable(f"lost Joey's database: {exc}") from None
        finally:
            lease.close()

    def _step(self, source: Source, producer: Producer, after: Any) -> Any:
        batch = source.read(after, self.settings.batch_size)
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
                json.dumps(record.inputs).encode(),
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
        self.store.save_position(self.spec.id, last)
        self.moved(len(batch))
        self._lag = max(0, self._lag - len(batch)) if self._lag >= 0 else -1
        self.report(bridges.RUNNING)
        return last


RUNNERS: dict[str, type[Runner]] = {bridges.SOURCE: SourceRunner, bridges.SINK: SinkRunner}
