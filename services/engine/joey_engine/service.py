"""The engine core: follows ``joey.deployments`` and runs the replicas this process holds slots for.

The deployments topic is read from the beginning by a consumer outside any group, so every
engine sees every deployment; the last value per key is the desired state. Replica slots
(Redis leases, see :mod:`joey_engine.slots`) decide which engine runs which replica. Each
replica is a child process (:mod:`joey_engine.replica`); the engine fetches the models into
its cache, starts, stops and restarts the replicas, and reports the ones that cannot run.
"""

from __future__ import annotations

import logging
import math
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import redis
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from prometheus_client import multiprocess

from joey_core import heartbeats, kafka, topics
from joey_core.heartbeats import ServiceHeartbeat
from joey_engine.artifact_cache import ArtifactCache
from joey_engine.deployment import Deployment, parse
from joey_engine.replica import ReplicaProcess, ReplicaSpec
from joey_engine.settings import EngineSettings
from joey_engine.slots import SlotLeases

log = logging.getLogger(__name__)

SERVICE = "engine"

POLL_S = 0.2
"""How long one read of the deployments topic waits; also the pace of reconciliation."""

STOP_TIMEOUT_S = 30.0
"""Longest wait for a replica to finish its batch, commit and leave; then its process is killed."""
REBALANCE_TIMEOUT_S = 15.0
"""Longest wait for the replicas that stay in a group to be reassigned after one left."""


@dataclass
class _Deployed:
    """What this engine does for one deployment."""

    deployment: Deployment
    slots: set[int] = field(default_factory=set)
    replicas: dict[int, ReplicaProcess] = field(default_factory=dict)
    artifacts: tuple[Path, ...] | None = None
    load_error: str = ""
    """Why the models could not be fetched; reported for every slot."""
    failed: dict[int, str] = field(default_factory=dict)
    """Why the last replica of a slot ended, reported until the slot's next replica starts."""
    failures: int = 0
    """Failed loads and crashed replicas so far; sets the backoff before the next attempt."""
    retry_at: float = 0.0


