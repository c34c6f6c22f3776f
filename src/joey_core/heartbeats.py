"""Heartbeats in Redis: engine replicas' (read by the registry's status) and every service instance's
(:class:`ServiceHeartbeat`, read by `joey up` and the engines to know who is ready).

Two keys per replica:
* ``<prefix>:hb:<workspace>/<pipeline>:<replica_id>`` holds the latest heartbeat, with a TTL:
  while it exists the replica is alive.
* ``<prefix>:replicas:<workspace>/<pipeline>`` is a hash replica_id -> last heartbeat,
  without TTL, so a replica whose key expired can still be reported as dead.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import redis

from joey_core.settings import ServiceSettings

log = logging.getLogger(__name__)


@dataclass
class ReplicaHeartbeat:
    replica_id: str
    deployment_id: str
    pipeline_version: int
    loaded: bool
    partitions: list[int] = field(default_factory=list)
    error: str = ""
    host: str = ""
    sent_at: float = field(default_factory=time.time)
    assigned: bool = False
    """Joined the consumer group: the group has assigned it partitions (possibly none) at least once."""
    queue_age_s: float = 0.0
    """The longest a record taken since the previous heartbeat had waited in the inputs topic."""
    phase: str = ""
    """Where the replica is in its start: "starting" (its engine fetches the models), "loading" (its process
    loads them), "joining" (loaded, waiting for partitions) or "running"; empty from older engines."""
    detail: str = ""
    """What the phase is doing, for people, e.g. "starting 1 python step sandbox"."""

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str | bytes) -> ReplicaHeartbeat:
        data: dict[str, Any] = json.loads(text)
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


def _live_key(prefix: str, workspace: str, pipeline: str, replica_id: str) -> str:
    return f"{prefix}:hb:{workspace}/{pipeline}:{replica_id}"


def _index_key(prefix: str, workspace: str, pipeline: str) -> str:
    return f"{prefix}:replicas:{workspace}/{pipeline}"


def publish(
    client: redis.Redis, prefix: str, workspace: str, pipeline: str, beat: ReplicaHeartbeat, ttl_s: float
) -> None:
    beat.sent_at = time.time()
    payload = beat.to_json()
    pipe = client.pipeline()
    pipe.set(_live_key(prefix, workspace, pipeline, beat.replica_id), payload, px=int(ttl_s * 1000))
    pipe.hset(_index_key(prefix, workspace, pipeline), beat.replica_id, payload)
    pipe.execute()


def retire(client: redis.Redis, prefix: str, workspace: str, pipeline: str, replica_id: str) -> None:
    """Remove a replica that stopped cleanly (a crashed one stays listed as dead)."""
    pipe = client.pipeline()
    pipe.delete(_live_key(prefix, workspace, pipeline, replica_id))
    pipe.hdel(_index_key(prefix, workspace, pipeline), replica_id)
    pipe.execute()


@dataclass
class ReplicaView:
    beat: ReplicaHeartbeat
    alive: bool


def read(client: redis.Redis, prefix: str, workspace: str, pipeline: str) -> list[ReplicaView]:
    """Every replica known for the pipeline, alive or dead, sorted by replica id."""
    return read_many(client, prefix, [(workspace, pipeline)])[(workspace, pipeline)]


def read_many(
    client: redis.Redis, prefix: str, pipelines: list[tuple[str, str]]
) -> dict[tuple[str, str], list[ReplicaView]]:
    """``read`` for each (workspace, pipeline) at once: two round trips to Redis however many."""
    pipe = client.pipeline(transaction=False)
    for workspace, pipeline in pipelines:
        pipe.hgetall(_index_key(prefix, workspace, pipeline))
    indexes: list[dict[bytes, bytes]] = pipe.execute() if pipelines else []
    keys = [
        _live_key(prefix, workspace, pipeline, rid.decode())
        for (workspace, pipeline), index in zip(pipelines, indexes, strict=True)
        for rid in sorted(index)
    ]
    live = iter(client.mget(keys) if keys else [])
    views: dict[tuple[str, str], list[ReplicaView]] = {}
    for key, index in zip(pipelines, indexes, strict=True):
        views[key] = []
        for rid in sorted(index):
            current = next(live)
            text = current if current is not None else index[rid]
            views[key].append(ReplicaView(ReplicaHeartbeat.from_json(text), alive=current is not None))
    return views


def forget_dead(client: redis.Redis, prefix: str, workspace: str, pipeline: str, older_than_s: float) -> None:
    """Drop dead replicas last seen more than ``older_than_s`` ago from the index."""
    cutoff = time.time() - older_than_s
    for view in read(client, prefix, workspace, pipeline):
        if not view.alive and view.beat.sent_at < cutoff:
            client.hdel(_index_key(prefix, workspace, pipeline), view.beat.replica_id)


def forget_pipeline(client: redis.Redis, prefix: str, workspace: str, pipeline: str) -> None:
    """Drop every replica known for a deleted pipeline, so a new one of the same name starts with none."""
    ids = [k.decode() for k in client.hkeys(_index_key(prefix, workspace, pipeline))]  # type: ignore[union-attr]
    pipe = client.pipeline()
    for rid in ids:
        pipe.delete(_live_key(prefix, workspace, pipeline, rid))
    pipe.delete(_index_key(prefix, workspace, pipeline))
    pipe.execute()


def _service_key(prefix: str, service: str, instance: str) -> str:
    return f"{prefix}:svc:{service}:{instance}"


def live_services(client: redis.Redis, prefix: str, service: str) -> list[str]:
    """Instance ids of the ready instances of ``service``."""
    keys: list[bytes] = client.keys(_service_key(prefix, service, "*"))  # type: ignore[assignment]
    return sorted(k.decode().rsplit(":", 1)[1] for k in keys)


class ServiceHeartbeat:
    """Marks one service instance ready in Redis for ``heartbeat_ttl_s``, refreshed every ``interval_s``.

    Readiness is advisory: a Redis outage is logged and never stops the service's work.
    """

    def __init__(
        self, client: redis.Redis, settings: ServiceSettings, service: str, interval_s: float | None = None
    ) -> None:
        self.client = client
        self.service = service
        self.interval_s = settings.heartbeat_ttl_s / 3 if interval_s is None else interval_s
        self._prefix = settings.redis_prefix
        self._key = _service_key(settings.redis_prefix, service, settings.instance_id)
        self._ttl_ms = int(settings.heartbeat_ttl_s * 1000)
        self._next = 0.0

    def beat(self) -> bool:
        """Refresh the heartbeat if it is due; True when it was refreshed."""
        now = time.monotonic()
        if now < self._next:
            return False
        self._next = now + self.interval_s
        payload = json.dumps({"at": time.time()})
        try:
            self.client.set(self._key, payload, px=self._ttl_ms)
        except redis.RedisError as exc:
            log.warning("cannot publish the %s heartbeat: %s", self.service, exc)
            return False
        return True

    def live_instances(self) -> list[str]:
        """The ready instances of this service, this one included once it has beaten."""
        return live_services(self.client, self._prefix, self.service)

    def retire(self) -> None:
        """Stop counting as ready, at once rather than when the heartbeat expires."""
        try:
            self.client.delete(self._key)
        except redis.RedisError as exc:
            log.warning("cannot retire the %s heartbeat: %s", self.service, exc)
