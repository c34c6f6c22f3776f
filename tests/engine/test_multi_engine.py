"""Two `joey serve engine` processes sharing one deployment's replicas, and one taking over when the
other is killed."""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
from confluent_kafka import Consumer, TopicPartition
from test_engine import (
    TopicReader,
    deploy,
    live_children,
    process_state,
    produce,
    request_id,
    wait_for,
)

from joey_core import heartbeats, kafka, topics
from joey_core.settings import CommonSettings
from joey_engine.settings import EngineSettings
from tests.conftest import ServiceProcess

log = logging.getLogger(__name__)

HEARTBEAT_INTERVAL_S = 0.5
LEASE_TTL_S = 3.0
"""Slot leases, replica and engine heartbeats all live this long after their last refresh."""
SESSION_TIMEOUT_S = 6.0
"""The replicas' consumer-group session timeout (joey_core.kafka.consumer_config)."""
TAKEOVER_S = LEASE_TTL_S + SESSION_TIMEOUT_S + 10.0
"""Bound on the takeover: the dead engine's lease and its replica's group session expire, then the new
replica loads the model and joins the group (~3 s); the rest is slack for a busy machine."""

RECORD = b'{"features": [5.1, 3.5, 1.4, 0.2]}'


class Deployed:
    """What Redis says about one deployment: slot leases and replica heartbeats."""

    def __init__(self, client: redis.Redis, prefix: str, spec: Any, partitions: int) -> None:
        self.client, self.prefix, self.spec = client, prefix, spec
        self.ws, self.pipeline = spec.workspace, spec.pipeline
        self.all_partitions = set(range(partitions))

    def slot_holders(self) -> dict[int, str]:
        """Engine instance id holding each slot lease."""
        pattern = f"{self.prefix}:slot:{self.ws}/{self.pipeline}:{self.spec.deployment_id}:*"
        keys: list[bytes] = self.client.keys(pattern)  # type: ignore[assignment]
        return {
            int(key.rsplit(b":", 1)[1]): holder.decode()
            for key, holder in zip(keys, self.client.mget(keys) if keys else [], strict=True)
            if holder is not None
        }

    def replicas(self) -> dict[str, set[int]]:
        """Partitions of every live, loaded replica, by replica id."""
        return {
            view.beat.replica_id: set(view.beat.partitions)
            for view in heartbeats.read(self.client, self.prefix, self.ws, self.pipeline)
            if view.alive and view.beat.loaded and view.beat.deployment_id == self.spec.deployment_id
        }

    def settled(self) -> dict[int, str] | None:
        """Slot holders once exactly ``replicas`` replicas run, one per slot on its holder, holding every
        partition once; else None."""
        holders, running = self.slot_holders(), self.replicas()
        held = list(running.values())
        if (
            len(holders) == self.spec.replicas
            and set(running)
            == {f"{engine}-{self.spec.deployment_id[:8]}-{slot}" for slot, engine in holders.items()}
            and all(held)
            and sum(map(len, held)) == len(self.all_partitions)
            and set().union(*held) == self.all_partitions
        ):
            return holders
        return None


def committed(settings: CommonSettings, group: str, topic: str, partitions: int) -> dict[int, int]:
    consumer = Consumer(kafka.consumer_config(settings, group))
    try:
        found = consumer.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)
        return {tp.partition: tp.offset for tp in found if tp.offset >= 0}
    finally:
        consumer.close()


def ends(positions: dict[str, tuple[int, int]]) -> dict[int, int]:
    """The offset after the last record produced to each partition."""
    found: dict[int, int] = {}
    for partition, offset in positions.values():
        found[partition] = max(found.get(partition, 0), offset + 1)
    return found


def kill9(engine: ServiceProcess) -> list[int]:
    """kill -9 an engine; returns the process ids of its replicas, which exit by themselves."""
    assert engine.process is not None
    children = live_children(engine.process.pid)
    engine.kill9()
    return [pid for pid, command in children.items() if "spawn_main" in command]


def alive(pids: list[int]) -> list[int]:
    return [pid for pid in pids if process_state(pid) not in (None, "Z")]


