"""Publishes deployment specs and tombstones on joey.deployments (and bridges on joey.bridges),
acknowledged before returning."""

from __future__ import annotations

import logging
import threading

from confluent_kafka import KafkaException, Producer

from joey_core import topics
from joey_core.kafka import DeliveryTracker, is_fatal, producer_config
from joey_registry import convert
from joey_registry.domain import DeploymentSpec
from joey_registry.errors import Unavailable
from joey_registry.settings import RegistrySettings

log = logging.getLogger(__name__)

# How much longer than a record's own timeout a publish waits for its report: by then librdkafka has
# either delivered the record or failed it, so a record reported lost cannot still go out later.
_REPORT_MARGIN_S = 5.0


class DeploymentPublisher:
    def __init__(self, settings: RegistrySettings) -> None:
        self._timeout = settings.publish_timeout_s
        self._config = producer_config(
            settings, **{"message.timeout.ms": int(settings.publish_timeout_s * 1000)}
        )
        self._producer = Producer(self._config)
        # One publish at a time: flush() waits for every in-flight record, and a deploy must
        # only report the delivery of its own.
        self._lock = threading.Lock()

    def publish(self, spec: DeploymentSpec) -> None:
        d = spec.deployment
        key = topics.deployment_key(d.workspace, d.pipeline)
        self.send(topics.DEPLOYMENTS, key, convert.deployment_spec_json(spec).encode())
        log.info(
            "published deployment %s of %s/%s version %d (%d replicas)",
            d.deployment_id,
            d.workspace,
            d.pipeline,
            d.pipeline_version,
            d.replicas,
        )

    def retract(self, workspace: str, pipeline: str) -> None:
        """Publish the tombstone that tells engines to stop the pipeline."""
        self.send(topics.DEPLOYMENTS, topics.deployment_key(workspace, pipeline), None)
        log.info("published undeploy of %s/%s", workspace, pipeline)

    def send(self, topic: str, key: str, value: bytes | None) -> None:
        """Publish one record on a compacted control topic; Unavailable unless the broker acknowledged it."""
        with self._lock:
            tracker = DeliveryTracker()
            try:
                self._producer.produce(topic, value=value, key=key.encode(), on_delivery=tracker.on_delivery)
                tracker.flush(self._producer, self._timeout + _REPORT_MARGIN_S)
            except (KafkaException, BufferError, TimeoutError) as exc:
                if isinstance(exc, KafkaException) and is_fatal(exc.args[0]):
                    # An idempotent producer is dead after a fatal error (e.g. a broker that restarted
                    # empty and no longer knows its producer id): a new one serves the next publish.
                    log.warning("replacing the deployments producer after a fatal error: %s", exc)
                    self._producer = Producer(self._config)
                raise Unavailable(
                    f"the broker did not acknowledge the change on {topic}: {exc}; nothing "
                    "was changed, retry once the broker answers"
                ) from exc

    def close(self) -> None:
        self._producer.flush(self._timeout)
