"""Thin helpers over confluent-kafka: client configs, topic creation, readiness.

Everything here works unchanged on a real Kafka cluster: topics are created explicitly
with their final partition count, and nothing relies on high-watermarks or aborted
transactions (the embedded broker gets both wrong).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from joey_core import topics
from joey_core.settings import CommonSettings

log = logging.getLogger(__name__)


def consumer_config(settings: CommonSettings, group_id: str, **overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "bootstrap.servers": settings.kafka_bootstrap,
        "group.id": group_id,
        # Offsets are committed by hand, synchronously, after outputs are acknowledged.
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        "fetch.wait.max.ms": 10,
        "enable.partition.eof": False,
    }
    if settings.kafka_dev_timeouts:
        config |= {"session.timeout.ms": 6000, "heartbeat.interval.ms": 500}
    return config | overrides


def producer_config(settings: CommonSettings, **overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "bootstrap.servers": settings.kafka_bootstrap,
        "acks": "all",
        "enable.idempotence": True,
        "linger.ms": 2,
        "compression.type": "lz4",
    }
    return config | overrides


def admin_client(settings: CommonSettings) -> AdminClient:
    return AdminClient({"bootstrap.servers": settings.kafka_bootstrap})


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    config: dict[str, str] = field(default_factory=dict)


def platform_topics(settings: CommonSettings) -> list[TopicSpec]:
    return [
        TopicSpec(topics.DEPLOYMENTS, 1, {"cleanup.policy": "compact"}),
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


def wait_for_broker(bootstrap: str, timeout: float = 30.0) -> None:
    """Block until the broker answers a metadata request."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
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


class DeliveryTracker:
    """Collects delivery reports so a batch can be flushed and checked as a whole.

    Pass :meth:`on_delivery` as the ``on_delivery`` callback of every ``produce`` of a
    batch, then call :meth:`flush` before committing the batch's input offsets.
    """

    def __init__(self) -> None:
        self.errors: list[KafkaError] = []

    def on_delivery(self, err: KafkaError | None, msg: Any) -> None:
        if err is not None:
            self.errors.append(err)

    def flush(self, producer: Any, timeout: float = 30.0) -> None:
        remaining = producer.flush(timeout)
        if remaining:
            raise TimeoutError(f"{remaining} records not acknowledged by the broker within {timeout:.0f}s")
        if self.errors:
            errors, self.errors = self.errors, []
            raise KafkaException(errors[0])