class Engine:
    def __init__(
        self,
        settings: EngineSettings,
        redis_client: redis.Redis | None = None,
        metrics_dir: Path | None = None,
    ) -> None:
        """``metrics_dir``: where replica processes write their metrics, when they are served."""
        self._settings = settings
        self._metrics_dir = metrics_dir
        self._redis = redis_client or redis.Redis.from_url(settings.redis_url)
        service_token = settings.service_token.get_secret_value() if settings.service_token else None
        self._store = ArtifactCache(settings.cache_dir, settings.registry_addr, service_token)
        self._leases = SlotLeases(
            self._redis, settings.redis_prefix, settings.instance_id, settings.heartbeat_ttl_s
        )
        self._desired: dict[str, Deployment | None] = {}
        self._deployed: dict[str, _Deployed] = {}
        self._retiring: dict[str, _Deployed] = {}
        """Deployments replaced by a rollout, serving until their successor is up."""
        self._next_lease_tick = 0.0
        # Refreshed on the lease tick, so it says alive exactly as long as the slot leases do.
        self._heartbeat = ServiceHeartbeat(self._redis, settings, SERVICE, interval_s=0)
        self._live_engines = 1
        self.ready = threading.Event()
        """Set once the engine has read the deployments topic up to its end."""

    def run(self, stop: threading.Event) -> None:
        """Serve until ``stop`` is set, then drain and stop every replica; errors are raised after that."""
        settings = self._settings
        # Creating them here too keeps a missing joey.deployments from being auto-created uncompacted.
        kafka.ensure_topics(kafka.admin_client(settings), kafka.platform_topics(settings))
        # Commit policy: none. It never subscribes nor commits (the compacted topic is read from its
        # start on every start); the group id only satisfies the client.
        consumer = Consumer(kafka.consumer_config(settings, f"joey.engine-control.{settings.instance_id}"))
        consumer.assign([TopicPartition(topics.DEPLOYMENTS, 0, OFFSET_BEGINNING)])
        log.info("engine %s started", settings.instance_id)
        try:
            while not stop.is_set():
                self._follow(consumer)
                if self.ready.is_set():
                    self._reconcile()
        finally:
            log.info("engine %s stopping", settings.instance_id)
            everything = [*self._retiring.values(), *self._deployed.values()]
            self._stop([(state, set(state.slots)) for state in everything])
            self._retiring.clear()
            self._deployed.clear()
            consumer.close()
            self._heartbeat.retire()

    def _follow(self, consumer: Consumer) -> None:
        messages = consumer.consume(500, POLL_S)
        for message in kafka.usable(messages, log):
            key = (message.key() or b"").decode("utf-8", errors="replace")
            if self._settings.workspaces and key.partition("/")[0] not in self._settings.workspaces:
                continue
            value = message.value()
            if value is None:
                self._desired[key] = None
                continue
            try:
                deployment = parse(value)
                if deployment.key != key:
                    raise ValueError(f"spec is for {deployment.key}")
            except ValueError as exc:
                log.error("ignoring deployment record for %r at offset %d: %s", key, message.offset(), exc)
                continue
            self._desired[key] = deployment
        if not self.ready.is_set() and not messages and self._caught_up(consumer):
            log.info(
                "caught up with %s: %d deployments",
                topics.DEPLOYMENTS,
                sum(map(bool, self._desired.values())),
            )
            self.ready.set()

    @staticmethod
    def _caught_up(consumer: Consumer) -> bool:
        # The embedded broker's high-watermark can be the first offset of the last batch (+1) rather than
        # the log end, but that whole batch arrives with its first record, so passing it means all was read.
        partition = TopicPartition(topics.DEPLOYMENTS, 0)
        low, high = consumer.get_watermark_offsets(partition, timeout=5.0, cached=False)
        position = consumer.position([partition])[0].offset
        return bool(max(position, low) >= high)

    def _reconcile(self) -> None:
        now = time.monotonic()
        lease_tick = now >= self._next_lease_tick
        if lease_tick:
            self._next_lease_tick = now + self._settings.heartbeat_interval_s
            self._announce()
        changed = set()
        for key, state in list(self._deployed.items()):
            wanted = self._desired.get(key)
            if wanted is None:
                log.info("undeploying %s", state.deployment)
                retiring = self._retiring.pop(key, None)
                self._stop([(s, set(s.slots)) for s in (retiring, state) if s is not None])
                del self._deployed[key]
            elif wanted.deployment_id != state.deployment.deployment_id:
                self._roll_out(key, state, wanted)
            elif wanted != state.deployment:
                log.info("%s now has %d replicas", wanted, wanted.replicas)
                state.deployment = wanted
                changed.add(key)
        for key, wanted in self._desired.items():
            if wanted is not None and key not in self._deployed:
                self._deployed[key] = _Deployed(wanted)
                changed.add(key)
        if changed and not lease_tick:
            # A fair share needs today's count of engines: one may have started since the last tick.
            self._count_live_engines()
        for key, wanted in self._desired.items():
            if wanted is None:
                continue
            state = self._deployed[key]
            # A new or rescaled deployment claims its slots now rather than at the next lease tick.
            if lease_tick or key in changed:
                try:
                    self._maintain_slots(state)
                except redis.RedisError as exc:
                    log.warning("cannot maintain replica slots of %s: %s", wanted, exc)
            self._supervise(state, now)
        if self._retiring:
            # Every pass, so the replaced replicas stop as soon as their successors are up.
            self._retire_replaced()

    def _roll_out(self, key: str, state: _Deployed, wanted: Deployment) -> None:
        """Start ``wanted`` beside ``state``, which keeps serving until ``wanted`` is up (make before
        break): both are members of the pipeline's consumer group, and each batch runs in one replica,
        so every record is answered by one version, named in its output and log row."""
        serving = self._retiring.get(key)
        if serving is None:
            log.info("rolling out %s; %s serves until it is up", wanted, state.deployment)
            self._retiring[key] = state
        else:
            # Replaced before it was up: the deployment still serving stays until the newest is up.
            log.info(
                "rolling out %s instead of %s; %s serves until it is up", wanted, state.deployment, serving
            )
            self._stop([(state, set(state.slots))], staying=list(serving.replicas.values()))
        del self._deployed[key]

    def _retire_replaced(self) -> None:
        for key, old in list(self._retiring.items()):
            # Replicas of a replaced deployment are not restarted: their partitions go to the group's others.
            for slot, replica in list(old.replicas.items()):
                if not replica.running:
                    log.warning(
                        "replica %s of replaced %s ended: %s",
                        replica.replica_id,
                        old.deployment,
                        replica.error,
                    )
                    del old.replicas[slot]
                    self._close(replica)
            new = self._deployed.get(key)
            if new is None or not self._is_up(new.deployment):
                continue
            log.info("%s is up; stopping the replicas of %s", new.deployment, old.deployment)
            self._stop([(old, set(old.slots))], staying=list(new.replicas.values()))
            del self._retiring[key]

    def _is_up(self, deployment: Deployment) -> bool:
        """Whether every replica of ``deployment``, on whichever engine, has loaded and joined the group."""
        settings = self._settings
        try:
            views = heartbeats.read(
                self._redis, settings.redis_prefix, deployment.workspace, deployment.pipeline
            )
        except redis.RedisError as exc:
            log.warning("cannot read the replicas of %s: %s", deployment, exc)
            return False
        up = [
            v
            for v in views
            if v.alive
            and v.beat.deployment_id == deployment.deployment_id
            and v.beat.loaded
            and v.beat.assigned
            and not v.beat.error
        ]
        return len(up) >= deployment.replicas

    def _announce(self) -> None:
        if self._heartbeat.beat():
            self._count_live_engines()

    def _count_live_engines(self) -> None:
        try:
            self._live_engines = max(1, len(self._heartbeat.live_instances()))
        except redis.RedisError as exc:
            log.warning("cannot count the live engines: %s", exc)

    def _maintain_slots(self, state: _Deployed) -> None:
        deployment = state.deployment
        lost = {slot for slot in state.slots if not self._leases.renew(deployment, slot)}
        if lost:
            log.warning(
                "slots %s of %s went to another engine; stopping their replicas", sorted(lost), deployment
            )
            self._stop([(state, lost)])
        excess = {slot for slot in state.slots if slot >= deployment.replicas}
        if excess:
            log.info("scaling %s down: stopping the replicas of slots %s", deployment, sorted(excess))
            self._stop([(state, excess)])
        # Taking at most a fair share leaves slots for the other engines.
        share = math.ceil(deployment.replicas / self._live_engines)
        for slot in range(deployment.replicas):
            if len(state.slots) >= share:
                break
            if slot not in state.slots and self._leases.claim(deployment, slot):
                log.info("claimed replica slot %d of %s", slot, deployment)
                state.slots.add(slot)
        # A running replica reports itself; the engine speaks for slots that have none (why they failed,
        # or that the models are being fetched) and for replicas whose process is still starting, which
        # can take seconds on a busy machine.
        starting = {slot for slot, replica in state.replicas.items() if not replica.reported}
        for slot in (state.slots - state.replicas.keys()) | starting:
            error = "" if slot in starting else state.load_error or state.failed.get(slot, "")
            detail = "starting the replica process" if slot in starting else "fetching models"
            beat = heartbeats.ReplicaHeartbeat(
                self._replica_id(deployment, slot),
                deployment.deployment_id,
                deployment.pipeline_version,
                loaded=False,
                error=error,
                host=socket.gethostname(),
                phase="" if error else "starting",
                detail="" if error else detail,
            )
            self._publish(deployment, beat)

    def _supervise(self, state: _Deployed, now: float) -> None:
        deployment = state.deployment
        for slot, replica in list(state.replicas.items()):
            if not replica.running:
                del state.replicas[slot]
                error = replica.error or "replica process exited without being asked to"
                self._close(replica)
                state.failed[slot] = error
                delay = self._backoff(state, now)
                log.warning(
                    "replica %s of %s failed (%s); restarting it in %.0f s",
                    replica.replica_id,
                    deployment,
                    error,
                    delay,
                )
                self._next_lease_tick = now  # report the error right away
        if not state.slots or now < state.retry_at:
            return
        if state.artifacts is None:
            try:
                state.artifacts = self._fetch(deployment)
            except Exception as exc:
                state.load_error = f"cannot load {deployment}: {exc}"
                delay = self._backoff(state, now)
                log.error("%s (attempt %d; retrying in %.0f s)", state.load_error, state.failures, delay)
                self._next_lease_tick = now  # report the error right away
                return
            state.load_error = ""
            state.failures = 0
        for slot in sorted(state.slots - state.replicas.keys()):
            spec = ReplicaSpec(
                self._settings, deployment, state.artifacts, self._replica_id(deployment, slot)
            )
            state.replicas[slot] = ReplicaProcess(spec).start()
            state.failed.pop(slot, None)
            self._next_lease_tick = now  # report it as starting right away

    def _backoff(self, state: _Deployed, now: float) -> float:
        state.failures += 1
        delay = min(self._settings.load_retry_max_s, 2.0 ** (state.failures - 1))
        state.retry_at = now + delay
        return delay

    def _fetch(self, deployment: Deployment) -> tuple[Path, ...]:
        """The model of every model step and challenger in the local cache; the replicas load them."""
        return tuple(
            self._store.fetch(deployment.workspace, step.sha256) for step in deployment.artifact_steps
        )

    def _stop(self, parts: list[tuple[_Deployed, set[int]]], staying: Sequence[ReplicaProcess] = ()) -> None:
        """Stop the replicas of the given slots, then give the slots up.

        The replicas of one deployment share a consumer group and leave it one at a time, each once the
        group has settled after the previous one left: the embedded broker drops a LeaveGroup that arrives
        during a rebalance and then never completes a rebalance of that group again. Different
        deployments stop in parallel. ``staying`` are more members of the same groups that stay (the
        successor's replicas in a rollout).
        """
        queues = [
            [state.replicas.pop(s) for s in sorted(slots) if s in state.replicas] for state, slots in parts
        ]
        while any(queues):
            leaving = [queue.pop() for queue in queues if queue]
            remaining = [
                w
                for (state, _), queue in zip(parts, queues, strict=True)
                for w in [*queue, *state.replicas.values()]
            ] + list(staying)
            generations = [w.assignments for w in remaining]
            for replica in leaving:
                replica.stop()
            for replica in leaving:
                if not replica.join(STOP_TIMEOUT_S):
                    log.error(
                        "replica %s did not stop within %.0f s; killing it",
                        replica.replica_id,
                        STOP_TIMEOUT_S,
                    )
                    replica.kill()
                    replica.join()
                self._close(replica)
            deadline = time.monotonic() + REBALANCE_TIMEOUT_S
            while time.monotonic() < deadline and any(
                w.running and w.assignments == before
                for w, before in zip(remaining, generations, strict=True)
            ):
                time.sleep(0.05)
        for state, slots in parts:
            deployment = state.deployment
            for slot in slots:
                state.slots.discard(slot)
                state.failed.pop(slot, None)
                try:
                    self._leases.release(deployment, slot)
                    # Also clears heartbeats reporting a load error or a crash for the slot.
                    heartbeats.retire(
                        self._redis,
                        self._settings.redis_prefix,
                        deployment.workspace,
                        deployment.pipeline,
                        self._replica_id(deployment, slot),
                    )
                except redis.RedisError as exc:
                    log.warning("cannot release slot %d of %s: %s", slot, deployment, exc)

    def _close(self, replica: ReplicaProcess) -> None:
        """Forget a replica whose process ended."""
        replica.close()
        if self._metrics_dir and replica.pid is not None:
            # Otherwise the gauges of a killed replica would keep counting it.
            multiprocess.mark_process_dead(replica.pid, str(self._metrics_dir))

    def replica_pids(self, key: str) -> dict[str, int]:
        """Process id of each running replica of deployment ``key`` (workspace/pipeline), by replica id."""
        state = self._deployed.get(key)
        replicas = list(state.replicas.values()) if state else []
        return {replica.replica_id: replica.pid for replica in replicas if replica.pid is not None}

    def _replica_id(self, deployment: Deployment, slot: int) -> str:
        # Unique per deployment too: during a rollout a slot has a replica of each deployment.
        return f"{self._settings.instance_id}-{deployment.deployment_id[:8]}-{slot}"

    def _publish(self, deployment: Deployment, beat: heartbeats.ReplicaHeartbeat) -> None:
        settings = self._settings
        heartbeats.publish(
            self._redis,
            settings.redis_prefix,
            deployment.workspace,
            deployment.pipeline,
            beat,
            settings.heartbeat_ttl_s,
        )
