"""The connector-bridge core: follows ``joey.bridges`` and runs every bridge that is not paused.

The bridges topic is read from the beginning by a consumer outside any group, so every process sees
every bridge; the last value per key is the desired state. Every process runs every sink, in the
sink's consumer group, so the group shares its partitions and hands a dead member's to the others;
every process tries every source, and the one holding its lease (:mod:`joey_connector_bridge.store`)
runs it. A changed, paused or deleted bridge's runner is stopped; a new or resumed one is started.
"""

from __future__ import annotations

import logging
import threading

import redis
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from joey_connector_bridge import metrics
from joey_connector_bridge.registry_client import RegistryClient
from joey_connector_bridge.runners import RUNNERS, Runner
from joey_connector_bridge.settings import BridgeSettings
from joey_connector_bridge.store import BridgeStore
from joey_core import bridges, kafka, topics
from joey_core.bridges import BridgeSpec
from joey_core.heartbeats import ServiceHeartbeat

log = logging.getLogger(__name__)

SERVICE = "connector-bridge"
POLL_S = 0.2
STOP_TIMEOUT_S = 30.0
"""Longest wait for a runner to finish its step; it is a daemon thread, so the process exits anyway."""


class ConnectorBridge:
    def __init__(self, settings: BridgeSettings, redis_client: redis.Redis | None = None) -> None:
        self._settings = settings
        self._store = BridgeStore(settings.database_url.get_secret_value())
        self._registry = RegistryClient(settings)
        self._redis = redis_client or redis.Redis.from_url(settings.redis_url.get_secret_value())
        self._heartbeat = ServiceHeartbeat(self._redis, settings, SERVICE)
        self._desired: dict[str, BridgeSpec | None] = {}
        self._running: dict[str, Runner] = {}
        self.ready = threading.Event()
        """Set once the bridges topic was read up to its end."""

    def run(self, stop: threading.Event) -> None:
        settings = self._settings
        kafka.ensure_topics(kafka.admin_client(settings), kafka.platform_topics(settings))
        self._store.open()
        # Commit policy: none. It never subscribes nor commits (the compacted topic is read from its start
        # on every start); the group id only satisfies the client.
        consumer = Consumer(kafka.consumer_config(settings, f"joey.bridge-control.{settings.instance_id}"))
        consumer.assign([TopicPartition(topics.BRIDGES, 0, OFFSET_BEGINNING)])
        log.info("connector-bridge %s started", settings.instance_id)
        try:
            while not stop.is_set():
                self._follow(consumer)
                if self.ready.is_set():
                    self._reconcile()
                    self._heartbeat.beat()
        finally:
            log.info("connector-bridge %s stopping", settings.instance_id)
            self._stop(list(self._running))
            consumer.close()
            self._heartbeat.retire()
            self._store.close()

    def _follow(self, consumer: Consumer) -> None:
        messages = consumer.consume(500, POLL_S)
        for message in kafka.usable(messages, log):
            key = (message.key() or b"").decode("utf-8", errors="replace")
            value = message.value()
            if value is None:
                self._desired[key] = None
                continue
            try:
                spec = bridges.parse(value)
                if spec.key != key:
                    raise ValueError(f"spec is for {spec.key}")
            except Exception as exc:
                # Whoever can write the topic must not stop the bridges: the record is ignored.
                metrics.REJECTED_SPECS.inc()
                log.error("ignoring bridge record for %r at offset %d: %s", key[:200], message.offset(), exc)
                continue
            self._desired[key] = spec
        if not self.ready.is_set() and not messages and _caught_up(consumer):
            log.info("caught up with %s: %d bridges", topics.BRIDGES, sum(map(bool, self._desired.values())))
            self.ready.set()

    def _reconcile(self) -> None:
        stale = [
            key
            for key, runner in self._running.items()
            if self._desired.get(key) != runner.spec or not runner.alive()
        ]
        self._stop(stale)
        for key, spec in self._desired.items():
            if spec is not None and not spec.paused and key not in self._running:
                runner = RUNNERS[spec.kind](spec, self._settings, self._store, self._registry)
                log.info("running %s %s (%s -> %s)", spec.kind, key, spec.connection, spec.pipeline)
                runner.start()
                self._running[key] = runner

    def _stop(self, keys: list[str]) -> None:
        runners = [self._running.pop(key) for key in keys]
        for runner in runners:
            runner.stop()
        for runner in runners:
            runner.join(STOP_TIMEOUT_S)
            log.info("stopped %s %s", runner.spec.kind, runner.spec.key)


def _caught_up(consumer: Consumer) -> bool:
    # As the engine's: the embedded broker's high-watermark may be the last batch's first offset + 1.
    partition = TopicPartition(topics.BRIDGES, 0)
    low, high = consumer.get_watermark_offsets(partition, timeout=5.0, cached=False)
    position = consumer.position([partition])[0].offset
    return bool(max(position, low) >= high)
