"""One replica of one deployment: consume a batch, run it, produce results, commit.

Commit policy: retry when rebalancing (``CommitPolicy.RETRY_WHEN_REBALANCING``); on revoke, best effort.

Offsets are committed synchronously after every batch, once its outputs, errors and logs are
acknowledged by the broker, and before the next poll. Rebalance callbacks only run inside a poll, so
when partitions are revoked nothing is outstanding: the only exception is a commit refused because the
group was rebalancing, which is retried in the revoke callback (or with the next batch).
Anything not committed is processed again by the partition's next owner: at least once.

A batch whose records the broker did not acknowledge is not committed: what was still queued is purged,
the partitions are rewound to the batch and it runs again after a backoff, in the same replica. Before a
batch runs, its offsets are noted in Redis (:mod:`joey_engine.attempts`) and the notes end once it is
answered: a replica that stops
mid-batch leaves them behind, and the next owner runs those records one at a time, dead-lettering one that was
tried ``max_record_attempts`` times.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import MutableMapping
from datetime import UTC, datetime
from typing import Any, Protocol

import redis
from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition

from joey_core import heartbeats, kafka
from joey_core.kafka import ConsumedRecord
from joey_core.records import bounded_text
from joey_engine import metrics, produced_records
from joey_engine.attempts import AttemptNotes
from joey_engine.deployment import Deployment
from joey_engine.pipeline import Failure, PipelineRunner, Success
from joey_engine.settings import EngineSettings

log = logging.getLogger(__name__)

IDLE_POLL_S = 0.1
"""Longest a poll waits for the first record of a batch, which bounds how fast a stop is noticed."""


class _Context(logging.LoggerAdapter):  # type: ignore[type-arg]
    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        return f"[{self.extra['context'] if self.extra else ''}] {msg}", kwargs


class Counter(Protocol):
    value: int


class ReplicaWorker:
    """Serves one replica in the calling thread; setting ``stop`` makes it finish the current batch,
    commit and leave the group."""

    def __init__(
        self,
        settings: EngineSettings,
        deployment: Deployment,
        runner: PipelineRunner,
        redis_client: redis.Redis,
        replica_id: str,
        stop: threading.Event,
        assignments: Counter,
    ) -> None:
        self.deployment = deployment
        self.replica_id = replica_id
        self._settings = settings
        self._runner = runner
        self._redis = redis_client
        self._stop = stop
        self._held: set[int] = set()
        self._assignments = assignments
        """Counts the group's assignments to this replica (one after every rebalance); the engine reads it."""
        self._pending: dict[tuple[str, int], int] = {}
        self._limit = kafka.max_record_bytes(settings)
        self._max_batch, self._batch_delay_ms = deployment.batch_limits(
            settings.max_batch_size, settings.max_batch_delay_ms
        )
        self._rewinds = 0
        """Consecutive batches rewound because the broker did not acknowledge them."""
        self._retry_s = 0.0
        """The wait before the last batch that could not be delivered runs again; 0 after a delivery."""
        self._beat = heartbeats.ReplicaHeartbeat(
            replica_id,
            deployment.deployment_id,
            deployment.pipeline_version,
            loaded=False,
            host=socket.gethostname(),
            phase="joining",
        )
        self._next_beat = 0.0
        self._queue_age_s = 0.0
        self._log = _Context(log, {"context": f"{deployment} replica {replica_id}"})
        self._notes = AttemptNotes(
            redis_client,
            settings.redis_prefix,
            deployment.consumer_group,
            settings.attempt_notes_ttl_s,
            self._log,
        )
        labels = (deployment.workspace, deployment.pipeline)
        self._ok = metrics.RECORDS.labels(*labels, "ok")
        self._failed = metrics.RECORDS.labels(*labels, "error")
        self._batch_size = metrics.BATCH_SIZE.labels(*labels)
        self._batch_seconds = metrics.BATCH_SECONDS.labels(*labels)
        self._undelivered = metrics.DELIVERY_FAILURES.labels(*labels)
        self._dead_lettered = metrics.DEAD_LETTERED.labels(*labels)
        self._bounded = metrics.OVERSIZED.labels(*labels)

    def run(self) -> str | None:
        """Serve until stopped; returns why the replica stopped when a fatal error stopped it."""
        labels = (self.deployment.workspace, self.deployment.pipeline)
        metrics.REPLICAS.labels(*labels).inc()
        try:
            self._serve()
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            self._log.exception("replica stopped by a fatal error")
            metrics.REPLICA_FAILURES.labels(*labels).inc()
            self._beat.loaded = False
            self._beat.error = error
            self._heartbeat()
            return error
        else:
            self._retire()
            return None
        finally:
            metrics.REPLICAS.labels(*labels).dec()

    def _serve(self) -> None:
        settings = self._settings
        consumer = Consumer(
            kafka.consumer_config(settings, self.deployment.consumer_group, **{"client.id": self.replica_id})
        )
        producer = Producer(kafka.producer_config(settings, **{"client.id": self.replica_id}))
        try:
            consumer.subscribe(
                [self.deployment.topics.inputs],
                on_assign=self._on_assign,
                on_revoke=self._on_revoke,
                on_lost=self._on_lost,
            )
            self._beat.loaded = True
            self._log.info("started, consuming %s", self.deployment.topics.inputs)
            while not self._stop.is_set():
                # Beating from the loop itself means a stuck loop stops looking alive.
                if time.monotonic() >= self._next_beat:
                    self._heartbeat()
                batch = self._consume(consumer)
                if batch:
                    self._process(batch, consumer, producer)
        finally:
            # Leaving the group runs the revoke callback, which commits anything still pending.
            consumer.close()
            # Every committed batch was flushed first: anything still queued answers a batch that was not
            # committed and is answered again by the next owner, so delivering it now (on every restart of
            # a crashing replica) would only add duplicates.
            producer.purge(in_queue=True, in_flight=False)
        self._log.info("stopped")

    def _consume(self, consumer: Consumer) -> list[ConsumedRecord]:
        # Waiting for the first record with poll keeps an idle replica quiet. Then the batch takes what
        # the consumer already fetched, and waits for more only while more keeps coming: never past
        # max_batch_delay_ms after the first, so a lone record is answered at once and a stream of them
        # in full batches.
        first = consumer.poll(IDLE_POLL_S)
        if first is None:
            return []
        messages = [first]
        deadline = time.monotonic() + self._batch_delay_ms / 1000
        wait = 0.0
        while len(messages) < self._max_batch:
            more = consumer.consume(self._max_batch - len(messages), wait)
            if not more:
                break
            messages += more
            wait = max(deadline - time.monotonic(), 0.0)
        batch = [ConsumedRecord.of(message) for message in kafka.usable(messages, self._log)]
        self._note_queue_age(batch)
        return batch

    def _note_queue_age(self, batch: list[ConsumedRecord]) -> None:
        """Keep the longest time a record of the batch waited in its topic, for the next heartbeat.

        Record timestamps make this right on any broker, unlike lag from high-watermarks."""
        stamps = [r.timestamp_ms for r in batch if r.timestamp_ms is not None]
        if stamps:
            waited = time.time() - min(stamps) / 1000
            self._queue_age_s = max(self._queue_age_s, waited)

    def _process(self, sources: list[ConsumedRecord], consumer: Consumer, producer: Producer) -> None:
        start = time.perf_counter()
        try:
            self._attempt(sources, consumer, producer)
        except BaseException:
            # Notes count only runs the process did not survive. An exception is not a record's fault:
            # the runner answers a record that raises alone, and raises only for the machine (OSError,
            # MemoryError) or a runtime every record breaks; after the run (a refused commit, a fatal
            # producer) the records may already be answered. The replica restarts, uncounted.
            self._notes.end(sources)
            raise
        self._batch_size.observe(len(sources))
        self._batch_seconds.observe(time.perf_counter() - start)

    def _attempt(self, sources: list[ConsumedRecord], consumer: Consumer, producer: Producer) -> None:
        tried = self._notes.start(sources)
        if not tried:
            self._answer(sources, {}, sources, consumer, producer)
        else:
            first = min(tried)
            self._log.warning(
                "a replica stopped while processing %d of these %d records (first at partition %d offset %d, "
                "tried %d times): running them one at a time",
                len(tried),
                len(sources),
                sources[first].partition,
                sources[first].offset,
                tried[first],
            )
            for i, source in enumerate(sources):
                attempts = tried.get(i, 0)
                failed = {}
                if attempts >= self._settings.max_record_attempts:
                    failed[0] = Failure(
                        f"dead-lettered after {attempts} attempts: a replica processing this record stopped "
                        "(crashed or was killed) every time; it is not run again",
                        None,
                    )
                    self._dead_lettered.inc()
                    self._log.error(
                        "dead-lettering partition %d offset %d after %d attempts",
                        source.partition,
                        source.offset,
                        attempts,
                    )
                # A dead-lettered record is noted too (with its count unchanged), so that this replica
                # owns, and ends, the note the dead one left.
                self._notes.begin([source], attempts if failed else attempts + 1)
                if not self._answer([source], failed, sources[i:], consumer, producer):
                    break

    def _answer(
        self,
        sources: list[ConsumedRecord],
        failed: dict[int, Failure],
        unanswered: list[ConsumedRecord],
        consumer: Consumer,
        producer: Producer,
    ) -> bool:
        """Run ``sources``, produce their records and commit once they are acknowledged; False when they
        were not, and the consumer is rewound to ``unanswered`` (``sources`` and what follows them)."""
        # Work whose caller has given up is not run: it is reported on the errors topic and in the log.
        now_ms = time.time() * 1000
        for i, source in enumerate(sources):
            if i not in failed and (failure := produced_records.refused(source, now_ms)) is not None:
                failed[i] = failure
        results = self._runner.run([s.value for s in sources], failed)
        now = datetime.now(UTC)
        answered = produced_records.answered(self.deployment, sources, results, now, self._limit)
        answers = answered.results
        self._bounded.inc(answered.bounded)
        tracker = kafka.DeliveryTracker()
        try:
            for i, reply in enumerate(answered.replies):
                tracker.produce(
                    producer, reply.topic, reply.value, reply.key, reply.headers, tag=(i, "reply")
                )
            for k, log_batch in enumerate(answered.logs):
                record = log_batch.record
                tracker.produce(
                    producer, record.topic, record.value, record.key, record.headers, tag=(k, "log")
                )
            tracker.flush(producer)
        except kafka.DeliveryError as exc:
            if exc.fatal:
                # The producer can send nothing more; the replica restarts with a new one.
                raise
            if exc.refused() is None:
                self._rewind(consumer, sources, unanswered, exc)
                return False
            self._answer_refused(sources, answered, exc, now, producer)
        except (BufferError, TimeoutError) as exc:
            # The tracker purged what was queued: nothing of this batch is delivered after its rewind.
            self._rewind(consumer, sources, unanswered, exc)
            return False
        failures = []
        unchecked = []
        for i, answer in enumerate(answers):
            if isinstance(answer, Success):
                if answer.check_errors:
                    unchecked.append((sources[i], answer.check_errors[0]))
            else:
                failures.append((sources[i], answer.reason))
        self._retry_s = 0.0
        self._rewinds = 0
        # Notes end at once, committed or not: a deferred removal left notes of answered records behind
        # whenever the replica then idled, stopped or lost the partition, and their next reader (the
        # offsets lost, or a pipeline of the same name) took them for a crash and dead-lettered them.
        self._commit(consumer, sources)
        self._notes.end(sources)
        if failures:
            source, reason = failures[0]
            self._log.warning(
                "%d of %d records failed; first at partition %d offset %d: %s",
                len(failures),
                len(sources),
                source.partition,
                source.offset,
                bounded_text(reason, 1000),
            )
        if unchecked:
            source, reason = unchecked[0]
            self._log.warning(
                "%d of %d records have checks that could not be evaluated (counted as failed); "
                "first at partition %d offset %d: %s",
                len(unchecked),
                len(sources),
                source.partition,
                source.offset,
                bounded_text(reason, 1000),
            )
        self._ok.inc(len(sources) - len(failures))
        self._failed.inc(len(failures))
        return True

    def _answer_refused(
        self,
        sources: list[ConsumedRecord],
        answered: produced_records.Answered,
        exc: kafka.DeliveryError,
        now: datetime,
        producer: Producer,
    ) -> None:
        """Answer alone each input whose reply or log the broker refused for good, by small bounded
        records, so the batch can be committed instead of retried forever: a refused reply by an error
        record (and a failure log only if its log was refused too: one log per input), a refused log
        alone by a failure log. A refused log record of several inputs refused the others' logs with
        it: those are sent again each in a record of its own, and one refused alone too gets a failure
        log. Raises when these are not delivered either: nothing is committed, and rewinding would
        re-send what was delivered."""
        self._undelivered.inc()
        self._log.error(
            "the broker refused for good %d records answering inputs of this %d-record batch (%s); each "
            "input is answered alone by a bounded error instead",
            len(exc.errors),
            len(sources),
            exc,
        )
        answers = answered.results
        replies = {i: err for (i, part), err in exc.errors if part == "reply"}
        logs: dict[int, KafkaError] = {}
        again: dict[int, dict[str, object]] = {}
        """Entries sent again alone: their record held others, any of which the broker may have refused."""
        for (k, part), err in exc.errors:
            if part == "log":
                batch = answered.logs[k]
                logs |= dict.fromkeys(batch.inputs, err)
                if len(batch.inputs) > 1:
                    again |= {
                        i: e for i, e in zip(batch.inputs, batch.entries, strict=True) if i not in replies
                    }
        for last in (False, True):
            tracker = kafka.DeliveryTracker()
            for i in sorted(replies.keys() | logs.keys()):
                if i in again:
                    record = produced_records.log_record([again[i]])
                    tracker.produce(
                        producer, record.topic, record.value, record.key, record.headers, tag=(i, "log")
                    )
                    continue
                reply, log = replies.get(i), logs.get(i)
                what = "reply" if reply is not None else "log"
                failure, error, entry = produced_records.bounded(
                    self.deployment,
                    sources[i],
                    answers[i],
                    f"the broker refused its {what} record ({reply or log})",
                    now,
                )
                if reply is not None:
                    answers[i] = failure
                    tracker.produce(
                        producer, error.topic, error.value, error.key, error.headers, tag=(i, "reply")
                    )
                if log is not None:
                    record = produced_records.log_record([entry])
                    tracker.produce(
                        producer, record.topic, record.value, record.key, record.headers, tag=(i, "log")
                    )
            try:
                tracker.flush(producer)
                return
            except kafka.DeliveryError as refused:
                tags = refused.refused()
                if not last and tags is not None and all(i in again for i, _ in tags):
                    # Refused alone too: these get their failure logs, in the same way.
                    replies, again = {}, {}
                    logs = {i: err for (i, _), err in refused.errors}
                    continue
                failed: Exception = refused
            except TimeoutError as timeout:
                failed = timeout
            raise RuntimeError(
                "the records answering inputs whose records the broker refused were not delivered either: "
                f"{failed}"
            ) from failed

    def _rewind(
        self,
        consumer: Consumer,
        sources: list[ConsumedRecord],
        unanswered: list[ConsumedRecord],
        exc: BaseException,
    ) -> None:
        """Rewind to the first record of each partition that was not answered, and back off; raise once
        that happened ``max_delivery_rewinds`` times in a row (a broker that stays away, or refuses every
        record): each rewind sends the batch again, so they must be bounded."""
        # Not the records' fault (the broker is away, or refuses them): no attempt is counted.
        self._notes.end(sources)
        self._rewinds += 1
        if self._rewinds > self._settings.max_delivery_rewinds:
            raise RuntimeError(
                f"the broker did not acknowledge a batch {self._rewinds} times in a row; last: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        self._undelivered.inc()
        self._retry_s = min(max(0.5, self._retry_s * 2), self._settings.delivery_retry_max_s)
        starts: dict[tuple[str, int], int] = {}
        for source in unanswered:
            position = (source.topic, source.partition)
            starts[position] = min(starts.get(position, source.offset), source.offset)
        self._log.error(
            "the broker did not acknowledge the records answering %d inputs (%s: %s); not committed, "
            "running them again in %.1f s from %s",
            len(unanswered),
            type(exc).__name__,
            exc,
            self._retry_s,
            ", ".join(f"partition {p} offset {o}" for (_, p), o in sorted(starts.items())),
        )
        for (topic, partition), offset in starts.items():
            # A failed seek raises: going on would commit the next batches past these records.
            consumer.seek(TopicPartition(topic, partition, offset))
        self._stop.wait(self._retry_s)

    def _commit(self, consumer: Consumer, sources: list[ConsumedRecord]) -> bool:
        """Commit the offsets after ``sources`` (and any still pending); False when the group was
        rebalancing and they are kept for later."""
        for tp in kafka.next_offsets(sources):
            position = (tp.topic, tp.partition)
            self._pending[position] = max(self._pending.get(position, 0), tp.offset)
        offsets = [
            TopicPartition(topic, partition, offset) for (topic, partition), offset in self._pending.items()
        ]
        if kafka.commit(consumer, offsets, kafka.CommitPolicy.RETRY_WHEN_REBALANCING, self._log):
            self._pending.clear()
            return True
        return False

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._held |= {tp.partition for tp in partitions}
        self._assignments.value += 1
        self._beat.assigned = True
        self._beat.phase = "running"
        self._log.info("assigned partitions %s", sorted(tp.partition for tp in partitions))
        self._heartbeat()

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        revoked = {(tp.topic, tp.partition) for tp in partitions}
        pending = [TopicPartition(t, p, o) for (t, p), o in self._pending.items() if (t, p) in revoked]
        # The partitions are leaving: what cannot be committed now, their next owner reprocesses.
        kafka.commit(consumer, pending, kafka.CommitPolicy.BEST_EFFORT, self._log)
        self._release(partitions)
        self._log.info("revoked partitions %s", sorted(tp.partition for tp in partitions))

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Lost partitions already belong to someone else: their pending offsets can no longer be committed.
        self._release(partitions)
        self._log.warning("lost partitions %s", sorted(tp.partition for tp in partitions))

    def _release(self, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self._held.discard(tp.partition)
            self._pending.pop((tp.topic, tp.partition), None)
        self._heartbeat()

    def _heartbeat(self) -> None:
        self._beat.partitions = sorted(self._held)
        self._beat.queue_age_s = round(self._queue_age_s, 3)
        self._queue_age_s = 0.0
        self._next_beat = time.monotonic() + self._settings.heartbeat_interval_s
        d = self.deployment
        try:
            heartbeats.publish(
                self._redis,
                self._settings.redis_prefix,
                d.workspace,
                d.pipeline,
                self._beat,
                self._settings.heartbeat_ttl_s,
            )
        except redis.RedisError as exc:
            # Inference goes on without Redis; only the status shown to users is stale.
            self._log.warning("cannot publish heartbeat: %s", exc)

    def _retire(self) -> None:
        self._notes.flush()
        d = self.deployment
        try:
            heartbeats.retire(
                self._redis, self._settings.redis_prefix, d.workspace, d.pipeline, self.replica_id
            )
        except redis.RedisError as exc:
            self._log.warning("cannot retire heartbeat: %s", exc)