def test_two_engines_share_a_deployment_and_one_takes_over_from_a_killed_one(
    settings: CommonSettings,
    engine_settings: EngineSettings,
    redis_client: redis.Redis,
    make_spec: Callable[..., Any],
    service_factory: Callable[..., Any],
    artifact_server: tuple[Any, str],
    iris_model: Path,
) -> None:
    token = secrets.token_hex(3)
    ws, pipeline = f"multi-{token}", "iris"
    names = topics.pipeline_topics(ws, pipeline)
    partitions = settings.pipeline_partitions
    assert partitions == 4
    # Redis keys of their own: only these two engines count towards each other's fair share.
    prefix = f"{engine_settings.redis_prefix}:multi-{token}"
    sha = artifact_server[0].add(iris_model.read_bytes())
    ids = [f"multi-a-{token}", f"multi-b-{token}"]
    engines = {
        instance: service_factory(
            "engine",
            JOEY_INSTANCE_ID=instance,
            JOEY_WORKSPACES=json.dumps([ws]),
            JOEY_REGISTRY_ADDR=artifact_server[1],
            JOEY_REDIS_PREFIX=prefix,
            JOEY_HEARTBEAT_INTERVAL_S=str(HEARTBEAT_INTERVAL_S),
            JOEY_HEARTBEAT_TTL_S=str(LEASE_TTL_S),
        )
        for instance in ids
    }

    def logs() -> str:
        return "\n".join(f"--- engine {i}:\n{e.log_text()}" for i, e in engines.items())

    def running(instance: str) -> bool:
        assert engines[instance].alive(), f"engine {instance} exited:\n" + logs()
        return True

    outputs: TopicReader | None = None
    children: list[int] = []
    try:
        wait_for(
            lambda: (
                all(map(running, ids))
                and heartbeats.live_services(redis_client, prefix, "engine") == sorted(ids)
            ),
            "both engines ready",
        )
        # Deployed once both engines announced themselves, each takes its fair share of one replica. An
        # engine announces itself only once it caught up with joey.deployments, and never hands slots
        # back: had the deployment been published before both started, the first one ready would take
        # both slots (what happened in every trial).
        spec = make_spec(ws, pipeline, sha, replicas=2)
        deploy(settings, ws, pipeline, spec)
        state = Deployed(redis_client, prefix, spec, partitions)
        try:
            holders = wait_for(state.settled, "two replicas holding all partitions")
        except TimeoutError:
            raise AssertionError(
                f"slots {state.slot_holders()}, replicas {state.replicas()}\n{logs()}"
            ) from None
        log.info("slot holders: %s; partitions %s", holders, state.replicas())
        assert sorted(holders.values()) == sorted(ids), f"one replica per engine expected: {holders}"

        # Every record answered exactly once while nothing crashes.
        outputs = TopicReader(settings, names.outputs)
        sent = produce(settings, names.inputs, [(f"r-{i}", RECORD) for i in range(500)])
        outputs.read_until(lambda ms: {request_id(m) for m in ms} >= sent.keys(), "500 outputs")
        group = topics.engine_group(ws, pipeline)
        wait_for(
            lambda: committed(settings, group, names.inputs, partitions) == ends(sent),
            f"committed offsets {ends(sent)}",
        )
        answered = Counter(request_id(m) for m in outputs.drain())
        assert answered == Counter(sent.keys()), {r: n for r, n in answered.items() if n != 1}
        served_from = {json.loads(m.value())["metadata"]["partition"] for m in outputs.messages}  # type: ignore[arg-type]
        assert served_from == state.all_partitions

        # kill -9 one engine: its replica exits with it; the other engine takes over its slot.
        victim = holders[0]
        [survivor] = [i for i in ids if i != victim]
        orphans = kill9(engines[victim])
        killed_at = time.monotonic()
        assert len(orphans) == 1, orphans
        children += orphans
        wait_for(lambda: not alive(children), "the killed engine's replica to exit", timeout=15)
        after = produce(settings, names.inputs, [(f"after-{i}", RECORD) for i in range(200)])

        def taken_over() -> dict[int, str] | None:
            running(survivor)
            found = state.settled()
            return found if found and set(found.values()) == {survivor} else None

        try:
            holders = wait_for(taken_over, "the surviving engine to take over", timeout=TAKEOVER_S)
        except TimeoutError:
            raise AssertionError(
                f"slots {state.slot_holders()}, replicas {state.replicas()}\n{logs()}"
            ) from None
        took = time.monotonic() - killed_at
        log.info("engine %s took over in %.1f s: partitions %s", survivor, took, state.replicas())
        outputs.read_until(lambda ms: {request_id(m) for m in ms} >= after.keys(), "outputs after the kill")
        # At least once: the kill may replay what was not committed yet, nothing is lost.
        answered = Counter(request_id(m) for m in outputs.messages)
        assert answered.keys() == sent.keys() | after.keys()
        log.info("answered more than once after the kill: %s", {r: n for r, n in answered.items() if n > 1})
        stopping = time.monotonic()
        assert engines[survivor].stop() == 0, logs()
        log.info("engine %s stopped in %.1f s", survivor, time.monotonic() - stopping)
    finally:
        if outputs is not None:
            outputs.close()
        # Only after a failure are engines left: killed, their replicas vanish from the group without
        # leaving it, whereas stopping both would have replicas of two engines leave at once, which can
        # wedge the embedded broker's group (see Engine._stop).
        for engine in engines.values():
            if engine.alive():
                children += kill9(engine)
        deploy(settings, ws, pipeline, None)
        try:
            wait_for(lambda: not alive(children), "orphaned replicas to exit", timeout=15)
        finally:
            for pid in alive(children):
                os.kill(pid, signal.SIGKILL)
