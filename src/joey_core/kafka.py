"""Thin helpers over confluent-kafka: client configs, topic creation, readiness, and the toolkit every
Kafka loop of Joey is built from.

The toolkit: :class:`ConsumedRecord` (a consumed record as a plain value), :func:`usable` (drops
records that carry a consumer error; a fatal one raises), :class:`DeliveryTracker` (flush and check
what a batch produced) and :func:`commit` (synchronous, per-partition errors included, with a
:class:`CommitPolicy` each loop names). A loop polls a batch, processes it, produces, flushes and
only then commits.

Everything here works unchanged on a real Kafka cluster: topics are created explicitly
with their final partition count, and nothing relies on high-watermarks or aborted
transactions (the embedded broker gets both wrong).
"""

from __future__ import annotations

import enum
import json
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from confluent_kafka import (
    TIMESTAMP_NOT_AVAILABLE,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, NewTopic

from joey_core import records, topics
from joey_core.settings import CommonSettings

log = logging.getLogger(__name__)


def client_config(settings: CommonSettings, **overrides: Any) -> dict[str, Any]:
    """What every Kafka client of Joey is built from: the cluster, its security settings and
    JOEY_KAFKA_CONFIG; then ``overrides``, the caller's own."""
    return _config(settings, {}, overrides)


def _config(settings: CommonSettings, defaults: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    # JOEY_KAFKA_CONFIG may tune Joey's defaults (linger.ms, ...); what a caller sets (its group) wins.
    config = {"bootstrap.servers": settings.kafka_bootstrap, **_security(settings), **defaults}
    return config | settings.kafka_config | overrides


def _security(settings: CommonSettings) -> dict[str, Any]:
    """librdkafka's security properties, from the JOEY_KAFKA_* settings (validated together there)."""
    security: dict[str, Any] = {}
    if settings.kafka_security_protocol is not None:
        security["security.protocol"] = settings.kafka_security_protocol
    if settings.kafka_sasl_mechanism is not None:
        security["sasl.mechanism"] = settings.kafka_sasl_mechanism
    if settings.kafka_sasl_username is not None:
        security["sasl.username"] = settings.kafka_sasl_username
    if settings.kafka_sasl_password is not None:
        security["sasl.password"] = settings.kafka_sasl_password.get_secret_value()
    if settings.kafka_ssl_ca_location is not None:
        security["ssl.ca.location"] = str(settings.kafka_ssl_ca_location)
    return security


def consumer_config(settings: CommonSettings, group_id: str, **overrides: Any) -> dict[str, Any]:
    defaults: dict[str, Any] = {
        # Offsets are committed by hand, synchronously, after outputs are acknowledged.
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        "fetch.wait.max.ms": 10,
        "enable.partition.eof": False,
    }
    if settings.kafka_dev_timeouts:
        # The embedded broker holds every join and rebalance of a group for half the session timeout
        # (rounded up to a second): 4 s makes that 2 s instead of 3, and still allows 8 heartbeats.
        defaults |= {"session.timeout.ms": 4000, "heartbeat.interval.ms": 500}
    return _config(settings, defaults, {"group.id": group_id} | overrides)


def producer_config(settings: CommonSettings, **overrides: Any) -> dict[str, Any]:
    defaults: dict[str, Any] = {
        "acks": "all",
        "enable.idempotence": True,
        "linger.ms": 2,
        "compression.type": "lz4",
    }
    return _config(settings, defaults, overrides)


def admin_client(settings: CommonSettings) -> AdminClient:
    return AdminClient(client_config(settings))


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    config: dict[str, str] = field(default_factory=dict)


def platform_topics(settings: CommonSettings) -> list[TopicSpec]:
    return [
        TopicSpec(topics.DEPLOYMENTS, 1, {"cleanup.policy": "compact"}),
        TopicSpec(topics.BRIDGES, 1, {"cleanup.policy": "compact"}),
        TopicSpec(topics.LOGS, settings.logs_partitions),
        TopicSpec(topics.LOGS_DEAD_LETTER, 1),
        TopicSpec(topics.ASSAY_RESULTS, 1),
        TopicSpec(topics.ASSAY_ALERTS, 1),
    ]


def pipeline_topic_specs(settings: CommonSettings, workspace: str, pipeline: str) -> list[TopicSpec]:
    names = topics.pipeline_topics(workspace, pipeline)
    return [TopicSpec(name, settings.pipeline_partitions) for name in names.all()]


def topic_partitions(admin: AdminClient, names: Iterable[str], timeout: float = 10.0) -> dict[str, int]:
    """Partition counts of the named topics that exist."""
    metadata = admin.list_topics(timeout=timeout)
    return {
        name: len(metadata.topics[name].partitions)
        for name in names
        if name in metadata.topics and metadata.topics[name].error is None
    }


def ensure_topics(admin: AdminClient, specs: Iterable[TopicSpec], timeout: float = 15.0) -> dict[str, int]:
    """Create missing topics; return the partition count of every topic in ``specs``."""
    specs = list(specs)
    existing = topic_partitions(admin, [s.name for s in specs], timeout)
    missing = [s for s in specs if s.name not in existing]
    if missing:
        futures = admin.create_topics(
            [
                NewTopic(s.name, num_partitions=s.partitions, replication_factor=-1, config=s.config)
                for s in missing
            ],
            operation_timeout=timeout,
        )
        for name, future in futures.items():
            try:
                future.result(timeout)
                log.info("created topic %s", name)
            except KafkaException as exc:
                if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise
    deadline = time.monotonic() + timeout
    while True:
        counts = topic_partitions(admin, [s.name for s in specs], timeout)
        if len(counts) == len(specs):
            return counts
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"topics not visible after creation: {sorted({s.name for s in specs} - set(counts))}"
            )
        time.sleep(0.05)


def wait_for_broker(config: dict[str, Any], timeout: float = 30.0) -> None:
    """Block until the cluster of a client ``config`` (:func:`client_config`) answers a metadata request."""
    bootstrap = config["bootstrap.servers"]
    admin = AdminClient(config)
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            admin.list_topics(timeout=2)
            return
        except KafkaException as exc:
            last = exc
            time.sleep(0.1)
    raise TimeoutError(f"Kafka at {bootstrap} not reachable after {timeout:.0f}s: {last}")


DEFAULT_MESSAGE_MAX_BYTES = 1_000_000
"""librdkafka's default ``message.max.bytes``; a real cluster's default limit is about the same."""

RECORD_OVERHEAD_BYTES = 512
"""Room kept under the limit for what Kafka adds to a record (lengths, timestamps, its batch's header)."""


def max_record_bytes(settings: CommonSettings) -> int:
    """Largest key + value + headers a producer of ``settings`` may send: the producer's
    ``message.max.bytes`` (JOEY_KAFKA_CONFIG), less Kafka's overhead. Checked before ``produce``, since
    the embedded broker accepts records far larger than a real cluster does."""
    limit = int(settings.kafka_config.get("message.max.bytes", DEFAULT_MESSAGE_MAX_BYTES))
    return max(limit - RECORD_OVERHEAD_BYTES, 0)


def record_size(key: bytes | None, value: bytes | None, headers: Iterable[tuple[str, Any]] = ()) -> int:
    """What a record weighs against ``message.max.bytes``: key, value and headers."""
    size = len(key or b"") + len(value or b"")
    for name, header in headers:
        size += len(name) + len(header or b"")
    return size


REFUSED_FOR_GOOD_ERRORS = frozenset(
    {
        KafkaError.MSG_SIZE_TOO_LARGE,  # also what librdkafka reports for a record over its own limit
        KafkaError.RECORD_LIST_TOO_LARGE,
        KafkaError.INVALID_RECORD,
        KafkaError.INVALID_MSG,  # Java's CORRUPT_MESSAGE
    }
)
"""Delivery errors that say the broker will never accept this record, whatever the cluster's state. Not
TOPIC_AUTHORIZATION_FAILED: an ACL granted later mends it, so it is retried like an outage."""


def refused_for_good(err: KafkaError) -> bool:
    """True when the broker will never accept this record (too large, invalid): sending
    it again only repeats the failure.

    An allow-list, because a delivery report's error never says whether it is retriable or fatal
    (confluent-kafka builds it with both flags false): any other code (a missing topic or leader, too few
    replicas, a timeout) may pass later, and the batch is retried rather than answered with errors."""
    return err.code() in REFUSED_FOR_GOOD_ERRORS


FATAL_PRODUCER_ERRORS = frozenset(
    {
        KafkaError._FATAL,  # noqa: SLF001 (librdkafka's public codes): what produce() on a failed producer says
        KafkaError._FENCED,  # noqa: SLF001
        # Answered to the epoch bump an idempotent producer makes after a purge by the embedded broker:
        # librdkafka then fails every later record with it and never raises a fatal error of its own.
        KafkaError.PRODUCER_FENCED,
    }
)


def is_fatal(err: KafkaError) -> bool:
    """The producer can deliver nothing more (its idempotence state is broken): it must be replaced.
    Told by the code, since a delivery report's ``err.fatal()`` is always false."""
    return err.fatal() or err.code() in FATAL_PRODUCER_ERRORS


class DeliveryError(KafkaException):
    """Some records of a batch were not acknowledged; ``errors`` holds each one's tag (what the caller
    passed to :meth:`DeliveryTracker.produce`) with its error."""

    def __init__(self, errors: list[tuple[Any, KafkaError]]) -> None:
        super().__init__(errors[0][1])
        self.errors = errors

    @property
    def fatal(self) -> bool:
        """The producer can deliver nothing more: it must be replaced."""
        return any(is_fatal(err) for _, err in self.errors)

    def refused(self) -> set[Any] | None:
        """The tags of the records the broker refused for good, when that is every failure; None when
        some failure may pass if retried (or is fatal)."""
        if all(refused_for_good(err) for _, err in self.errors):
            return {tag for tag, _ in self.errors}
        return None


PURGE_REPORTS_S = 1.0
"""How long a failed flush waits for the reports of the records it purged."""


class DeliveryTracker:
    """Collects delivery reports so a batch can be flushed and checked as a whole.

    Produce every record of a batch through :meth:`produce` (or pass :meth:`on_delivery` as the
    ``on_delivery`` callback of ``produce``), then call :meth:`flush` before committing the batch's input
    offsets. Use one tracker per batch: a report that arrives late then counts for its own batch.
    """

    def __init__(self) -> None:
        self.errors: list[tuple[Any, KafkaError]] = []

    def on_delivery(self, err: KafkaError | None, msg: Any, tag: Any = None) -> None:
        if err is not None:
            self.errors.append((tag, err))

    def produce(
        self,
        producer: Producer,
        topic: str,
        value: bytes | None,
        key: bytes | None = None,
        headers: Sequence[tuple[str, Any]] | None = None,
        timeout: float = 30.0,
        tag: Any = None,
    ) -> None:
        """``producer.produce`` with this tracker's callback; a full local queue is waited out (its
        deliveries served) for up to ``timeout`` rather than raised at once; raised then, with what the
        batch still had queued purged. ``tag`` names the record in
        a :class:`DeliveryError`, so the caller knows which one failed.

        A record ``produce`` refuses at once (over the producer's own size limit, a topic known to be
        missing, a fatal producer) counts as one whose delivery failed: :meth:`flush` reports it with the
        others, so the caller classifies both alike and the rest of the batch is still produced."""
        deadline = time.monotonic() + timeout

        def report(err: KafkaError | None, msg: Any) -> None:
            self.on_delivery(err, msg, tag)

        while True:
            try:
                producer.produce(topic, value, key, headers=list(headers or ()), on_delivery=report)
                return
            except KafkaException as exc:
                self.errors.append((tag, exc.args[0]))
                return
            except BufferError:
                if time.monotonic() > deadline:
                    # The batch failed: like a failed flush, it leaves nothing queued to be delivered later.
                    self._purge(producer)
                    raise
                producer.poll(0.1)

    def settle(self, producer: Any, timeout: float) -> int:
        """Wait up to ``timeout`` for every delivery; return how many were not acknowledged in time.

        On a failure what is still queued is purged, and the purged records' reports served (each counts
        in :attr:`errors`, as ``_PURGE_QUEUE``): records of a failed batch delivered later (with the next
        batch's flush, or a dying process's) would only be duplicates that grow with every retry.
        """
        remaining = producer.flush(timeout)
        if remaining:
            # Only then is anything still queued. (A purge with nothing queued is not harmless: it can
            # still fail a record produced right after it, e.g. the bounded answers to refused ones.)
            self._purge(producer)
        return int(remaining)

    @staticmethod
    def _purge(producer: Any) -> None:
        producer.purge(in_queue=True, in_flight=False)
        # The purged records' reports may not be ready at once (a loaded machine): serve them, or one
        # would count as still outstanding and reach a later batch's tracker.
        producer.flush(PURGE_REPORTS_S)

    def flush(self, producer: Any, timeout: float = 30.0) -> None:
        """Wait for every delivery (:meth:`settle`); raise TimeoutError, or DeliveryError when one failed."""
        remaining = self.settle(producer, timeout)
        if remaining:
            self.errors = []
            raise TimeoutError(f"{remaining} records not acknowledged by the broker within {timeout:.0f}s")
        if self.errors:
            errors, self.errors = self.errors, []
            raise DeliveryError(errors)


Headers = list[tuple[str, bytes | None]]
AnyLogger = logging.Logger | logging.LoggerAdapter[Any]


class ConsumedRecord:
    """A record read from a topic, as a plain value: where it came from, and what it carries.

    Read-only by convention. Built once per record on the engine's hot path, so the headers are
    scanned once, here, for the request id and deadline every consumer of an input record needs.
    """

    __slots__ = (
        "_value_json",
        "deadline_ms",
        "headers",
        "key",
        "offset",
        "partition",
        "request_id",
        "request_id_problem",
        "timestamp_ms",
        "topic",
        "value",
    )

    def __init__(
        self,
        topic: str,
        partition: int,
        offset: int,
        key: bytes | None,
        value: bytes | None,
        headers: Headers | None = None,
        timestamp_ms: int | None = None,
    ) -> None:
        self.topic = topic
        self.partition = partition
        self.offset = offset
        self.key = key
        self.value = value
        self.headers: Headers = headers or []
        self.timestamp_ms = timestamp_ms
        """When it was written, by the broker's or the producer's clock; None when the broker has none."""
        request_id: bytes | None = None
        deadline: bytes | None = None
        for name, raw in self.headers:
            if raw is None:
                continue
            if name == records.REQUEST_ID_HEADER and request_id is None:
                request_id = raw
            elif name == records.DEADLINE_HEADER and deadline is None:
                deadline = raw
        self.request_id: str = f"{topic}/{partition}/{offset}"
        """The caller's request id (bounded, see records.parse_request_id), or the record's position
        when it came without one."""
        self.request_id_problem: str | None = None
        """Why the request-id header could not be used as sent (too long, not UTF-8), or None."""
        if request_id:
            self.request_id, self.request_id_problem = records.parse_request_id(request_id)
        self.deadline_ms: float | None = _deadline_ms(deadline)
        """When the caller stops waiting (epoch ms), from the deadline header."""
        self._value_json: str | None = None

    @classmethod
    def of(cls, message: Message) -> ConsumedRecord:
        """A message :func:`usable` kept (one without an error)."""
        topic, partition, offset = message.topic(), message.partition(), message.offset()
        if topic is None or partition is None or offset is None:
            raise ValueError(f"not a consumed record: {message.error()}")
        # A consumed record's headers are always a list of (str, bytes | None) pairs.
        headers = cast(Headers, message.headers())
        kind, ms = message.timestamp()
        stamp = None if kind == TIMESTAMP_NOT_AVAILABLE else ms
        return cls(topic, partition, offset, message.key(), message.value(), headers, stamp)

    def where(self) -> str:
        return f"{self.topic}[{self.partition}]@{self.offset}"

    def header(self, name: str) -> str | None:
        return records.header_value(self.headers, name)

    @property
    def value_json(self) -> str:
        """The value as strict JSON text (what output and log records embed); only valid for a value
        that parsed as a JSON object."""
        if self._value_json is None:
            self._value_json = records.strict_json_text(self.value, lambda: json.loads(self.value or b"null"))
        return self._value_json

    def __repr__(self) -> str:
        return f"ConsumedRecord({self.where()}, request_id={self.request_id!r})"


def _deadline_ms(raw: bytes | None) -> float | None:
    # A malformed deadline cannot be honoured; the record is processed as if it had none.
    try:
        return None if raw is None else float(raw)
    except ValueError:
        return None


def usable(
    messages: Iterable[Message],
    log: AnyLogger,
    level: int = logging.WARNING,
) -> list[Message]:
    """The messages that are records; a consumer error is logged and dropped, a fatal one raises.

    Non-fatal errors (a partition's end, a broker reconnecting) are the client telling, not failing: it
    goes on by itself. A fatal error means this client can do nothing more, so the loop must stop.
    """
    kept = []
    for message in messages:
        error = message.error()
        if error is None:
            kept.append(message)
        elif error.fatal():
            raise KafkaException(error)
        else:
            where = f" on {message.topic()}[{message.partition()}]" if message.topic() is not None else ""
            log.log(level, "consumer error%s: %s", where, error)
    return kept


def next_offsets(consumed: Iterable[ConsumedRecord]) -> list[TopicPartition]:
    """The offsets to commit once ``consumed`` is done: one past the last record of each partition."""
    ends: dict[tuple[str, int], int] = {}
    for record in consumed:
        position = (record.topic, record.partition)
        ends[position] = max(ends.get(position, 0), record.offset + 1)
    return [TopicPartition(topic, partition, offset) for (topic, partition), offset in ends.items()]


# The group moved on while a batch ran: its members must rejoin before anything can be committed.
REBALANCING = frozenset(
    {
        KafkaError.REBALANCE_IN_PROGRESS,
        KafkaError.ILLEGAL_GENERATION,
        KafkaError.UNKNOWN_MEMBER_ID,
        KafkaError._ASSIGNMENT_LOST,  # noqa: SLF001  # librdkafka's local error codes start with "_"
    }
)


class CommitPolicy(enum.Enum):
    """What a refused commit means to the loop; every loop names its own."""

    RETRY_WHEN_REBALANCING = "retry when rebalancing"
    """Refused because the group rebalances: keep the offsets and commit them later (on revoke or
    with the next batch). Any other failure raises: the loop cannot know what was stored."""

    BEST_EFFORT = "best effort"
    """Logged and forgotten: what the batch produced is durable and idempotent, so the partition's
    next owner replays it into no-ops."""


def commit(
    consumer: Consumer,
    offsets: Sequence[TopicPartition],
    policy: CommitPolicy,
    log: AnyLogger,
) -> bool:
    """Commit ``offsets`` synchronously; True when every one was committed.

    A partition the broker refused counts as a failed commit, handled by ``policy`` like the whole
    request failing.
    """
    if not offsets:
        return True
    try:
        results = consumer.commit(offsets=list(offsets), asynchronous=False) or []
        refused = [tp for tp in results if tp.error is not None]
        if refused:
            raise KafkaException(refused[0].error)
    except KafkaException as exc:
        error = exc.args[0] if exc.args else exc
        code = error.code() if isinstance(error, KafkaError) else None
        if policy is CommitPolicy.RETRY_WHEN_REBALANCING:
            if code not in REBALANCING:
                raise
            log.warning("commit refused while the group rebalances (%s); retrying later", error)
        else:
            log.warning("offset commit failed; the next owner replays these records: %s", error)
        return False
    return True
